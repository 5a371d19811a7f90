"""The benchmark's library: what ``scripts/benchmark.py`` measures, and how.

Measurement, not learning: it lives beside the packages, not in them.

- ``workloads``: the model sizes and rollout shapes measured (``WORKLOADS``), and
  their assets (a word-level tokenizer, a random GPT-2, prompts; nothing downloaded);
- ``measure``: one measurement per child process: the framework's fast and stock
  paths through ``learn``, and the floors, which are the one-page PPO
  (``scripts/ppo_reference.py``) timed in parts and whole;
- ``memory`` (``scripts/update_memory.py``): the peak memory of one update, settings side
  by side; ``memory_breakdown`` (run as a script): where a PPO run's memory goes, phase by
  phase, attributed to weights, gradients, optimizer state, reference, KV caches,
  activations and the allocator.
"""
