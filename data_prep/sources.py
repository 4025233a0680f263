"""Finding the source rasters, naming them, and pairing each with its label file.

Source ids are the image path relative to the common parent of all images, with path separators
replaced by ``__`` and the extension dropped: ``dubai/tile_1/images/image_part_001.jpg`` and
``dubai/tile_2/images/image_part_001.jpg`` become ``tile_1__images__image_part_001`` and
``tile_2__images__image_part_001``. They are unique, readable and stable for the same inputs.

Labels (``--labels``) are paired in one of two ways:

- one entry per input, in order: a folder (labels found by file stem), a file (the label of an
  input file, whatever its name) or ``-`` (that input has no labels);
- a list of label files named like the images (same stem), in any order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from data_prep.errors import PrepError
from data_prep.rasters import RASTER_SUFFIXES, list_rasters

NO_LABELS = "-"  # a --labels entry meaning "this input has no labels"
ID_SEPARATOR = "__"


@dataclass(frozen=True)
class SourceSpec:
    """One source raster: its id, image file, label file (None: unlabelled) and folder id."""

    source_id: str
    image_path: Path
    label_path: Path | None
    folder: str


@dataclass(frozen=True)
class _Input:
    path: Path
    is_dir: bool
    images: tuple[Path, ...]


def _absolute(path: str | Path) -> Path:
    # abspath, not resolve: symlinked folders keep the names the user gave them.
    return Path(os.path.abspath(os.fspath(path)))


def _expand_input(path: str | Path) -> _Input:
    absolute = _absolute(path)
    if absolute.is_dir():
        images = list_rasters(absolute)
        if not images:
            raise PrepError(
                f"input folder {path}: no rasters found ({', '.join('*' + s for s in RASTER_SUFFIXES)})"
            )
        return _Input(absolute, True, tuple(images))
    if absolute.is_file():
        return _Input(absolute, False, (absolute,))
    raise PrepError(f"input {path}: no such file or folder")


def source_id_of(image: Path, common_parent: Path) -> str:
    """``tile_1/images/image_part_001.jpg`` (relative to ``common_parent``) -> ``tile_1__images__image_part_001``."""
    relative = image.relative_to(common_parent)
    return ID_SEPARATOR.join((*relative.parent.parts, relative.stem))


def discover_sources(
    inputs: Sequence[str | Path], labels: Sequence[str | Path] = ()
) -> list[SourceSpec]:
    """Every source raster of ``inputs`` (files or folders), paired with its label, by id."""
    if not inputs:
        raise PrepError("no inputs: give at least one raster file or folder")
    groups = [_expand_input(p) for p in inputs]
    images = [image for group in groups for image in group.images]
    seen: dict[Path, Path] = {}
    for image in images:
        if image in seen:
            raise PrepError(f"{image} is given twice (check the inputs)")
        seen[image] = image
    common = Path(os.path.commonpath([str(image.parent) for image in images]))
    label_of = _pair_labels(groups, labels)
    specs: dict[str, SourceSpec] = {}
    for image in images:
        source_id = source_id_of(image, common)
        if source_id in specs:
            other = specs[source_id].image_path
            raise PrepError(
                f"{image} and {other} would both be source {source_id!r}; rename one of them"
            )
        folder = ID_SEPARATOR.join(image.parent.relative_to(common).parts) or "."
        specs[source_id] = SourceSpec(source_id, image, label_of.get(image), folder)
    return [specs[k] for k in sorted(specs)]


def _pair_labels(groups: list[_Input], labels: Sequence[str | Path]) -> dict[Path, Path | None]:
    if not labels:
        return {}
    entries = [str(entry) for entry in labels]
    for entry in entries:
        if entry != NO_LABELS and not _absolute(entry).exists():
            raise PrepError(f"labels {entry}: no such file or folder")
    one_per_input = len(entries) == len(groups)
    if one_per_input and any(e == NO_LABELS or _absolute(e).is_dir() for e in entries):
        return _pair_per_input(groups, entries)
    if all(e != NO_LABELS and _absolute(e).is_file() for e in entries):
        return _pair_files(groups, [_absolute(e) for e in entries])
    raise PrepError(
        f"--labels: got {len(entries)} entries for {len(groups)} inputs; give one label folder, "
        f"file or '{NO_LABELS}' per input, or label files named like the images"
    )


def _pair_per_input(groups: list[_Input], entries: list[str]) -> dict[Path, Path | None]:
    pairs: dict[Path, Path | None] = {}
    for group, entry in zip(groups, entries, strict=True):
        if entry == NO_LABELS:
            pairs.update({image: None for image in group.images})
            continue
        target = _absolute(entry)
        if target.is_file():
            if group.is_dir:
                raise PrepError(
                    f"labels {entry} is a file but its input {group.path} is a folder; "
                    "give a label folder for a folder of images"
                )
            pairs[group.images[0]] = target
            continue
        by_stem = _by_stem(list_rasters(target), f"label folder {target}")
        for image in group.images:
            label = by_stem.get(image.stem)
            if label is None:
                raise PrepError(
                    f"no label for {image}: looked for {image.stem}.* in label folder {target}"
                )
            pairs[image] = label
    return pairs


def _pair_files(groups: list[_Input], files: list[Path]) -> dict[Path, Path | None]:
    images = [image for group in groups for image in group.images]
    by_stem = _by_stem(files, "--labels files")
    unmatched = [image for image in images if image.stem not in by_stem]
    if not unmatched:
        image_stems = {image.stem for image in images}
        unused = [f for f in files if f.stem not in image_stems]
        if unused:
            raise PrepError(f"label file {unused[0]} matches no input image by name")
        return {image: by_stem[image.stem] for image in images}
    if len(files) == len(groups) and not any(group.is_dir for group in groups):
        return {group.images[0]: label for group, label in zip(groups, files, strict=True)}
    raise PrepError(
        f"no label for {unmatched[0]}: looked for {unmatched[0].stem}.* among the --labels files "
        f"({', '.join(str(f) for f in files[:3])}{' ...' if len(files) > 3 else ''})"
    )


def _by_stem(files: list[Path], where: str) -> dict[str, Path]:
    by_stem: dict[str, Path] = {}
    for path in files:
        if path.stem in by_stem:
            raise PrepError(
                f"{where}: {by_stem[path.stem].name} and {path.name} have the same name; "
                "labels are matched to images by file name without extension"
            )
        by_stem[path.stem] = path
    return by_stem
