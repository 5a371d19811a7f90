"""The benchmark's library: what ``scripts/benchmark.py`` measures, and how.

Measurement, not learning: it lives beside the packages, not in them.

- ``workloads``: the model sizes and rollout shapes measured (``WORKLOADS``), and
  their assets (a word-level tokenizer, a random GPT-2, prompts; nothing downloaded);
- ``measure``: one measurement per child process: the framework's fast and stock
  paths through ``learn``, and the floors, which are the one-page PPO
  (``scripts/ppo_reference.py``) timed in parts and whole.
"""
