"""Which GEM and TextArena games run offline: read from a game's source, before it is made.

Some of their games download data when made (NLTK's ``words`` corpus and POS tagger,
Hugging Face datasets) or call a remote LLM. ``refuse_unless_offline`` reads what a
game's code needs from its source, never importing it (some games call
``nltk.download`` when imported), and refuses it with ``OfflineError`` (naming the
fix) unless that data is already on this machine. Decided from the code rather than
from a list, so a new release's game that downloads is caught too. What that gives
today (textarena 0.7.4, gem-llm 0.1.0):

- offline as they come: TextArena's single-player 2048, Bandit, Blackjack, Countdown,
  Crosswords, Cryptarithm, FifteenPuzzle, FrozenLake, GuessTheNumber, LightsOut,
  LogicPuzzle, Mastermind, Minesweeper, PegJump, RushHour, Secretary, Set,
  Slitherlink, Sokoban, Sudoku, ThreeCardMonte, TowerOfHanoi; GEM's ``game:``
  GuessTheNumber, Mastermind, Minesweeper, FifteenPuzzle, Sudoku, TowerofHanoi,
  Game2048, Sokoban and its ``rg:`` (reasoning-gym) tasks;
- with NLTK data downloaded beforehand (``python -m nltk.downloader words
  averaged_perceptron_tagger_eng`` where there is network): TextArena's Hangman,
  WordLadder, Wordle, WordSearch and GEM's Hangman, Wordle, WordSearch (TextArena's
  still call ``nltk.download`` when made, which fails harmlessly offline);
- with ``dataset=`` (or ``HF_DATASETS_OFFLINE=1`` and a Hugging Face cache): GEM's
  ``math:``, ``code:``, ``qa:``, ``logic:`` and ``eval:`` ids;
- never: TextArena's GuessWho and TwentyQuestions (an OpenRouter LLM is the game master).
"""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping

# Client libraries that talk to a server: a game importing one is not offline.
NETWORK_LIBRARIES = ("openai", "anthropic", "requests", "httpx", "aiohttp", "urllib.request", "websockets",
                     "boto3", "groq", "cerebras", "ollama", "google.generativeai", "huggingface_hub")
# Where ``nltk.download`` puts a package, by kind (``nltk.data.find`` needs the kind in the name).
NLTK_KINDS = ("corpora", "taggers", "tokenizers", "chunkers", "grammars", "misc", "models", "sentiment",
              "stemmers", "help")
# Names under ``nltk.corpus`` that are its own modules, not data to download.
NLTK_CORPUS_MODULES = frozenset({"reader", "util"})
NLTK_DOWNLOAD_CALLS = ("nltk.download", "nltk.downloader.download")


class OfflineError(RuntimeError):
    """A game that needs the network here: data it would download, or a remote service."""


@dataclass(frozen=True)
class GameNeeds:
    """What a game's code fetches over the network, read from its source."""

    nltk: frozenset[str] = frozenset()  # NLTK packages it downloads or reads (``words``, a tagger)
    remote: frozenset[str] = frozenset()  # LLM agents or network clients it uses ("OpenRouterAgent", "openai")
    hf_datasets: bool = False  # it calls ``datasets.load_dataset`` (the Hugging Face Hub)


def _source_file(module: str) -> Path | None:
    """The file of ``module`` found without importing it or its packages (some games
    call ``nltk.download`` when imported); None when it has no Python source."""
    parts = module.split(".")
    try:
        spec = importlib.util.find_spec(parts[0])  # the top package: textarena or gem, already imported
    except (ImportError, ValueError):  # e.g. __main__
        return None
    for depth in range(2, len(parts) + 1):
        if spec is None or not spec.submodule_search_locations:
            return None
        spec = importlib.machinery.PathFinder.find_spec(".".join(parts[:depth]), list(spec.submodule_search_locations))
    origin = spec.origin if spec else None
    return Path(origin) if origin and origin.endswith(".py") else None


def _dotted(node: ast.AST) -> str:
    """``a.b.c`` for an attribute chain on a name, else ""."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(names)]) if isinstance(node, ast.Name) else ""


def _strings(node: ast.AST) -> list[str]:
    """The string literals of ``node``: itself, or the items of a list, tuple or set."""
    items = node.elts if isinstance(node, (ast.List, ast.Tuple, ast.Set)) else [node]
    return [item.value for item in items if isinstance(item, ast.Constant) and isinstance(item.value, str)]


def _is_llm_agent(name: str) -> bool:
    """A TextArena agent other than the human at the keyboard: an LLM behind an API."""
    return name.endswith("Agent") and name != "HumanAgent"


class _SourceReader(ast.NodeVisitor):
    """Reads the modules of one library (``top``: ``textarena`` or ``gem``) and gathers
    what they need from the network; ``read`` answers which of the library's own
    modules each one imports, to be read next."""

    def __init__(self, top: str):
        self.top = top
        self.nltk: set[str] = set()
        self.remote: set[str] = set()
        self.hf_datasets = False
        self._package = ""  # of the module being read, for its relative imports
        self._follow: list[str] = []

    def read(self, module: str) -> list[str]:
        path = _source_file(module)
        if path is None:
            return []
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            return []  # it cannot be imported either, so it fetches nothing
        self._package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        self._follow = []
        self.visit(tree)
        return self._follow

    def _imported(self, names: Iterable[str]) -> None:
        """Network clients among ``names``; the library's own modules among them are read
        next (not ``<top>.agents``: its LLM agents count only where a game builds one)."""
        for name in names:
            if name.startswith(self.top + ".") and name != f"{self.top}.agents":
                self._follow.append(name)
            self.remote.update(lib for lib in NETWORK_LIBRARIES if name == lib or name.startswith(lib + "."))

    def visit_Import(self, node: ast.Import) -> None:
        self._imported(alias.name for alias in node.names)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:  # relative: from this module's package, up ``level - 1`` packages
            base = ".".join(filter(None, [self._package.rsplit(".", node.level - 1)[0], base]))
        names = [alias.name for alias in node.names]
        self._imported([base, *(f"{base}.{name}" for name in names)])  # a name may be a module
        if base == "nltk.corpus":
            self.nltk.update(names)
        elif base == "datasets" and "load_dataset" in names:
            self.hf_datasets = True
        elif base == f"{self.top}.agents":
            self.remote.update(filter(_is_llm_agent, names))

    def visit_Call(self, node: ast.Call) -> None:
        if _dotted(node.func) in NLTK_DOWNLOAD_CALLS:  # nltk.download("words"), nltk.download(["a", "b"])
            for argument in [*node.args, *(keyword.value for keyword in node.keywords)]:
                self.nltk.update(_strings(argument))
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        dotted = _dotted(node)
        if dotted.startswith("nltk.corpus.") and dotted.count(".") == 2:  # nltk.corpus.words
            self.nltk.add(node.attr)
        elif dotted == "datasets.load_dataset":
            self.hf_datasets = True
        elif _is_llm_agent(node.attr) and isinstance(node.value, ast.Attribute) and node.value.attr == "agents":
            self.remote.add(node.attr)  # ta.agents.OpenRouterAgent(...)
        self.generic_visit(node)


@lru_cache(maxsize=None)
def game_needs(module: str) -> GameNeeds:
    """What ``module`` and the modules of its own library that it imports (transitively)
    need from the network, read from their source, never imported: NLTK packages it
    passes to ``nltk.download`` or reads from ``nltk.corpus``, network clients it
    imports, TextArena LLM agents (``ta.agents.*Agent``, not ``HumanAgent``) it builds,
    and ``datasets.load_dataset``."""
    reader = _SourceReader(top=module.split(".")[0])
    todo, seen = [module], set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(reader.read(name))
    return GameNeeds(frozenset(reader.nltk - NLTK_CORPUS_MODULES), frozenset(reader.remote), reader.hf_datasets)


def _nltk_has(package: str) -> bool:
    """Whether NLTK's ``package`` is on this machine (in ``nltk.data.path``), without the network."""
    import nltk

    for kind in NLTK_KINDS:
        try:
            nltk.data.find(f"{kind}/{package}")
            return True
        except LookupError:
            pass
    return False


def _hf_offline() -> bool:
    """Whether Hugging Face is told to use its cache only (then ``load_dataset`` stays offline)."""
    return any(os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")
               for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def refuse_unless_offline(library: str, game_id: str, entry_point: Any, kwargs: Mapping[str, Any]) -> None:
    """Raise ``OfflineError`` before ``game_id`` is made (``library``: "GEM" or "TextArena";
    ``entry_point``: its registry entry; ``kwargs``: what it will be made with) if it would
    reach for the network: data that is not on this machine yet, or a remote service.
    Data already here is not refused. Checked at every call: data may arrive meanwhile."""
    module = entry_point.split(":")[0] if isinstance(entry_point, str) else getattr(entry_point, "__module__", "")
    if not module:
        return
    needs = game_needs(module)
    where = f"{library}'s {game_id!r}"
    pick = f"Fix: pick an offline game (the list is in {__name__}'s docstring)"
    if needs.remote:
        raise OfflineError(f"{where} calls a remote service while it runs ({', '.join(sorted(needs.remote))}: an LLM "
                           f"or a web API), and textenv runs its games offline. {pick}.")
    missing = sorted(package for package in needs.nltk if not _nltk_has(package))
    if missing:
        raise OfflineError(
            f"{where} needs NLTK data that is not on this machine: {', '.join(missing)} (the game would download it "
            f"with nltk.download, or fail, when made, and textenv runs its games offline). {pick}, or download the "
            f"data beforehand where there is network: python -m nltk.downloader {' '.join(missing)} (into a folder of "
            f"nltk.data.path, or one named by NLTK_DATA); then this game works.")
    if needs.hf_datasets and kwargs.get("dataset") is None and not _hf_offline():
        name = kwargs.get("dataset_name") or "its dataset"
        adapter = "GemTurnEnv" if library == "GEM" else "TextArenaTurnEnv"
        raise OfflineError(
            f"{where} downloads the Hugging Face dataset {name!r} (datasets.load_dataset) when made, and textenv "
            f"runs its games offline. {pick}, or load the dataset yourself (pip install datasets) and pass it: "
            f"{adapter}({game_id!r}, dataset=datasets.load_from_disk(path)) (or set HF_DATASETS_OFFLINE=1 with the "
            f"dataset in your Hugging Face cache).")
