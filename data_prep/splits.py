"""Seeded train/val splits of the tile index, assigned per unit, never per tile.

A unit is a source image, a folder of sources, or a square spatial block of one source; all
tiles of a unit land in the same split, so neighbouring tiles of one image (which share content,
and pixels when tiles overlap) never leak between training and validation beyond the chosen unit.
A tile belongs to the block holding its top-left pixel, so with overlapping tiles the tiles on
either side of a block border share ``overlap`` pixels; source and folder units share none.

Only labelled units are split: ``val_sources`` globs force units into ``val`` (and then no other
unit is drawn for val), otherwise ``val_fraction`` of the labelled units are drawn for val; of the
remaining labelled units, ``labeled_fraction`` become ``labeled`` and the rest ``unlabeled``.
Tiles of sources without labels are always ``unlabeled``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Collection, Mapping, Sequence

import numpy as np

from data_prep.errors import PrepError
from semisup import columns as C
from semisup.config import SplitBy


def tile_units(
    source_ids: Sequence[str],
    y0s: Sequence[int],
    x0s: Sequence[int],
    *,
    split_by: SplitBy,
    block_size: int,
    folder_of: Mapping[str, str],
) -> list[str]:
    """The split unit of every tile (one string per tile).

    ``source``: the source id; ``folder``: ``folder_of[source]``; ``block``: the source id and
    the ``block_size``-pixel block that holds the tile's top-left pixel.
    """
    if split_by == "source":
        return list(source_ids)
    if split_by == "folder":
        return [folder_of[s] for s in source_ids]
    if split_by == "block":
        return [
            f"{s}@{y // block_size}_{x // block_size}"
            for s, y, x in zip(source_ids, y0s, x0s, strict=True)
        ]
    raise ValueError(f"split_by: got {split_by!r}, expected source, folder or block")


def _count(fraction: float, total: int, keep_one_back: bool) -> int:
    """Units to draw: the rounded fraction, at least one when the fraction is positive.

    With ``keep_one_back`` (val) at least one unit is left for training.
    """
    if fraction <= 0 or total == 0:
        return 0
    count = max(1, round(fraction * total))
    return min(count, total - 1) if keep_one_back else min(count, total)


def assign_unit_splits(
    labelled_units: Collection[str],
    *,
    val_fraction: float,
    labeled_fraction: float,
    seed: int,
    val_units: Collection[str] | None = None,
) -> dict[str, str]:
    """Split of every labelled unit: ``val``, ``labeled`` or ``unlabeled``.

    ``val_units`` (a subset of ``labelled_units``), when given, are exactly the val units and
    replace the random val draw.
    Same inputs and seed -> same result, independent of the order of ``labelled_units``.
    """
    units = sorted(set(labelled_units))
    rng = np.random.default_rng(seed)
    order = [units[i] for i in rng.permutation(len(units))]
    if val_units is not None:
        val = set(val_units)
        rest = [u for u in order if u not in val]
    else:
        n_val = _count(val_fraction, len(order), keep_one_back=True)
        val, rest = set(order[:n_val]), order[n_val:]
    labeled = set(rest[: _count(labeled_fraction, len(rest), keep_one_back=False)])
    return {u: C.VAL if u in val else C.LABELED if u in labeled else C.UNLABELED for u in units}


def split_tiles(
    source_ids: Sequence[str],
    y0s: Sequence[int],
    x0s: Sequence[int],
    *,
    labelled_sources: Collection[str],
    folder_of: Mapping[str, str],
    split_by: SplitBy,
    block_size: int,
    val_fraction: float,
    labeled_fraction: float,
    val_sources: Sequence[str] = (),
    seed: int = 0,
) -> list[str]:
    """The split of every tile (``semisup.columns`` LABELED / UNLABELED / VAL).

    ``val_sources`` are glob patterns on source ids; a unit holding a matching source goes to
    val whole. A pattern matching no source is an error (a typo would silently change the split).
    """
    units = tile_units(
        source_ids, y0s, x0s, split_by=split_by, block_size=block_size, folder_of=folder_of
    )
    labelled = set(labelled_sources)
    all_sources = sorted(set(source_ids))
    forced_sources: set[str] = set()
    for pattern in val_sources:
        matched = fnmatch.filter(all_sources, pattern)
        if not matched:
            example = ", ".join(all_sources[:3])
            raise PrepError(
                f"--val-sources {pattern!r} matches no source id (source ids look like {example})"
            )
        forced_sources.update(matched)
    labelled_units = {u for u, s in zip(units, source_ids, strict=True) if s in labelled}
    val_units = {
        u for u, s in zip(units, source_ids, strict=True) if s in forced_sources and s in labelled
    }
    by_unit = assign_unit_splits(
        labelled_units,
        val_fraction=val_fraction,
        labeled_fraction=labeled_fraction,
        seed=seed,
        val_units=val_units if val_sources else None,
    )
    return [
        by_unit[u] if s in labelled else C.UNLABELED for u, s in zip(units, source_ids, strict=True)
    ]
