"""The training order, its shares per worker, and per-sample augmentation keys (Ray-free)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from semisup import columns as C
from semisup.augment import strong_view, weak_view
from semisup.config import AugmentConfig
from semisup.sampling import (
    SHARED_RANK,
    DataPosition,
    SplitOrder,
    sample_keys,
    share_bounds,
    validation_share,
    worker_seed,
)


def _order(tiles: int = 10, batch: int = 4, seed: int = 7) -> SplitOrder:
    return SplitOrder(np.arange(100, 100 + tiles, dtype=np.int64), batch, seed)


def test_every_pass_is_a_seeded_permutation_cut_into_full_batches() -> None:
    order = _order()
    assert order.batches_per_epoch == 2  # 10 tiles, batches of 4: the last 2 wait for next pass
    assert [order.position(s) for s in (0, 1, 2, 5)] == [
        DataPosition(0, 0),
        DataPosition(0, 1),
        DataPosition(1, 0),
        DataPosition(2, 1),
    ]
    first, second = order.permutation(0), order.permutation(1)
    assert sorted(first) == list(range(100, 110)) and not np.array_equal(first, second)
    assert np.array_equal(first, _order().permutation(0))  # seeded: the same in every process
    assert not np.array_equal(first, _order(seed=8).permutation(0))
    steps = np.concatenate([order.global_batch_ids(s) for s in (0, 1)])
    assert np.array_equal(steps, first[:8]) and len(set(steps)) == 8
    with pytest.raises(ValueError, match="no full global batch"):
        _order(tiles=3).position(0)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_rank_shares_put_the_global_batch_back_together(world: int) -> None:
    order = _order(tiles=20, batch=8)
    for step in range(5):
        shares = [order.rank_share(step, rank, world) for rank in range(world)]
        assert np.array_equal(
            np.concatenate([ids for ids, _ in shares]), order.global_batch_ids(step)
        )
        assert [start for _, start in shares] == [rank * 8 // world for rank in range(world)]
    with pytest.raises(ValueError, match="cannot be split evenly over 3 workers"):
        share_bounds(8, 0, 3)


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_validation_shares_cover_every_tile_exactly_once(world: int) -> None:
    tiles = np.array([9, 3, 7, 1, 5, 11, 2], dtype=np.int64)
    shares = [validation_share(tiles, rank, world) for rank in range(world)]
    together = np.concatenate(shares)
    assert sorted(together) == sorted(tiles) and len(together) == len(tiles)


def test_seeds_differ_by_purpose_and_rank_but_not_by_process() -> None:
    seeds = {
        worker_seed(0, rank, purpose)
        for rank in (SHARED_RANK, 0, 1)
        for purpose in ("torch", "labeled_order", "unlabeled_order")
    }
    assert len(seeds) == 9 and all(0 <= s < 2**63 for s in seeds)
    assert worker_seed(3, 1, "torch") == worker_seed(3, 1, "torch")
    keys = sample_keys(0, "labeled_samples", step=4, count=6)
    assert torch.equal(sample_keys(0, "labeled_samples", 4, count=3, start=3), keys[3:])
    assert not torch.equal(sample_keys(0, "labeled_samples", 5, 6), keys)
    assert not torch.equal(sample_keys(0, "unlabeled_samples", 4, 6), keys)


def _batch(size: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        C.IMAGE: torch.rand(size, 3, 32, 32, generator=generator),
        C.LABEL: torch.randint(0, 5, (size, 32, 32), generator=generator),
        C.CONFIDENCE: torch.rand(size, 32, 32, generator=generator),
        C.VALID: torch.ones(size, 32, 32, dtype=torch.bool),
    }


def test_views_of_a_split_batch_equal_the_views_of_the_whole() -> None:
    """Keys follow the sample: two workers' halves are augmented as one worker's whole batch
    (flips, rotations, scale, CutMix partners, colour jitter and blur, all switched on)."""
    config = AugmentConfig(colour_strength=0.5, blur_prob=0.5, cutmix_prob=1.0)
    batch, keys = _batch(8), sample_keys(0, "unlabeled_samples", step=3, count=8)
    for view in (weak_view, strong_view):
        whole = view(batch, config, keys)
        halves = [
            view({k: v[lo : lo + 4] for k, v in batch.items()}, config, keys[lo : lo + 4])
            for lo in (0, 4)
        ]
        for name in batch:
            assert torch.equal(torch.cat([h[name] for h in halves]), whole[name]), name
    strong = strong_view(batch, config, keys)
    assert not torch.equal(strong[C.IMAGE], batch[C.IMAGE])
    assert not torch.equal(strong_view(batch, config, keys + 1)[C.IMAGE], strong[C.IMAGE])
