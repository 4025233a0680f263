"""Known imagery: the class tables and file layouts of the datasets semisup is shown on.

The Dubai set ("Semantic segmentation of aerial imagery", Humans in the Loop / MBRSC, CC0 1.0)
stores masks as RGB colour codes. The colours below are the ones actually present in its masks
(the ``classes.json`` shipped with the dataset elsewhere is wrong).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from semisup.columns import IGNORE_INDEX

CLASS_NAMES: tuple[str, ...] = ("building", "land", "road", "vegetation", "water")

DUBAI_COLOURS: dict[str, int] = {
    "#3C1098": 0,  # building
    "#8429F6": 1,  # land
    "#6EC1E4": 2,  # road
    "#FEDD3A": 3,  # vegetation
    "#E2A929": 4,  # water
    "#9B9B9B": IGNORE_INDEX,  # unlabeled
    "#000000": IGNORE_INDEX,  # void
}


# Colour maps known by name (``semisup prep --label-colors dubai``, ``pipeline.label_colors``).
NAMED_COLOUR_MAPS: dict[str, dict[str, int]] = {"dubai": DUBAI_COLOURS}


def colour_map(value: str | None) -> str | dict[str, int] | None:
    """A known colour map by name, else ``value`` unchanged (a JSON file path, or None).

    A file of that name in the working directory wins over the built-in map.
    """
    if value is not None and value in NAMED_COLOUR_MAPS and not Path(value).exists():
        return NAMED_COLOUR_MAPS[value]
    return value


def shared_data_dir() -> Path | None:
    """The real imagery folder: $SEMISUP_SHARED_DATA, else ``../shared/data`` beside the repo."""
    candidates = []
    if os.environ.get("SEMISUP_SHARED_DATA"):
        candidates.append(Path(os.environ["SEMISUP_SHARED_DATA"]))
    candidates += [
        Path.cwd().parent / "shared" / "data",
        Path(__file__).resolve().parents[2] / "shared" / "data",
    ]
    return next((path for path in candidates if path.is_dir()), None)


def dubai_folders(
    root: Path, tiles: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
) -> tuple[list[Path], list[Path]]:
    """(image folders, mask folders) of the Dubai tiles, in corresponding order."""
    images = [root / f"tile_{t}" / "images" for t in tiles]
    masks = [root / f"tile_{t}" / "masks" for t in tiles]
    missing = [str(p) for p in images + masks if not p.is_dir()]
    if missing:
        raise FileNotFoundError(f"Dubai folders missing: {', '.join(missing)}")
    return images, masks


def write_colour_map(path: Path, colours: dict[str, int] = DUBAI_COLOURS) -> Path:
    """Write a colour map JSON (``{"#RRGGBB": class_id}``) for ``semisup prep --label-colors``."""
    path.write_text(json.dumps(colours, indent=2) + "\n")
    return path
