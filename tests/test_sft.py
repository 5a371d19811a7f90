"""Supervised fine-tuning: the loss it reports is real, it learns, and its output loads."""

from __future__ import annotations

import json

import pytest
import torch

from textenv import TextGenEnv
from textenv.lm.models import load_causal_lm, load_tokenizer
from textenv.training.sft import SFTExample, encode_examples, heldout_loss, load_sft_examples, supervised_finetune

from agents.cli import sft


def test_prompt_tokens_are_conditioned_on_not_learned(default_tokenizer):
    ((ids, first_learned),) = encode_examples(default_tokenizer, [SFTExample("12+7=", "19")], max_length=32)
    prompt = default_tokenizer("12+7=")["input_ids"]
    assert ids[: len(prompt)] == prompt and first_learned == len(prompt)
    assert ids[-1] == default_tokenizer.eos_token_id
    ((plain, first_plain),) = encode_examples(default_tokenizer, ["The film was great."], max_length=32)
    assert first_plain == 1  # plain text: every token after the first is learned


def test_heldout_loss_matches_a_direct_cross_entropy(tiny_model_path):
    model, tokenizer = load_causal_lm(str(tiny_model_path)), load_tokenizer(str(tiny_model_path))
    examples = [SFTExample("3+4=", "7"), SFTExample("", "The film was fun.")]
    reported = heldout_loss(model, encode_examples(tokenizer, examples, 32), tokenizer.pad_token_id)
    losses, counts = [], []
    for ids, first in encode_examples(tokenizer, examples, 32):
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
        nll = [-logprobs[t - 1, ids[t]].item() for t in range(first, len(ids))]
        losses.append(sum(nll))
        counts.append(len(nll))
    assert reported == pytest.approx(sum(losses) / sum(counts), abs=1e-5)


def test_sft_lowers_heldout_loss_on_a_new_corpus(tiny_model_path):
    from textenv.tasks.arithmetic import arithmetic_problems

    train, heldout = arithmetic_problems()
    model, tokenizer = load_causal_lm(str(tiny_model_path)), load_tokenizer(str(tiny_model_path))
    result = supervised_finetune(
        model, tokenizer, [SFTExample(p, a) for p, a in train], [SFTExample(p, a) for p, a in heldout[:60]],
        steps=150, learning_rate=3e-3, max_length=16, progress=False,
    )
    assert result.heldout_loss_after < result.heldout_loss_before - 1.0


def test_sft_script_trains_logs_and_saves_a_model_the_env_loads(tmp_path, tiny_model_path):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"{a}+1=", "completion": str(a + 1)}) for a in range(40)))
    summary = sft.run(["--model", str(tiny_model_path), "--data", str(data), "--output", str(tmp_path / "out"),
                        "--steps", "60", "--learning-rate", "3e-3", "--heldout-fraction", "0.1",
                        "--tensorboard-log", str(tmp_path / "tb"), "--quiet"])
    assert summary["heldout_loss_after"] < summary["heldout_loss_before"]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    env = TextGenEnv(["5+1="], model=str(tmp_path / "out"), max_prompt_len=8, max_new_tokens=3)
    assert env.reset(seed=0)[0]["attention_mask"].sum() == len(env.prompt_ids[0])


def test_corpus_files_are_read_and_bad_ones_refused(tmp_path):
    text = tmp_path / "c.txt"
    text.write_text("first line\n\nsecond line\n")
    assert load_sft_examples(text) == [SFTExample("", "first line"), SFTExample("", "second line")]
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"question": "x"}\n')
    with pytest.raises(ValueError, match="needs 'prompt' and 'completion'"):
        load_sft_examples(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sft_examples(tmp_path / "missing.txt")
