"""Student training on Ray Train: learning, reports, warm starts, storage, bad config.

Determinism, exact resumption and data-parallel equivalence are in ``test_train_exact.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from store_factory import scene_store as scene_store_at

from data_prep.ingest import build_store
from semisup.cli import main
from semisup.config import ConfigError, ExperimentConfig, load_config
from semisup.train import run_training

FAST = [
    "student.model_type=tiny",
    "train.batch_size=4",
    "train.warmup_steps=2",
    "train.lr=2e-3",
    "stream.tiles_per_task=16",
]


def _config(*overrides: str) -> ExperimentConfig:
    return load_config(overrides=[*FAST, *overrides])


@pytest.fixture(scope="module")
def scene_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Four generated 256 px scenes as 64 px tiles: 1 labeled, 2 unlabeled, 1 val source."""
    return scene_store_at(tmp_path_factory.mktemp("scenes"), size=256)


@pytest.mark.timeout(300)
def test_debug_run_learns_and_writes_its_reports(
    scene_store: str, tmp_path: Path, ray_session: None
) -> None:
    config = _config("ssl.target=ema", "train.epochs=3", "train.steps_per_epoch=12")
    report = run_training(scene_store, config, tmp_path / "run", debug=True)
    epochs = report["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1, 2] and report["steps"] == 36
    assert epochs[-1]["train"]["loss_sup"] < epochs[0]["train"]["loss_sup"]
    assert 0 <= report["best_miou"] <= 1 and report["best_epoch"] in (0, 1, 2)
    assert {"loss_cons", "mask_ratio"} <= set(epochs[0]["train"])
    assert Path(report["best_checkpoint"]).is_file()
    assert len(epochs[0]["iou_per_class"]) == 5
    assert (tmp_path / "run" / "report.md").read_text().count("\n| ") == 4  # header + 3 epochs
    assert any((tmp_path / "run" / "tensorboard").iterdir())
    # the best adapter, rebuilt on its base as evaluate, predict, select and the teacher
    # rebuild it, scores exactly what training measured on the same validation tiles
    from semisup import columns as C
    from semisup.evaluate import evaluate_run
    from semisup.store import read_tile_index

    index = read_tile_index(scene_store).to_pandas()
    val = index.loc[(index[C.SPLIT] == C.VAL) & (index["valid_fraction"] > 0), C.TILE_ID]
    rebuilt = evaluate_run(scene_store, tmp_path / "run", val.tolist())
    assert rebuilt["miou"] == pytest.approx(report["best_miou"], abs=1e-9)
    with pytest.raises(FileExistsError, match="--resume"):
        run_training(scene_store, config, tmp_path / "run", debug=True)


@pytest.mark.timeout(300)
def test_warm_start_begins_where_the_named_run_ended(
    scene_store: str, tmp_path: Path, ray_session: None
) -> None:
    from safetensors.torch import load_file

    first = run_training(
        scene_store,
        _config("ssl.target=ema", "train.epochs=1", "train.steps_per_epoch=8"),
        tmp_path / "first",
        debug=True,
    )
    # a learning rate too small to move the weights: the warm student is the first run's best
    still = _config(
        "ssl.target=ema",
        "train.epochs=1",
        "train.steps_per_epoch=1",
        "train.lr=1e-12",
        f"train.init_from={tmp_path / 'first'}",
    )
    warm = run_training(scene_store, still, tmp_path / "warm", debug=True)
    assert warm["best_miou"] == pytest.approx(first["best_miou"], abs=1e-6)
    before = load_file(str(tmp_path / "first" / "best" / "adapter.safetensors"))
    after = load_file(str(tmp_path / "warm" / "best" / "adapter.safetensors"))
    assert before.keys() == after.keys()
    assert max(float((before[k] - after[k]).abs().max()) for k in before) < 1e-6
    cold = run_training(
        scene_store,
        _config("ssl.target=ema", "train.epochs=1", "train.steps_per_epoch=1", "train.lr=1e-12"),
        tmp_path / "cold",
        debug=True,
    )
    assert cold["best_miou"] != pytest.approx(first["best_miou"], abs=1e-6)
    # an adapter of another layout or a missing file fails before training, naming the key
    with pytest.raises(ConfigError, match=r"train.init_from=.*mode 'decoder' \(config: 'lora'\)"):
        run_training(
            scene_store,
            _config("ssl.target=ema", "student.mode=lora", f"train.init_from={tmp_path / 'first'}"),
            tmp_path / "bad",
            debug=True,
        )
    with pytest.raises(ConfigError, match="no adapter at"):
        run_training(
            scene_store,
            _config("ssl.target=ema", f"train.init_from={tmp_path / 'none'}"),
            tmp_path / "bad",
            debug=True,
        )
    assert not (tmp_path / "bad").exists()


def test_bad_config_values_fail_before_any_worker_starts(
    scene_store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for override, key in [
        ("student.lora_rank=-1", "student.lora_rank"),
        ("ssl.confidence_threshold=1.5", "ssl.confidence_threshold"),
        ("student.mode=partial", "student.mode"),
        ("train.batch_sise=4", "train.batch_sise"),
    ]:
        status = main(
            ["train", "--store", scene_store, "--out", str(tmp_path / "r"), "--set", override]
        )
        assert status == 2
        assert key in capsys.readouterr().err
        assert not (tmp_path / "r").exists()
    # a base checkpoint that cannot be read: one line naming it, before the run folder exists
    bad = tmp_path / "sam.pth"
    bad.write_bytes(b"not a checkpoint")
    status = main(
        [
            "train",
            "--store",
            scene_store,
            "--out",
            str(tmp_path / "r"),
            "--set",
            f"student.checkpoint={bad}",
            "--set",
            "ssl.target=ema",
        ]
    )
    assert status == 2 and str(bad) in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.timeout(300)
def test_resume_continues_a_stopped_run(
    scene_store: str, tmp_path: Path, ray_session: None
) -> None:
    run_dir, storage = tmp_path / "run", tmp_path / "checkpoints"
    first = run_training(
        scene_store,
        _config(
            "ssl.enabled=false",
            "train.epochs=1",
            "train.steps_per_epoch=4",
            f"train.storage={storage}",
        ),
        run_dir,
    )
    assert first["steps"] == 4
    assert list(storage.glob("train/checkpoint_*")) and not (run_dir / "ray").exists()
    longer = _config(
        "ssl.enabled=false", "train.epochs=2", "train.steps_per_epoch=4", f"train.storage={storage}"
    )
    second = run_training(scene_store, longer, run_dir, resume=True)
    assert second["steps"] == 8
    assert [e["epoch"] for e in second["epochs"]] == [0, 1]
    assert second["epochs"][0] == first["epochs"][0]


@pytest.fixture(scope="module")
def dubai_store(dubai_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Dubai tile 1 for training (every image labelled) and tile 3 for validation."""
    from semisup.known_imagery import CLASS_NAMES, DUBAI_COLOURS

    result = build_store(
        [dubai_dir / "tile_1" / "images", dubai_dir / "tile_3" / "images"],
        tmp_path_factory.mktemp("dubai") / "store.zarr",
        labels=[dubai_dir / "tile_1" / "masks", dubai_dir / "tile_3" / "masks"],
        label_colors=DUBAI_COLOURS,
        class_names=list(CLASS_NAMES),
        config={
            "tile_size": 256,
            "split_by": "folder",
            "val_sources": ["tile_3*"],
            "labeled_fraction": 1.0,
        },
        quiet=True,
    )
    return str(result.path)


def _majority_class_miou(store: str) -> float:
    """Validation mIoU of always predicting the most frequent class of the val tiles."""
    import torch

    from semisup import columns as C
    from semisup.metrics import confusion_matrix, majority_class_miou
    from semisup.store import open_store, read_tile_index

    root, index = open_store(store), read_tile_index(store).to_pandas()
    confusion = torch.zeros(5, 5, dtype=torch.int64)
    for source in index.loc[index[C.SPLIT] == C.VAL, C.SOURCE].unique():
        label = torch.from_numpy(root[source][C.LABEL][:].astype(np.int64))
        confusion += confusion_matrix(torch.zeros_like(label), label, 5)
    return majority_class_miou(confusion)


@pytest.mark.timeout(600)
def test_two_workers_on_real_dubai_tiles_learn_past_the_majority_class(
    dubai_store: str, tmp_path: Path, ray_session: None
) -> None:
    config = _config(
        "ssl.enabled=false",
        "train.num_workers=2",
        "train.cpus_per_worker=0.5",
        "train.batch_size=8",
        "train.epochs=3",
        "train.steps_per_epoch=10",
        "train.lr=3e-3",
    )
    report = run_training(dubai_store, config, tmp_path / "run")
    epochs = report["epochs"]
    assert epochs[-1]["train"]["loss"] < epochs[0]["train"]["loss"]
    floor = _majority_class_miou(dubai_store)
    assert 0.05 < floor < 0.2
    assert report["best_miou"] > floor + 0.02


@pytest.mark.timeout(600)
def test_a_semi_supervised_run_on_real_tiles_counts_unlabeled_pixels_and_measures_them(
    dubai_store: str, tmp_path: Path, ray_session: None
) -> None:
    """Dubai tile 1: three images labelled, the rest unlabeled (their ground truth only
    measures the targets); FreeMatch thresholds on a student's own EMA teacher."""
    from semisup import columns as C
    from semisup.store import read_tile_index

    index = read_tile_index(dubai_store).to_pandas()
    pool = index[index[C.SPLIT] == C.LABELED]
    sources = sorted(pool[C.SOURCE].unique())
    labelled = pool[C.SOURCE].isin(sources[:3])
    splits = {
        C.LABELED: pool.loc[labelled, C.TILE_ID].tolist(),
        C.UNLABELED: pool.loc[~labelled, C.TILE_ID].tolist(),
        C.VAL: index.loc[index[C.SPLIT] == C.VAL, C.TILE_ID].tolist(),
    }
    config = _config(
        "ssl.target=ema",
        "ssl.threshold_mode=freematch",
        "ssl.ramp_up_steps=4",
        "train.epochs=2",
        "train.steps_per_epoch=6",
    )
    report = run_training(dubai_store, config, tmp_path / "run", debug=True, splits=splits)
    last = report["epochs"][-1]["train"]
    assert last["mask_ratio"] > 0.05 and last["loss_cons"] > 0
    assert sum(last[f"mask_share_{k}"] for k in range(5)) == pytest.approx(last["mask_ratio"])
    assert 0 < last["pseudo_accuracy"] <= 1


@pytest.mark.timeout(300)
def test_a_teacher_run_measures_its_calibration_and_a_student_cuts_at_it(
    scene_store: str, tmp_path: Path, ray_session: None
) -> None:
    import json

    teacher = run_training(
        scene_store,
        _config("ssl.enabled=false", "train.epochs=1", "train.steps_per_epoch=4"),
        tmp_path / "teacher",
        debug=True,
    )
    measured = teacher["epochs"][0]["calibration"]
    assert measured["target_accuracy"] == 0.9 and 0 <= measured["kept_fraction"] <= 1
    assert (measured["threshold"] is None) == (measured["kept_fraction"] == 0)
    # a teacher whose best epoch was 90 % right above 0.6: the student's cut is 0.6
    best = tmp_path / "teacher" / "best" / "metrics.json"
    metrics = json.loads(best.read_text())
    best.write_text(json.dumps({**metrics, "calibration": {**measured, "threshold": 0.6}}))
    calibrated = [
        "ssl.target=ema",
        "ssl.threshold_mode=calibrated",
        "ssl.ramp_up_steps=0",
        "train.epochs=1",
        "train.steps_per_epoch=3",
    ]
    with pytest.raises(ConfigError, match="needs ssl.calibration_run"):
        run_training(scene_store, _config(*calibrated), tmp_path / "none", debug=True)
    student = run_training(
        scene_store,
        _config(*calibrated, f"ssl.calibration_run={tmp_path / 'teacher'}"),
        tmp_path / "student",
        debug=True,
    )
    assert 0 <= student["epochs"][0]["train"]["mask_ratio"] <= 1
    best.write_text(json.dumps({**metrics, "calibration": {**measured, "threshold": None}}))
    with pytest.raises(ConfigError, match="never reached 0.9"):
        run_training(
            scene_store,
            _config(*calibrated, f"ssl.calibration_run={tmp_path / 'teacher'}"),
            tmp_path / "again",
            debug=True,
        )
