"""Data order: which samples each rank reads, resumable at the exact next sample, even when
the number of processes changes.

Owns: the per-epoch global order (`epoch_order`, `length_grouped_order`), its split across
ranks (`rank_slice`), and `ResumableSampler`, whose whole state is a small dict for
checkpoints. Does not own: what a sample is (packing.py, padding.py), checkpoint files
(minimind.checkpoint), the training loop.

The rules:
- Epoch e has one global order, a permutation that depends only on (seed, e) (and on the
  lengths and group size when grouping by length), never on the number of ranks.
- The position is counted in GLOBAL samples consumed in the epoch. From position p, rank r
  of w reads order[p + r], order[p + r + w], ...: the next w samples go one to each rank.
- After a step, the engine calls `advance(n)` with the global samples that step consumed
  (micro-batch x world size; a final short step may pass the full figure, the position is
  clamped to the epoch's end, which starts the next epoch). Since the consumed samples are
  exactly order[:p], a resume with any other world size reads order[p:] split its own way:
  every sample of the epoch is read exactly once.
- The last w - 1 samples of an epoch may leave ranks one sample apart; `drop_last=True`
  drops that remainder so every rank reads the same count (DDP needs equal step counts).

Length grouping (for padded chat batches, padding.py): shuffle, cut the order into windows of
`group_size * sort_window` samples, sort each window by length, cut it into groups of
`group_size`, shuffle the groups (a short last group stays last, so later groups stay
aligned). With `group_size` = the samples of one optimizer step on all ranks (the global
batch), a step reads one group of similar lengths. The groups belong to the run: a resume
with another global batch (another world size) adopts the saved group size, so the order
and the meaning of the saved position stay the same; its steps then straddle groups.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

SORT_WINDOW = 64  # groups per sorted window: larger is less padding but less random


def _rng(seed: int, epoch: int) -> np.random.Generator:
    # PCG64 seeded from the pair: one stream per (seed, epoch), stable across numpy versions.
    return np.random.default_rng([seed, epoch])


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The global order of epoch `epoch`: a permutation of range(num_samples), (n,) int64.

    >>> sorted(epoch_order(5, seed=0, epoch=0).tolist())
    [0, 1, 2, 3, 4]
    >>> bool((epoch_order(100, 0, 0) == epoch_order(100, 0, 1)).all())
    False
    """
    return _rng(seed, epoch).permutation(num_samples).astype(np.int64)


def length_grouped_order(
    lengths: Sequence[int] | np.ndarray,
    seed: int,
    epoch: int,
    group_size: int,
    sort_window: int = SORT_WINDOW,
) -> np.ndarray:
    """A permutation in which each run of `group_size` samples has similar lengths.

    >>> lengths = [1, 9, 2, 8, 3, 7, 4, 6]
    >>> order = length_grouped_order(lengths, seed=0, epoch=0, group_size=2)
    >>> sorted(order.tolist()) == list(range(8))
    True
    >>> [sorted(lengths[i] for i in order[k : k + 2]) for k in range(0, 8, 2)]
    [[6, 7], [3, 4], [8, 9], [1, 2]]
    """
    if group_size < 1:
        raise ValueError(f"group_size must be positive, got {group_size}")
    lengths = np.asarray(lengths)
    rng = _rng(seed, epoch)
    perm = rng.permutation(len(lengths)).astype(np.int64)
    window = group_size * sort_window
    groups: list[np.ndarray] = []
    for start in range(0, len(perm), window):
        chunk = perm[start : start + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        groups += [chunk[g : g + group_size] for g in range(0, len(chunk), group_size)]
    short = [groups.pop()] if groups and len(groups[-1]) < group_size else []
    shuffled = [groups[g] for g in rng.permutation(len(groups))]
    return np.concatenate(shuffled + short) if groups or short else perm


def rank_slice(
    order: np.ndarray, position: int, rank: int, world_size: int, end: int | None = None
) -> np.ndarray:
    """Rank `rank`'s samples from global `position` to `end`: every world_size-th, from its
    own offset.

    >>> order = np.arange(10, 20)
    >>> rank_slice(order, 3, 0, 2).tolist(), rank_slice(order, 3, 1, 2).tolist()
    ([13, 15, 17, 19], [14, 16, 18])
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    return order[position + rank : end : world_size]


class ResumableSampler:
    """Yields this rank's sample indices for the rest of the current epoch (a snapshot taken
    by `iter`). Use as a DataLoader `sampler`; call `advance` after each step and save
    `state_dict()` with the checkpoint. Torch-free: any iterable with `__len__` works.

    `lengths` + `group_size` turn on length grouping (module docstring). `load_state_dict`
    restores the checkpoint's seed: a resumed run continues the same order.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        lengths: Sequence[int] | np.ndarray | None = None,
        group_size: int | None = None,
        drop_last: bool = False,
    ):
        if num_samples < 0 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler: {num_samples} samples, rank {rank} of {world_size}")
        if (lengths is None) != (group_size is None):
            raise ValueError("length grouping needs both lengths and group_size")
        if lengths is not None and len(lengths) != num_samples:
            raise ValueError(f"{len(lengths)} lengths for {num_samples} samples")
        self.num_samples, self.seed = num_samples, seed
        self.rank, self.world_size = rank, world_size
        self.lengths = None if lengths is None else np.asarray(lengths)
        self.group_size, self.drop_last = group_size, drop_last
        self.epoch = self.position = 0
        self._cached: tuple[int, int, np.ndarray] | None = None  # (seed, epoch, order)

    def order(self) -> np.ndarray:
        """The current epoch's global order (cached)."""
        if self._cached is None or self._cached[:2] != (self.seed, self.epoch):
            if self.lengths is None:
                order = epoch_order(self.num_samples, self.seed, self.epoch)
            else:
                order = length_grouped_order(self.lengths, self.seed, self.epoch, self.group_size)
            self._cached = (self.seed, self.epoch, order)
        return self._cached[2]

    def epoch_end(self) -> int:
        """The global position at which the current epoch ends (after `drop_last`)."""
        if not self.drop_last:
            return self.num_samples
        return self.num_samples - (self.num_samples - self.position) % self.world_size

    def indices(self, count: int | None = None) -> np.ndarray:
        """This rank's next `count` samples (all remaining when None), without advancing: a
        function of (seed, epoch, position, rank, world_size) only."""
        out = rank_slice(self.order(), self.position, self.rank, self.world_size, self.epoch_end())
        return out if count is None else out[:count]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return len(range(self.position + self.rank, self.epoch_end(), self.world_size))

    def advance(self, global_samples: int) -> None:
        """Count `global_samples` consumed by all ranks together; past the epoch's end, start
        the next epoch at position 0."""
        if global_samples < 0:
            raise ValueError(f"cannot advance by {global_samples}")
        self.position += global_samples
        if self.position >= self.epoch_end():
            self.set_epoch(self.epoch + 1)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` from its beginning (DistributedSampler's name)."""
        self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "num_samples": self.num_samples,
            "group_size": self.group_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the saved run: its seed, epoch, position and, when grouping by length,
        its group size (a resume with another global batch keeps the run's order, so the saved
        position still marks exactly the samples read). Refuses another number of samples, or
        grouped state in an ungrouped sampler and vice versa."""
        saved_group = state.get("group_size", self.group_size)
        problems = []
        if state.get("num_samples", self.num_samples) != self.num_samples:
            problems.append(
                f"num_samples={state['num_samples']}, this sampler has {self.num_samples}"
            )
        if (saved_group is None) != (self.group_size is None):
            problems.append(f"group_size={saved_group}, this sampler has {self.group_size}")
        if problems:
            raise ValueError(
                f"sampler state is for {'; '.join(problems)}: the saved position would point "
                "at other samples"
            )
        if saved_group is not None:
            self.group_size = saved_group
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
