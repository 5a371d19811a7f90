"""Results are written atomically: a failure during a write leaves the previous file whole."""

from __future__ import annotations

import pytest

from agents import load_agent, make_agent, make_text_vec_env
from textenv.files import atomic_write, atomic_write_text, check_writable_folder


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
