"""Student training on Ray Train: learning, reports, DDP equivalence, resumption, bad config."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from store_factory import scene_store as scene_store_at

from data_prep.ingest import build_store
from semisup.cli import main
from semisup.config import ConfigError, ExperimentConfig, load_config
from semisup.synthetic import generate_scene
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


@pytest.fixture(scope="module")
def repeated_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Every labeled tile is the same 64 px crop, so any split of the data gives the same batch."""
    root = tmp_path_factory.mktemp("repeated")
    image, label = generate_scene(64, seed=3)
    np.save(root / "a.npy", np.tile(image, (1, 8, 1)))
    np.save(root / "b.npy", np.tile(image, (1, 2, 1)))
    np.save(root / "a_label.npy", np.tile(label, (1, 8)))
    np.save(root / "b_label.npy", np.tile(label, (1, 2)))
    result = build_store(
        [root / "a.npy", root / "b.npy"], root / "store.zarr",
        labels=[root / "a_label.npy", root / "b_label.npy"], num_classes=5,
        config={"tile_size": 64, "val_sources": ["b"], "labeled_fraction": 1.0}, quiet=True,
    )  # fmt: skip
    return str(result.path)


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
    with pytest.raises(FileExistsError, match="--resume"):
        run_training(scene_store, config, tmp_path / "run", debug=True)


@pytest.mark.timeout(300)
def test_warm_start_begins_where_the_named_run_ended(
    scene_store: str, tmp_path: Path, ray_session: None
) -> None:
    from safetensors.torch import load_file

    first = run_training(
        scene_store, _config("ssl.target=ema", "train.epochs=1", "train.steps_per_epoch=8"),
        tmp_path / "first", debug=True,
    )  # fmt: skip
    # a learning rate too small to move the weights: the warm student is the first run's best
    still = _config("ssl.target=ema", "train.epochs=1", "train.steps_per_epoch=1",
                    "train.lr=1e-12", f"train.init_from={tmp_path / 'first'}")  # fmt: skip
    warm = run_training(scene_store, still, tmp_path / "warm", debug=True)
    assert warm["best_miou"] == pytest.approx(first["best_miou"], abs=1e-6)
    before = load_file(str(tmp_path / "first" / "best" / "adapter.safetensors"))
    after = load_file(str(tmp_path / "warm" / "best" / "adapter.safetensors"))
    assert before.keys() == after.keys()
    assert max(float((before[k] - after[k]).abs().max()) for k in before) < 1e-6
    cold = run_training(scene_store, _config("ssl.target=ema", "train.epochs=1",
                        "train.steps_per_epoch=1", "train.lr=1e-12"), tmp_path / "cold",
                        debug=True)  # fmt: skip
    assert cold["best_miou"] != pytest.approx(first["best_miou"], abs=1e-6)
    # an adapter of another layout or a missing file fails before training, naming the key
    with pytest.raises(ConfigError, match=r"train.init_from=.*mode 'decoder' \(config: 'lora'\)"):
        run_training(scene_store, _config("ssl.target=ema", "student.mode=lora", f"train.init_from={tmp_path / 'first'}"),
                     tmp_path / "bad", debug=True)  # fmt: skip
    with pytest.raises(ConfigError, match="no adapter at"):
        run_training(scene_store, _config("ssl.target=ema", f"train.init_from={tmp_path / 'none'}"),
                     tmp_path / "bad", debug=True)  # fmt: skip
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


@pytest.mark.timeout(300)
def test_one_and_two_workers_take_the_same_steps(
    repeated_store: str, tmp_path: Path, ray_session: None
) -> None:
    common = ["ssl.enabled=false", "augment.weak_flip=false", "augment.weak_rot90=false",
              "train.epochs=1", "train.steps_per_epoch=2", "train.cpus_per_worker=0.5"]  # fmt: skip
    losses = []
    for workers in (1, 2):
        config = _config(*common, f"train.num_workers={workers}")
        report = run_training(repeated_store, config, tmp_path / f"w{workers}")
        losses.append(report["epochs"][0]["train"]["loss"])  # mean of steps 1 and 2
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


@pytest.mark.timeout(420)
def test_killed_worker_resumes_from_its_checkpoint(
    scene_store: str, tmp_path: Path, ray_session: None
) -> None:
    config = _config("ssl.target=ema", "train.epochs=4", "train.steps_per_epoch=6",
                     "train.checkpoint_every_steps=3", "train.early_stop_patience=10")  # fmt: skip
    run_dir = tmp_path / "run"
    killed: list[int] = []

    def kill_after_first_checkpoint() -> None:
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            if list((run_dir / "ray").glob("**/checkpoint_*")):
                for proc in psutil.process_iter(["cmdline"]):
                    if "RayTrainWorker" in " ".join(proc.info["cmdline"] or []):
                        proc.kill()
                        killed.append(proc.pid)
            time.sleep(0.2)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    report = run_training(scene_store, config, run_dir)
    killer.join(timeout=1)
    assert killed, "no Train worker was killed"
    assert report["steps"] == 24
    assert [e["epoch"] for e in report["epochs"]] == [0, 1, 2, 3]


@pytest.mark.timeout(300)
def test_resume_continues_a_stopped_run(
    scene_store: str, tmp_path: Path, ray_session: None
) -> None:
    run_dir, storage = tmp_path / "run", tmp_path / "checkpoints"
    first = run_training(scene_store, _config("ssl.enabled=false", "train.epochs=1",
                                              "train.steps_per_epoch=4",
                                              f"train.storage={storage}"), run_dir)  # fmt: skip
    assert first["steps"] == 4
    assert list(storage.glob("train/checkpoint_*")) and not (run_dir / "ray").exists()
    longer = _config("ssl.enabled=false", "train.epochs=2", "train.steps_per_epoch=4",
                     f"train.storage={storage}")  # fmt: skip
    second = run_training(scene_store, longer, run_dir, resume=True)
    assert second["steps"] == 8
    assert [e["epoch"] for e in second["epochs"]] == [0, 1]
    assert second["epochs"][0] == first["epochs"][0]


@pytest.fixture(scope="module")
def dubai_store(dubai_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Dubai tile 1 for training (every image labelled) and tile 3 for validation."""
    from semisup.datasets import CLASS_NAMES, DUBAI_COLOURS

    result = build_store(
        [dubai_dir / "tile_1" / "images", dubai_dir / "tile_3" / "images"],
        tmp_path_factory.mktemp("dubai") / "store.zarr",
        labels=[dubai_dir / "tile_1" / "masks", dubai_dir / "tile_3" / "masks"],
        label_colors=DUBAI_COLOURS, class_names=list(CLASS_NAMES),
        config={"tile_size": 256, "split_by": "folder", "val_sources": ["tile_3*"],
                "labeled_fraction": 1.0},
        quiet=True,
    )  # fmt: skip
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
    config = _config("ssl.enabled=false", "train.num_workers=2", "train.cpus_per_worker=0.5",
                     "train.batch_size=8", "train.epochs=3", "train.steps_per_epoch=10",
                     "train.lr=3e-3")  # fmt: skip
    report = run_training(dubai_store, config, tmp_path / "run")
    epochs = report["epochs"]
    assert epochs[-1]["train"]["loss"] < epochs[0]["train"]["loss"]
    floor = _majority_class_miou(dubai_store)
    assert 0.05 < floor < 0.2
    assert report["best_miou"] > floor + 0.02


class _FakeShard:
    """A shard of ``rows`` numbered tiles that counts how often it is read."""

    def __init__(self, rows: int) -> None:
        self.ids = np.arange(rows)
        self.reads = 0

    def iter_batches(self, batch_size: int, batch_format: str, drop_last: bool):  # type: ignore[no-untyped-def]
        self.reads += 1
        stop = len(self.ids) - batch_size + 1 if drop_last else len(self.ids)
        for lo in range(0, stop, batch_size):
            yield {"tile_id": self.ids[lo : lo + batch_size], "image": np.zeros((batch_size, 4))}


def test_small_shards_are_read_once_then_replayed_reshuffled() -> None:
    from semisup.train import ShardCache, cycle_batches

    shard = _FakeShard(10)
    batches = cycle_batches(ShardCache(shard, budget_bytes=10_000), 4, "labeled", seed=0)
    passes = [np.concatenate([next(batches)["tile_id"] for _ in range(2)]) for _ in range(4)]
    assert shard.reads == 1  # 2 full batches of 4 per pass; later passes come from memory
    assert passes[0].tolist() == list(range(8))
    assert all(len(set(p)) == 8 and set(p) <= set(range(10)) for p in passes)
    assert any(p.tolist() != passes[1].tolist() for p in passes[2:])  # reshuffled each pass
    validation = ShardCache(_FakeShard(10), budget_bytes=10_000)
    first = [b["tile_id"].tolist() for b in validation.passes(4)]
    assert first == [list(range(4)), list(range(4, 8)), [8, 9]]
    assert [b["tile_id"].tolist() for b in validation.passes(4)] == first


def test_a_streamed_first_pass_is_mixed_by_the_shuffle_buffer(ray_session: None) -> None:
    import ray

    from semisup.train import ShardCache, cycle_batches

    def first_pass(buffer: int, seed: int) -> list[int]:
        cache = ShardCache(ray.data.range(64, override_num_blocks=4), 10**6, buffer, seed)
        batches = cycle_batches(cache, 8, "labeled", seed=0)
        return [int(i) for _ in range(8) for i in next(batches)["id"]]

    assert first_pass(0, 0) == list(range(64))  # no buffer: the shard's own order
    mixed = first_pass(32, 0)
    assert sorted(mixed) == list(range(64)) and mixed != list(range(64))
    assert mixed[:8] != list(range(8))
    assert first_pass(32, 0) == mixed and first_pass(32, 1) != mixed


def test_shards_over_the_budget_stream_every_pass() -> None:
    from semisup.train import ShardCache, cycle_batches

    shard = _FakeShard(8)
    batches = cycle_batches(ShardCache(shard, budget_bytes=100), 4, "unlabeled", seed=0)
    for _ in range(6):
        next(batches)
    assert shard.reads == 3
    with pytest.raises(ValueError, match="no full batch of 16"):
        next(cycle_batches(ShardCache(_FakeShard(8), 0), 16, "labeled", seed=0))
