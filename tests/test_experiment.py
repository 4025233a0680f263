"""The label-efficiency experiment: pure analysis, and the whole experiment on a reduced setting."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data_prep.ingest import build_store
from semisup import columns as C
from semisup.config import ConfigError, load_config
from semisup.experiment import (
    LabelEfficiencySettings,
    analyse,
    format_report,
    gap_closed,
    partition,
    per_class_table,
    run_label_efficiency,
    self_training,
    summarise,
    tiles_to_reach,
)
from semisup.store import read_tile_index
from semisup.synthetic import write_scenes


def test_summary_statistics_and_targets() -> None:
    stats = summarise([0.2, 0.4, 0.6])
    assert stats["mean"] == pytest.approx(0.4) and stats["std"] == pytest.approx(0.2)
    assert summarise([0.3])["std"] == 0.0
    assert tiles_to_reach([(40, 0.30), (10, 0.2), (20, 0.31)], 0.3) == 20
    assert tiles_to_reach([(10, 0.2)], 0.3) is None
    assert gap_closed(0.2, 0.25, 0.3) == pytest.approx(0.5)
    assert gap_closed(0.2, 0.25, 0.2) is None
    with pytest.raises(ConfigError, match="fractions"):
        LabelEfficiencySettings(fractions=(0.0,))
    with pytest.raises(ConfigError, match="semi_init.*'scratch', 'teacher'"):
        LabelEfficiencySettings(semi_init=("student",))


def test_analysis_counts_the_tiles_each_strategy_needs() -> None:
    curve = pd.DataFrame(
        [
            {
                "method": "labels_only",
                "fraction": 0.125,
                "labeled_tiles": 8,
                "test_miou": 0.20,
                "seed": 0,
                "test_iou_per_class": [0.1, None, 0.3],
            },
            {
                "method": "labels_only",
                "fraction": 0.125,
                "labeled_tiles": 8,
                "test_miou": 0.20,
                "seed": 1,
                "test_iou_per_class": [0.3, None, None],
            },
            {
                "method": "semi_supervised",
                "fraction": 0.125,
                "labeled_tiles": 8,
                "test_miou": 0.26,
                "seed": 0,
                "test_iou_per_class": [0.2, None, 0.4],
                "mask_ratio": 0.5,
                "pseudo_accuracy": 0.8,
            },
            {
                "method": "semi_supervised_round_2",
                "fraction": 0.125,
                "labeled_tiles": 8,
                "test_miou": 0.28,
                "seed": 0,
                "test_iou_per_class": [0.2, None, 0.5],
                "mask_ratio": 0.6,
                "pseudo_accuracy": 0.85,
            },
            {
                "method": "full_label",
                "fraction": 1.0,
                "labeled_tiles": 64,
                "test_miou": 0.30,
                "seed": 0,
                "test_iou_per_class": [0.3, None, 0.5],
            },
        ]
    )
    rounds = pd.DataFrame(
        [
            {"strategy": s, "round": r, "seed": 0, "labeled_tiles": n, "test_miou": m}
            for s, r, n, m in [
                ("random", 0, 4, 0.10),
                ("random", 1, 8, 0.15),
                ("random", 2, 12, 0.20),
                ("active", 0, 4, 0.10),
                ("active", 1, 8, 0.21),
                ("active", 2, 12, 0.25),
            ]
        ]
    )
    result = analyse(curve, rounds)
    gain = result["ssl_gain"]["semi_supervised"]["0.1250"]
    assert gain["semi_minus_labels_only"] == pytest.approx(0.06)
    assert gain["paired_gain"]["mean"] == pytest.approx(0.06) and gain["paired_gain"]["n"] == 1
    assert gain["gap_closed"] == pytest.approx(0.6)
    # a later self-training round is paired with the same labels-only run
    second = result["ssl_gain"]["semi_supervised_round_2"]["0.1250"]
    assert second["paired_gain"]["mean"] == pytest.approx(0.08)
    assert second["gap_closed"] == pytest.approx(0.8)
    reach = result["tiles_to_reach_random_final"]
    assert reach["per_seed"] == {"random": [12], "active": [8]}
    assert reach["label_saving"]["mean"] == pytest.approx(1 - 8 / 12)
    assert reach["on_mean_curves"] == {"random": 12, "active": 8}
    # per-class IoU: the mean over the seeds where the class was present, None where never
    # the consistency term's measures: for the runs that have one
    semi = result["learning_curve"]["semi_supervised"]["0.1250"]
    assert semi["mask_ratio"]["mean"] == 0.5 and semi["pseudo_accuracy"]["mean"] == 0.8
    assert "mask_ratio" not in result["learning_curve"]["labels_only"]["0.1250"]
    per_class = result["learning_curve"]["labels_only"]["0.1250"]["test_iou_per_class"]
    assert per_class == [pytest.approx(0.2), None, pytest.approx(0.3)]
    # without active-learning rounds: the learning curve alone, no empty sections
    alone = analyse(curve, pd.DataFrame())
    assert alone["active_learning"] == {} and "tiles_to_reach_random_final" not in alone
    text = format_report(
        {
            "store": "s.zarr",
            "tiles": {"pool": 64, "monitor": 8, "test": 8},
            "settings": {"seeds": [0, 1]},
            "class_names": ["a", "b", "c"],
            **alone,
        }
    )
    assert "| 0.1250 | 8 | semi_supervised | 0.260 ± 0.000 |" in text
    assert text.index("| semi_supervised |") < text.index("| semi_supervised_round_2 |")
    assert "| 0.500 ± 0.000 | 0.800 ± 0.000 |" in text and "Active learning" not in text
    table = "\n".join(per_class_table(result["learning_curve"], ["a", "b", "c"]))
    assert "| method | label fraction | a | b | c |" in table
    assert "| labels_only | 0.1250 | 0.200 | – | 0.300 |" in table


class RecordingRunner:
    """The two calls of ``Runner`` that self-training makes, recorded instead of run."""

    def __init__(self, out: Path, rounds: int) -> None:
        self.out, self.settings = out, LabelEfficiencySettings(self_training_rounds=rounds)
        self.calls: list[tuple[str, str]] = []

    def pseudo_label(self, teacher_run: Path, seed: int) -> None:
        self.calls.append(("pseudo_label", teacher_run.name))

    def train(self, name: str, labeled: np.ndarray, seed: int, semi: bool) -> dict[str, object]:
        self.calls.append(("train", name))
        (self.out / "runs" / name).mkdir(parents=True)
        (self.out / "runs" / name / "test.json").write_text("{}")
        return {"name": name, "test_miou": 0.5}


def test_each_self_training_round_learns_from_the_previous_rounds_student(
    tmp_path: Path,
) -> None:
    runner = RecordingRunner(tmp_path, rounds=3)
    rows = self_training(runner, np.arange(4), 0, 0.125, "f0.1250_s0")  # type: ignore[arg-type]
    assert runner.calls == [
        ("pseudo_label", "semi_f0.1250_s0"),
        ("train", "semi_r2_f0.1250_s0"),
        ("pseudo_label", "semi_r2_f0.1250_s0"),
        ("train", "semi_r3_f0.1250_s0"),
    ]
    assert [row["method"] for row in rows] == [
        "semi_supervised_round_2",
        "semi_supervised_round_3",
    ]
    assert all(row["fraction"] == 0.125 for row in rows)
    # a rerun finds every round finished: no pool is labelled again
    runner.calls.clear()
    runner.train = lambda name, *_, **__: {"name": name}  # type: ignore[method-assign]
    self_training(runner, np.arange(4), 0, 0.125, "f0.1250_s0")  # type: ignore[arg-type]
    assert runner.calls == []
    with pytest.raises(ConfigError, match="self_training_rounds: got 0"):
        LabelEfficiencySettings(self_training_rounds=0)
    with pytest.raises(ConfigError, match="expected 'scratch' in semi_init"):
        LabelEfficiencySettings(self_training_rounds=2, semi_init=("teacher",))


@pytest.fixture(scope="module")
def experiment_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("experiment")
    images, masks = write_scenes(root, count=6, size=192, seed=31)
    return str(
        build_store(
            [images],
            root / "store.zarr",
            labels=[masks],
            num_classes=5,
            config={
                "tile_size": 64,
                "val_sources": ["scene_4", "scene_5"],
                "labeled_fraction": 0.5,
                "seed": 3,
            },
            quiet=True,
        ).path
    )


def test_partition_keeps_test_tiles_apart(experiment_store: str) -> None:
    index = read_tile_index(experiment_store).to_pandas()
    tiles = partition(index)
    assert len(tiles.pool) == 4 * 9 and len(tiles.monitor) == len(tiles.test) == 9
    assert not set(tiles.pool) & (set(tiles.monitor) | set(tiles.test))
    by_id = index.set_index(C.TILE_ID)[C.SOURCE]
    assert not set(by_id[tiles.monitor]) & set(by_id[tiles.test])  # split by source


@pytest.mark.timeout(900)
def test_experiment_runs_end_to_end_and_resumes(
    experiment_store: str, tmp_path: Path, ray_session: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(
        overrides=[
            "student.model_type=tiny",
            "train.num_workers=0",
            "train.batch_size=4",
            "train.epochs=2",
            "train.steps_per_epoch=4",
            "train.warmup_steps=1",
            "ssl.threshold_mode=freematch",
            "stream.tiles_per_task=16",
        ]
    )
    settings = LabelEfficiencySettings(
        fractions=(0.125, 0.25),
        seeds=(0,),
        al_start_fraction=0.125,
        al_rounds=1,
        al_round_fraction=0.125,
        semi_init=("scratch", "teacher", "oracle"),
        target_area=True,
    )
    out = tmp_path / "le"
    report = run_label_efficiency(experiment_store, out, config, settings, log=None)
    assert set(report["learning_curve"]) == {
        "labels_only",
        "semi_supervised",
        "semi_supervised_warm",
        "semi_supervised_target_area",
        "oracle",
        "full_label",
    }
    assert set(report["learning_curve"]["labels_only"]) == {"0.1250", "0.2500"}
    curve = pd.read_csv(out / "learning_curve.csv")
    assert curve.groupby("method")["labeled_tiles"].apply(list).to_dict() == {
        "full_label": [36],
        "labels_only": [4, 9],
        "semi_supervised": [4, 9],
        "semi_supervised_warm": [4, 9],
        "oracle": [4, 9],
        "semi_supervised_target_area": [4, 9],
    }
    # the target-area student also has the 9 monitor tiles unlabeled; never a test tile
    area = curve[curve["method"] == "semi_supervised_target_area"]
    assert (area["unlabeled_tiles"] == 36 - area["labeled_tiles"] + 9).all()
    assert set(report["room"]) == {"0.1250", "0.2500"}
    assert all(isinstance(entry["room"], bool) for entry in report["room"].values())
    assert "room " in (out / "report.md").read_text()
    # each consistency student's row shows the share of unlabeled pixels used and their accuracy
    oracle_row = next(
        line for line in (out / "report.md").read_text().splitlines() if "| oracle |" in line
    )
    assert oracle_row.endswith("| 1.000 ± 0.000 |")
    # the oracle's targets are the ground truth: every counted pixel is right
    oracle = curve[curve["method"] == "oracle"]
    assert (oracle["pseudo_accuracy"] == 1.0).all() and (oracle["mask_ratio"] > 0.5).all()
    assert (curve.loc[curve["method"] == "semi_supervised", "pseudo_accuracy"] < 1.0).all()
    # the warm student started from its teacher; the others from the base
    warm_config = (out / "runs" / "semi_warm_f0.1250_s0" / "config.yaml").read_text()
    assert f"init_from: {out / 'runs' / 'labels_only_f0.1250_s0'}" in warm_config
    assert "init_from: null" in (out / "runs" / "semi_f0.1250_s0" / "config.yaml").read_text()
    semi = curve[curve["method"] == "semi_supervised"]
    assert (semi["unlabeled_tiles"] == 36 - semi["labeled_tiles"]).all()
    assert curve["test_miou"].between(0, 1).all()
    rounds = pd.read_csv(out / "active_learning.csv")
    assert rounds.groupby("strategy")["labeled_tiles"].apply(list).to_dict() == {
        "active": [4, 8],
        "random": [4, 8],
    }
    # both strategies start from the same seed set: the same run
    assert rounds.loc[rounds["round"] == 0, "test_miou"].nunique() == 1
    for name in ("learning_curve.png", "active_learning.png", "report.md"):
        assert (out / name).stat().st_size > 500
    text = (out / "report.md").read_text()
    assert "Learning curve" in text and "| method | label fraction | class 0 |" in text
    assert json.loads((out / "report.json").read_text())["tiles"]["test"] == 9
    # the active round trains on the seed set plus the tiles the selection picked
    start, picked = (
        set(json.loads((out / "runs" / name / "test.json").read_text())["labeled_ids"])
        for name in ("al_start_s0", "al_active_r1_s0")
    )
    assert start < picked and len(picked - start) == 4
    # a rerun reuses every finished run (and the recorded pick) and gives the same report
    import semisup.selection

    def no_scoring(*_: object, **__: object) -> None:
        raise AssertionError("a finished active round was scored again")

    monkeypatch.setattr(semisup.selection, "score_tiles", no_scoring)
    mtimes = {p: p.stat().st_mtime for p in (out / "runs").glob("*/test.json")}
    again = run_label_efficiency(experiment_store, out, config, settings, log=None)
    assert {p: p.stat().st_mtime for p in (out / "runs").glob("*/test.json")} == mtimes
    assert again["learning_curve"] == report["learning_curve"]
    assert np.isfinite(again["ssl_gain"]["semi_supervised_warm"]["0.1250"]["gap_closed"] or 0.0)
    assert "| 0.1250 | 4 | semi_supervised_warm |" in (out / "report.md").read_text()
