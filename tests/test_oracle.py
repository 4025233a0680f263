"""The consistency path's ceiling on real tiles: ground truth as its targets closes the label gap.

A student whose consistency targets are the unlabeled tiles' ground truth at confidence 1
(``ssl.target: oracle``) gets every answer a perfect teacher could give. Short of most of the
labels-only → full-label gap, the consistency path itself (views, weighting, loss) is broken,
whatever the teacher.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from data_prep.ingest import build_store
from semisup.config import PrepConfig, load_config
from semisup.experiment import LabelEfficiencySettings, gap_closed, run_label_efficiency
from semisup.known_imagery import DUBAI_COLOURS

FRACTION = 1 / 32  # of the pool (tile_1, 9 images): a steep part of the learning curve
MIN_GAP = 0.05  # full − labels-only test mIoU: the room the oracle has to close
MIN_CLOSED = 0.8


@pytest.mark.slow
@pytest.mark.timeout(2400)
@pytest.mark.xfail(
    strict=True,
    reason="measured: labels-only 0.342, oracle 0.341, full-label 0.376 (room 0.034): the tiny "
    "from-scratch student learns little from perfect targets through strong views "
    "(docs/label_efficiency); remove this mark when it passes",
)
def test_ground_truth_targets_close_most_of_the_label_gap(
    dubai_dir: Path, tmp_path: Path, ray_session: None
) -> None:
    tiles = ("tile_1", "tile_3")  # pool, and the held-out monitor/test images
    store = build_store(
        [dubai_dir / t / "images" for t in tiles],
        tmp_path / "dubai.zarr",
        labels=[dubai_dir / t / "masks" for t in tiles],
        label_colors=DUBAI_COLOURS,
        class_names=["building", "land", "road", "vegetation", "water"],
        config=PrepConfig(tile_size=128, split_by="folder", val_sources=("tile_3*",)),
        quiet=True,
    ).path
    config = load_config(
        overrides=[
            "student.model_type=tiny",
            "student.mode=full",
            "train.num_workers=0",
            "train.torch_threads=2",
            "train.batch_size=8",
            "train.lr=0.001",
            "train.epochs=6",
            "train.steps_per_epoch=40",
            "train.warmup_steps=20",
            "train.early_stop_patience=6",
            "ssl.threshold_mode=fixed",
            "ssl.ramp_up_steps=20",
            "ray.dashboard=false",
        ]
    )
    settings = LabelEfficiencySettings(
        fractions=(FRACTION,), seeds=(0,), al_rounds=0, semi_init=("oracle",)
    )
    out = tmp_path / "oracle"
    run_label_efficiency(str(store), out, config, settings, log=None)
    curve = pd.read_csv(out / "learning_curve.csv").set_index("method")["test_miou"]
    only, oracle, full = curve["labels_only"], curve["oracle"], curve["full_label"]
    assert full - only >= MIN_GAP, f"no room: labels-only {only:.3f}, full-label {full:.3f}"
    closed = gap_closed(only, oracle, full)
    assert closed is not None and closed >= MIN_CLOSED, (
        f"ground-truth targets closed {closed:.0%} of the gap (labels-only {only:.3f}, "
        f"oracle {oracle:.3f}, full-label {full:.3f})"
    )
