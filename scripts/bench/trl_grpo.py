"""TRL's ``GRPOTrainer`` on a benchmark workload: what users pick instead of textenv's GRPO.

    pip install -e ".[bench]"                        # trl>=1.16
    PYTHONPATH=scripts python -m bench.trl_grpo --workload S    # prints generated tokens/s (CPU, 2 threads)

``scripts/benchmark.py --group`` runs ``measure_trl_grpo`` in a child process of its own,
beside textenv's GRPO and the one-page floor (``scripts/grpo_reference.py``), on the same
workload: the same locally built random GPT-2 folder and tokenizer (``build_assets``,
nothing downloaded), the same prompts, VADER on prompt + completion as the reward (the
framework's ``reward="vader"``, the same per-completion cost), ``num_generations`` = the
group size (4), ``max_completion_length`` = ``new_tokens`` with every completion forced
to the full length (``min_new_tokens``: the EOS is suppressed, as the built workloads have
none; on workload R, the real checkpoint's chats, completions end at its EOS as in textenv,
and the tokens generated are counted),
``num_iterations`` = ``n_epochs``, ``minibatches`` optimizer steps per pass over the
generation batch (``per_device_train_batch_size`` = completions / minibatches,
``steps_per_generation`` = minibatches, no gradient accumulation), the same fixed beta,
clip epsilon 0.2, gradient-norm clipping at 1.0, dropout off, fp32, ``use_vllm=False``,
no gradient checkpointing (TRL's default is on; the others do not checkpoint), no
logging, reporting or saving. It times whole iterations (``n_epochs x minibatches``
trainer steps each, generation included) after one warm-up iteration.

What TRL does differently (read in trl 1.16's ``GRPOTrainer``), all of it in its favour
or its cost, not in the work asked:

- decoding: ``model.generate`` (transformers' sampling loop with a dynamic KV cache and
  its logits processors), prompts left-padded to the longest of the batch rather than to
  the workload's ``max_prompt_len``;
- old log-probs: with ``num_iterations > 1`` it recomputes them in an extra no-grad
  teacher-forced pass over the generation batch (textenv and the floor keep the decode's,
  which equal a recomputation in fp32); the reference's log-probs in a second such pass,
  with a second copy of the model (as textenv and the floor);
- the update's forward: a fused, tiled LM head (``add_fused_lm_head``) that returns the
  sampled tokens' log-probs and the entropy without materialising the (tokens, vocab)
  logits; the entropy is computed for logging;
- loss: ``loss_type="dapo"`` (default), the token mean over the accumulated batch: with
  no accumulation the minibatch's token mean, as textenv's ``token_mean``; the KL term is
  k3, ``exp(ref - logp) - (ref - logp) - 1``, added per token, as textenv's;
- advantages: ``(R - mean) / (std + 1e-4)`` per group (``scale_rewards="group"``), as
  textenv's GRPO; AdamW (weight decay 0) with a linear learning-rate decay;
- the Trainer around it: accelerate, a dataloader with a repeat sampler, callbacks.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.workloads import GROUP_KL_COEF as BETA, GROUP_SIZE  # what textenv's GRPO and the floor get
from bench.workloads import Workload, build_assets, workload_named

DIFFERENCES = (
    "TRL decodes with `model.generate` (prompts padded to the batch's longest), recomputes the old log-probs "
    "in an extra no-grad pass (num_iterations > 1), scores the update with a fused tiled LM head (log-probs "
    "and entropy, no full logits), and runs inside HF Trainer/accelerate; its loss (dapo: token mean, k3 KL in "
    "the loss) and group advantages are textenv's; AdamW with linear LR decay"
)


def grpo_config(workload: Workload, output_dir: str, iterations: int, beta: float = BETA,
                group_size: int = GROUP_SIZE, bf16: bool = False, use_cpu: bool = True):
    """The ``GRPOConfig`` of ``workload``: one warm-up and ``iterations`` timed iterations of
    ``n_epochs x minibatches`` optimizer steps each (module doc)."""
    from trl import GRPOConfig

    if workload.n_envs % group_size or workload.n_envs % workload.minibatches:
        raise ValueError(f"{workload.name}: {workload.n_envs} completions do not split into groups of "
                         f"{group_size} and into {workload.minibatches} minibatches")
    steps_per_iteration = workload.n_epochs * workload.minibatches
    return GRPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=workload.n_envs // workload.minibatches,
        gradient_accumulation_steps=1,
        steps_per_generation=workload.minibatches,  # generation batch: all n_envs completions
        num_generations=group_size,
        max_completion_length=workload.new_tokens,
        # The full length, always, where the workload's completions have it (no EOS to stop at).
        generation_kwargs={"min_new_tokens": workload.new_tokens} if workload.full_length else None,
        temperature=1.0, top_p=1.0, top_k=0,
        num_iterations=workload.n_epochs,
        beta=beta,
        epsilon=0.2,
        loss_type="dapo",
        scale_rewards="group",
        learning_rate=2e-4,
        max_grad_norm=1.0,
        max_steps=steps_per_iteration * (1 + iterations),
        use_vllm=False,
        gradient_checkpointing=False,
        disable_dropout=True,
        bf16=bf16, fp16=False,
        use_cpu=use_cpu,
        report_to=[], logging_strategy="no", save_strategy="no", eval_strategy="no",
        log_completions=False, disable_tqdm=True,
        dataloader_num_workers=0, seed=0,
    )


class IterationClock:
    """``perf_counter`` at the end of every trainer step (a ``TrainerCallback``)."""

    def __init__(self):
        from transformers import TrainerCallback

        clock = self
        self.step_ends: list[float] = []

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                clock.step_ends.append(time.perf_counter())

        self.callback = _Callback()


def text_of(message: str | list[dict[str, str]]) -> str:
    """A prompt or completion as TRL hands it to a reward function: the text itself, or for a
    chat (a conversational dataset) the content of its last message."""
    return message if isinstance(message, str) else message[-1]["content"]


def measure_trl_grpo(workload: Workload, model_path: Path, prompts: list[str], device: torch.device,
                     iterations: int, autocast: bool = False, lora: dict[str, Any] | None = None) -> dict[str, Any]:
    """``iterations`` timed GRPO iterations of TRL's trainer after a warm-up one:
    ``{"seconds", "tokens", "completion_tokens_seen"}``. A chat workload's prompts are user
    messages (TRL renders them with the chat template, as textenv's env does); ``lora``: the
    adapters of textenv's ``policy_kwargs["lora"]`` (``policies.lora.LORA_DEFAULTS`` fill the
    rest), given to TRL as its ``peft_config`` (its reference: the base, adapters off)."""
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import GRPOTrainer
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    transformers.utils.logging.set_verbosity_error()
    analyzer = SentimentIntensityAnalyzer()
    completion_tokens = []

    def vader(prompts: list[str], completions: list[str], completion_ids: list[list[int]] | None = None,
              **kwargs) -> list[float]:
        """VADER on prompt + completion, per completion (the framework's reward="vader")."""
        if completion_ids is not None:
            completion_tokens.append(sum(len(ids) for ids in completion_ids))
        return [analyzer.polarity_scores(f"{text_of(p)} {text_of(c)}")["compound"]
                for p, c in zip(prompts, completions)]

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    if tokenizer.eos_token is None:
        # The built workloads' tokenizer has no EOS; TRL needs one. "[UNK]", suppressed anyway by min_new_tokens.
        tokenizer.eos_token = "[UNK]"
    model = AutoModelForCausalLM.from_pretrained(str(model_path))
    dataset = {"prompt": [[{"role": "user", "content": p}] for p in prompts] if workload.chat else list(prompts)}
    peft_config = None
    if lora is not None:
        from peft import LoraConfig

        from policies.lora import LORA_DEFAULTS

        peft_config = LoraConfig(task_type="CAUSAL_LM", **{**LORA_DEFAULTS, **lora})
    with tempfile.TemporaryDirectory() as output_dir:
        config = grpo_config(workload, output_dir, iterations, bf16=autocast, use_cpu=device.type == "cpu")
        clock = IterationClock()
        trainer = GRPOTrainer(model=model, reward_funcs=vader, args=config,
                              train_dataset=Dataset.from_dict(dataset), peft_config=peft_config,
                              processing_class=tokenizer, callbacks=[clock.callback])
        trainer.remove_callback(PrinterCallback)  # no logs printed
        trainer.train()
    steps_per_iteration = workload.n_epochs * workload.minibatches
    ends = clock.step_ends
    if len(ends) != steps_per_iteration * (1 + iterations):
        raise RuntimeError(f"TRL ran {len(ends)} steps, expected {steps_per_iteration * (1 + iterations)}")
    seconds = ends[-1] - ends[steps_per_iteration - 1]  # from the end of the warm-up iteration
    tokens = workload.tokens_per_iteration * iterations
    seen = sum(completion_tokens[1:]) if completion_tokens else None
    if not workload.full_length:  # completions end at EOS: the tokens generated, EOS included
        tokens = seen
    elif seen is not None and seen != tokens:
        raise RuntimeError(f"TRL generated {seen} completion tokens in the timed iterations, expected {tokens}: "
                           "completions were not of the full length")
    return {"seconds": seconds, "tokens": tokens, "completion_tokens_seen": seen}


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="S")
    parser.add_argument("--iterations", type=int, default=None, help="timed iterations (default: the workload's)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    workload = workload_named(args.workload)
    iterations = args.iterations or workload.iterations
    with tempfile.TemporaryDirectory() as folder:
        model_path, prompts = build_assets(workload, Path(folder))
        result = measure_trl_grpo(workload, model_path, prompts, torch.device("cpu"), iterations)
    print(f"TRL GRPOTrainer on {workload.name} ({iterations} iterations, {args.threads} threads): "
          f"{result['tokens'] / result['seconds']:,.0f} generated tok/s "
          f"({result['completion_tokens_seen']} completion tokens timed"
          f"{', every completion of the full length' if workload.full_length else ', completions end at EOS'})")
    return result


if __name__ == "__main__":
    main()
