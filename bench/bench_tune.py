"""The cost Tune adds per trial over a bare ``semisup train`` of the same config, in one run.

The same four configs (the ``lora_rank`` space: ranks 4, 8, 16, 32) are trained twice on one
local Ray (2 CPUs, dashboard on): first as four sequential ``run_training`` calls, then as a
``run_tune`` sweep that runs one trial at a time. ASHA's only rung is the last epoch, so it stops
nothing and both do the same training. The two alternate (ABBA) to cancel drifts in the load
of a shared machine. With ``--concurrent`` a last pass runs the sweep with as many trials at
once as the CPUs hold. Wall times include each run's start-up (worker
processes, Ray Data pipelines) and, for Tune, the sweep's summary files.

    python bench/bench_tune.py [--epochs 2] [--steps 4] [--tile-size 128] [--rounds 1] [--concurrent]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path

import psutil

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def tree_cpu_seconds() -> float:
    """CPU seconds of this process and its descendants (raylet, GCS, dashboard, workers), with
    what their exited children used (Train workers of finished trials, reaped by the raylet).

    Less sensitive than wall time to other work on a shared machine.
    """
    total = 0.0
    for process in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        with suppress(psutil.Error):
            t = process.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


def bare_trials(store: str, configs: list, folder: Path) -> tuple[float, list[float]]:  # type: ignore[type-arg]
    """Total seconds of sequential ``run_training`` calls, and each call's training-loop time."""
    from semisup.train import run_training

    start = time.perf_counter()
    loops = []
    for index, config in enumerate(configs):
        report = run_training(store, config, folder / f"trial_{index}")
        loops.append(float(report["epochs"][-1]["seconds"]))
    return time.perf_counter() - start, loops


def tune_trials(store: str, base, out: Path, concurrent: int | None) -> tuple[float, list[float]]:  # type: ignore[no-untyped-def]
    """Total seconds of the sweep, and each trial's training-loop time."""
    from semisup.tune import run_tune

    start = time.perf_counter()
    summary = run_tune(
        store,
        base,
        "lora_rank",
        out,
        samples=1,
        grace_period=base.train.epochs,
        max_concurrent=concurrent,
    )
    seconds = time.perf_counter() - start
    loops = []
    for record in json.loads(Path(summary["trials_json"]).read_text()):
        report = json.loads((Path(record["trial_path"]) / "run" / "report.json").read_text())
        loops.append(float(report["epochs"][-1]["seconds"]))
    return seconds, loops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2, help="epochs per trial")
    parser.add_argument("--steps", type=int, default=4, help="training steps per epoch")
    parser.add_argument("--tile-size", type=int, default=128, help="tile side in pixels")
    parser.add_argument("--rounds", type=int, default=1, help="ABBA rounds (2 passes each)")
    parser.add_argument(
        "--concurrent", action="store_true", help="also run the sweep with concurrent trials"
    )
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_train import build_scene_store

    from semisup import search_space
    from semisup.config import load_config
    from semisup.runtime import ray_runtime
    from tune_spaces import SPACES

    base = load_config(
        overrides=[
            "student.model_type=tiny",
            "ssl.target=ema",
            "train.num_workers=1",
            "train.cpus_per_worker=0.5",
            "stream.read_cpus=0.25",
            "train.torch_threads=2",
            "train.batch_size=8",
            f"train.epochs={args.epochs}",
            f"train.steps_per_epoch={args.steps}",
            "train.early_stop_patience=100",
            "ray.num_cpus=2",
            "ray.dashboard=true",
        ]
    )
    dims = search_space.check_space(SPACES["lora_rank"], base, "lora_rank")
    configs = [
        search_space.trial_config(base, dims, {"student.lora_rank": r}) for r in (4, 8, 16, 32)
    ]
    # ABBA order (bare, Tune, Tune, bare, ...): on a shared machine the load drifts, and this
    # order cancels a linear drift between the two means
    passes: dict[str, list[tuple[float, list[float]]]] = {"bare": [], "tune": [], "both": []}
    cpu: dict[str, list[float]] = {"bare": [], "tune": [], "both": []}
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp, ray_runtime(base.ray):
        store = build_scene_store(Path(tmp) / "scenes", args.tile_size)
        for index in range(2 * args.rounds):
            order = ("bare", "tune") if index % 2 == 0 else ("tune", "bare")
            for mode in order:
                folder = Path(tmp) / f"{mode}_{index}"
                before = tree_cpu_seconds()
                passes[mode].append(
                    bare_trials(store, configs, folder)
                    if mode == "bare"
                    else tune_trials(store, base, folder, concurrent=1)
                )
                cpu[mode].append(tree_cpu_seconds() - before)
                loads.append(os.getloadavg()[0])
                print(
                    f"[bench] {mode} pass {index}: {passes[mode][-1][0]:.1f} s, "
                    f"{cpu[mode][-1]:.1f} CPU s, load average {loads[-1]:.1f}",
                    file=sys.stderr,
                    flush=True,
                )
        if args.concurrent:
            before = tree_cpu_seconds()
            passes["both"].append(tune_trials(store, base, Path(tmp) / "both", concurrent=None))
            cpu["both"].append(tree_cpu_seconds() - before)
            loads.append(os.getloadavg()[0])
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"load average (1 min) {min(loads):.1f}-{max(loads):.1f} over the run "
        f"(mean {sum(loads) / len(loads):.1f})"
    )
    print(
        f"4 trials (LoRA rank 4/8/16/32), tiny SAM student, {args.tile_size} px tiles, "
        f"batch 8 + 8 unlabeled (EMA), {args.epochs} epochs x {args.steps} steps; "
        f"{2 * args.rounds} passes each, ABBA order"
    )
    print(
        "                              passes (wall s)     s/trial   CPU s/trial   "
        "training-loop s/trial"
    )
    names = {
        "bare": "4 x run_training, sequential",
        "tune": "Tune, 1 trial at a time",
        "both": "Tune, concurrent trials",
    }
    mean: dict[str, float] = {}
    for mode, results in passes.items():
        if not results:
            continue
        walls = [wall for wall, _ in results]
        loops = [loop for _, trial_loops in results for loop in trial_loops]
        mean[mode] = sum(walls) / len(walls)
        mean[f"{mode}_cpu"] = sum(cpu[mode]) / len(cpu[mode])
        shown = " ".join(f"{w:.0f}" for w in walls)
        print(
            f"{names[mode]:<29} {shown:<18} {mean[mode] / 4:8.1f} "
            f"{mean[f'{mode}_cpu'] / 4:12.1f} {sum(loops) / len(loops):15.1f}"
        )
    print(
        f"per-trial ratio Tune/bare: {mean['tune'] / mean['bare']:.3f} wall "
        f"({(mean['tune'] - mean['bare']) / 4:+.1f} s per trial), "
        f"{mean['tune_cpu'] / mean['bare_cpu']:.3f} CPU "
        f"({(mean['tune_cpu'] - mean['bare_cpu']) / 4:+.1f} CPU s per trial)"
    )
    if "both" in mean:
        print(f"concurrent sweep / sequential bare: {mean['both'] / mean['bare']:.3f}")


if __name__ == "__main__":
    main()
