"""Benchmark: an exported student on onnxruntime (fp32 and int8) against PyTorch, on the CPU.

For each model type a random-init LoRA student (q/v, rank 8) is saved as a `semisup train`-
shaped run and exported with ``semisup.export.export_run`` (fp32, then ``--quantize int8``).
Each row gives the file sizes and the latency of one tile (batch 1) for three ways of running
it: the PyTorch student as ``semisup predict`` loads it (``student.load_student``, adapter
unmerged), onnxruntime fp32 and onnxruntime int8. Calls alternate between the three after one
warm-up call each, so load from other processes falls on all alike; medians of one run.

Beside the wall time each column gives the process CPU seconds (``time.process_time``, all
threads) and the row the 1-minute load average before and after: CPU seconds near threads ×
wall mean the threads ran; much less means they waited for a core.

Run from the repository root::

    python bench/bench_export.py --model-types tiny vit_b --size 256 --iterations 10
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from semisup.config import ExperimentConfig, TrainConfig, save_config
from semisup.export import export_run
from semisup.onnx_student import OnnxStudent
from semisup.student import build_student, load_student, save_adapter

RUNNERS = ("torch", "onnx fp32", "onnx int8")


def make_run(folder: Path, model_type: str, size: int, num_classes: int) -> Path:
    """A run folder holding a random-init LoRA student's adapter (base drawn by seed 0)."""
    (folder / "best").mkdir(parents=True)
    save_config(ExperimentConfig(train=TrainConfig(seed=0)), folder / "config.yaml")
    torch.manual_seed(0)
    model = build_student(model_type, num_classes, size, mode="lora", lora_targets="qv")
    with torch.no_grad():  # a non-zero LoRA update, so that merging has something to fold
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.01)
    save_adapter(model, folder / "best" / "adapter.safetensors")
    return folder


def time_runners(
    runners: dict[str, Callable[[np.ndarray], object]], size: int, iterations: int
) -> dict[str, tuple[float, float]]:
    """Median (wall s, CPU s) of one batch-1 call per runner, calls interleaved."""
    tile = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    walls: dict[str, list[float]] = {name: [] for name in runners}
    cpus: dict[str, list[float]] = {name: [] for name in runners}
    for iteration in range(iterations + 1):
        for name, run in runners.items():
            wall, cpu = time.perf_counter(), time.process_time()
            run(tile)
            if iteration > 0:  # iteration 0 warms up allocators and kernels
                walls[name].append(time.perf_counter() - wall)
                cpus[name].append(time.process_time() - cpu)
    return {
        name: (statistics.median(walls[name]), statistics.median(cpus[name])) for name in runners
    }


def bench_model(model_type: str, size: int, threads: int, iterations: int) -> str:
    """One table row for ``model_type`` at ``size`` px."""
    with tempfile.TemporaryDirectory() as work:
        run = make_run(Path(work) / "run", model_type, size, num_classes=5)
        fp32, int8 = Path(work) / "fp32.onnx", Path(work) / "int8.onnx"
        export_run(run, fp32)
        export_run(run, int8, quantize="int8")
        student = load_student(run / "best" / "adapter.safetensors", seed=0)

        def torch_probabilities(tile: np.ndarray) -> object:
            with torch.inference_mode():
                return student(torch.from_numpy(tile)).softmax(1).numpy()

        runners = {
            "torch": torch_probabilities,
            "onnx fp32": OnnxStudent(fp32, threads=threads),
            "onnx int8": OnnxStudent(int8, threads=threads),
        }
        load_before = os.getloadavg()[0]
        timings = time_runners(runners, size, iterations)
        load_after = os.getloadavg()[0]
        sizes = [fp32.stat().st_size / 2**20, int8.stat().st_size / 2**20]
    cells = " | ".join(f"{timings[n][0]:.3f} ({timings[n][1]:.3f})" for n in RUNNERS)
    torch_wall = timings["torch"][0]
    return (
        f"| {model_type} | {size} | {sizes[0]:.1f} | {sizes[1]:.1f} | {cells} "
        f"| {torch_wall / timings['onnx fp32'][0]:.2f}× "
        f"| {torch_wall / timings['onnx int8'][0]:.2f}× "
        f"| {load_before:.1f} → {load_after:.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-types", nargs="+", default=["tiny", "vit_b"], help="SAM specs")
    parser.add_argument("--size", type=int, default=256, help="tile px")
    parser.add_argument("--iterations", type=int, default=10, help="timed calls per runner")
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{args.threads} threads, batch 1, median of {args.iterations} interleaved calls"
    )
    print(
        "| model | px | fp32 MiB | int8 MiB | torch s (CPU s) | onnx fp32 s (CPU s) "
        "| onnx int8 s (CPU s) | torch / fp32 | torch / int8 | load before → after |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model_type in args.model_types:
        print(bench_model(model_type, args.size, args.threads, args.iterations), flush=True)


if __name__ == "__main__":
    main()
