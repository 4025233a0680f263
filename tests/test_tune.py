"""Ray Tune sweeps: a LoRA-rank sweep on 2 CPUs, ASHA, resumption, outputs, early errors."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from store_factory import scene_store as scene_store_at

from semisup import tune_report
from semisup.cli import main
from semisup.config import ConfigError, ExperimentConfig, load_config
from semisup.tune import (
    EXPERIMENT_NAME,
    max_concurrent_trials,
    ray_param_space,
    run_tune,
    trial_demand,
)

# Each trial: the tiny student, 2 steps per epoch on 64 px tiles, half a CPU for its one Train
# worker and a quarter for reads, so two trials train side by side on 2 CPUs.
FAST = [
    "student.model_type=tiny",
    "train.batch_size=4",
    "train.warmup_steps=1",
    "train.lr=3e-3",
    "stream.tiles_per_task=16",
    "stream.read_cpus=0.25",
    "train.cpus_per_worker=0.5",
    "train.torch_threads=1",
    "ssl.enabled=false",
    "train.epochs=3",
    "train.steps_per_epoch=2",
    "train.early_stop_patience=10",
    "train.max_failures=0",
]


def _config(*overrides: str) -> ExperimentConfig:
    return load_config(overrides=[*FAST, *overrides])


@pytest.fixture(scope="module")
def scene_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Four generated 192 px scenes as 64 px tiles: 1 labeled, 2 unlabeled, 1 val source."""
    return scene_store_at(tmp_path_factory.mktemp("scenes"), size=192)


def _trial_dirs(out: Path) -> dict[str, Path]:
    """Trial id -> trial folder under OUT/tune."""
    return {
        "_".join(p.name.split("_")[2:4]): p
        for p in (out / EXPERIMENT_NAME).iterdir()
        if p.is_dir() and p.name.startswith("train_trial_")
    }


# ---------------------------------------------------------------------------------------------
# Without Ray


def test_concurrent_trials_are_capped_by_cpus_and_gpus() -> None:
    demand = trial_demand(_config())
    assert demand == {"CPU": pytest.approx(0.85)}  # driver 0.1 + worker 0.5 + reads 0.25
    assert max_concurrent_trials({"CPU": 2.0}, demand) == 2
    assert max_concurrent_trials({"CPU": 16.0}, demand) == 18
    gpu = trial_demand(_config("train.use_gpu=true", "train.num_workers=2"))
    assert gpu == {"CPU": pytest.approx(0.35), "GPU": 2.0}
    assert max_concurrent_trials({"CPU": 16.0, "GPU": 4.0}, gpu) == 2
    with pytest.raises(ConfigError, match="needs 2 GPU"):
        max_concurrent_trials({"CPU": 16.0}, gpu)
    with pytest.raises(ConfigError, match="needs 4.35 CPU"):
        max_concurrent_trials(
            {"CPU": 2.0}, trial_demand(_config("train.num_workers=2", "train.cpus_per_worker=2"))
        )


def _record(trial_id: str, best: float | None, outcome: str, rank: int) -> tune_report.TrialRecord:
    curve = [] if best is None else [best / 2, best]
    return tune_report.TrialRecord(
        trial_id=trial_id,
        outcome=outcome,
        params={"student.lora_rank": rank},
        epochs_done=len(curve),
        best_miou=best,
        best_epoch=1 if curve else None,
        curve=curve,
        train_loss=[1.0] * len(curve),
        trial_path=f"/x/{trial_id}",
        best_adapter=f"/x/{trial_id}/a" if curve else None,
        error=None,
    )


def test_trial_outcomes_table_and_plot() -> None:
    report = {"epochs": [{}, {}, {}], "stopped_early": False}
    assert tune_report.outcome("TERMINATED", report, epochs=3) == tune_report.COMPLETED
    assert (
        tune_report.outcome("TERMINATED", {**report, "epochs": [{}]}, epochs=3)
        == tune_report.STOPPED_BY_SCHEDULER
    )
    assert tune_report.outcome("TERMINATED", {"epochs": [{}], "stopped_early": True}, 3) == (
        tune_report.STOPPED_BY_PATIENCE
    )
    assert tune_report.outcome("RUNNING", report, epochs=3) == tune_report.UNFINISHED
    assert tune_report.outcome("ERROR", None, epochs=3, failed=True) == tune_report.FAILED
    records = [
        _record("a", 0.30, tune_report.COMPLETED, 4),
        _record("b", 0.45, tune_report.COMPLETED, 8),
        _record("c", 0.10, tune_report.STOPPED_BY_SCHEDULER, 16),
        _record("d", None, tune_report.FAILED, 32),
    ]
    assert tune_report.best_trial(records) == records[1]
    rows = tune_report.table_rows(records, ["student.lora_rank"])
    assert [r["trial_id"] for r in rows] == ["b", "a", "c", "d"]
    parsed = list(csv.DictReader(tune_report.rows_csv(rows).splitlines()))
    assert parsed[0]["student.lora_rank"] == "8" and parsed[3]["best_miou"] == ""
    png = tune_report.plot_png(records, ["student.lora_rank"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_tune_results_stand_in_for_a_missing_report() -> None:
    import pandas as pd

    frame = pd.DataFrame(
        {"miou": [0.2, 0.3, 0.3, 0.25], "epochs_done": [1, 2, 2, 3], "train_loss": [2, 1.5, 1.4, 1]}
    )  # a resumed trial reported epoch 2 twice
    report = tune_report.report_from_tune_results(frame)
    assert report is not None
    assert [e["miou"] for e in report["epochs"]] == [0.2, 0.3, 0.25]
    assert report["epochs"][1]["train"]["loss"] == 1.4
    assert (report["best_miou"], report["best_epoch"]) == (0.3, 1)
    assert tune_report.outcome("TERMINATED", report, epochs=5) == tune_report.STOPPED_BY_SCHEDULER
    assert tune_report.report_from_tune_results(pd.DataFrame()) is None


def test_optuna_takes_no_grid_and_is_optional(scene_store: str, tmp_path: Path) -> None:
    from ray import tune

    from semisup import search_space
    from tune_spaces import SPACES

    dims = search_space.parse_space(SPACES["default"] | SPACES["lora_rank"], "joint")
    space = ray_param_space(dims, for_optuna=True)
    assert set(space) == {k for k, d in dims.items() if d.searched}
    assert isinstance(space["student.lora_rank"], tune.search.sample.Categorical)
    assert isinstance(space["train.lr"], tune.search.sample.Float)
    assert isinstance(ray_param_space(dims)["student.lora_rank"], dict)  # a grid for Tune's own
    if importlib.util.find_spec("optuna") is None:
        with pytest.raises(ConfigError, match="optuna package"):
            run_tune(
                scene_store, _config(), "lora_rank", tmp_path / "o", samples=2, search="optuna"
            )
        assert not (tmp_path / "o").exists()


def test_unknown_key_fails_before_any_trial_starts(scene_store: str, tmp_path: Path) -> None:
    import ray

    ray_was_up = ray.is_initialized()  # the session's Ray, when an earlier test started it
    out = tmp_path / "sweep"
    with pytest.raises(ConfigError, match=r"student\.lora_rnak"):
        run_tune(scene_store, _config(), {"student.lora_rnak": {"grid": [4, 8]}}, out, samples=1)
    with pytest.raises(ConfigError, match=r"student\.lora_rank: got 0"):
        run_tune(scene_store, _config(), {"student.lora_rank": {"grid": [0, 8]}}, out, samples=1)
    with pytest.raises(ConfigError, match=r"ssl\.target='pseudo' needs pseudo-labels"):
        run_tune(
            scene_store,
            _config("ssl.enabled=true"),
            {"ssl.target": {"choice": ["ema", "pseudo"]}},
            out,
            samples=1,
        )
    assert not out.exists() and ray.is_initialized() == ray_was_up  # nothing started


def test_cli_names_the_bad_key_and_shows_an_example(
    scene_store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["tune", "--store", scene_store, "--space", "lora_rank", "--out", str(tmp_path / "o")]
    assert main([*argv, "--set", "train.epohcs=2"]) == 2
    assert "train.epohcs" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 2
    assert "no sweep to continue" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["tune", "--help"])
    assert "semisup tune --store" in capsys.readouterr().out.split("example:")[-1]
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# Sweeps on the session's local Ray (2 CPUs, with the dashboard)


def _interrupt_when_a_trial_starts(out: Path, trial_index: int, fired: list[float]) -> None:
    """Send the Tune run SIGUSR1 (as Ctrl+C) once trial ``trial_index`` has started training."""
    deadline = time.time() + 400
    while time.time() < deadline:
        if list((out / EXPERIMENT_NAME).glob(f"*_{trial_index:05d}_*/run/config.yaml")):
            os.kill(os.getpid(), signal.SIGUSR1)
            fired.append(time.time())
            return
        time.sleep(0.5)


def _files(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.mark.timeout(700)
def test_lora_rank_sweep_of_four_trials_on_two_cpus_interrupted_and_resumed(
    scene_store: str, tmp_path: Path, ray_session: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from semisup.student import read_adapter_spec

    out = tmp_path / "sweep"
    # interrupted (as by Ctrl+C) when the third trial starts, i.e. once one trial has finished
    fired: list[float] = []
    watcher = threading.Thread(target=_interrupt_when_a_trial_starts, args=(out, 2, fired))
    watcher.start()
    first = run_tune(scene_store, _config(), "lora_rank", out, samples=1)
    watcher.join()
    assert fired and not first["complete"]
    finished = {
        t["trial_id"]: t
        for t in json.loads((out / "trials.json").read_text())
        if t["outcome"] != tune_report.UNFINISHED
    }
    assert 1 <= len(finished) < 4
    trials = _trial_dirs(out)
    before = {
        t: (_files(trials[t] / "run"), (trials[t] / "progress.csv").read_text()) for t in finished
    }
    with pytest.raises(FileExistsError, match="--resume"):
        run_tune(scene_store, _config(), "lora_rank", out, samples=1)
    # `semisup tune --resume` takes the sweep's own settings, and refuses different ones
    assert main(["tune", "--out", str(out), "--resume", "--set", "train.epochs=9"]) == 2
    assert "config.train.epochs=3 (not 9)" in capsys.readouterr().err

    summary = run_tune(scene_store, _config(), "lora_rank", out, samples=1, resume=True)
    assert json.loads(json.dumps(summary)) == summary
    assert summary["trials"] == 4 and summary["complete"]
    # the finished trials were not run again: their run folders and Tune records are unchanged
    trials = _trial_dirs(out)
    for trial_id, (files, progress) in before.items():
        assert _files(trials[trial_id] / "run") == files
        assert (trials[trial_id] / "progress.csv").read_text() == progress
    assert summary["searched"] == ["student.lora_rank", "student.lora_alpha"]
    with open(summary["trials_csv"]) as table:
        rows = list(csv.DictReader(table))
    assert sorted(int(r["student.lora_rank"]) for r in rows) == [4, 8, 16, 32]
    assert all(float(r["student.lora_alpha"]) == 2 * int(r["student.lora_rank"]) for r in rows)
    assert all(
        r["outcome"] in (tune_report.COMPLETED, tune_report.STOPPED_BY_SCHEDULER) for r in rows
    )
    best_miou = max(float(r["best_miou"]) for r in rows)
    assert summary["best_miou"] == pytest.approx(best_miou) and 0 < best_miou <= 1
    assert rows[0]["trial_id"] == summary["best_trial"]
    # the best config is a valid experiment config that `semisup train --config` reads as it is
    best = load_config(summary["best_config"])
    assert best.student.mode == "lora"
    assert best.student.lora_rank == summary["best_params"]["student.lora_rank"]
    assert best.train == _config().train
    # the best trial's best adapter, exported beside the summary
    spec = read_adapter_spec(summary["best_adapter"])
    assert spec.mode == "lora" and spec.lora_rank == best.student.lora_rank
    # TensorBoard events per trial (Tune's and the trainer's) and the trainer's own reports
    assert len(trials) == 4
    for folder in trials.values():
        assert list(folder.glob("events.out.tfevents.*"))
        assert list((folder / "run" / "tensorboard").glob("events.out.tfevents.*"))
        assert (folder / "run" / "best" / "adapter.safetensors").is_file()
    records = json.loads(Path(summary["trials_json"]).read_text())
    assert all(len(r["curve"]) == r["epochs_done"] >= 1 for r in records)
    assert Path(summary["summary_md"]).read_text().count("\n| ") == 5  # header + 4 trials
    assert Path(summary["plot"]).read_bytes()[:4] == b"\x89PNG"
    # two trials trained side by side: the cap let both run and neither starved
    spans = []
    for folder in trials.values():
        lines = (folder / "progress.csv").read_text().splitlines()
        header = lines[0].split(",")
        stamps = [float(line.split(",")[header.index("timestamp")]) for line in lines[1:]]
        spans.append((min(stamps), max(stamps)))
    spans.sort()
    assert any(b[0] <= a[1] for a, b in zip(spans, spans[1:], strict=False))


@pytest.mark.timeout(600)
def test_asha_stops_a_trial_that_trails_at_an_early_epoch(
    scene_store: str, tmp_path: Path, ray_session: None
) -> None:
    # Trials run one at a time, in grid order. The second barely moves from its initial weights,
    # so at the first rung (1 epoch of 5) its validation mIoU trails the first trial's and ASHA
    # stops it; the stop reaches it within about an epoch.
    space = {"train.lr": {"grid": [3e-3, 1e-7]}}
    summary = run_tune(
        scene_store,
        _config("train.epochs=5"),
        space,
        tmp_path / "sweep",
        samples=1,
        max_concurrent=1,
    )
    records = json.loads(Path(summary["trials_json"]).read_text())
    outcomes = {r["params"]["train.lr"]: (r["outcome"], r["epochs_done"]) for r in records}
    assert outcomes[3e-3] == (tune_report.COMPLETED, 5)
    assert outcomes[1e-7][0] == tune_report.STOPPED_BY_SCHEDULER and 1 <= outcomes[1e-7][1] < 5
    assert summary["stopped_early"] == 1 and summary["complete"]
    assert load_config(summary["best_config"]).train.lr == 3e-3


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_sweep_lands_in_object_storage(
    scene_store: str, s3_options: dict[str, str], tmp_path: Path, ray_session: None
) -> None:
    import pyarrow.fs
    import s3fs

    s3fs.S3FileSystem(**s3_options).mkdir("tune-bucket")
    endpoint = s3_options["endpoint_url"].removeprefix("http://")
    out = (
        "s3://testing:testing@tune-bucket/sweeps/rank"
        f"?scheme=http&endpoint_override={endpoint}&region=us-east-1"
    )
    space = {"student.mode": "lora", "student.lora_rank": {"grid": [4, 8]}}
    summary = run_tune(scene_store, _config(), space, out, samples=1)
    assert summary["trials"] == 2 and summary["complete"]
    fs, root = pyarrow.fs.FileSystem.from_uri(out)

    def read(path: str) -> bytes:
        with fs.open_input_stream(f"{root}/{path}") as stream:
            return bytes(stream.readall())

    rows = list(csv.DictReader(read("trials.csv").decode().splitlines()))
    assert sorted(int(r["student.lora_rank"]) for r in rows) == [4, 8]
    (tmp_path / "best.yaml").write_bytes(read("best_config.yaml"))
    assert load_config(tmp_path / "best.yaml").student.lora_rank in (4, 8)
    assert read("best_adapter.safetensors")[:8] and read("tune_plot.png")[:4] == b"\x89PNG"
    files = [i.path for i in fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))]
    for row in rows:
        trial = row["trial_path"]
        assert any(f.startswith(f"{trial}/run/tensorboard/events.out") for f in files)
        assert f"{trial}/run/best/adapter.safetensors" in files
        assert any(f.startswith(f"{trial}/train/train/checkpoint_") for f in files)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_optuna_draws_the_trials_when_installed(
    scene_store: str, tmp_path: Path, ray_session: None
) -> None:
    pytest.importorskip("optuna")
    space = {
        "student.mode": "lora",
        "student.lora_rank": {"grid": [4, 8]},
        "train.lr": {"loguniform": [1e-3, 5e-3]},
    }
    out = tmp_path / "sweep"
    summary = run_tune(
        scene_store, _config("train.epochs=2"), space, out, samples=2, search="optuna"
    )
    assert summary["trials"] == 2 and summary["complete"]  # a grid is a choice for Optuna
    assert json.loads((out / "sweep.json").read_text())["search"] == "optuna"
    records = json.loads(Path(summary["trials_json"]).read_text())
    assert all(r["params"]["student.lora_rank"] in (4, 8) for r in records)
    assert all(1e-3 <= r["params"]["train.lr"] <= 5e-3 for r in records)
    assert load_config(summary["best_config"]).student.lora_rank in (4, 8)
