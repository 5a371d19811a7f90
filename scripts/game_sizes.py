"""The lengths each offline game needs, as ``max_prompt_len="auto"`` sizes them
(``textenv.multiturn.size_dialogue``), with a model's tokenizer and chat template.

    python scripts/game_sizes.py                          # SmolLM2-135M-Instruct's tokenizer
    python scripts/game_sizes.py --model default --max-turns 4

Prints a Markdown table: the game, ``max_prompt_len``, ``max_episode_tokens`` and the
context they make together, beside the model's own context.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

GAMES = {  # id -> (adapter, game id), the single-player games that run offline (textenv.offline_games)
    "GEM Mastermind": ("gem", "game:Mastermind-v0-easy"),
    "GEM Minesweeper": ("gem", "game:Minesweeper-v0-easy"),
    "GEM GuessTheNumber": ("gem", "game:GuessTheNumber-v0-easy"),
    "GEM Sudoku": ("gem", "game:Sudoku-v0-easy"),
    "TextArena GuessTheNumber": ("textarena", "GuessTheNumber-v0"),
    "TextArena Mastermind": ("textarena", "Mastermind-v0"),
    "TextArena FrozenLake": ("textarena", "FrozenLake-v0"),
    "TextArena TowerOfHanoi": ("textarena", "TowerOfHanoi-v0"),
    "TextArena Minesweeper": ("textarena", "Minesweeper-v0"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-turns", type=int, default=8)
    parser.add_argument("--max-turn-tokens", type=int, default=8)
    args = parser.parse_args(argv)
    from transformers import AutoConfig

    from textenv.games import GAME_DEFAULTS, GemTurnEnv, TextArenaTurnEnv
    from textenv.lm.models import resolve_model_path
    from textenv.multiturn import size_dialogue

    config = AutoConfig.from_pretrained(resolve_model_path(args.model))
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    print(f"| game | max_prompt_len | max_episode_tokens | context needed ({args.model}: {context}) |")
    print("|---|---|---|---|")
    for name, (adapter, game_id) in GAMES.items():
        turn_env = partial(GemTurnEnv if adapter == "gem" else TextArenaTurnEnv, game_id)
        sized = size_dialogue(turn_env, {**GAME_DEFAULTS, "model": args.model, "max_turns": args.max_turns,
                                         "max_turn_tokens": args.max_turn_tokens})
        width = sized["max_prompt_len"] + sized["max_episode_tokens"]
        print(f"| {name} (`{game_id}`) | {sized['max_prompt_len']} | {sized['max_episode_tokens']} | {width} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
