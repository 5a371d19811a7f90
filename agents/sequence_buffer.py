"""``SequenceRolloutBuffer``: SB3's rollout storage, with whole sequences as observations.

Per-token quantities (actions, rewards, values, log-probs, episode starts,
advantages, returns) live in ``(n_steps, n_envs)`` arrays exactly as in SB3's
``RolloutBuffer``, and GAE is SB3's own ``compute_returns_and_advantage``. What
changes is the observation: instead of one padded observation per step, the
buffer keeps one row per *segment* (the steps of one episode inside this
rollout; an episode cut by the rollout's end is a segment too) holding that
segment's last state plus its last action, and the column at which each step's
state ends. ``get`` yields minibatches of whole segments whose observations are
``TokenSequences``, so the policy evaluates every step of a segment in one
forward pass, while SB3's ``PPO.train``/``A2C.train`` run unchanged on the
per-token tensors.

A segment can be left out of the loss (``leave_out``): one whose episode's reward
returned ``None`` is left out when it closes (``textenv.rewards``), and group methods
leave out the groups they filter. ``get`` draws its minibatches from the other segments
only (``trained_segments``), and rollout-wide advantage statistics ignore the left-out
tokens; the KL penalty and the logged KL still count every token the policy generated.
"""

from __future__ import annotations

from typing import Callable, Generator, NamedTuple

import numpy as np
import torch
from stable_baselines3.common.buffers import RolloutBuffer

from policies.sequences import TokenSequences
from textenv.lm.shared_prefix import distinct_rows
from textenv.rewards import is_skipped


def normalize_rollout_advantages(buffer: RolloutBuffer, sums: Callable[[list[float]], np.ndarray] | None = None) -> None:
    """Standardise the advantages of every token of the rollout, in place, before any
    minibatch is drawn (SB3's convention: unbiased std, ``+ 1e-8``). Returns are left as
    they are: the critic still regresses onto the unnormalised returns.

    ``sums`` (data-parallel training: ``agents.distributed.global_sums``) adds up the
    count, sum and sum of squares over every rank's rollout, so that all ranks standardise
    with the global mean and std."""
    if isinstance(buffer, SequenceRolloutBuffer):
        valid = buffer.token_mask(trained_only=True)
    else:
        valid = np.ones_like(buffer.advantages, bool)
    advantages = buffer.advantages[valid]
    if sums is None:
        if advantages.size > 1:
            buffer.advantages[valid] = (advantages - advantages.mean()) / (advantages.std(ddof=1) + 1e-8)
        return
    local = advantages.astype(np.float64)
    count, total, total_of_squares = sums([local.size, local.sum(), np.square(local).sum()])
    if count > 1:
        mean = total / count
        std = np.sqrt(max(total_of_squares - count * mean**2, 0.0) / (count - 1))
        buffer.advantages[valid] = (local - mean) / (std + 1e-8)


class SequenceRolloutSamples(NamedTuple):
    """SB3's ``RolloutBufferSamples`` fields, plus the reference's log-prob of each action
    (for methods with the KL in the loss, e.g. GRPO)."""

    observations: TokenSequences
    actions: torch.Tensor
    old_values: torch.Tensor
    old_log_prob: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    ref_log_prob: torch.Tensor
    action_masks: None = None  # MaskablePPO asks; masking policies recompute masks instead


#: Prompts that segments share run once (``textenv.lm.shared_prefix``) when that spares at least
#: this share of the body's tokens. The split costs a second body call and a cache. A GRPO
#: update timed both ways in one process (``scripts/bench/shared_prompts.py``, 2-core CPU,
#: medians of 6): sparing 22% of the tokens (workload S: 2 layers, prompts 13 of 45 columns)
#: took it to 0.86x, 14% (M) to 0.95x, 64% (R: SmolLM2-135M on chats) to 1.52x.
SHARED_PROMPTS_MIN_SAVING = 1 / 3


class SequenceRolloutBuffer(RolloutBuffer):
    #: Data-parallel training (``agents.distributed.agree_on_minibatch_count``): maps the
    #: number of minibatches this rank would form to the number every rank forms.
    agree_on_minibatch_count: Callable[[int], int] | None = None
    #: Group rollouts (``agents.group_methods``): a group's segments share their prompt, which
    #: may run once per minibatch (``_shared_prompts``). Other rollouts cut episodes
    #: wherever the rollout ends, and their minibatches are shuffled segment by segment.
    shares_prompts: bool = False
    #: Data-parallel training (``agents.distributed.every_rank_agrees``): whether every rank's
    #: rollout shares its prompts. Under FSDP2 each body call gathers every layer, so all ranks
    #: must split their rows alike or none.
    agree_on_prompt_sharing: Callable[[bool], bool] | None = None

    def reset(self) -> None:
        shape = (self.buffer_size, self.n_envs)
        self.actions = np.zeros((*shape, 1), dtype=np.float32)
        self.rewards = np.zeros(shape, dtype=np.float32)
        self.returns = np.zeros(shape, dtype=np.float32)
        self.episode_starts = np.zeros(shape, dtype=np.float32)
        self.values = np.zeros(shape, dtype=np.float32)
        self.log_probs = np.zeros(shape, dtype=np.float32)
        self.ref_log_probs = np.zeros(shape, dtype=np.float32)
        self.advantages = np.zeros(shape, dtype=np.float32)
        self.state_columns = np.zeros(shape, dtype=np.int64)
        self.segment_ids: list[torch.Tensor] = []
        self.segment_masks: list[torch.Tensor] = []
        self.segment_spans: list[tuple[int, int, int]] = []  # (env, first step, last step)
        # The task score at each segment's episode end (None: cut by the rollout's end, or not
        # judged) and whether the segment is in the loss (see the module doc).
        self.segment_scores: list[float | None] = []
        self.segment_in_loss: list[bool] = []
        self._segment_start = np.zeros(self.n_envs, dtype=np.int64)
        self.generator_ready = False
        self.prefix_columns = 0  # set with the segments (_prepare_segments)
        self._segment_prompts: np.ndarray | None = None
        self.pos = 0
        self.full = False

    def add(self, *args, **kwargs) -> None:
        raise TypeError(
            "SequenceRolloutBuffer is filled by the fast rollout (add_step, end_finished_episodes); "
            "the stock SB3 rollout needs a RolloutBuffer (pass fast=False to the agent)."
        )

    def add_step(
        self,
        actions: torch.Tensor,
        rewards: np.ndarray,
        episode_starts: np.ndarray,
        values: torch.Tensor,
        log_probs: torch.Tensor,
        state_columns: torch.Tensor,
        ref_log_probs: np.ndarray,
    ) -> None:
        """Store one step of every env (same conventions as ``RolloutBuffer.add``)."""
        self.actions[self.pos, :, 0] = actions.cpu().numpy()
        self.rewards[self.pos] = rewards
        self.episode_starts[self.pos] = episode_starts
        self.values[self.pos] = values.cpu().numpy().flatten()
        self.log_probs[self.pos] = log_probs.cpu().numpy()
        self.state_columns[self.pos] = state_columns.cpu().numpy()
        self.ref_log_probs[self.pos] = ref_log_probs
        self.pos += 1
        self.full = self.pos == self.buffer_size

    def end_finished_episodes(self, dones: np.ndarray, infos: list[dict]) -> None:
        """Close the segments of the episodes that ended at the last added step; their
        final observations are the VecEnv's ``terminal_observation``s. An episode whose
        reward could not judge it (``info["task_score"] is None``) is left out of the loss."""
        for env in np.flatnonzero(dones):
            info = infos[env]
            final = info["terminal_observation"]
            self._close_segment(
                int(env), torch.as_tensor(final["input_ids"]).long(), torch.as_tensor(final["attention_mask"]).long(),
                score=info.get("task_score"), in_loss=not is_skipped(info),
            )

    def close_open_segments(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """At the rollout's end: episodes still running form segments cut at the boundary;
        ``input_ids``/``attention_mask`` are all envs' current observations."""
        for env in range(self.n_envs):
            if self._segment_start[env] < self.pos:
                self._close_segment(env, input_ids[env], attention_mask[env])

    def _close_segment(self, env: int, ids: torch.Tensor, mask: torch.Tensor, score: float | None = None,
                       in_loss: bool = True) -> None:
        self.segment_spans.append((env, int(self._segment_start[env]), self.pos - 1))
        self.segment_ids.append(ids)
        self.segment_masks.append(mask)
        self.segment_scores.append(None if score is None else float(score))
        self.segment_in_loss.append(in_loss)
        self._segment_start[env] = self.pos

    def leave_out(self, segments: np.ndarray) -> None:
        """Leave ``segments`` (indices into ``segment_spans``) out of the loss."""
        for segment in segments:
            self.segment_in_loss[int(segment)] = False

    def trained_segments(self) -> np.ndarray:
        """The indices of the segments in the loss (those ``get`` draws its minibatches from)."""
        return np.flatnonzero(np.asarray(self.segment_in_loss, dtype=bool))

    def get(self, batch_size: int | None = None) -> Generator[SequenceRolloutSamples, None, None]:
        """Minibatches of whole segments, shuffled, each of at least ``batch_size`` tokens
        (except the last); ``None``: everything at once."""
        for segments in self.minibatch_segments(batch_size):
            yield self.segment_samples(segments)

    def minibatch_segments(self, batch_size: int | None = None) -> Generator[np.ndarray, None, None]:
        """The segment indices of each minibatch ``get`` yields (one shuffle of all segments,
        or of whole groups when segments share prompts: ``_shuffled_groups``).

        With ``agree_on_minibatch_count`` set (data-parallel training), the shuffled segments
        are split into the agreed number of minibatches of about equal segment counts
        instead, so that every rank runs as many backward passes."""
        assert self.full, "the rollout is not complete"
        self._prepare_segments()
        if batch_size is None:
            batch_size = self.buffer_size * self.n_envs
        order, group_ends = self._shuffled_groups()
        batches: list[np.ndarray] = []
        first, n_tokens = 0, 0
        for position, segment in enumerate(order):
            n_tokens += len(self._segment_tokens[segment])
            if (n_tokens >= batch_size and group_ends[position]) or position == len(order) - 1:
                batches.append(order[first : position + 1])
                first, n_tokens = position + 1, 0
        if self.agree_on_minibatch_count is not None:
            count = self.agree_on_minibatch_count(len(batches))
            if count != len(batches):
                batches = np.array_split(order, count)
        yield from batches

    def _shuffled_groups(self) -> tuple[np.ndarray, np.ndarray]:
        """The trained segments in a random order, and where a minibatch may end in it. When
        segments share prompts (``prefix_columns``: a group rollout), the order shuffles whole
        groups (the segments of one prompt) and a minibatch ends only after a group's last
        segment, so each prompt runs once per minibatch (as veRL counts its minibatches in
        prompts); otherwise it shuffles segments, and a minibatch may end anywhere."""
        trained = self.trained_segments()
        if self.prefix_columns == 0 or len(trained) == 0:
            return np.random.permutation(trained), np.ones(len(trained), dtype=bool)
        prompt_of = self._segment_prompts[trained]
        groups = [trained[prompt_of == prompt] for prompt in np.random.permutation(np.unique(prompt_of))]
        ends = [np.arange(len(group)) == len(group) - 1 for group in groups]
        return np.concatenate(groups), np.concatenate(ends)

    @torch.no_grad()
    def recompute_log_probs(self, policy, batch_size: int | None = None) -> None:
        """Replace the rollout's log-probs with a teacher-forced pass of ``policy`` over every
        segment, in minibatches of at least ``batch_size`` tokens, as the update evaluates them.

        Under bf16 the KV-cached decode and the whole-sequence forward round differently
        (measured on the default task: |log-prob difference| up to 0.06, i.e. a ratio of
        1.06 before any update); recomputed, the first epoch's ratios start at 1 within
        float rounding of one path, so PPO's clipping measures the update, not the noise."""
        self._prepare_segments()
        batch_size = batch_size or self.buffer_size * self.n_envs
        flat_log_probs = self.log_probs.reshape(-1)  # a view: writes land in self.log_probs
        batch: list[int] = []
        n_tokens = 0
        for segment in range(len(self.segment_spans)):
            batch.append(segment)
            n_tokens += len(self._segment_tokens[segment])
            if n_tokens >= batch_size or segment == len(self.segment_spans) - 1:
                samples = self.segment_samples(np.array(batch))
                _, log_prob, _ = policy.evaluate_actions(samples.observations, samples.actions.long().flatten())
                flat_log_probs[self.segment_token_indices(np.array(batch))] = log_prob.float().cpu().numpy()
                batch, n_tokens = [], 0

    def token_mask(self, trained_only: bool = False) -> np.ndarray:
        """``(n_steps, n_envs)``: which entries hold a token of some segment (a group
        rollout leaves the steps after an episode's end empty); ``trained_only``: of a
        segment in the loss."""
        mask = np.zeros((self.buffer_size, self.n_envs), dtype=bool)
        for (env, first, last), in_loss in zip(self.segment_spans, self.segment_in_loss):
            if in_loss or not trained_only:
                mask[first : last + 1, env] = True
        return mask

    def segment_token_indices(self, segments: np.ndarray) -> np.ndarray:
        """Flat ``step * n_envs + env`` indices of every token of ``segments``, in order."""
        self._prepare_segments()
        return np.concatenate([self._segment_tokens[s] for s in segments])

    def _prepare_segments(self) -> None:
        if self.generator_ready:
            return
        # Flat (step * n_envs + env) index of every token of every segment.
        self._segment_tokens = [
            np.arange(first, last + 1) * self.n_envs + env for env, first, last in self.segment_spans
        ]
        # The columns left of the first real token of any segment are padding in every row (the
        # prompts are left-padded to max_prompt_len): dropped once for the whole rollout, so every
        # minibatch's body pass is that much shorter. Once, not per minibatch: every pass over a
        # sequence (the update's epochs, the recomputed old log-probs) then has the same columns,
        # and bf16 rounds them alike.
        ids, masks = torch.stack(self.segment_ids), torch.stack(self.segment_masks)
        self.shared_left_padding = int(masks.any(0).int().argmax())
        self._all_ids = ids[:, self.shared_left_padding:].to(self.device)
        self._all_masks = masks[:, self.shared_left_padding:].to(self.device)
        # The segments' shared prompts, found once per rollout: their width, and which distinct
        # prompt each segment has (what _shuffled_groups groups by every epoch).
        self.prefix_columns, self._segment_prompts = self._shared_prompts()
        self.generator_ready = True

    def _shared_prompts(self) -> tuple[int, np.ndarray | None]:
        """How many leading columns are prompts that segments share (``TokenSequences.prefix_columns``)
        and the index of each segment's distinct prompt: in a group rollout (``shares_prompts``)
        whose segments all start right after a prompt of the same width, when running each
        distinct prompt once would spare at least ``SHARED_PROMPTS_MIN_SAVING`` of the body's
        tokens; else ``(0, None)``. One answer for the whole rollout, so that every pass over a
        segment (the update's, the recomputed log-probs', the reference's) splits it alike; in
        data-parallel training, ``(0, None)`` unless every rank shares."""
        width, prompts = self._local_shared_prompts()
        if self.agree_on_prompt_sharing is not None and not self.agree_on_prompt_sharing(width > 0):
            return 0, None
        return width, prompts

    def _local_shared_prompts(self) -> tuple[int, np.ndarray | None]:
        """``_shared_prompts`` of this rank's rollout alone."""
        if not self.shares_prompts:
            return 0, None
        first_columns = {int(self.state_columns[first, env]) for env, first, _ in self.segment_spans}
        if len(first_columns) != 1 or len(self.segment_spans) < 2:
            return 0, None
        width = first_columns.pop() + 1 - self.shared_left_padding  # the prompts' last column is the first state's
        if width <= 0:
            return 0, None
        first, prompt_of_segment = distinct_rows(self._all_ids[:, :width], self._all_masks[:, :width])
        rows, row_width = len(self.segment_spans), int(self.state_columns.max()) + 1 - self.shared_left_padding
        saving = width * (rows - len(first)) / (rows * row_width)
        return (width, prompt_of_segment.cpu().numpy()) if saving >= SHARED_PROMPTS_MIN_SAVING else (0, None)

    def _get_samples(self, segments: np.ndarray, env=None) -> SequenceRolloutSamples:
        """SB3's name for ``segment_samples`` (its buffers' draws go through it)."""
        return self.segment_samples(segments)

    def segment_samples(self, segments: np.ndarray) -> SequenceRolloutSamples:
        """Every token of ``segments`` (indices into ``segment_spans``), as one batch: the
        segments' sequences once each, and per token its row, state column, action and
        stored quantities (what the update, the log-prob recomputation and the deferred
        reference scoring read)."""
        flat = self.segment_token_indices(segments)
        rows = np.concatenate([np.full(len(self._segment_tokens[s]), i) for i, s in enumerate(segments)])
        index = torch.as_tensor(segments, device=self.device)
        observations = TokenSequences(
            input_ids=self._all_ids[index],
            attention_mask=self._all_masks[index],
            token_rows=torch.as_tensor(rows, device=self.device),
            token_columns=torch.as_tensor(self.state_columns.reshape(-1)[flat] - self.shared_left_padding,
                                          device=self.device),
            prefix_columns=self.prefix_columns,
        )

        return SequenceRolloutSamples(
            observations=observations,
            actions=self.to_torch(self.actions.reshape(-1, 1)[flat]),
            old_values=self.to_torch(self.values.reshape(-1)[flat]),
            old_log_prob=self.to_torch(self.log_probs.reshape(-1)[flat]),
            advantages=self.to_torch(self.advantages.reshape(-1)[flat]),
            returns=self.to_torch(self.returns.reshape(-1)[flat]),
            ref_log_prob=self.to_torch(self.ref_log_probs.reshape(-1)[flat]),
        )
