"""Command line of the prep stage: ``semisup prep`` and ``python -m data_prep``."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import get_args

from data_prep.errors import PrepError
from data_prep.ingest import build_store
from semisup.config import (
    ConfigError,
    PrepConfig,
    SplitBy,
    add_config_arguments,
    config_from_arguments,
)
from semisup.known_imagery import colour_map

DESCRIPTION = (
    "Turn rasters (GeoTIFF/COG, PNG, JPEG, .npy; uint8 or uint16) and their labels (class-id "
    "rasters, colour-coded masks, box CSV/XML) into one Zarr tile store with a tile index and "
    "seeded labeled/unlabeled/val splits. The store is built in a temporary folder and renamed "
    "into place when complete; rerunning the same command is a no-op."
)

EPILOG = """\
example (Dubai tiles 1 and 2, colour-coded masks):
  cat > dubai_colors.json <<'EOF'
  {"#3C1098": 0, "#8429F6": 1, "#6EC1E4": 2, "#FEDD3A": 3, "#E2A929": 4,
   "#9B9B9B": 255, "#000000": 255}
  EOF
  semisup prep ../shared/data/dubai/tile_{1,2}/images \\
      --labels ../shared/data/dubai/tile_{1,2}/masks --label-colors dubai_colors.json \\
      --class-names building,land,road,vegetation,water --split-by folder --out dubai.zarr

example (GeoTIFFs with box prompts, a 16-bit image with its 0/255 footprint mask):
  echo '{"#000000": 0, "#FFFFFF": 1}' > footprint_colors.json
  semisup prep ../shared/data/spacenet_vegas/sample_geotiff.tif \\
      --labels ../shared/data/spacenet_vegas/sample_fp_mask.tif \\
      --label-colors footprint_colors.json --out vegas.zarr

labels pair with inputs either one entry per input (a folder searched by file name, a file, or
'-' for none) or as label files named like the images. --out is a local path.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the prep flags to ``parser`` (and its description and example epilog)."""
    defaults = PrepConfig()
    parser.description = parser.description or DESCRIPTION
    parser.epilog = EPILOG  # the self-contained example, colour map included
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="raster files or folders (folders: *.tif *.tiff *.png *.jpg *.jpeg *.npy inside)",
    )
    parser.add_argument(
        "--out", required=True, metavar="STORE", help="the store to write (a local path)"
    )
    parser.add_argument(
        "--labels",
        nargs="+",
        action="extend",
        default=[],
        metavar="DIR_OR_FILE",
        help="label folders or files: one per input ('-' for none), or files named like the images",
    )
    parser.add_argument(
        "--label-colors",
        metavar="MAP.json",
        help='JSON colour map {"#RRGGBB": class_id}, 255 = ignore, for colour-coded masks; '
        "'dubai' names the Dubai set's map",
    )
    parser.add_argument(
        "--boxes",
        nargs="+",
        action="extend",
        default=[],
        metavar="CSV_OR_XML",
        help="box files (CSV with image_path,xmin,ymin,xmax,ymax[,label] or Pascal-VOC XML)",
    )
    parser.add_argument(
        "--box-classes",
        nargs="+",
        action="extend",
        default=[],
        metavar="NAMES=CLASS",
        help="rename box labels: 'Tree,0,Alive,Dead=tree' stores the four names as 'tree' "
        "(repeatable; names not listed stay as they are)",
    )
    parser.add_argument(
        "--tile-size",
        type=int,
        metavar="PX",
        help=f"tile side in pixels (default {defaults.tile_size})",
    )
    parser.add_argument(
        "--overlap",
        type=int,
        metavar="PX",
        help=f"pixels shared by neighbouring tiles (default {defaults.overlap})",
    )
    parser.add_argument(
        "--split-by",
        choices=get_args(SplitBy),
        help=f"unit kept whole by the split (default {defaults.split_by})",
    )
    parser.add_argument(
        "--block-size",
        type=int,
        metavar="PX",
        help=f"side of a spatial block with --split-by block (default {defaults.block_size})",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        metavar="F",
        help=f"fraction of labelled units drawn for val (default {defaults.val_fraction})",
    )
    parser.add_argument(
        "--val-sources",
        nargs="+",
        action="extend",
        metavar="GLOB",
        help="source-id globs forced into val instead of a random draw, e.g. 'tile_6*'",
    )
    parser.add_argument(
        "--labeled-fraction",
        type=float,
        metavar="F",
        help=f"fraction of the other labelled units kept labelled (default {defaults.labeled_fraction})",
    )
    parser.add_argument(
        "--num-classes",
        type=int,
        metavar="N",
        help="number of classes (default: from --class-names, the colour map, or the labels)",
    )
    parser.add_argument(
        "--class-names", metavar="A,B,C", help="comma-separated class names, in class-id order"
    )
    parser.add_argument("--seed", type=int, help=f"seed of the split (default {defaults.seed})")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing store built from other inputs/options (once the new one is complete)",
    )
    add_config_arguments(parser)  # flags given explicitly take precedence over --config/--set


def config_from_args(args: argparse.Namespace) -> PrepConfig:
    """PrepConfig from --config/--set, then the explicit flags (flags win)."""
    keys = (
        "tile_size",
        "overlap",
        "split_by",
        "block_size",
        "val_fraction",
        "labeled_fraction",
        "seed",
    )
    values = {key: getattr(args, key) for key in keys if getattr(args, key, None) is not None}
    if getattr(args, "val_sources", None):
        values["val_sources"] = tuple(args.val_sources)
    return dataclasses.replace(config_from_arguments(args).prep, **values)


def run_cli(args: argparse.Namespace) -> int:
    """Run ``semisup prep``; returns the exit status (errors are printed, not raised)."""
    try:
        class_names = None
        if args.class_names:
            class_names = [name.strip() for name in args.class_names.split(",")]
        build_store(
            args.inputs,
            args.out,
            labels=args.labels,
            label_colors=colour_map(args.label_colors),
            boxes=args.boxes,
            box_classes=args.box_classes,
            config=config_from_args(args),
            num_classes=args.num_classes,
            class_names=class_names,
            overwrite=args.overwrite,
        )
    except (PrepError, ConfigError, OSError) as err:
        print(f"semisup prep: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    return 0
