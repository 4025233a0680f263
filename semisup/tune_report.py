"""What a sweep found, as files: the trials table, a Markdown summary, a plot, the best config.

Ray-free: ``semisup.tune`` gathers one record per trial (a dict, see ``TrialRecord``) and these
functions turn the records into CSV, Markdown and PNG, and write them to the sweep's folder,
which may be a local path or any storage URL Ray accepts (through pyarrow's filesystems, as Ray
itself resolves it).
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

import yaml

from semisup import search_space, storage
from semisup.config import ExperimentConfig, to_dict

METRIC = "miou"  # validation mIoU, reported by the training loop every epoch
TIME_ATTR = "epochs_done"  # epochs trained; survives a resumed trial, unlike training_iteration
COMPLETED = "completed"
STOPPED_BY_SCHEDULER = "stopped by ASHA"
STOPPED_BY_PATIENCE = "stopped by patience"
UNFINISHED = "unfinished"
FAILED = "error"


class TrialRecord(TypedDict):
    """One trial of a sweep (JSON-safe).

    ``curve``: validation mIoU per epoch, ``train_loss``: mean training loss per epoch, both in
    epoch order; ``best_miou`` is None before the first validation.
    """

    trial_id: str
    outcome: str
    params: dict[str, Any]
    epochs_done: int
    best_miou: float | None
    best_epoch: int | None
    curve: list[float]
    train_loss: list[float]
    trial_path: str
    best_adapter: str | None
    error: str | None


def outcome(
    status: str, report: Mapping[str, Any] | None, epochs: int, failed: bool = False
) -> str:
    """How a trial ended, from Tune's trial status and the trial's training report.

    A trial Tune terminated before its last epoch without the trainer's own patience stop was
    stopped by the scheduler.
    """
    if failed:
        return FAILED
    if status != "TERMINATED":
        return UNFINISHED
    if report is None:
        return STOPPED_BY_SCHEDULER
    if report.get("stopped_early"):
        return STOPPED_BY_PATIENCE
    return COMPLETED if len(report.get("epochs", [])) >= epochs else STOPPED_BY_SCHEDULER


def best_trial(records: Sequence[TrialRecord]) -> TrialRecord | None:
    """The trial with the highest validation mIoU at any epoch (None if none validated)."""
    scored = [r for r in records if r["best_miou"] is not None and r["best_adapter"]]
    return max(scored, key=lambda r: r["best_miou"] or 0.0) if scored else None


def table_rows(records: Sequence[TrialRecord], keys: Sequence[str]) -> list[dict[str, Any]]:
    """One flat row per trial, best first: id, outcome, each key's value, epochs, mIoU."""
    rows = []
    ordered = sorted(records, key=lambda r: -1.0 if r["best_miou"] is None else r["best_miou"])
    for record in reversed(ordered):
        row: dict[str, Any] = {"trial_id": record["trial_id"], "outcome": record["outcome"]}
        row.update({key: record["params"].get(key) for key in keys})
        row.update(
            epochs_done=record["epochs_done"],
            best_miou=record["best_miou"],
            best_epoch=record["best_epoch"],
            trial_path=record["trial_path"],
        )
        rows.append(row)
    return rows


def rows_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as CSV text with a header (empty cells for None)."""
    out = io.StringIO()
    if not rows:
        return ""
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return out.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def summary_markdown(summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> str:
    """The sweep as Markdown: what was searched, the best trial, and every trial's row."""
    keys = [k for k in (rows[0] if rows else {}) if k != "trial_path"]
    best = summary.get("best_trial")
    lines = [
        f"# Tune sweep: space `{summary['space']}`",
        "",
        f"{summary['trials']} trials over {', '.join(f'`{k}`' for k in summary['searched'])} "
        f"with ASHA on validation mIoU ({summary['outcomes']}).",
        "",
    ]
    if best:
        lines += [
            f"Best: trial `{best}`, validation mIoU {summary['best_miou']:.4f} with "
            + ", ".join(f"`{k}` = {_cell(v)}" for k, v in summary["best_params"].items())
            + f". Config: `{summary['best_config']}`; adapter: `{summary['best_adapter']}`.",
            "",
        ]
    if not summary["complete"]:
        lines += ["The sweep was interrupted; `semisup tune --resume` continues it.", ""]
    lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_cell(row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _numeric(values: Sequence[Any]) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def plot_png(
    records: Sequence[TrialRecord], keys: Sequence[str], log_keys: Sequence[str] = ()
) -> bytes:
    """PNG bytes: best mIoU against each searched key (one panel each), then learning curves.

    Categorical keys are placed at evenly spaced positions; ``log_keys`` get a log x-axis.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = len(keys) + 1
    columns = min(panels, 3)
    rows = math.ceil(panels / columns)
    figure = Figure(figsize=(4.2 * columns, 3.4 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    scored = [r for r in records if r["best_miou"] is not None]
    for index, key in enumerate(keys):
        axes = figure.add_subplot(rows, columns, index + 1)
        values = [r["params"].get(key) for r in scored]
        positions: list[float]
        if _numeric(values):
            positions = [float(typing.cast(float, v)) for v in values]
            if key in log_keys:
                axes.set_xscale("log")
        else:  # categorical: one position per distinct value, in order of appearance
            labels = list(dict.fromkeys(map(str, values)))
            positions = [float(labels.index(str(v))) for v in values]
            axes.set_xticks(range(len(labels)), labels)
        stopped = [r["outcome"] != COMPLETED for r in scored]
        scores = [float(r["best_miou"] or 0.0) for r in scored]
        for early, marker in ((False, "o"), (True, "x")):
            picked = [i for i, s in enumerate(stopped) if s == early]
            axes.scatter(
                [positions[i] for i in picked],
                [scores[i] for i in picked],
                marker=marker,
                label="stopped early" if early else "full schedule",
            )
        axes.set_xlabel(key)
        axes.set_ylabel("best val mIoU")
        if index == 0 and any(stopped):
            axes.legend(fontsize="small")
    curves = figure.add_subplot(rows, columns, panels)
    for record in records:
        if record["curve"]:
            style = "-" if record["outcome"] == COMPLETED else "--"
            epochs = range(1, len(record["curve"]) + 1)
            shown = ", ".join(f"{k.split('.')[-1]}={_cell(record['params'].get(k))}" for k in keys)
            curves.plot(
                epochs, record["curve"], style, marker=".", label=f"{record['trial_id']} {shown}"
            )
    curves.xaxis.set_major_locator(MaxNLocator(integer=True))
    curves.set_xlabel("epoch")
    curves.set_ylabel("val mIoU")
    curves.set_title("learning curves (dashed: stopped early)", fontsize="medium")
    if len(records) <= 12:
        curves.legend(fontsize="x-small")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def report_from_tune_results(frame: Any) -> dict[str, Any] | None:
    """The parts of a training report that Tune's results of a trial hold (None if none)."""
    if frame is None or METRIC not in getattr(frame, "columns", ()):
        return None
    rows = frame.dropna(subset=[METRIC]).drop_duplicates(TIME_ATTR, keep="last")
    if rows.empty:
        return None
    rows = rows.sort_values(TIME_ATTR)
    curve = [float(v) for v in rows[METRIC]]
    losses = rows["train_loss"] if "train_loss" in rows else [math.nan] * len(curve)
    best = max(range(len(curve)), key=curve.__getitem__)
    return {
        "epochs": [
            {"miou": m, "train": {"loss": float(v)}} for m, v in zip(curve, losses, strict=True)
        ],
        "best_miou": curve[best],
        "best_epoch": best,
        "stopped_early": False,
    }


def write_outputs(
    fs: Any,
    root: str,
    out: str,
    name: str,
    dims: Mapping[str, search_space.Dimension],
    config: ExperimentConfig,
    records: list[TrialRecord],
    experiment: str,
) -> dict[str, Any]:
    """trials.csv/.json, summary.md, tune_plot.png, best_config.yaml, best_adapter.safetensors.

    ``root``: OUT's path on ``fs``; ``experiment``: where the Tune experiment is. Returns the
    sweep's summary (JSON-safe).
    """
    import pyarrow.fs

    shown = [k for k, d in dims.items() if d.kind != "constant"]
    plotted = [k for k, d in dims.items() if d.searched]
    counts: dict[str, int] = {}
    for record in records:
        counts[record["outcome"]] = counts.get(record["outcome"], 0) + 1
    best = best_trial(records)
    summary: dict[str, Any] = {
        "out": out,
        "experiment": experiment,
        "space": name,
        "searched": shown,
        "trials": len(records),
        "outcomes": ", ".join(f"{n} {k}" for k, n in sorted(counts.items())),
        "stopped_early": counts.get(STOPPED_BY_SCHEDULER, 0),
        "complete": not counts.get(UNFINISHED),
        "best_trial": best["trial_id"] if best else None,
        "best_miou": best["best_miou"] if best else None,
        "best_params": {k: best["params"][k] for k in shown} if best else {},
        "best_config": storage.child(out, "best_config.yaml") if best else None,
        "best_adapter": storage.child(out, "best_adapter.safetensors") if best else None,
        "trials_csv": storage.child(out, "trials.csv"),
        "trials_json": storage.child(out, "trials.json"),
        "summary_md": storage.child(out, "summary.md"),
        "plot": storage.child(out, "tune_plot.png"),
    }
    if best:
        best_config = search_space.apply(config, best["params"])
        storage.write(
            fs, f"{root}/best_config.yaml", yaml.safe_dump(to_dict(best_config), sort_keys=False)
        )
        # the best trial's best adapter, copied within the storage
        pyarrow.fs.copy_files(
            str(best["best_adapter"]),
            f"{root}/best_adapter.safetensors",
            source_filesystem=fs,
            destination_filesystem=fs,
        )
    rows = table_rows(records, shown)
    storage.write(fs, f"{root}/trials.csv", rows_csv(rows))
    storage.write(fs, f"{root}/trials.json", json.dumps(records, indent=2, default=str) + "\n")
    storage.write(fs, f"{root}/summary.md", summary_markdown(summary, rows))
    log_keys = [k for k, d in dims.items() if d.kind == "loguniform"]
    storage.write(fs, f"{root}/tune_plot.png", plot_png(records, plotted, log_keys))
    print(
        f"[tune] {summary['trials']} trials ({summary['outcomes']}); best "
        f"{summary['best_trial']} at val mIoU {summary['best_miou']}",
        file=sys.stderr,
    )
    return summary
