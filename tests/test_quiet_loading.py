"""Loading a model through the library prints no transformers progress bar ("Loading
weights") unless transformers' verbosity asks for it, and leaves transformers' own
progress-bar setting as it found it (``textenv.lm.models.quiet_loading``)."""

from __future__ import annotations

import logging

import pytest
from transformers.utils import logging as transformers_logging

from textenv.lm.models import load_causal_lm, load_model_body, load_tokenizer, loading_is_verbose, quiet_loading
from textenv.rewards import RewardModelReward
from textenv.training.reward_model import reward_model_from_causal_lm


@pytest.fixture
def progress_bar_enabled():
    """Transformers' progress bars on, as in a fresh process (conftest turns them off)."""
    was_enabled, verbosity = transformers_logging.is_progress_bar_enabled(), transformers_logging.get_verbosity()
    transformers_logging.enable_progress_bar()
    transformers_logging.set_verbosity_warning()  # transformers' default
    yield
    (transformers_logging.enable_progress_bar if was_enabled else transformers_logging.disable_progress_bar)()
    transformers_logging.set_verbosity(verbosity)


@pytest.fixture(scope="module")
def tiny_classifier_path(tmp_path_factory, tiny_model_path, default_tokenizer):
    """A one-output sequence classifier, saved as ``textenv-train-reward-model`` saves one."""
    folder = tmp_path_factory.mktemp("tiny-classifier")
    model = reward_model_from_causal_lm(str(tiny_model_path))
    model.config.pad_token_id = default_tokenizer.pad_token_id
    model.save_pretrained(folder)
    default_tokenizer.save_pretrained(folder)
    return folder


LOADERS = {
    "load_causal_lm": lambda lm, rm: load_causal_lm(lm),
    "load_model_body": lambda lm, rm: load_model_body(lm),
    "load_tokenizer": lambda lm, rm: load_tokenizer(lm),
    "reward_model_from_causal_lm": lambda lm, rm: reward_model_from_causal_lm(lm),
    "RewardModelReward": lambda lm, rm: RewardModelReward(rm),
}


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_a_library_load_prints_no_progress_bar_and_restores_the_setting(
    loader, tiny_model_path, tiny_classifier_path, progress_bar_enabled, capfd
):
    capfd.readouterr()
    LOADERS[loader](str(tiny_model_path), str(tiny_classifier_path))
    captured = capfd.readouterr()
    assert "Loading" not in captured.err and "Loading" not in captured.out, captured.err
    assert transformers_logging.is_progress_bar_enabled()  # the user's setting, back after the load


def test_quiet_loading_restores_the_previous_setting_even_after_an_error(progress_bar_enabled):
    with pytest.raises(RuntimeError):
        with quiet_loading():
            assert not transformers_logging.is_progress_bar_enabled()
            raise RuntimeError("a failed load")
    assert transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    with quiet_loading():
        assert not transformers_logging.is_progress_bar_enabled()
    assert not transformers_logging.is_progress_bar_enabled()  # off before: still off, never switched on


def test_verbose_transformers_shows_the_loading_bar(tiny_model_path, progress_bar_enabled, capfd):
    """'Unless verbose': transformers' own verbosity at info (TRANSFORMERS_VERBOSITY=info) or debug."""
    assert not loading_is_verbose()
    transformers_logging.set_verbosity(logging.INFO)
    assert loading_is_verbose()
    capfd.readouterr()
    load_causal_lm(str(tiny_model_path))
    assert "Loading weights" in capfd.readouterr().err
    assert transformers_logging.is_progress_bar_enabled()
