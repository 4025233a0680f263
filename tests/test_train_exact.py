"""Training you can trust: the same seed gives the same weights, a restarted run ends where an
uninterrupted one ends, and N workers take the step one worker takes.

Every run here has augmentation, CutMix and the EMA teacher switched on, and tiles that differ,
so a broken gradient reduction, a wrong batch split, a rank-keyed random draw or a lost piece of
checkpointed state changes the weights these tests compare.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from store_factory import scene_store as scene_store_at

from semisup.config import ExperimentConfig, load_config
from semisup.store import store_facts
from semisup.train import run_training
from semisup.train_loop import build_model, build_optimizer
from semisup.train_state import STATE_FILE, trainable_state

EXACT = [
    "student.model_type=tiny",
    "student.mode=decoder",
    "train.batch_size=4",
    "train.warmup_steps=2",
    "train.lr=2e-3",
    "train.torch_threads=1",  # thread counts change float reduction order: fixed for equality
    "ssl.target=ema",
    "ssl.ramp_up_steps=0",
    "ssl.confidence_threshold=0.2",  # just above chance for 5 classes: consistency counts at once
    "augment.cutmix_prob=0.5",
    "augment.blur_prob=0.5",
    "train.early_stop_patience=10",
]
# long enough that a checkpoint is registered well before the end, whatever the machine's load
RESUMED = ["train.epochs=3", "train.steps_per_epoch=6", "train.checkpoint_every_steps=3"]
CHECKPOINT_STEPS = (3, 6, 9, 12, 15)  # where a resumed run can have restarted (not the last, 18)


def _config(*overrides: str) -> ExperimentConfig:
    return load_config(overrides=[*EXACT, *overrides])


@pytest.fixture(scope="module")
def scene_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Four generated 256 px scenes as 64 px tiles: 16 labeled, 32 unlabeled, 16 val tiles."""
    return scene_store_at(tmp_path_factory.mktemp("scenes"), size=256)


def final_weights(run_dir: Path, storage: Path | None = None) -> dict[str, torch.Tensor]:
    """The trainable weights of a run's latest checkpoint (its last step)."""
    checkpoints = sorted((storage or run_dir / "ray").glob(f"train/checkpoint_*/{STATE_FILE}"))
    assert checkpoints, f"no checkpoint under {run_dir}"
    saved = torch.load(checkpoints[-1], map_location="cpu", weights_only=True)
    return saved["model"]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def reference(
    scene_store: str, tmp_path_factory: pytest.TempPathFactory, ray_session: None
) -> dict[str, torch.Tensor]:
    """The final weights of an uninterrupted ``--debug`` run of RESUMED (18 steps)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    report = run_training(scene_store, _config(*RESUMED), run_dir, debug=True)
    assert report["steps"] == 18 and report["resumed_at"] == []
    return final_weights(run_dir)


@pytest.mark.timeout(300)
def test_the_same_seed_gives_bit_identical_weights(
    scene_store: str, tmp_path: Path, reference: dict[str, torch.Tensor]
) -> None:
    again = _config(*RESUMED)
    run_training(scene_store, again, tmp_path / "again", debug=True)
    assert max_difference(final_weights(tmp_path / "again"), reference) == 0.0
    other = _config(*RESUMED, "train.seed=1")
    run_training(scene_store, other, tmp_path / "other", debug=True)
    assert max_difference(final_weights(tmp_path / "other"), reference) > 1e-4


@pytest.mark.timeout(420)
def test_two_workers_take_the_step_one_worker_takes(
    scene_store: str, tmp_path: Path, ray_session: None
) -> None:
    """5 steps of plain SGD: 2 workers × 2 tiles against 1 worker × 4 tiles, equal to 1e-5
    relative to the update; validation of the same (initial) weights equal exactly."""
    # a learning rate large enough that the update stands well above float32's rounding of the
    # weights themselves (about 4e-9 at their size)
    common = ["train.optimizer=sgd", "train.lr=0.05", "train.epochs=1", "train.steps_per_epoch=5"]
    one = run_training(scene_store, _config(*common), tmp_path / "one", debug=True)
    two = run_training(
        scene_store,
        _config(*common, "train.num_workers=2", "train.cpus_per_worker=0.5"),
        tmp_path / "two",
    )
    start = trainable_state(build_model(_config(*common), store_facts(scene_store), None))
    after_one, after_two = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    update_one = {k: after_one[k] - start[k] for k in start}
    update_two = {k: after_two[k] - start[k] for k in start}
    scale = max(float(v.abs().max()) for v in update_one.values())
    assert scale > 1e-3  # the steps moved the weights
    difference = max_difference(update_one, update_two)
    print(f"2 workers vs 1: max |update difference| {difference:.3g} (update scale {scale:.3g})")
    assert difference <= 1e-5 * scale
    for name in ("loss", "loss_sup", "loss_cons", "mask_ratio"):
        train_one, train_two = one["epochs"][0]["train"], two["epochs"][0]["train"]
        assert train_two[name] == pytest.approx(train_one[name], rel=1e-5, abs=1e-7), name
    assert one["epochs"][0]["train"]["mask_ratio"] > 0.05  # the consistency term took part
    # mIoU, Dice and per-class IoU of the same weights: argmax counts, equal exactly; the
    # calibration error sums float32 confidences of forward passes over other batch sizes
    # (4 tiles against 2 per worker), equal to float32's rounding
    initial_one, initial_two = dict(one["initial"]), dict(two["initial"])
    ece_one = initial_one["calibration"].pop("expected_calibration_error")
    ece_two = initial_two["calibration"].pop("expected_calibration_error")
    assert initial_two == initial_one
    assert ece_two == pytest.approx(ece_one, rel=1e-5)


def _registered_checkpoint(run_dir: Path) -> bool:
    """Whether Ray Train has registered a checkpoint of the run (its manager's snapshot names
    one): a checkpoint folder alone may still be unknown to the controller."""
    snapshot = run_dir / "ray" / "train" / "checkpoint_manager_snapshot.json"
    try:
        return bool(json.loads(snapshot.read_text()).get("latest_checkpoint_result"))
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def _kill_one_worker_after_a_checkpoint(run_dir: Path, killed: list[int]) -> None:
    """SIGKILL this run's Train worker once a checkpoint is registered (found by Ray's state
    API in the test session's own Ray: no other process is touched)."""
    from ray.util.state import list_actors

    deadline = time.time() + 240
    while time.time() < deadline and not killed:
        if _registered_checkpoint(run_dir):
            workers = list_actors(
                filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
            )
            if workers:
                os.kill(int(workers[0].pid), signal.SIGKILL)
                killed.append(int(workers[0].pid))
        time.sleep(0.2)


@pytest.mark.timeout(420)
def test_a_killed_worker_resumes_and_ends_with_the_uninterrupted_weights(
    scene_store: str, tmp_path: Path, reference: dict[str, torch.Tensor]
) -> None:
    run_dir, killed = tmp_path / "run", []
    killer = threading.Thread(
        target=_kill_one_worker_after_a_checkpoint, args=(run_dir, killed), daemon=True
    )
    killer.start()
    report = run_training(scene_store, _config(*RESUMED, "train.num_workers=1"), run_dir)
    killer.join(timeout=5)
    assert killed, "no Train worker was killed"
    assert report["steps"] == 18 and [e["epoch"] for e in report["epochs"]] == [0, 1, 2]
    assert report["resumed_at"] and report["resumed_at"][0] in CHECKPOINT_STEPS
    difference = max_difference(final_weights(run_dir), reference)
    print(f"killed worker, resumed at {report['resumed_at']}: max |difference| {difference:.3g}")
    assert difference <= 1e-6


@pytest.mark.timeout(420)
def test_a_stopped_driver_resumes_and_ends_with_the_uninterrupted_weights(
    scene_store: str, tmp_path: Path, reference: dict[str, torch.Tensor]
) -> None:
    """``semisup train --debug`` interrupted (SIGINT, as Ctrl-C) after its first checkpoint,
    then ``--resume``."""
    run_dir = tmp_path / "run"
    overrides = [f"--set={item}" for item in (*EXACT, *RESUMED)]
    cli = "import sys; from semisup.cli import main; sys.exit(main())"
    command = [
        sys.executable,
        "-c",
        cli,
        "train",
        "--store",
        scene_store,
        "--out",
        str(run_dir),
        "--debug",
        *overrides,
    ]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = psutil.Process(driver.pid)
    try:
        deadline = time.time() + 240
        while (
            not list((run_dir / "ray").glob(f"train/checkpoint_*/{STATE_FILE}"))
            and driver.poll() is None
        ):
            assert time.time() < deadline, "the driver wrote no checkpoint"
            time.sleep(0.1)
        assert driver.poll() is None, "the driver ended before it could be stopped"
        children = started.children(recursive=True)
        driver.send_signal(signal.SIGINT)
        assert driver.wait(timeout=120) != 0
    finally:
        for process in [started, *locals().get("children", [])]:
            if process.is_running():  # only what this test started
                process.kill()
    report = run_training(scene_store, _config(*RESUMED), run_dir, resume=True, debug=True)
    assert report["steps"] == 18 and report["resumed_at"]
    assert report["resumed_at"][0] in CHECKPOINT_STEPS
    difference = max_difference(final_weights(run_dir), reference)
    print(f"stopped driver, resumed at {report['resumed_at']}: max |difference| {difference:.3g}")
    assert difference <= 1e-6


@pytest.mark.timeout(300)
def test_a_run_that_cannot_improve_stops_after_exactly_patience_epochs(
    scene_store: str, tmp_path: Path, ray_session: None
) -> None:
    frozen = _config(
        "train.lr=1e-12", "train.epochs=6", "train.steps_per_epoch=1", "train.early_stop_patience=2"
    )
    report = run_training(scene_store, frozen, tmp_path / "run", debug=True)
    assert report["stopped_early"] is True
    assert [e["epoch"] for e in report["epochs"]] == [0, 1]
    assert all(e["miou"] == report["initial"]["miou"] for e in report["epochs"])


@pytest.mark.parametrize(("batch", "factor"), [(8, 1), (16, 2), (32, 4)])
def test_the_learning_rate_scales_linearly_with_the_global_batch(batch: int, factor: int) -> None:
    """``train.lr`` is for a global batch of 8; AdamW and SGD both get it scaled."""
    model = torch.nn.Linear(2, 2)
    for optimizer in ("adamw", "sgd"):
        config = _config(
            f"train.batch_size={batch}", "train.lr=1e-3", f"train.optimizer={optimizer}"
        )
        built = build_optimizer(config, model)
        assert built.param_groups[0]["lr"] == pytest.approx(1e-3 * factor)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_one_and_two_worker_runs_are_each_bit_identical_when_repeated(
    scene_store: str, tmp_path: Path, ray_session: None
) -> None:
    for workers in (1, 2):
        runs = []
        for attempt in range(2):
            run_dir = tmp_path / f"w{workers}-{attempt}"
            config = _config(
                f"train.num_workers={workers}",
                "train.cpus_per_worker=0.5",
                "train.epochs=1",
                "train.steps_per_epoch=4",
            )
            run_training(scene_store, config, run_dir)
            runs.append(final_weights(run_dir))
        assert max_difference(*runs) == 0.0
