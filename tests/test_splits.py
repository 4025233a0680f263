"""Split assignment: disjoint, seeded, whole units, fractions respected (pure functions)."""

from __future__ import annotations

from collections import defaultdict

import pytest

from data_prep.errors import PrepError
from data_prep.splits import assign_unit_splits, split_tiles, tile_units
from semisup import columns as C


def _grid(sources: list[str], size: int = 1000, tile: int = 100) -> tuple[list, list, list]:
    """One row per tile of a size×size grid for every source."""
    src, ys, xs = [], [], []
    for s in sources:
        for y in range(0, size, tile):
            for x in range(0, size, tile):
                src.append(s)
                ys.append(y)
                xs.append(x)
    return src, ys, xs


SOURCES = [f"tile_{t}__images__part_{i}" for t in range(1, 7) for i in range(1, 10)]
FOLDERS = {s: s.split("__")[0] for s in SOURCES}


def _split(**overrides: object) -> tuple[list[str], list[str], list[str]]:
    src, ys, xs = _grid(SOURCES, size=400)
    kwargs: dict = {
        "labelled_sources": set(SOURCES),
        "folder_of": FOLDERS,
        "split_by": "source",
        "block_size": 200,
        "val_fraction": 0.2,
        "labeled_fraction": 0.25,
        "val_sources": (),
        "seed": 0,
    }
    kwargs.update(overrides)
    splits = split_tiles(src, ys, xs, **kwargs)
    units = tile_units(
        src,
        ys,
        xs,
        split_by=kwargs["split_by"],
        block_size=kwargs["block_size"],
        folder_of=FOLDERS,
    )
    return splits, units, src


@pytest.mark.parametrize("split_by", ["source", "folder", "block"])
def test_each_unit_lies_in_exactly_one_split(split_by: str) -> None:
    splits, units, _ = _split(split_by=split_by)
    by_unit: dict[str, set[str]] = defaultdict(set)
    for unit, split in zip(units, splits, strict=True):
        by_unit[unit].add(split)
    assert all(len(s) == 1 for s in by_unit.values())
    assert set(splits) <= set(C.SPLITS)
    # Disjoint: no unit (hence no tile) appears in two splits.
    per_split = {name: {u for u, s in by_unit.items() if name in s} for name in C.SPLITS}
    assert not (per_split[C.VAL] & per_split[C.LABELED])
    assert not (per_split[C.VAL] & per_split[C.UNLABELED])
    assert not (per_split[C.LABELED] & per_split[C.UNLABELED])


def test_block_units_keep_neighbouring_tiles_together() -> None:
    src, ys, xs = _grid(["a"], size=400, tile=100)
    units = tile_units(src, ys, xs, split_by="block", block_size=200, folder_of={})
    assert len(set(units)) == 4
    # The four tiles of the top-left 200 px block share a unit.
    assert len({u for u, y, x in zip(units, ys, xs, strict=True) if y < 200 and x < 200}) == 1


def test_same_seed_same_split_other_seed_differs() -> None:
    assert _split(seed=3)[0] == _split(seed=3)[0]
    assert _split(seed=3)[0] != _split(seed=4)[0]


def test_unit_order_does_not_change_the_split() -> None:
    units = [f"u{i}" for i in range(30)]
    kwargs = {"val_fraction": 0.2, "labeled_fraction": 0.5, "seed": 1}
    assert assign_unit_splits(units, **kwargs) == assign_unit_splits(units[::-1], **kwargs)


def test_fractions_are_respected() -> None:
    units = [f"u{i}" for i in range(41)]
    result = assign_unit_splits(units, val_fraction=0.2, labeled_fraction=0.125, seed=0)
    counts = {name: list(result.values()).count(name) for name in C.SPLITS}
    assert counts[C.VAL] == round(0.2 * 41)  # 8
    assert counts[C.LABELED] == round(0.125 * (41 - 8))  # 4
    assert counts[C.UNLABELED] == 41 - 8 - 4


def test_small_fractions_keep_one_unit_and_leave_training_data() -> None:
    one = assign_unit_splits(["only"], val_fraction=0.2, labeled_fraction=0.125, seed=0)
    assert one == {"only": C.LABELED}  # val never takes the last unit
    two = assign_unit_splits(["a", "b"], val_fraction=0.1, labeled_fraction=0.1, seed=0)
    assert sorted(two.values()) == [C.LABELED, C.VAL]
    none = assign_unit_splits(["a", "b"], val_fraction=0.0, labeled_fraction=0.0, seed=0)
    assert set(none.values()) == {C.UNLABELED}


def test_val_sources_force_whole_units_into_val() -> None:
    splits, units, src = _split(split_by="folder", val_sources=("tile_6*",))
    val_sources = {s for s, split in zip(src, splits, strict=True) if split == C.VAL}
    assert val_sources == {s for s in SOURCES if s.startswith("tile_6")}
    # No random val draw on top of the forced units; 5 folders remain, 1/4 of them labelled.
    labeled_units = {u for u, split in zip(units, splits, strict=True) if split == C.LABELED}
    assert len(labeled_units) == 1


def test_unlabelled_sources_are_always_unlabeled() -> None:
    labelled = {s for s in SOURCES if not s.startswith("tile_1")}
    splits, _, src = _split(labelled_sources=labelled, val_sources=("tile_1*", "tile_2*"))
    for source, split in zip(src, splits, strict=True):
        if source.startswith("tile_1"):
            assert split == C.UNLABELED
        if source.startswith("tile_2"):
            assert split == C.VAL


def test_val_glob_matching_nothing_is_an_error() -> None:
    with pytest.raises(PrepError, match="'tile_9\\*' matches no source id"):
        _split(val_sources=("tile_9*",))
