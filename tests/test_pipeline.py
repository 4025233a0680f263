"""The ``semisup run`` stage runner: keys, skipping, reruns after a change, resuming.

The runner is exercised with a small table of real stages that write files; the pipeline's own
stages run in tests/test_demo.py and, as a cluster job, in tests/test_cluster.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from store_factory import SourceSpec, build_store

from semisup import columns as C
from semisup.config import ConfigError, ExperimentConfig, PipelineConfig, load_config
from semisup.label_import import import_labels
from semisup.pipeline import STAGES, Stage, enabled_stages, read_manifest, run_pipeline, stage_keys
from semisup.stages import RunContext
from semisup.store import label_array, open_store, read_tile_index

REPO_ROOT = Path(__file__).resolve().parents[1]


# A toy pipeline: a -> b -> c, each writing one file whose content depends on its config.


def stage_a(context: RunContext) -> dict[str, Any]:
    path = context.out / "a.txt"
    path.write_text(f"seed {context.config.prep.seed}\n")
    return {"value": context.config.prep.seed, "outputs": [str(path)]}


def stage_b(context: RunContext) -> dict[str, Any]:
    if (context.out / "b.crash").exists():  # a preempted node: the process dies mid-stage
        os._exit(9)
    if (context.out / "b.fail").exists():
        raise RuntimeError("b failed")
    path = context.out / "b.txt"
    value = context.results["a"]["value"] + context.config.train.epochs
    path.write_text(f"{value}\n")
    return {"value": value, "resumed": context.resume, "outputs": [str(path)]}


def stage_c(context: RunContext) -> dict[str, Any]:
    value = context.results.get("b", {}).get("value")
    path = context.out / "c.json"
    path.write_text(json.dumps({"b": value, "threshold": context.config.ssl.confidence_threshold}))
    return {"b": value, "outputs": [str(path)]}


TOY: dict[str, Stage] = {
    "a": Stage(stage_a, ("prep.seed",), uses_ray=False),
    "b": Stage(stage_b, ("train.epochs",), needs=("a",), uses_ray=False),
    "c": Stage(stage_c, ("ssl.confidence_threshold",), uses=("b",), uses_ray=False),
}


def toy_config(out: Path, **sections: Any) -> ExperimentConfig:
    config = ExperimentConfig(pipeline=PipelineConfig(out=str(out)))
    for name, values in sections.items():
        config = dataclasses.replace(
            config, **{name: dataclasses.replace(getattr(config, name), **values)}
        )
    return config


def run_toy(config: ExperimentConfig) -> dict[str, Any]:
    return run_pipeline(config, log=None, table=TOY)


def run_with_flag(tmp_path: Path, flag: str) -> Path:
    """A run folder holding ``flag``, the file that makes stage b fail or crash."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"format": 1, "stages": {}}))
    (out / flag).touch()
    return out


def log_lines(out: Path) -> list[str]:
    return [line.split(" ", 2)[2] for line in (out / "run.log").read_text().splitlines()]


def test_a_rerun_skips_every_stage_and_says_so(tmp_path: Path) -> None:
    config = toy_config(tmp_path / "run")
    first = run_toy(config)
    assert first["ran"] == ["a", "b", "c"] and first["skipped"] == []
    assert first["stages"]["b"]["value"] == 0 + config.train.epochs
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "run").glob("*.*")}
    second = run_toy(config)
    assert second["ran"] == [] and second["skipped"] == ["a", "b", "c"]
    assert second["stages"] == first["stages"]  # results come back from the manifest
    for name in ("a.txt", "b.txt", "c.json"):
        assert (tmp_path / "run" / name).stat().st_mtime_ns == before[name]
    lines = log_lines(tmp_path / "run")
    assert [f"[run] {n}: up to date, skipped" for n in "abc"] == [
        line for line in lines if "skipped" in line and "stage(s)" not in line
    ]
    manifest = read_manifest(tmp_path / "run")
    assert {n: r["status"] for n, r in manifest["stages"].items()} == dict.fromkeys("abc", "done")
    assert all(r["attempts"] == 1 and r["seconds"] >= 0 for r in manifest["stages"].values())


def test_a_changed_section_reruns_that_stage_and_those_reading_it(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_toy(toy_config(out))
    changed = run_toy(toy_config(out, train={"epochs": 3}))
    assert changed["skipped"] == ["a"] and changed["ran"] == ["b", "c"]
    assert (out / "b.txt").read_text() == "3\n" and json.loads((out / "c.json").read_text())[
        "b"
    ] == 3
    assert "[run] b: config changed, rerunning (its earlier outputs are replaced) ..." in log_lines(
        out
    )
    only_c = run_toy(toy_config(out, train={"epochs": 3}, ssl={"confidence_threshold": 0.5}))
    assert only_c["ran"] == ["c"] and only_c["skipped"] == ["a", "b"]


def test_missing_outputs_rerun_the_stage_and_those_after_it(tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = toy_config(out)
    run_toy(config)
    (out / "b.txt").unlink()
    again = run_toy(config)
    assert again["ran"] == ["b", "c"]
    assert "[run] c: rerunning, its inputs from b were rebuilt" in log_lines(out)


def test_a_failed_stage_is_resumed_and_the_run_continues(tmp_path: Path) -> None:
    out = run_with_flag(tmp_path, "b.fail")
    config = toy_config(out)
    with pytest.raises(RuntimeError, match="b failed"):
        run_toy(config)
    record = read_manifest(out)["stages"]["b"]
    assert record["status"] == "failed" and "b failed" in record["error"]
    (out / "b.fail").unlink()
    resumed = run_toy(config)
    assert resumed["skipped"] == ["a"] and resumed["ran"] == ["b", "c"]
    assert resumed["stages"]["b"]["resumed"] is True
    assert read_manifest(out)["stages"]["b"]["attempts"] == 2
    assert "[run] b: resuming the failed attempt 1 ..." in log_lines(out)


def test_a_process_killed_mid_stage_resumes_that_stage(tmp_path: Path) -> None:
    out = run_with_flag(tmp_path, "b.crash")
    script = (
        "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]);"
        "import test_pipeline as t; t.run_toy(t.toy_config(Path(sys.argv[2])))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    killed = subprocess.run(
        [sys.executable, "-c", script, str(Path(__file__).parent), str(out)], env=env, timeout=120
    )
    assert killed.returncode == 9
    assert read_manifest(out)["stages"]["b"]["status"] == "running"  # as a preempted job leaves it
    (out / "b.crash").unlink()
    resumed = run_toy(toy_config(out))
    assert resumed["skipped"] == ["a"] and resumed["stages"]["b"]["resumed"] is True
    assert "[run] b: resuming the interrupted attempt 1 ..." in log_lines(out)


def test_stage_selection_and_folder_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown stage 'x'; known stages: a, b, c"):
        run_toy(toy_config(tmp_path / "r1", pipeline={"stages": ("a", "x")}))
    with pytest.raises(ConfigError, match="b needs the outputs of a"):
        run_toy(toy_config(tmp_path / "r2", pipeline={"stages": ("b",)}))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no run.json"):
        run_toy(toy_config(foreign))
    with pytest.raises(ConfigError, match="pipeline.out"):
        run_toy(toy_config(tmp_path, pipeline={"out": "s3://bucket/run"}))
    # a stage left out runs on the recorded outputs of an earlier run with the same config
    out = tmp_path / "r3"
    run_toy(toy_config(out))
    only_c = run_toy(
        toy_config(out, pipeline={"stages": ("c",)}, ssl={"confidence_threshold": 0.1})
    )
    assert (
        only_c["ran"] == ["c"] and only_c["stages"]["c"]["b"] == 0 + ExperimentConfig().train.epochs
    )


def test_pipeline_table_keys_follow_the_stages_that_read_each_other() -> None:
    base = load_config(REPO_ROOT / "cluster" / "smoke.yaml")
    keys = stage_keys(base)
    assert list(keys) == list(STAGES)
    optional = ("detect", "compare", "tune")
    assert enabled_stages(base) == [name for name in STAGES if name not in optional]

    def changed(**sections: Any) -> set[str]:
        config = base
        for name, values in sections.items():
            config = dataclasses.replace(
                config, **{name: dataclasses.replace(getattr(config, name), **values)}
            )
        new = stage_keys(config)
        return {name for name in keys if new[name] != keys[name]}

    after_student = {"evaluate", "report", "select", "predict", "compare"}
    assert changed(ssl={"confidence_threshold": 0.7}) == {
        "student",
        "tune",
        "detect",
        *after_student,
    }
    assert changed(detector={"nms_iou": 0.4}) == {"detect", "compare"}
    # the detect stage's automatic SAM teacher is the student's model
    assert changed(student={"model_type": "vit_b"}) == {
        "zero-shot",
        "teacher",
        "pseudo-label",
        "student",
        "tune",
        "detect",
        *after_student,
    }
    assert changed(pipeline={"detect_tile_size": 128}) == {"detect", "compare"}
    assert changed(pipeline={"detect_sam_points_per_side": 8}) == {"detect", "compare"}
    assert changed(pipeline={"compare_classes": ("building=building",)}) == {"compare"}
    assert changed(pipeline={"zero_shot_tiles": 8}) == {"zero-shot", "evaluate", "report"}
    assert changed(pipeline={"select_budget": 4}) == {"select"}
    assert changed(train={"epochs": 2}) == {
        "teacher",
        "pseudo-label",
        "student",
        "tune",
        "detect",
        *after_student,
    }
    assert changed(prep={"tile_size": 128}) == set(STAGES)
    assert changed(pipeline={"out": "elsewhere", "stages": ("prep",)}) == set()


def test_a_label_import_reruns_the_stages_that_read_labels(tmp_path: Path) -> None:
    """After ``semisup label import`` raises the store's label version, a rerun rebuilds the
    stages that train on labels and those downstream of them, and skips the rest."""

    def prep(context: RunContext) -> dict[str, Any]:
        build_store(str(context.store), [SourceSpec("scene", 64, 64, split=C.UNLABELED)])
        return {"outputs": [str(context.store)]}

    def reader(context: RunContext) -> dict[str, Any]:
        index = read_tile_index(str(context.store)).to_pandas()
        return {"labeled": int((index[C.SPLIT] == C.LABELED).sum())}

    table = {
        "prep": Stage(prep, ("prep.seed",), uses_ray=False),
        "zero": Stage(stage_a, ("prep.seed",), needs=("prep",), uses_ray=False),
        "train": Stage(reader, (), needs=("prep",), uses_ray=False, reads_labels=True),
        "after": Stage(stage_c, (), uses=("train",), uses_ray=False),
    }
    config = toy_config(tmp_path / "run")
    first = run_pipeline(config, log=None, table=table)
    assert first["ran"] == ["prep", "zero", "train", "after"]
    assert first["stages"]["train"]["labeled"] == 0
    assert run_pipeline(config, log=None, table=table)["ran"] == []

    # an annotator's mask for one tile: the ground truth the store already holds, hidden by the
    # split, so the import only moves the tile to labeled
    store = tmp_path / "run" / "store.zarr"
    tile = read_tile_index(str(store)).to_pandas().iloc[0]
    labels = label_array(open_store(str(store))["scene"])
    assert labels is not None
    window = (
        slice(tile["y0"], tile["y0"] + tile["height"]),
        slice(tile["x0"], tile["x0"] + tile["width"]),
    )
    mask = tmp_path / f"scene__r{tile['row']}_c{tile['col']}.png"
    Image.fromarray(labels[window]).save(mask)
    import_labels(store, [mask], log=None)

    again = run_pipeline(config, log=None, table=table)
    assert again["skipped"] == ["prep", "zero"] and again["ran"] == ["train", "after"]
    assert again["stages"]["train"]["labeled"] == 1
    lines = log_lines(tmp_path / "run")
    assert "[run] train: the store's labels changed (label version 1), rerunning ..." in lines
    assert "[run] after: rerunning, its inputs from train were rebuilt" in lines
    assert run_pipeline(config, log=None, table=table)["ran"] == []


def test_the_label_version_is_in_the_keys_of_the_stages_that_train_on_labels() -> None:
    base = load_config(REPO_ROOT / "cluster" / "smoke.yaml")
    keys, imported = stage_keys(base), stage_keys(base, label_version=2)
    changed = {name for name in keys if imported[name] != keys[name]}
    untouched = {"prep", "stream", "zero-shot", "detect"} & set(STAGES)
    assert changed == set(STAGES) - untouched
    assert {
        "teacher",
        "pseudo-label",
        "student",
        "evaluate",
        "report",
        "select",
        "predict",
    } <= changed
