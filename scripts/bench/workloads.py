"""The workloads ``scripts/benchmark.py`` measures, and their assets (built here, no downloads).

S, M, L: randomly initialised GPT-2 models and a word-level tokenizer over the project's
review corpus; prompts are 8-16 random words, and the tokenizer has no EOS token,
so every episode runs its full ``new_tokens``. ``Workload.iterations`` is the
default number of timed iterations: 16,384 generated tokens per variant on S,
8,192 on M, 2,048 on L (one iteration: minutes on a 2-core CPU). ``workload_named``
also reads ``"S@512"``: workload S with 512 new tokens per episode, for the
episode-length scaling.

R: the real checkpoint (``model="smollm2-135m-instruct"``, SmolLM2-135M-Instruct, 135M
parameters, vocabulary 49,152) on a chat task, the issue's setting: 8 episodes of 8 new
tokens after a chat prompt (the model's chat template with its default system prompt,
34-45 tokens, left-padded to 48), PPO's defaults (4 epochs of one 64-token minibatch);
full fine-tune and LoRA (``R_LORA``). Its assets are the installed checkpoint and
``CHAT_PROMPTS``; without the checkpoint ``real_checkpoint_problem`` says how to install it.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Workload:
    name: str
    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    n_envs: int
    new_tokens: int
    prompt_tokens: tuple[int, int] = (8, 16)
    n_epochs: int = 4
    minibatches: int = 4
    iterations: int = 1  # default number of timed iterations
    model: str | None = None  # a built-in checkpoint by name; None: a random GPT-2 of this shape, built here
    chat: bool = False  # prompts are user messages, rendered with the model's chat template

    @property
    def max_prompt_len(self) -> int:
        return self.prompt_tokens[1]

    @property
    def tokens_per_iteration(self) -> int:
        return self.n_envs * self.new_tokens

    @property
    def full_length(self) -> bool:
        """Every completion runs ``new_tokens``: the built workloads' tokenizer has no EOS. A
        checkpoint's chats end at its EOS in the framework and in TRL (the floors run on)."""
        return self.model is None


WORKLOADS = {
    "S": Workload("S", n_layer=2, n_embd=128, n_head=4, vocab_size=1000, n_envs=16, new_tokens=32, iterations=32),
    "M": Workload("M", n_layer=4, n_embd=256, n_head=4, vocab_size=8000, n_envs=32, new_tokens=64, iterations=4),
    # GPT-2-124M's shape and vocabulary; 16 x 128 tokens keeps an iteration at minutes on a 2-core CPU.
    "L": Workload("L", n_layer=12, n_embd=768, n_head=12, vocab_size=50_257, n_envs=16, new_tokens=128, iterations=1),
    # A seconds-long workload for smoke tests of the benchmark itself.
    "tiny": Workload("tiny", n_layer=1, n_embd=32, n_head=2, vocab_size=300, n_envs=4, new_tokens=6, minibatches=2),
    # The real checkpoint (its shape for the record: SmolLM2-135M-Instruct's config) on a chat task.
    "R": Workload("R", n_layer=30, n_embd=576, n_head=9, vocab_size=49_152, n_envs=8, new_tokens=8,
                  prompt_tokens=(48, 48), n_epochs=4, minibatches=1, iterations=1, model="smollm2-135m-instruct",
                  chat=True),
}

#: GRPO and RLOO: completions per prompt, and the fixed beta of the k3 KL in the loss (the fast
#: path, the floor and TRL's GRPOTrainer get the same: bench.measure, bench.trl_grpo).
GROUP_SIZE = 4
GROUP_KL_COEF = 0.04

#: Workload R's LoRA adapters (the issue's rank).
R_LORA = {"r": 8}

#: Workload R's prompts: user messages, each rendered with the chat template (34-45 tokens).
CHAT_PROMPTS = [
    "Write a haiku about the sea.",
    "What is the capital of France? Answer in one sentence.",
    "Tell me a short joke about cats.",
    "Explain gravity to a child in two sentences.",
    "Give me three tips for sleeping better.",
    "Describe a sunset in one sentence.",
    "What is two plus two?",
    "Suggest a name for a small black cat.",
]


def real_checkpoint_problem(workload: Workload) -> str | None:
    """Why ``workload``'s checkpoint cannot be loaded here (with the line that installs it),
    or ``None`` (also for the built workloads)."""
    if workload.model is None:
        return None
    from textenv.training.gguf_model import REAL_INSTALL_LINE, GGUFUnavailable, gguf_package_problem, smollm2_gguf_file

    problem = gguf_package_problem()
    if problem is None:
        try:
            smollm2_gguf_file()
        except GGUFUnavailable as error:
            problem = str(error)
    return None if problem is None else f"{problem} (install: {REAL_INSTALL_LINE})"


def workload_named(name: str) -> Workload:
    """``"S"`` or ``"S@512"`` (``S`` with 512 new tokens per episode and as many timed
    iterations as keep its generated tokens per variant)."""
    base, _, new_tokens = name.partition("@")
    if base not in WORKLOADS:
        raise KeyError(f"unknown workload {base!r}: choose from {sorted(WORKLOADS)}")
    workload = WORKLOADS[base]
    if not new_tokens:
        return workload
    tokens = int(new_tokens)
    iterations = max(1, workload.iterations * workload.new_tokens // tokens)
    return dataclasses.replace(workload, name=name, new_tokens=tokens, iterations=iterations)


def build_assets(workload: Workload, folder: Path, seed: int = 0) -> tuple[Path, list[str]]:
    """A word-level tokenizer of ``vocab_size`` words and a random GPT-2, saved to ``folder``;
    for a workload with a ``model``, that checkpoint's folder (converted once into the cache)
    and ``CHAT_PROMPTS``, nothing written to ``folder``."""
    if workload.model is not None:
        from textenv.lm.models import resolve_model_path

        return Path(resolve_model_path(workload.model)), list(CHAT_PROMPTS)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from textenv.tasks.corpus import generate_reviews

    words: list[str] = ["[PAD]", "[UNK]"]
    seen = set(words)
    for review in generate_reviews(2000, seed=seed):
        for word in review.replace(".", " .").replace(",", " ,").split():
            if word not in seen and len(words) < workload.vocab_size:
                seen.add(word)
                words.append(word)
    words += [f"w{i}" for i in range(workload.vocab_size - len(words))]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]")
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=workload.vocab_size,
        n_positions=workload.max_prompt_len + workload.new_tokens,
        n_embd=workload.n_embd,
        n_layer=workload.n_layer,
        n_head=workload.n_head,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    rng = random.Random(seed)
    low, high = workload.prompt_tokens
    prompts = [" ".join(rng.choices(words[2:], k=rng.randint(low, high))) for _ in range(256)]
    return folder, prompts
