"""Box annotations (SAM box prompts) from CSV tables and Pascal-VOC XML.

CSV columns are found by header name, in any order: ``image_path, xmin, ymin, xmax, ymax``, an
optional ``label`` and, in prediction files, an optional ``score`` (NEON's truth CSVs order them
``xmin, xmax, ymin, ymax``). One CSV may hold boxes of several images. VOC XML holds one image: ``<filename>`` and one ``<object>`` per box with
``<name>`` and ``<bndbox>``. Boxes are pixel x0, y0, x1, y1 of the image they annotate, which is
found by file stem (``match_boxes``).
"""

from __future__ import annotations

import csv
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePath

import numpy as np

from data_prep.errors import PrepError
from data_prep.sources import SourceSpec

CSV_COLUMNS = ("image_path", "xmin", "ymin", "xmax", "ymax")
DEFAULT_BOX_LABEL = "object"  # the label of a box whose file has no label column


@dataclass(frozen=True)
class BoxSet:
    """The boxes one annotation file gives for one image.

    ``image_ref``: the image as the file names it (a path or a file name); ``boxes``: N×4 float32
    pixel x0, y0, x1, y1; ``labels``: N class names; ``path``: the annotation file; ``scores``:
    N float32 confidences where the file has a ``score`` column (predictions), else None.
    """

    image_ref: str
    boxes: np.ndarray
    labels: tuple[str, ...]
    path: Path
    scores: np.ndarray | None = None

    @property
    def image_name(self) -> str:
        """The image's file name (``a/b/c.tif`` and ``c.tif`` name the same image)."""
        return PurePath(self.image_ref.replace("\\", "/")).name

    @property
    def image_stem(self) -> str:
        return PurePath(self.image_name).stem


def read_box_file(path: str | Path) -> list[BoxSet]:
    """Boxes of a ``.csv`` or ``.xml`` file, one BoxSet per image it annotates."""
    path = Path(path)
    if not path.is_file():
        raise PrepError(f"box file {path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return read_box_csv(path)
    if suffix == ".xml":
        return [read_voc_xml(path)]
    raise PrepError(f"box file {path}: expected a .csv table or a Pascal-VOC .xml file")


def read_box_csv(path: Path) -> list[BoxSet]:
    """Rows grouped by ``image_path``, in order of first appearance."""
    try:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip().lower() for h in reader.fieldnames or []]
            missing = [c for c in CSV_COLUMNS if c not in header]
            if missing:
                raise PrepError(
                    f"box file {path}: missing column(s) {', '.join(missing)}; "
                    f"found {', '.join(header) or 'no header'}"
                )
            scored = "score" in header
            rows: dict[str, tuple[list[list[float]], list[str], list[float]]] = {}
            for line, raw in enumerate(reader, start=2):
                row = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items()}
                box = [_number(row[c], path, line, c) for c in ("xmin", "ymin", "xmax", "ymax")]
                _check_order(box, path, line)
                boxes, labels, scores = rows.setdefault(row["image_path"], ([], [], []))
                boxes.append(box)
                labels.append(row.get("label") or DEFAULT_BOX_LABEL)
                if scored:
                    scores.append(_number(row["score"], path, line, "score"))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise PrepError(f"box file {path}: cannot read CSV ({err})") from err
    return [
        BoxSet(
            ref,
            np.asarray(b, dtype=np.float32).reshape(-1, 4),
            tuple(labels),
            path,
            np.asarray(scores, dtype=np.float32) if scored else None,
        )  # fmt: skip
        for ref, (b, labels, scores) in rows.items()
    ]


def read_voc_xml(path: Path) -> BoxSet:
    """One Pascal-VOC annotation; the image is ``<filename>``, else the XML file's stem."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as err:
        raise PrepError(f"box file {path}: cannot parse XML ({err})") from err
    boxes, labels = [], []
    for number, obj in enumerate(root.iter("object"), start=1):
        where = f"object {number}"
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise PrepError(f"box file {path}: {where} has no <bndbox>")
        box = [
            _number(bndbox.findtext(c, ""), path, where, c)
            for c in ("xmin", "ymin", "xmax", "ymax")
        ]
        _check_order(box, path, where)
        boxes.append(box)
        labels.append((obj.findtext("name") or DEFAULT_BOX_LABEL).strip())
    image_ref = (root.findtext("filename") or "").strip() or path.stem
    return BoxSet(
        image_ref, np.asarray(boxes, dtype=np.float32).reshape(-1, 4), tuple(labels), path
    )


def parse_box_classes(specs: Sequence[str]) -> dict[str, str]:
    """``["Tree,0,Alive,Dead=tree", ...]`` -> ``{"Tree": "tree", "0": "tree", ...}``.

    Box files name one class in several ways (NEON alone has ``Tree``, ``0``, ``Alive`` and
    ``Dead``); each spec lists the names a file may use, then ``=`` and the class they mean.
    """
    mapping: dict[str, str] = {}
    for spec in specs:
        names, sep, target = spec.rpartition("=")
        sources = [n.strip() for n in names.split(",") if n.strip()]
        if not sep or not target.strip() or not sources:
            raise PrepError(
                f"--box-classes {spec!r}: expected NAME[,NAME...]=CLASS, e.g. 'Tree,0,Dead=tree'"
            )
        for name in sources:
            if mapping.get(name, target.strip()) != target.strip():
                raise PrepError(
                    f"--box-classes: {name!r} is mapped to both {mapping[name]!r} and "
                    f"{target.strip()!r}"
                )
            mapping[name] = target.strip()
    return mapping


def rename_box_labels(box_set: BoxSet, mapping: dict[str, str]) -> BoxSet:
    """``box_set`` with its labels through ``mapping`` (names it does not list stay as they are)."""
    if not mapping:
        return box_set
    return replace(box_set, labels=tuple(mapping.get(label, label) for label in box_set.labels))


def encode_labels(labels: Sequence[str]) -> tuple[tuple[str, ...], np.ndarray]:
    """(sorted distinct names, N int32 index of each label into them)."""
    names = tuple(sorted(set(labels)))
    index = {name: i for i, name in enumerate(names)}
    return names, np.array([index[label] for label in labels], dtype=np.int32)


def clip_boxes(boxes: np.ndarray, height: int, width: int, source: str) -> np.ndarray:
    """Clip N×4 x0, y0, x1, y1 boxes to the image; a box left with no area is an error."""
    clipped = boxes.copy()
    clipped[:, [0, 2]] = np.clip(clipped[:, [0, 2]], 0, width)
    clipped[:, [1, 3]] = np.clip(clipped[:, [1, 3]], 0, height)
    empty = (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
    if empty.any():
        first = int(np.flatnonzero(empty)[0])
        raise PrepError(
            f"{source}: {int(empty.sum())} box(es) lie outside the {width}x{height} image, "
            f"e.g. box {first + 1}: {boxes[first].tolist()}"
        )
    return clipped


def match_boxes(
    box_sets: Sequence[BoxSet], specs: Sequence[SourceSpec], note: Callable[[str], None]
) -> dict[str, list[BoxSet]]:
    """Source id -> its box sets, matching each set's image by file stem (then by path).

    Boxes of images that are not among the sources are skipped with a ``note`` (one CSV may
    cover many images), but a box file none of whose images is a source is an error.
    """
    by_stem: dict[str, list[SourceSpec]] = {}
    for spec in specs:
        by_stem.setdefault(spec.image_path.stem, []).append(spec)
    matched: dict[str, list[BoxSet]] = {}
    used_files: set[Path] = set()
    for box_set in box_sets:
        candidates = by_stem.get(box_set.image_stem, [])
        if len(candidates) > 1:
            # Same file name in several folders: keep the sources whose path ends like the ref.
            ref_parts = PurePath(box_set.image_ref.replace("\\", "/")).parts
            candidates = [
                c for c in candidates if c.image_path.parts[-len(ref_parts) :] == ref_parts
            ]
            if len(candidates) != 1:
                raise PrepError(
                    f"box file {box_set.path}: image {box_set.image_ref!r} matches "
                    f"{len(by_stem[box_set.image_stem])} sources; name it by a longer path"
                )
        if not candidates:
            note(
                f"box file {box_set.path}: skipping {len(box_set.boxes)} boxes of "
                f"{box_set.image_ref!r}, which is not among the inputs"
            )
            continue
        matched.setdefault(candidates[0].source_id, []).append(box_set)
        used_files.add(box_set.path)
    for path in sorted({b.path for b in box_sets} - used_files):
        refs = sorted({b.image_ref for b in box_sets if b.path == path})
        raise PrepError(
            f"box file {path}: none of its images ({', '.join(refs[:3])}) is among the inputs"
        )
    return matched


def _number(text: str, path: Path, where: int | str, column: str) -> float:
    try:
        return float(text)
    except ValueError:
        at = f"line {where}" if isinstance(where, int) else where
        raise PrepError(f"box file {path}: {at}: {column} = {text!r} is not a number") from None


def _check_order(box: list[float], path: Path, where: int | str) -> None:
    if box[2] < box[0] or box[3] < box[1]:
        at = f"line {where}" if isinstance(where, int) else where
        raise PrepError(f"box file {path}: {at}: xmax < xmin or ymax < ymin in {box}")
