"""Column names and sentinels shared by every stage.

A batch is a dict of named columns. The same names flow through the Zarr tile store, Ray Data,
the teacher, ``iter_torch_batches``, ``train_step`` and the tests, so they are defined once here.

Per-tile columns (one row per tile):

- ``IMAGE``: H×W×C in the source dtype (uint8 or uint16), channels last, as stored.
- ``LABEL``: H×W uint8 class ids, ``IGNORE_INDEX`` where unlabelled, void or padding.
- ``VALID``: H×W bool, False at nodata pixels and at padding outside the raster.
- ``PSEUDO_LABEL``: H×W uint8/int class or instance ids written by the teacher.
- ``CONFIDENCE``: H×W float32 in [0, 1], the teacher's confidence per pixel.
- ``TILE_ID``, ``SOURCE``, ``ROW``, ``COL``, ``Y0``, ``X0``: where the tile sits (see ``store``).
"""

from __future__ import annotations

from typing import Final

IMAGE: Final = "image"
LABEL: Final = "label"
VALID: Final = "valid"
PSEUDO_LABEL: Final = "pseudo_label"
CONFIDENCE: Final = "confidence"

TILE_ID: Final = "tile_id"
SOURCE: Final = "source"
ROW: Final = "row"
COL: Final = "col"
Y0: Final = "y0"
X0: Final = "x0"
SAMPLE_KEY: Final = "sample_key"  # int64 per sample: seeds its augmentation (semisup.sampling)
HEIGHT: Final = "height"
WIDTH: Final = "width"
SPLIT: Final = "split"
VALID_FRACTION: Final = "valid_fraction"  # share of the tile's pixels that hold data
LABEL_COVERAGE: Final = "label_coverage"  # share of the tile's pixels with a class label
MINX: Final = "minx"  # the tile's bounds in the source CRS
MINY: Final = "miny"
MAXX: Final = "maxx"
MAXY: Final = "maxy"

# Rows of a prediction job (``semisup.stitch.Job``): one window row of one stripe of one output
JOB_SEQ: Final = "seq"
JOB_OUTPUT: Final = "output"  # index into the run's outputs
FIRST_COL: Final = "first_col"  # [first_col, last_col): the row's window starts
LAST_COL: Final = "last_col"

# Class id for pixels that carry no supervision (unlabelled, void, padding, unconfident).
# 255 because labels are stored as uint8; also the ignore value of the colour map files.
IGNORE_INDEX: Final = 255

# Splits of the tile index. Splits are assigned per source image or spatial block, never per tile.
LABELED: Final = "labeled"
UNLABELED: Final = "unlabeled"
VAL: Final = "val"
SPLITS: Final = (LABELED, UNLABELED, VAL)
