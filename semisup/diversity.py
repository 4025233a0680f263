"""Active learning: which unlabeled tiles to label next, given one uncertainty score per tile.

Pure NumPy; ``semisup.select`` computes the scores (Ray Data, the trained student) and writes
the proposals. Uncertainty alone picks clusters: the most uncertain tiles of an image are
usually neighbours showing the same unfamiliar thing. ``diverse_greedy`` therefore discounts a
candidate for every tile already chosen near it in the same source and for every tile already
chosen from its source, so one batch of labelling spreads over places and images.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def diverse_greedy(
    scores: np.ndarray,
    sources: Sequence[str],
    centres: np.ndarray,
    budget: int,
    *,
    diversity: float = 0.5,
    radius_px: float = 512.0,
) -> np.ndarray:
    """Indices of ``budget`` tiles picked greedily by discounted score, best first.

    Args:
        scores: N uncertainty scores in [0, 1] (higher = more worth labelling).
        sources: N source ids; tiles of different sources never discount each other spatially.
        centres: N×2 tile centres (y, x) in pixels of their source.
        budget: tiles to pick; fewer are returned when there are fewer candidates.
        diversity: 0 = plain top-k by score; 1 = strongest spreading. A candidate's score is
            multiplied by (1 − diversity·exp(−d²/2r²)) for each chosen tile at distance d in its
            source, and by 1 / (1 + diversity·n) when n tiles of its source are already chosen.
        radius_px: r, the distance over which a chosen tile discounts its neighbours.
    """
    scores = np.asarray(scores, dtype=np.float64)
    count = len(scores)
    if budget < 0:
        raise ValueError(f"budget: got {budget}, expected an integer >= 0")
    if not 0 <= diversity <= 1:
        raise ValueError(f"diversity: got {diversity}, expected a value in [0, 1]")
    if radius_px <= 0:
        raise ValueError(f"radius_px: got {radius_px}, expected > 0")
    if len(sources) != count or np.asarray(centres).shape != (count, 2):
        raise ValueError(
            f"scores, sources and centres disagree: {count} scores, {len(sources)} sources, "
            f"centres of shape {np.asarray(centres).shape} (expected ({count}, 2))"
        )
    source_ids, source_of = np.unique(np.asarray(sources, dtype=str), return_inverse=True)
    centres = np.asarray(centres, dtype=np.float64)
    spatial = np.ones(count)  # product of the spatial discounts so far
    per_source = np.zeros(len(source_ids))  # tiles chosen per source
    available = np.ones(count, dtype=bool)
    chosen: list[int] = []
    for _ in range(min(budget, count)):
        gain = scores * spatial / (1.0 + diversity * per_source[source_of])
        gain[~available] = -np.inf
        best = int(np.argmax(gain))
        chosen.append(best)
        available[best] = False
        per_source[source_of[best]] += 1
        same = source_of == source_of[best]
        squared = ((centres - centres[best]) ** 2).sum(1)
        spatial[same] *= 1.0 - diversity * np.exp(-squared[same] / (2 * radius_px**2))
    return np.asarray(chosen, dtype=np.int64)


def footprint_feature(bounds: Sequence[float], properties: Mapping[str, Any]) -> dict[str, Any]:
    """A GeoJSON Feature: the rectangle (minx, miny, maxx, maxy) as a closed polygon ring."""
    minx, miny, maxx, maxy = (float(v) for v in bounds)
    ring = [[minx, miny], [maxx, miny], [maxx, maxy], [minx, maxy], [minx, miny]]
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": dict(properties),
    }


def feature_collection(features: Sequence[dict[str, Any]], crs_name: str | None) -> dict[str, Any]:
    """A FeatureCollection whose coordinates are in ``crs_name`` (e.g. "EPSG:32640").

    RFC 7946 GeoJSON assumes WGS 84; footprints here stay in the source CRS so they overlay the
    imagery exactly, and the CRS is named in the (pre-RFC, still widely read by GDAL and QGIS)
    ``crs`` member.
    """
    collection: dict[str, Any] = {"type": "FeatureCollection", "features": list(features)}
    if crs_name:
        collection["crs"] = {"type": "name", "properties": {"name": crs_name}}
    return collection


def crs_name(wkt: str | None) -> str | None:
    """ "EPSG:<code>" for a WKT CRS that has one, the WKT itself otherwise, None without a CRS."""
    if not wkt:
        return None
    from rasterio.crs import CRS

    code = CRS.from_wkt(wkt).to_epsg()
    return f"EPSG:{code}" if code else wkt


def dumps_geojson(collection: Mapping[str, Any]) -> str:
    """A GeoJSON document as text (indented, with a trailing newline)."""
    return json.dumps(collection, indent=1) + "\n"
