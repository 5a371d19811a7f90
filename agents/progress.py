"""A progress bar that counts generated tokens, the unit of ``total_timesteps``.

SB3's ``ProgressBarCallback`` adds ``n_envs`` at every env step. A group rollout
(RLOO, GRPO) keeps stepping while some of its episodes wait, finished, for the
others: they generate nothing, and ``num_timesteps`` does not count them, so SB3's
bar ran far past its total (14,272 / 8,192). This bar shows ``num_timesteps``
itself.
"""

from __future__ import annotations

import warnings

from stable_baselines3.common.callbacks import BaseCallback


class TokenProgressBar(BaseCallback):
    """tqdm (rich) bar of the tokens generated since ``learn`` began, out of those it was asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.pbar = None
        self._start = 0

    def _on_training_start(self) -> None:
        from tqdm import TqdmExperimentalWarning
        from tqdm.rich import tqdm

        self._start = self.model.num_timesteps
        with warnings.catch_warnings():  # tqdm calls its rich bar experimental; SB3's bar is the same one
            warnings.simplefilter("ignore", TqdmExperimentalWarning)
            self.pbar = tqdm(total=self.locals["total_timesteps"] - self._start, unit="tok")

    @property
    def shown(self) -> int:
        """The tokens the bar shows now."""
        return self.pbar.n if self.pbar is not None else 0

    def _on_step(self) -> bool:
        self.pbar.update(self.model.num_timesteps - self._start - self.pbar.n)
        return True

    def _on_training_end(self) -> None:
        self.pbar.update(self.model.num_timesteps - self._start - self.pbar.n)
        self.pbar.refresh()
        self.pbar.close()
