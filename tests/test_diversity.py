"""Greedy diverse selection and GeoJSON footprints (pure, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from semisup.diversity import crs_name, diverse_greedy, feature_collection, footprint_feature


def _grid(source: str, rows: int, cols: int, size: int = 256) -> tuple[list[str], np.ndarray]:
    centres = [(r * size + size / 2, c * size + size / 2) for r in range(rows) for c in range(cols)]
    return [source] * len(centres), np.array(centres)


def test_zero_diversity_is_top_k() -> None:
    rng = np.random.default_rng(0)
    scores = rng.random(30)
    sources, centres = _grid("a", 5, 6)
    picked = diverse_greedy(scores, sources, centres, 7, diversity=0.0)
    assert picked.tolist() == np.argsort(-scores)[:7].tolist()


def test_budget_is_respected_and_nothing_is_picked_twice() -> None:
    sources, centres = _grid("a", 3, 3)
    scores = np.linspace(0, 1, 9)
    for budget in (0, 4, 9, 20):
        picked = diverse_greedy(scores, sources, centres, budget)
        assert len(picked) == min(budget, 9) and len(set(picked.tolist())) == len(picked)


def test_diversity_spreads_over_places_and_sources() -> None:
    # source "a" holds a hot corner of near-equal, very uncertain tiles; "b" and "c" are milder
    sa, ca = _grid("a", 4, 4)
    sb, cb = _grid("b", 4, 4)
    sc, cc = _grid("c", 4, 4)
    scores = np.concatenate([np.full(16, 0.5), np.full(16, 0.4), np.full(16, 0.35)])
    scores[[0, 1, 4, 5]] = [0.9, 0.89, 0.88, 0.87]  # a 2×2 cluster in a's corner
    sources, centres = sa + sb + sc, np.concatenate([ca, cb, cc])
    plain = diverse_greedy(scores, sources, centres, 6, diversity=0.0)
    assert {sources[i] for i in plain} == {"a"}
    spread = diverse_greedy(scores, sources, centres, 6, diversity=0.8)
    assert {sources[i] for i in spread} == {"a", "b", "c"}
    a_picks = centres[[i for i in spread if sources[i] == "a"]]
    gaps = np.linalg.norm(a_picks[:, None] - a_picks[None], axis=-1)
    assert gaps[np.triu_indices(len(a_picks), 1)].min() > 256  # no two neighbours of the cluster


def test_bad_arguments_are_named() -> None:
    sources, centres = _grid("a", 2, 2)
    with pytest.raises(ValueError, match="budget"):
        diverse_greedy(np.ones(4), sources, centres, -1)
    with pytest.raises(ValueError, match="diversity"):
        diverse_greedy(np.ones(4), sources, centres, 2, diversity=2.0)
    with pytest.raises(ValueError, match="disagree"):
        diverse_greedy(np.ones(3), sources, centres, 2)


def test_footprints_are_closed_rings_with_a_named_crs() -> None:
    feature = footprint_feature((10.0, 20.0, 30.0, 40.0), {"tile_id": 3})
    ring = feature["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] and len(ring) == 5
    assert {tuple(p) for p in ring} == {(10, 20), (30, 20), (30, 40), (10, 40)}
    collection = feature_collection([feature], "EPSG:32640")
    assert collection["crs"]["properties"]["name"] == "EPSG:32640"
    from rasterio.crs import CRS

    assert crs_name(CRS.from_epsg(32616).to_wkt()) == "EPSG:32616"
    assert crs_name(None) is None
