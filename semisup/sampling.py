"""Which tiles each training step sees, and every seed of a run: pure functions, Ray-free.

The order of a training split is not left to task scheduling. Each pass over a split is a
permutation of its tile ids drawn from ``(seed, split, pass)``; global step ``s`` takes the
``s``-th run of ``global_batch`` tiles of that sequence (passes end where a full batch no longer
fits, like ``drop_last``); rank ``r`` of ``world`` takes the ``r``-th contiguous share of the
global batch. So:

- the tiles of a step do not depend on the worker count: 2 workers × B/2 see exactly the tiles
  1 worker × B sees, in the same global order;
- the data position of a run is its step: a resumed run recomputes the order and continues with
  the very next batch (``SplitOrder.position`` names it for checkpoints and logs);
- validation covers every tile exactly once whatever the worker count (``validation_share``).

Random choices per sample (augmentation) are keyed by the sample's place in the global batch
(``sample_keys``), never by rank or by a process-wide generator, so they too do not depend on how
the batch is split over workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
import torch

# Each purpose draws from its own stream of the run's seed. Numbers, not hash(): Python salts
# string hashes per process, and every worker must derive the same seeds.
SeedPurpose = Literal[
    "torch", "labeled_order", "unlabeled_order", "labeled_samples", "unlabeled_samples"
]
PURPOSES: Final[dict[str, int]] = {
    "torch": 1,  # the process-wide torch generator (dropout, if a model has any)
    "labeled_order": 2,  # the permutations of the labelled split
    "unlabeled_order": 3,
    "labeled_samples": 4,  # the augmentation keys of labelled samples
    "unlabeled_samples": 5,
}
WEAK_VIEW: Final = 0  # sub-keys of a sample key, one per view (derive_keys)
STRONG_VIEW: Final = 1
SHARED_RANK: Final = -1  # the rank of a seed every worker shares (orders, keys)


def worker_seed(seed: int, rank: int, purpose: SeedPurpose) -> int:
    """A 63-bit seed for ``purpose`` on ``rank`` (``SHARED_RANK``: the same on every worker)."""
    entropy = [seed, PURPOSES[purpose], rank + 1]  # SeedSequence takes non-negative words
    return int(np.random.SeedSequence(entropy).generate_state(2, np.uint64)[0] >> np.uint64(1))


def sample_keys(
    seed: int, purpose: SeedPurpose, step: int, count: int, start: int = 0
) -> torch.Tensor:
    """``count`` int64 keys for samples ``start .. start+count-1`` of global step ``step``.

    A key seeds the random choices of one sample (``semisup.augment``); it depends on the
    sample's index in the global batch, not on which worker holds it.
    """
    base = np.random.SeedSequence([seed, PURPOSES[purpose], step])
    words = base.generate_state(start + count, np.uint64)[start:] >> np.uint64(1)
    return torch.from_numpy(words.astype(np.int64))


def derive_keys(keys: torch.Tensor, view: int) -> torch.Tensor:
    """Independent per-sample keys for one view (``WEAK_VIEW``, ``STRONG_VIEW``) of ``keys``."""
    words = [
        np.random.SeedSequence([int(key), view]).generate_state(1, np.uint64)[0] >> np.uint64(1)
        for key in keys.tolist()
    ]
    return torch.tensor(np.array(words, np.uint64).astype(np.int64), dtype=torch.int64)


@dataclass(frozen=True)
class DataPosition:
    """Where a split's order stands: pass ``epoch`` (a permutation), batch ``batch`` in it."""

    epoch: int
    batch: int


@dataclass(frozen=True)
class SplitOrder:
    """The seeded order in which a training split feeds global batches of ``global_batch``."""

    tile_ids: np.ndarray  # N int64, sorted: the split's tiles
    global_batch: int
    seed: int  # worker_seed(run seed, SHARED_RANK, the split's purpose)

    def __post_init__(self) -> None:
        if self.global_batch < 1:
            raise ValueError(f"global batch must be >= 1, got {self.global_batch}")

    @property
    def batches_per_epoch(self) -> int:
        """Full global batches in one pass over the split (the rest of a pass is left out)."""
        return len(self.tile_ids) // self.global_batch

    def position(self, step: int) -> DataPosition:
        """The pass and the batch within it that global step ``step`` takes."""
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"a split of {len(self.tile_ids)} tiles gives no full global batch of "
                f"{self.global_batch} tiles"
            )
        epoch, batch = divmod(step, self.batches_per_epoch)
        return DataPosition(epoch, batch)

    def permutation(self, epoch: int) -> np.ndarray:
        """The split's tile ids in the order of pass ``epoch`` (N int64)."""
        rng = np.random.default_rng([self.seed, epoch])
        return self.tile_ids[rng.permutation(len(self.tile_ids))]

    def global_batch_ids(self, step: int) -> np.ndarray:
        """The ``global_batch`` tile ids of global step ``step``, in global order."""
        where = self.position(step)
        lo = where.batch * self.global_batch
        return self.permutation(where.epoch)[lo : lo + self.global_batch]

    def rank_share(self, step: int, rank: int, world: int) -> tuple[np.ndarray, int]:
        """(tile ids of ``rank``'s share of step ``step``, index of its first in the batch)."""
        lo, hi = share_bounds(self.global_batch, rank, world)
        return self.global_batch_ids(step)[lo:hi], lo


def share_bounds(global_batch: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi) of ``rank``'s contiguous share of a global batch split evenly over ``world``."""
    if world < 1 or not 0 <= rank < world or global_batch % world:
        raise ValueError(
            f"a global batch of {global_batch} cannot be split evenly over {world} workers "
            f"(rank {rank})"
        )
    per_rank = global_batch // world
    return rank * per_rank, (rank + 1) * per_rank


def validation_share(tile_ids: np.ndarray, rank: int, world: int) -> np.ndarray:
    """``rank``'s tiles of a validation split: contiguous, disjoint, together every tile once."""
    bounds = np.linspace(0, len(tile_ids), world + 1).round().astype(int)
    return np.sort(tile_ids)[bounds[rank] : bounds[rank + 1]]
