"""Step time of the Ray Train student loop against a bare PyTorch loop, in one run.

Both loops run the same ``semisup.steps.train_step`` on the same model, batch size, seed and
number of torch threads. The bare loop takes its batches from tiles already in memory; the Ray
loop reads them through Ray Data shards inside a TorchTrainer worker. The per-step time of the Ray
loop is measured inside the worker (data wait included) and excludes start-up and validation.

    python bench/bench_train.py [--steps 30] [--threads 1,2] [--rounds 3] [--tile-size 256]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def build_scene_store(folder: Path, tile_size: int) -> str:
    """Six generated 768 px scenes: 2 labeled, 3 unlabeled, 1 val source."""
    from data_prep.ingest import build_store
    from semisup.synthetic import write_scenes

    images, masks = write_scenes(folder, count=6, size=768, seed=100)
    result = build_store(
        [images],
        folder / "store.zarr",
        labels=[masks],
        num_classes=5,
        config={"tile_size": tile_size, "val_sources": ["scene_5"], "labeled_fraction": 0.4},
        quiet=True,
    )
    return str(result.path)


def in_memory_batches(store: str, split: str, batch_size: int) -> list[dict[str, np.ndarray]]:
    """Every tile of ``split`` read with zarr directly, grouped into numpy batches."""
    from semisup import columns as C
    from semisup.store import open_store, read_store_meta, read_tile, read_tile_index

    root = open_store(store)
    size = read_store_meta(root).tile_size
    index = read_tile_index(store).to_pandas()
    rows = []
    for row in index[index[C.SPLIT] == split].itertuples():
        tile = read_tile(root[row.source], row.y0, row.x0, size)
        tile.setdefault(C.LABEL, np.full((size, size), 255, np.uint8))
        tile[C.SOURCE] = row.source
        rows.append(tile)
    batches = []
    for lo in range(0, len(rows) - batch_size + 1, batch_size):
        group = rows[lo : lo + batch_size]
        batches.append({key: np.stack([r[key] for r in group]) for key in group[0]})
    return batches


def bare_loop(store: str, config, steps: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(mean, median) seconds per step of train_step over in-memory batches (no Ray)."""
    from semisup import columns as C
    from semisup.ema import make_ema_teacher
    from semisup.model_input import prepare_batch
    from semisup.steps import StepRecipe, train_step
    from semisup.store import store_facts
    from semisup.student import build_student
    from semisup.train import scaled_lr

    facts = store_facts(store)
    band_scale = {k: (tuple(v[0]), tuple(v[1])) for k, v in facts["band_scale"].items()}
    labeled = in_memory_batches(store, C.LABELED, config.train.batch_size)
    unlabeled = in_memory_batches(store, C.UNLABELED, config.train.batch_size)
    torch.manual_seed(config.train.seed)
    model = build_student(
        config.student.model_type,
        facts["num_classes"],
        facts["tile_size"],
        mode=config.student.mode,
        lora_rank=config.student.lora_rank,
        lora_targets=config.student.lora_targets,
    )
    teacher = make_ema_teacher(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=scaled_lr(config))
    recipe = StepRecipe(config.ssl, config.augment, facts["num_classes"], config.train.dice_weight)
    times = []
    for step in range(steps):
        start = time.perf_counter()
        labeled_batch = prepare_batch(labeled[step % len(labeled)], band_scale)
        unlabeled_batch = prepare_batch(unlabeled[step % len(unlabeled)], band_scale)
        train_step(
            model,
            optimizer,
            labeled_batch,
            unlabeled_batch,
            teacher=teacher,
            recipe=recipe,
            step=step,
        )
        times.append(time.perf_counter() - start)
    return float(np.mean(times)), float(np.median(times))


def ray_loop(store: str, config, steps: int, run_dir: Path) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(mean, median) seconds per step measured inside a 1-worker TorchTrainer."""
    from semisup.runtime import ray_runtime
    from semisup.train import run_training

    with ray_runtime(config.ray):
        report = run_training(store, config, run_dir)
    train = report["epochs"][0]["train"]
    return float(train["step_seconds"]), float(train["step_seconds_median"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps per loop")
    parser.add_argument(
        "--threads", default="2", help="torch threads in both loops; a list (1,2) runs each"
    )
    parser.add_argument("--tile-size", type=int, default=256, help="tile side in pixels")
    parser.add_argument(
        "--rounds", type=int, default=1, help="alternating bare/Ray rounds per thread count"
    )
    args = parser.parse_args()

    from semisup.config import load_config

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = build_scene_store(Path(tmp) / "scenes", args.tile_size)
        for threads in (int(t) for t in args.threads.split(",")):
            config = load_config(
                overrides=[
                    "student.model_type=tiny",
                    "student.mode=lora",
                    "ssl.target=ema",
                    "train.num_workers=1",
                    f"train.torch_threads={threads}",
                    "train.batch_size=8",
                    "train.epochs=1",
                    f"train.steps_per_epoch={args.steps}",
                    "ray.num_cpus=2",
                ]
            )
            torch.set_num_threads(threads)
            for round_ in range(args.rounds):
                bare = bare_loop(store, config, args.steps)
                run_dir = Path(tmp) / f"run_{threads}_{round_}"
                ray_step = ray_loop(store, dataclasses.replace(config), args.steps, run_dir)
                rows.append((threads, round_, bare, ray_step, os.getloadavg()[0]))
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}"
    )
    print(
        f"model tiny SAM student (LoRA + decoder + head), {args.tile_size} px, batch 8 labeled "
        f"+ 8 unlabeled (EMA-teacher consistency), {args.steps} steps per loop"
    )
    print("threads round  bare mean/median ms   ray mean/median ms   overhead (median)  load")
    for threads, round_, bare, ray_step, load in rows:
        overhead = 100 * (ray_step[1] / bare[1] - 1)
        print(
            f"{threads:7d} {round_:5d}  {bare[0] * 1000:7.1f} {bare[1] * 1000:7.1f}     "
            f"{ray_step[0] * 1000:7.1f} {ray_step[1] * 1000:7.1f}     {overhead:+7.1f} %"
            f"         {load:.1f}"
        )
    for threads in sorted({r[0] for r in rows}):
        picked = [r for r in rows if r[0] == threads]
        bare_median = float(np.median([r[2][1] for r in picked]))
        ray_median = float(np.median([r[3][1] for r in picked]))
        ratio = bare_median / ray_median
        print(
            f"{threads} thread(s): ratio bare/ray (median over rounds) {ratio:.3f} "
            f"(overhead {100 * (1 / ratio - 1):+.1f} %)"
        )


if __name__ == "__main__":
    main()
