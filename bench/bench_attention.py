"""Benchmark: SAM's image encoder with SDPA attention against segment-anything's reference path.

One model per (model type, tile size) with random weights and random position tables; the two
paths are the same module switched with ``semisup.sam_attention.set_attention``, so they share
every weight. Iterations alternate between the paths (reference, sdpa, reference, ...) after one
warm-up forward each, so that load from other processes falls on both alike; the ratio is
taken on the medians of one run.

Beside the wall time each row gives the process CPU seconds (``time.process_time``, all threads)
and the 1-minute load average before and after: CPU seconds near threads × wall mean the
threads ran; much less means they waited for a core.

Run from the repository root::

    python bench/bench_attention.py --model-types tiny vit_b --sizes 256 512 --iterations 3
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from dataclasses import dataclass

import torch

from semisup.sam import build_sam
from semisup.sam_attention import AttentionImplementation, set_attention

PATHS: tuple[AttentionImplementation, AttentionImplementation] = ("reference", "sdpa")


@dataclass(frozen=True)
class Timing:
    wall_s: float  # median seconds per forward
    cpu_s: float  # median process CPU seconds per forward


def time_paths(
    model_type: str, image_size: int, *, batch_size: int, iterations: int
) -> dict[str, Timing]:
    """Median wall and CPU seconds of one encoder forward per path, interleaved."""
    torch.manual_seed(0)
    sam = build_sam(model_type, image_size=image_size)
    with torch.no_grad():
        for name, parameter in sam.image_encoder.named_parameters():
            if name.endswith(("rel_pos_h", "rel_pos_w")):  # zero-initialised otherwise
                parameter.normal_(0, 0.5)
    images = torch.randn(batch_size, 3, image_size, image_size)
    walls: dict[str, list[float]] = {path: [] for path in PATHS}
    cpus: dict[str, list[float]] = {path: [] for path in PATHS}
    with torch.inference_mode():
        for iteration in range(iterations + 1):
            for path in PATHS:
                set_attention(sam, path)
                wall, cpu = time.perf_counter(), time.process_time()
                sam.image_encoder(images)
                if iteration > 0:  # iteration 0 warms up allocator and kernels
                    walls[path].append(time.perf_counter() - wall)
                    cpus[path].append(time.process_time() - cpu)
    return {
        path: Timing(statistics.median(walls[path]), statistics.median(cpus[path]))
        for path in PATHS
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-types", nargs="+", default=["tiny", "vit_b"], help="SAM specs")
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 512], help="tile px")
    parser.add_argument("--iterations", type=int, default=3, help="timed forwards per path")
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, {args.threads} torch threads, batch {args.batch_size}, "
        f"median of {args.iterations} interleaved forwards per path"
    )
    print(
        "| model | px | reference s (CPU s) | sdpa s (CPU s) | reference / sdpa "
        "| load before → after |"
    )
    print("|---|---|---|---|---|---|")
    for model_type in args.model_types:
        for size in args.sizes:
            load_before = os.getloadavg()[0]
            timings = time_paths(
                model_type, size, batch_size=args.batch_size, iterations=args.iterations
            )
            load_after = os.getloadavg()[0]
            reference, sdpa = timings["reference"], timings["sdpa"]
            print(
                f"| {model_type} | {size} | {reference.wall_s:.3f} ({reference.cpu_s:.3f}) "
                f"| {sdpa.wall_s:.3f} ({sdpa.cpu_s:.3f}) "
                f"| {reference.wall_s / sdpa.wall_s:.2f}× "
                f"| {load_before:.1f} → {load_after:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
