"""Results are written atomically: a failure during a write leaves the previous file whole; and
with the permission bits of a plain write (0o666 less the umask; an existing file keeps its own)."""

from __future__ import annotations

import os
import stat

import pytest

from agents import load_agent, make_agent, make_text_vec_env
from textenv.files import atomic_write, atomic_write_text, check_writable_folder, plain_file_mode, plain_modes


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "report.json"
    atomic_write_text(target, "old")

    def half_written(temporary):
        temporary.write_text("new but incomplete")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, half_written)
    assert target.read_text() == "old"
    assert [path.name for path in tmp_path.iterdir()] == ["report.json"]
    atomic_write_text(target, "new")
    assert target.read_text() == "new"


def test_an_agent_save_that_fails_midway_keeps_the_previous_agent(default_model_path, tmp_path):
    env = make_text_vec_env("textenv/PositiveSentiment-v0", n_envs=2, seed=0, env_kwargs={"device": "cpu"})
    agent = make_agent("ppo", env, seed=0, n_steps=4)
    agent.save(tmp_path / "agent")  # SB3's convention: .zip added
    assert (tmp_path / "agent.zip").is_file()
    before = (tmp_path / "agent.zip").read_bytes()

    # The parameters fail to serialise while the zip is being written (as a full disk would).
    agent.get_parameters = lambda: {"policy": {"weight": lambda: None}}
    with pytest.raises(Exception):
        agent.save(tmp_path / "agent.zip")
    assert (tmp_path / "agent.zip").read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["agent.zip"]
    assert load_agent(str(tmp_path / "agent.zip"), env=env).num_timesteps == 0


def test_an_unwritable_folder_is_named(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(OSError, match="cannot write into .*a-file/out.*is not a folder"):
        check_writable_folder(blocker / "out")
    check_writable_folder(tmp_path / "new" / "folder")  # writable, and nothing made
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a-file"]


@pytest.fixture
def umask():
    """Set the process's umask for the test (``umask(0o027)``), the old one back after."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077, 0o002], ids=oct)
def test_a_new_file_gets_the_mode_of_a_plain_write(tmp_path, umask, mask):
    umask(mask)
    (tmp_path / "plain.txt").write_text("plain")  # what open(path, "w") gives: 0o666 & ~umask
    atomic_write_text(tmp_path / "report.json", "{}")
    assert mode(tmp_path / "report.json") == mode(tmp_path / "plain.txt") == 0o666 & ~mask
    assert plain_file_mode(tmp_path) == 0o666 & ~mask
    assert sorted(path.name for path in tmp_path.iterdir()) == ["plain.txt", "report.json"]  # no probe left


def test_an_existing_file_keeps_its_mode(tmp_path, umask):
    umask(0o022)
    target = tmp_path / "report.json"
    for kept in (0o640, 0o600, 0o664):
        target.write_text("old")
        os.chmod(target, kept)
        atomic_write_text(target, "new")
        assert (target.read_text(), mode(target)) == ("new", kept)


def test_a_writer_that_replaces_its_file_still_leaves_the_plain_mode(tmp_path, umask):
    """safetensors 0.8 writes through a 0o600 temporary file of its own, renamed over the
    path it is given: the mode is set after the writer is done."""
    import torch
    from safetensors.torch import save_file

    umask(0o022)
    atomic_write(tmp_path / "head.safetensors", lambda temporary: save_file({"w": torch.zeros(2)}, str(temporary)))
    assert mode(tmp_path / "head.safetensors") == 0o644


def test_plain_modes_fixes_what_a_library_writes_into_a_folder(tmp_path, umask):
    import torch
    from safetensors.torch import save_file

    umask(0o027)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "kept.safetensors").write_bytes(b"")
    os.chmod(folder / "kept.safetensors", 0o644)
    with plain_modes(folder):
        save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))  # 0o600 by safetensors 0.8
        save_file({"w": torch.ones(2)}, str(folder / "kept.safetensors"))  # replaced: 0o600 too
        (folder / "critic").mkdir()
        save_file({"w": torch.ones(2)}, str(folder / "critic" / "model.safetensors"))
        (folder / "config.json").write_text("{}")
    assert {str(path.relative_to(folder)): mode(path) for path in folder.rglob("*") if path.is_file()} == {
        "model.safetensors": 0o640, "critic/model.safetensors": 0o640, "config.json": 0o640,
        "kept.safetensors": 0o644,
    }


def test_a_saved_agent_is_readable_as_a_plain_file_is(default_model_path, tmp_path, umask):
    umask(0o022)
    env = make_text_vec_env("textenv/PositiveSentiment-v0", n_envs=2, seed=0, env_kwargs={"device": "cpu"})
    make_agent("ppo", env, seed=0, n_steps=4).save(tmp_path / "agent.zip")
    assert mode(tmp_path / "agent.zip") == 0o644


def test_an_exported_policy_and_a_built_model_are_readable_as_plain_files_are(default_model_path, tmp_path, umask,
                                                                              monkeypatch):
    """The value head and ``textenv_policy.json`` of an export, the weights of any
    ``save_pretrained`` of the project's, and a built model's cache folder: a plain write's
    modes (safetensors writes 0600, ``tempfile.mkdtemp`` makes 0700)."""
    from agents.saving import export_policy
    from textenv.lm.cache import ensure_built

    umask(0o022)
    env = make_text_vec_env("textenv/PositiveSentiment-v0", n_envs=2, seed=0, env_kwargs={"device": "cpu"})
    folder = export_policy(make_agent("ppo", env, seed=0, n_steps=4), tmp_path / "exported")
    modes = {path.name: mode(path) for path in folder.iterdir() if path.is_file()}
    assert {"value_head.safetensors", "textenv_policy.json", "model.safetensors"} <= set(modes)
    assert set(modes.values()) == {0o644}, modes
    monkeypatch.setenv("TEXTENV_HOME", str(tmp_path / "cache"))

    def build(staging, progress):
        from safetensors.torch import save_file
        import torch

        save_file({"w": torch.zeros(2)}, str(staging / "model.safetensors"))
        (staging / "config.json").write_text("{}")

    built = ensure_built("tiny-v1", build, "a tiny model", progress=False)
    assert mode(built) == 0o755 and mode(built / "model.safetensors") == mode(built / "config.json") == 0o644
