"""The ``semisup`` console script: one subcommand per pipeline stage."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from semisup.config import ConfigError

_EXAMPLES = {
    "prep": "semisup prep ../shared/data/dubai/tile_1/images --labels ../shared/data/dubai/tile_1/masks "
    "--label-colors dubai_colours.json --out dubai.zarr",
    "info": "semisup info dubai.zarr",
    "train": "semisup train --store dubai.zarr --out runs/decoder --set student.mode=decoder",
    "demo": "semisup demo --out demo_out",
}


def _add_prep(sub: argparse._SubParsersAction) -> None:
    from data_prep import cli as prep_cli

    parser = sub.add_parser(
        "prep",
        help="rasters and labels -> a chunked Zarr tile store",
        description="Build a Zarr v3 tile store from GeoTIFF/COG, PNG/JPEG or NumPy rasters.",
        epilog=f"example:\n  {_EXAMPLES['prep']}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prep_cli.add_arguments(parser)
    parser.set_defaults(handler=prep_cli.run)


def _add_info(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "info",
        help="summarise a tile store: sources, tiles per split, geo metadata",
        epilog=f"example:\n  {_EXAMPLES['info']}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("store", help="store path or fsspec URL (s3://, gs://, ...)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(handler=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    from semisup.store_info import store_summary

    summary = store_summary(args.store)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(f"{args.store}: {summary['tiles']} tiles of {summary['tile_size']} px "
              f"(overlap {summary['overlap']}), {len(summary['sources'])} sources, "
              f"{summary['num_classes']} classes")  # fmt: skip
        for split, count in sorted(summary["tiles_per_split"].items()):
            print(f"  {split:<10} {count} tiles")
        for source in summary["sources"]:
            print(f"  {source['source_id']}: {source['height']}×{source['width']}×{source['bands']} "
                  f"{source['dtype']}, crs={source['crs_name'] or 'none'}")  # fmt: skip
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    from semisup import train

    parser = sub.add_parser(
        "train",
        help="train the student on Ray Train (consistency regularisation, full/decoder/LoRA)",
        description="Trains the student on the store's labeled (and unlabeled) tiles, validates "
        "every epoch on the val tiles, stops early, checkpoints, and writes RUN_DIR/report.json.",
        epilog=f"example:\n  {_EXAMPLES['train']}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_arguments(parser)
    parser.set_defaults(handler=train.run_cli)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo",
        help="run the whole pipeline on built-in settings and small real or generated data",
        description="Runs every stage on one machine with a local Ray, in a few minutes on 2 CPUs. "
        "Uses the Dubai imagery in ../shared/data when present, generated scenes otherwise.",
        epilog=f"example:\n  {_EXAMPLES['demo']}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("demo_out"),
        help="folder for every output (default: demo_out)",
    )
    parser.add_argument(
        "--data", type=Path, default=None, help="real imagery folder (default: ../shared/data)"
    )
    parser.add_argument(
        "--synthetic", action="store_true", help="use generated scenes even if real data exists"
    )
    parser.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from semisup.demo import run_demo

    run_demo(args.out, data_dir=args.data, synthetic=args.synthetic)
    return 0


_SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_prep,
    _add_info,
    _add_train,
    _add_demo,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="semisup",
        description="Semi-supervised Segment Anything for aerial imagery, on Ray.",
        epilog="examples:\n  " + "\n  ".join(_EXAMPLES.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(title="stages", dest="command", metavar="COMMAND")
    sub.required = True
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError, OSError) as err:
        if os.environ.get("SEMISUP_TRACEBACK"):
            traceback.print_exc()
        print(f"semisup {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
