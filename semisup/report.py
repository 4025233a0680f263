"""``semisup report``: one run's evaluation gathered in one place.

For a pipeline run folder (as ``semisup demo`` / ``semisup run`` write it) the report holds:
zero-shot SAM, the labels-only teacher and the semi-supervised student side by side per class;
the quality of the teacher's pseudo-labels against the ground truth of the tiles that have it,
per confidence bin (which calibrates ``ssl.confidence_threshold``); and prediction overlays on
validation tiles. Outputs in ``RUN/report/``: report.json, report.md, calibration.png and
overlays.png.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from semisup import columns as C
from semisup.calibration import calibration, confidence_bins


@dataclass(frozen=True)
class RunLayout:
    """Where one pipeline run keeps what the report reads."""

    store: Path
    zero_shot: Path  # folder with zero_shot.json
    labels_only: Path  # `semisup train` run folder of the labels-only (teacher) model
    semi: Path  # `semisup train` run folder of the semi-supervised student

    @classmethod
    def of(cls, run: Path) -> RunLayout:
        return cls(run / "store.zarr", run / "zero_shot", run / "teacher", run / "student")


# ---------------------------------------------------------------------------------------------
# Pseudo-label calibration (pure)


def pseudo_label_quality(
    store: str, bins: int = 10, target_accuracy: float = 0.9
) -> dict[str, Any] | None:
    """Calibration of the store's semantic pseudo-labels on tiles with ground truth.

    Reads tile by tile (memory stays one tile). None when the store has no semantic
    pseudo-labels or no pseudo-labelled tile has ground truth.
    """
    from semisup.pseudo_label import read_manifest
    from semisup.store import (
        current_labels,
        label_array,
        open_store,
        read_store_meta,
        read_tile_index,
        read_window,
    )

    root = open_store(store)
    teacher = root.attrs.get("semisup_pseudo_label") or {}
    if not isinstance(teacher, dict) or teacher.get("mode") != "semantic":
        return None
    size = read_store_meta(root).tile_size
    done = set(read_manifest(store).column(C.TILE_ID).to_pylist())
    labels = current_labels(root)
    index = read_tile_index(store, labels=labels).to_pandas()
    index = index[index[C.TILE_ID].isin(done) & (index[C.LABEL_COVERAGE] > 0)]
    totals = {k: np.zeros(bins) for k in ("pixels", "correct", "confidence_sum")}
    for row in index.itertuples():
        group: Any = root[str(row.source)]
        truth = label_array(group, labels)
        if truth is None:
            continue
        y0, x0 = int(row.y0), int(row.x0)  # type: ignore[call-overload]
        label = read_window(truth, y0, x0, size, size, C.IGNORE_INDEX)
        pseudo = read_window(group[C.PSEUDO_LABEL], y0, x0, size, size, C.IGNORE_INDEX)
        confidence = read_window(group[C.CONFIDENCE], y0, x0, size, size, 0.0)
        keep = (label != C.IGNORE_INDEX) & (pseudo != C.IGNORE_INDEX)
        counts = confidence_bins(confidence[keep], pseudo[keep] == label[keep], bins)
        for key in totals:
            totals[key] += counts[key]
    if totals["pixels"].sum() == 0:
        return None
    result = calibration(
        totals["pixels"], totals["correct"], totals["confidence_sum"], target_accuracy
    )
    result["tiles"] = len(index)
    return result


# ---------------------------------------------------------------------------------------------
# Gathering a run


def _best_epoch(report: dict[str, Any]) -> dict[str, Any]:
    return next(e for e in report["epochs"] if e["epoch"] == report["best_epoch"])


def per_class_table(
    class_names: Sequence[str],
    zero_shot: dict[str, Any] | None,
    labels_only: dict[str, Any],
    semi: dict[str, Any],
) -> list[dict[str, Any]]:
    """One row per class: zero-shot box IoU, labels-only and semi-supervised validation IoU."""
    zero = {c["class_id"]: c["box_iou"] for c in (zero_shot or {}).get("per_class", [])}
    only, student = _best_epoch(labels_only), _best_epoch(semi)
    return [
        {
            "class": name,
            "zero_shot_box_iou": zero.get(k),
            "labels_only_iou": only["iou_per_class"][k],
            "semi_supervised_iou": student["iou_per_class"][k],
        }
        for k, name in enumerate(class_names)
    ]


RANDOM_WEIGHTS_NOTE = (
    "Zero-shot SAM has random weights here (no checkpoint): its score shows the pipeline "
    "working, not SAM; `--checkpoint PATH_OR_URL` loads official weights"
)
MIN_VALID_SHARE = 0.9  # tiles shown in figures are at least this valid, when enough are
MIN_CLASS_SHARE = 0.02  # a class counts as shown when it covers this share of a tile


def pick_showcase_tiles(
    valid_share: np.ndarray, class_share: np.ndarray, count: int, min_valid: float = MIN_VALID_SHARE
) -> list[int]:
    """Indices of up to ``count`` tiles worth showing: mostly valid, with a spread of classes.

    ``valid_share``: N float in [0, 1], the valid share of each padded tile (edge tiles padded
    to the full tile size count their padding as not valid); ``class_share``: N×K, the share of
    each tile's pixels labelled with each class. Candidates are the tiles at least
    ``min_valid`` valid, or the ``count`` most valid ones when fewer are. Each pick is the
    candidate that shows the most classes not shown yet (a class counts above
    ``MIN_CLASS_SHARE``), then the most classes, then the most valid pixels.
    """
    valid_share = np.asarray(valid_share, dtype=np.float64)
    present = np.asarray(class_share).reshape(len(valid_share), -1) >= MIN_CLASS_SHARE  # N×K
    candidates = np.flatnonzero(valid_share >= min_valid)
    if len(candidates) < count:
        candidates = np.argsort(-valid_share, kind="stable")[:count]
    shown = np.zeros(present.shape[1], dtype=bool)
    picks: list[int] = []
    for _ in range(min(count, len(candidates))):
        left = [int(i) for i in candidates if int(i) not in picks]
        best = max(
            left,
            key=lambda i: (int((present[i] & ~shown).sum()), int(present[i].sum()), valid_share[i]),
        )
        picks.append(best)
        shown |= present[best]
    return picks


def showcase_val_tiles(store: str, count: int) -> list[dict[str, Any]]:
    """Up to ``count`` labelled validation tiles for the overlays (``pick_showcase_tiles``),
    judged by their padded window's ``valid`` mask, not the tile index's clipped window."""
    from semisup.store import (
        current_labels,
        label_array,
        open_store,
        read_store_meta,
        read_tile_index,
        read_window,
    )

    root = open_store(store)
    meta = read_store_meta(root)
    labels = current_labels(root)
    index = read_tile_index(store, labels=labels).to_pandas()
    rows = index[(index[C.SPLIT] == C.VAL) & (index[C.LABEL_COVERAGE] > 0)]
    size, classes = meta.tile_size, max(meta.num_classes or 1, 1)
    valid_share, class_share = [], []
    for row in rows.itertuples():
        group: Any = root[str(row.source)]
        y0, x0 = int(row.y0), int(row.x0)  # type: ignore[call-overload]
        truth = label_array(group, labels)
        if truth is None:  # a val tile always has labels; a damaged store shows none of it
            continue
        valid = read_window(group[C.VALID], y0, x0, size, size, False)
        label = read_window(truth, y0, x0, size, size, C.IGNORE_INDEX)
        labelled = label[valid & (label != C.IGNORE_INDEX)]
        valid_share.append(float(valid.mean()))
        class_share.append(np.bincount(labelled, minlength=classes)[:classes] / label.size)
    if not valid_share:
        return []
    picks = pick_showcase_tiles(np.array(valid_share), np.array(class_share), count)
    return [rows.iloc[i].to_dict() for i in picks]


def overlays(store: str, runs: dict[str, Path], path: Path, tiles: int = 4) -> Path:
    """PNG: validation tiles with the ground truth and each run's prediction.

    The tiles are mostly valid and show a spread of classes (``pick_showcase_tiles``); labels
    and predictions leave nodata unpainted.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from matplotlib.patches import Patch

    from semisup.evaluate import run_predictor
    from semisup.model_input import prepare_batch
    from semisup.store import band_scales, open_store, read_store_meta, read_tile, store_facts

    root = open_store(store)
    meta = read_store_meta(root)
    picks = showcase_val_tiles(store, tiles)
    predictors = {name: run_predictor(run, meta.tile_size) for name, run in runs.items()}
    scale = band_scales(store_facts(store))
    columns = 2 + len(predictors)
    figure, axes = plt.subplots(
        max(len(picks), 1), columns, figsize=(2.2 * columns, 2.2 * len(picks) + 0.6), squeeze=False
    )
    num_classes = meta.num_classes or 1
    colours = plt.get_cmap("tab10")
    shade = {"cmap": colours, "vmin": 0, "vmax": 9, "interpolation": "nearest"}
    for i, row in enumerate(picks):
        group: Any = root[str(row[C.SOURCE])]
        tile = read_tile(group, int(row[C.Y0]), int(row[C.X0]), meta.tile_size)
        batch = {k: v[None] for k, v in tile.items()}
        batch[C.SOURCE] = np.array([row[C.SOURCE]])
        tensors = prepare_batch(batch, scale)
        nodata = ~tile[C.VALID]
        image = tensors[C.IMAGE][0].permute(1, 2, 0).numpy()
        label = np.ma.masked_where(nodata | (tile[C.LABEL] == C.IGNORE_INDEX), tile[C.LABEL])
        panels = [("image", image), ("ground truth", label)]
        with torch.inference_mode():
            for name, predict in predictors.items():
                predicted = predict(tensors[C.IMAGE]).argmax(1)[0].numpy()
                panels.append((name, np.ma.masked_where(nodata, predicted)))
        for ax, (title, panel) in zip(axes[i], panels, strict=True):
            if panel.ndim == 3:
                ax.imshow(panel)
            else:
                ax.imshow(panel % 10, **shade)
            ax.set_title(title if i else f"{title}\n", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    names = list(meta.class_names or [f"class {k}" for k in range(num_classes)])
    handles = [Patch(color=colours(k % 10), label=name) for k, name in enumerate(names)]
    handles.append(
        Patch(facecolor="white", edgecolor="grey", label="nodata, unlabelled: unpainted")
    )
    figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=7)
    figure.tight_layout(rect=(0, 0.6 / (2.2 * max(len(picks), 1) + 0.6), 1, 1))
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def calibration_plot(quality: dict[str, Any], path: Path) -> Path:
    """Reliability diagram of the pseudo-labels: accuracy against confidence per bin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 1.0 / len(quality["pixels"])
    centres = np.asarray(quality["bin_edges"]) + width / 2
    accuracy = [np.nan if a is None else a for a in quality["accuracy"]]
    figure, ax = plt.subplots(figsize=(4, 3.5))
    ax.bar(centres, accuracy, width=width * 0.9, label="pseudo-label accuracy")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    if quality["suggested_threshold"] is not None:
        ax.axvline(quality["suggested_threshold"], color="red", label="suggested threshold")
    ax.set(xlabel="teacher confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def format_report(report: dict[str, Any]) -> str:
    """The run report as Markdown: the figures of ``report`` as tables, with the plots."""
    lines = ["# Run report", "", f"Run `{report['run']}`.", "", "## Validation mIoU", ""]
    lines += ["| model | mIoU |", "|---|---|"]
    lines.append(
        f"| zero-shot SAM (box prompts, class-agnostic) | {_fmt(report['zero_shot_miou'])} |"
    )
    lines.append(f"| labels-only | {_fmt(report['labels_only_miou'])} |")
    lines.append(f"| semi-supervised | {_fmt(report['semi_supervised_miou'])} |")
    if report["zero_shot_miou"] is not None and not report.get("zero_shot_checkpoint"):
        lines += ["", f"{RANDOM_WEIGHTS_NOTE}."]
    lines += ["", "## Per class (IoU)", "", "| class | zero-shot | labels-only | semi-supervised |"]
    lines.append("|---|---|---|---|")
    for row in report["per_class"]:
        lines.append(
            f"| {row['class']} | {_fmt(row['zero_shot_box_iou'])} | "
            f"{_fmt(row['labels_only_iou'])} | {_fmt(row['semi_supervised_iou'])} |"
        )
    quality = report["pseudo_labels"]
    lines += ["", "## Pseudo-label quality", ""]
    if quality is None:
        lines.append("The store holds no semantic pseudo-labels on tiles with ground truth.")
    else:
        lines += [
            f"On {quality['tiles']} pseudo-labelled tiles with ground truth: accuracy "
            f"{quality['overall_accuracy']:.3f}, expected calibration error "
            f"{quality['expected_calibration_error']:.3f}. Threshold for "
            f"{quality['target_accuracy']:.0%} accuracy: "
            f"{_fmt(quality['suggested_threshold'])} (keeps {quality['kept_fraction']:.1%} of the "
            "pixels).",
            "",
            "| confidence | pixels | accuracy | accuracy at or above |",
            "|---|---|---|---|",
        ]
        for edge, pixels, accuracy, above in zip(
            quality["bin_edges"],
            quality["pixels"],
            quality["accuracy"],
            quality["accuracy_above"],
            strict=True,
        ):
            lines.append(
                f"| {edge:.1f}–{edge + 0.1:.1f} | {pixels} | {_fmt(accuracy)} | {_fmt(above)} |"
            )
        lines += ["", "![calibration](calibration.png)"]
    lines += ["", "## Predictions on validation tiles", "", "![overlays](overlays.png)", ""]
    return "\n".join(lines)


def run_report(
    run: Path, layout: RunLayout | None = None, out: Path | None = None
) -> dict[str, Any]:
    """Gather a pipeline run's evaluation into ``out`` (default RUN/report)."""
    layout = layout or RunLayout.of(run)
    for name, path in (("labels-only", layout.labels_only), ("semi-supervised", layout.semi)):
        if not (path / "report.json").is_file():
            raise FileNotFoundError(f"{name} run {path}: no report.json (expected a train run)")
    out = out or run / "report"
    out.mkdir(parents=True, exist_ok=True)
    zero_file = layout.zero_shot / "zero_shot.json"
    zero = json.loads(zero_file.read_text()) if zero_file.is_file() else None
    only = json.loads((layout.labels_only / "report.json").read_text())
    semi = json.loads((layout.semi / "report.json").read_text())
    store = str(layout.store)
    quality = pseudo_label_quality(store)
    report = {
        "run": str(run),
        "zero_shot_miou": zero.get("box_miou") if zero else None,
        "zero_shot_checkpoint": zero.get("checkpoint") if zero else None,
        "labels_only_miou": only["best_miou"],
        "semi_supervised_miou": semi["best_miou"],
        "per_class": per_class_table(only["class_names"], zero, only, semi),
        "pseudo_labels": quality,
    }
    if quality is not None:
        calibration_plot(quality, out / "calibration.png")
    overlays(
        store,
        {"labels-only": layout.labels_only, "semi-supervised": layout.semi},
        out / "overlays.png",
    )
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(format_report(report))
    return report


EXAMPLE = "semisup report --run demo_out"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``semisup report`` flags."""
    parser.add_argument("--run", type=Path, required=True, help="a pipeline run folder")
    parser.add_argument("--out", type=Path, default=None, help="default: RUN/report")
    parser.add_argument("--store", type=Path, default=None, help="default: RUN/store.zarr")
    parser.add_argument("--labels-only", type=Path, default=None, help="default: RUN/teacher")
    parser.add_argument("--semi", type=Path, default=None, help="default: RUN/student")


def run_cli(args: argparse.Namespace) -> int:
    """Write the run's report and print where it is."""
    default = RunLayout.of(args.run)
    layout = RunLayout(
        store=args.store or default.store,
        zero_shot=default.zero_shot,
        labels_only=args.labels_only or default.labels_only,
        semi=args.semi or default.semi,
    )
    report = run_report(args.run, layout, args.out)
    print(
        f"labels-only {_fmt(report['labels_only_miou'])}, semi-supervised "
        f"{_fmt(report['semi_supervised_miou'])} val mIoU; report in "
        f"{(args.out or args.run / 'report') / 'report.md'}"
    )
    return 0
