"""A plain-data summary of a tile store, for ``semisup info`` and the demo."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from typing import Any

from semisup import columns as C
from semisup.store import open_store, read_source_meta, read_store_meta, read_tile_index


def _crs_name(wkt: str | None) -> str | None:
    if not wkt:
        return None
    try:
        from rasterio.crs import CRS

        crs = CRS.from_wkt(wkt)
        return crs.to_string()
    except Exception:  # an exotic WKT still names itself in its first words
        return wkt.split(",")[0]


def store_summary(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Store attributes, tiles per split and per-source metadata as JSON-safe data."""
    root = open_store(url, storage_options=storage_options)
    meta = read_store_meta(root)
    index = read_tile_index(url, storage_options).to_pandas()
    sources = []
    for source_id in meta.sources:
        source = read_source_meta(root, source_id)
        sources.append(
            {
                "source_id": source_id,
                "height": source.height,
                "width": source.width,
                "bands": source.bands,
                "dtype": source.dtype,
                "crs_name": _crs_name(source.crs),
                "tiles": int((index[C.SOURCE] == source_id).sum()),
            }
        )
    return {
        "tile_size": meta.tile_size,
        "overlap": meta.overlap,
        "num_classes": meta.num_classes,
        "class_names": meta.class_names,
        "tiles": len(index),
        "tiles_per_split": {str(k): int(v) for k, v in index[C.SPLIT].value_counts().items()},
        "sources": sources,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``semisup info`` flags."""
    parser.add_argument("store", help="store path or fsspec URL (s3://, gs://, ...)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run_cli(args: argparse.Namespace) -> int:
    """Print the store's summary (as JSON with ``--json``); returns the exit status."""
    summary = store_summary(args.store)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return 0
    print(
        f"{args.store}: {summary['tiles']} tiles of {summary['tile_size']} px "
        f"(overlap {summary['overlap']}), {len(summary['sources'])} sources, "
        f"{summary['num_classes']} classes"
    )
    for split, count in sorted(summary["tiles_per_split"].items()):
        print(f"  {split:<10} {count} tiles")
    for source in summary["sources"]:
        print(
            f"  {source['source_id']}: {source['height']}×{source['width']}×{source['bands']} "
            f"{source['dtype']}, crs={source['crs_name'] or 'none'}"
        )
    return 0
