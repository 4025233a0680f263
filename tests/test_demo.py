"""`semisup demo` end to end on generated scenes: every stage runs, its figures add up, and a
rerun into the same folder skips every stage."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from semisup import columns as C
from semisup.demo import run_demo
from semisup.report import showcase_val_tiles
from semisup.store import LabelVersion, label_version, read_tile_index

# What reads as "something is wrong" on a console: log levels of Python and Ray's C++ core
# ("[2026-01-01 10:00:00,000 E 123 123] ..."), Python warnings, tracebacks and worker output.
NOISE = re.compile(
    r"\b(WARNING|ERROR|CRITICAL)\b|^\[[^\]]* [WEF] \d+ \d+\]|\w+Warning: |Traceback "
    r"|^\((raylet|\w+ pid=\d+)"
)


def run_demo_as_a_newcomer(out: Path) -> subprocess.CompletedProcess[str]:
    """`semisup demo` in a fresh process, as `make demo` runs it (its own new Ray)."""
    env = {k: v for k, v in os.environ.items() if k != "SEMISUP_VERBOSE"}
    command = [sys.executable, "-m", "semisup.cli", "demo", "--synthetic", "--out", str(out)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=1500)


@pytest.mark.timeout(1800)  # about 6 minutes alone on 2 cores; far more when they are shared
def test_demo_runs_the_whole_chain_on_generated_scenes(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    done = run_demo_as_a_newcomer(out)
    assert done.returncode == 0, done.stderr[-3000:]
    console = (done.stdout + done.stderr).splitlines()
    noise = [line for line in console if NOISE.search(line)]
    assert not noise, "lines that read as errors:\n" + "\n".join(noise)
    # random weights said once, where the zero-shot numbers are; the time of every stage
    assert sum("SAM has random weights here" in line for line in console) == 1
    summary = json.loads((out / "demo_summary.json").read_text())
    stages = summary["stages"]
    for name in stages:
        assert any(line.startswith(f"| {name} | ") for line in console), name
    assert any(line.startswith("| total of the stages | ") for line in console)
    assert list(stages) == [
        "prep",
        "stream",
        "zero-shot",
        "teacher",
        "pseudo-label",
        "student",
        "evaluate",
        "report",
        "select",
        "predict",
        "detect",
        "compare",
    ]
    assert summary["ran"] == list(stages) and summary["skipped"] == []
    store = str(out / "store.zarr")
    before = read_tile_index(store, labels=LabelVersion()).to_pandas()  # as prep wrote it
    index = read_tile_index(store).to_pandas()  # after the round's import
    assert stages["prep"]["sources"] == 4 and stages["prep"]["tiles"] == len(index) == 4 * 9
    assert set(index.loc[index[C.SPLIT] == C.VAL, C.SOURCE]) == {"scene_3"}
    for split in C.SPLITS:
        expected = int(((before[C.SPLIT] == split) & (before["valid_fraction"] > 0)).sum())
        assert stages["stream"][split]["tiles"] == expected > 0
    # one active-learning round: the first pass's 4 proposals labelled and imported, then the
    # stages that train on labels (and those after them) rerun; prep, stream, zero-shot and
    # detect (its own store) are up to date
    round_1 = summary["round"]
    proposed = set(pd.read_csv(out / "rounds" / "round_1" / "selection.csv")[C.TILE_ID])
    assert round_1["proposed"] == round_1["annotated"] == round_1["moved_to_labeled"] == 4
    assert round_1["label_version"] == round_1["after"]["label_version"] == 1
    labeled = set(index.loc[index[C.SPLIT] == C.LABELED, C.TILE_ID])
    assert labeled == set(before.loc[before[C.SPLIT] == C.LABELED, C.TILE_ID]) | proposed
    assert round_1["after"]["labeled_tiles"] == round_1["before"]["labeled_tiles"] + 4
    assert round_1["after"]["labeled_tiles"] == len(labeled)
    assert round_1["ran"] == [
        "teacher",
        "pseudo-label",
        "student",
        "evaluate",
        "report",
        "select",
        "predict",
        "compare",
    ]
    assert round_1["skipped"] == ["prep", "stream", "zero-shot", "detect"]
    assert round_1["before"]["student_miou"] == summary["first_pass"]["student"]["best_miou"]
    assert round_1["after"]["student_miou"] == stages["student"]["best_miou"]
    assert sum(line.startswith("  round 1       4 of the 4 proposed") for line in console) == 1
    assert (out / "zero_shot" / "zero_shot.json").is_file()
    unlabeled = int(((index[C.SPLIT] == C.UNLABELED) & (index["valid_fraction"] > 0)).sum())
    assert stages["pseudo-label"]["tiles_processed"] == unlabeled
    for run in ("teacher", "student"):
        report = json.loads((out / run / "report.json").read_text())
        assert 0 < report["best_miou"] <= 1 and Path(report["best_checkpoint"]).is_file()
    assert stages["teacher"]["mode"] == "decoder" and not stages["teacher"]["consistency"]
    assert stages["student"]["mode"] == "lora" and stages["student"]["consistency"]
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert [row["value"] for row in evaluation["rows"]] == [
        stages["zero-shot"]["box_miou"],
        stages["teacher"]["best_miou"],
        stages["student"]["best_miou"],
    ]
    # after training: the report, the proposals and the map of the validation scene
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["semi_supervised_miou"] == stages["student"]["best_miou"]
    assert 0 <= report["pseudo_labels"]["overall_accuracy"] <= 1
    assert (out / "report" / "overlays.png").is_file()
    shown = showcase_val_tiles(str(out / "store.zarr"), 4)
    assert len(shown) == 4  # the scenes' validation tiles are whole: none is padded
    selected = pd.read_csv(out / "select" / "selection.csv")
    unlabeled_ids = set(index.loc[index[C.SPLIT] == C.UNLABELED, C.TILE_ID])
    assert len(selected) == 4 and set(selected[C.TILE_ID]) <= unlabeled_ids
    assert json.loads((out / "select" / "selection.geojson").read_text())["features"]
    assert stages["predict"]["rasters"][0].endswith("scene_3.tif") and stages["predict"]["vectors"]
    import rasterio

    with (
        rasterio.open(out / "predict" / "scene_3.tif") as mapped,
        rasterio.open(stages["predict"]["rasters"][0]) as source,
    ):
        assert (mapped.crs, mapped.transform, mapped.shape) == (
            source.crs,
            source.transform,
            source.shape,
        )
    assert (out / "predict" / "scene_3.geojson").is_file()
    # the box student on the scenes' buildings, held out on the SAM student's validation scene
    detect = stages["detect"]
    assert detect["tiles_per_split"]["val"] == 9 and detect["val_truth_boxes"] > 0
    assert detect["target"] == "both" and detect["sam_instances"] > 0  # SAM's pseudo-boxes
    assert 0 <= detect["best_ap"] <= 1 and detect["raster"].endswith("scene_3.tif")
    assert len(Path(detect["csv"]).read_text().splitlines()) == detect["boxes"] + 1  # + header
    features = json.loads(Path(detect["geojson"]).read_text())["features"]
    assert len(features) == detect["boxes"]
    assert sum("box AP (near 0)" in line for line in console) == 1  # said once, beside it
    compared = json.loads((out / "compare" / "compare.json").read_text())
    assert [row["model"] for row in compared["rows"]] == [
        "SAM student (segmentation)",
        "Faster R-CNN student",
    ]
    assert compared["val_tiles"] == 9 and compared["classes"] == {"building": "building"}
    assert compared["rows"][1]["ap"] == pytest.approx(detect["best_ap"], abs=1e-9)
    assert any(line.startswith("| Faster R-CNN student | ") for line in console)
    # a rerun finds every stage up to date: nothing is recomputed or rewritten
    mtime = (out / "student" / "report.json").stat().st_mtime_ns
    again = run_demo(out, synthetic=True)
    assert again["ran"] == [] and again["skipped"] == list(stages)
    assert again["round"]["ran"] == [] and again["round"]["before"] == round_1["before"]
    assert again["stages"] == stages and read_tile_index(store).to_pandas().equals(index)
    assert label_version(store) == 1  # the round is not labelled again
    assert (out / "student" / "report.json").stat().st_mtime_ns == mtime
    skips = len(round_1["skipped"]) + 2 * len(stages)  # the round's, then both passes again
    assert (out / "run.log").read_text().count("up to date, skipped") == skips
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a run")
    with pytest.raises(FileExistsError, match="not empty"):
        run_demo(tmp_path / "other", synthetic=True)


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_demo_with_tune_ends_in_the_sweep_summary_and_plot(
    tmp_path: Path, ray_session: None
) -> None:
    out = tmp_path / "demo"
    first = run_demo(out, synthetic=True)
    assert "tune" not in first["stages"]
    summary = run_demo(out, synthetic=True, tune=True)
    assert summary["ran"] == ["tune"]  # every other stage is up to date
    tune = summary["stages"]["tune"]
    assert tune["trials"] == 4 and 0 <= tune["best_miou"] <= 1
    assert set(tune["best_params"]) == {"student.lora_rank", "student.lora_alpha"}
    for name in ("summary.md", "tune_plot.png", "best_config.yaml", "trials.csv"):
        assert (out / "tune" / name).stat().st_size > 0
    from semisup.config import load_config

    assert (
        load_config(out / "tune" / "best_config.yaml").student.lora_rank
        == tune["best_params"]["student.lora_rank"]
    )
