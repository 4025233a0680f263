"""Benchmark: ``semisup predict`` (``run_predict``) against a bare loop of the same model over
the same windows, and its peak memory at two raster sizes.

Both sides predict a synthetic RGB GeoTIFF (smooth structure plus noise, a nodata corner) with
the same built-in random-init student, window size, overlap, batch size and torch threads:

- ``run_predict``: Ray actor pool (reads its windows with rasterio, predicts), the driver blends
  and writes the COG; whole call timed, Ray already up;
- bare loop: in this process, the same windows read with ``raster_windows.read_strip`` and put
  through the same model (``window_predictor.load_model``) and softmax; no blending, no writing.

Reported per raster size: pixels/s of both (raster pixels / seconds) and their ratio; then the
steady state, from the difference of the two sizes, so that the fixed costs of a call (actor
start-up, model load, COG conversion) cancel; and the peak memory (PSS) of this process plus
every Ray process, and its rise above the level before the call. CPU seconds are counted too
of this process and every Ray process (``CpuSampler``; the bare loop's Ray is idle then), because
on a shared machine wall time follows the other users' load more than our code.

Run from the repository root on an otherwise idle machine::

    python bench/bench_predict.py --sizes 1024 2048 --model tiny --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the synthetic raster writer shared with the tests
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import ray  # noqa: E402
from store_factory import write_large_geotiff  # noqa: E402

from semisup import blend  # noqa: E402
from semisup.actor_pool import ActorPoolConfig  # noqa: E402
from semisup.map_writer import MapWriter  # noqa: E402
from semisup.memory import process_tree, wait_for_exit  # noqa: E402
from semisup.predict import PredictConfig, run_predict  # noqa: E402
from semisup.raster_windows import open_sources  # noqa: E402
from semisup.stitch import plan_jobs  # noqa: E402
from semisup.window_predictor import load_model, read_job_windows, resolve_model  # noqa: E402


class CpuSampler:
    """CPU seconds (user + system) spent by this process and its descendants while inside;
    sampled every 0.1 s per process, so that the actor, which exits at the end of a run,
    counts up to its last sample (under 0.1 s of its CPU may be missed)."""

    def __init__(self) -> None:
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self._started = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for process in process_tree():
            with suppress(psutil.Error):
                times = process.cpu_times()
                seconds = times.user + times.system
                if process.pid not in self.last and self._started:
                    self.first[process.pid] = 0.0  # born during the run: all its CPU counts
                self.last[process.pid] = seconds

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self._sample()

    def __enter__(self) -> CpuSampler:
        self._sample()  # processes alive before: count from here
        self._started = True
        self.first = {pid: seconds for pid, seconds in self.last.items()}
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def seconds(self) -> float:
        return sum(self.last[pid] - self.first.get(pid, 0.0) for pid in self.last)


def bare_loop(
    raster: Path, model_name: str, args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    """Read and predict every window ``run_predict`` would, in this process; seconds, windows."""
    source = open_sources([raster])[0]
    model = resolve_model(model_name, workdir=work, num_classes=args.classes, tile_size=args.tile)
    net = load_model(model)
    tile, overlap = model.image_size, args.overlap
    writer = MapWriter(
        work / "unused.tif",
        height=source.height,
        width=source.width,
        crs=None,
        transform=None,
        stripes=blend.stripe_bounds(source.width, args.stripe),
        identity={},
    )
    jobs = plan_jobs([(source, writer)], tile, overlap)
    torch.set_num_threads(args.threads)
    windows, opened, start = 0, {}, time.perf_counter()
    with CpuSampler() as sampler, torch.inference_mode():
        for job in jobs:
            batch = {key: np.array([getattr(job, key)]) for key in ("y0", "first_col", "last_col")}
            batch |= {"seq": np.array([job.seq]), "output": np.array([0])}
            read = read_job_windows(
                batch, sources=[source], tile=tile, overlap=overlap, opened=opened
            )
            images = read["image"]
            for i in range(0, len(images), args.batch_size):
                pixels = torch.from_numpy(images[i : i + args.batch_size])
                net(pixels).float().softmax(1).numpy().astype(np.float16)
            windows += len(images)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "cpu_s": sampler.seconds, "windows": windows}


def pipeline(raster: Path, out: Path, model_name: str, args: argparse.Namespace) -> dict[str, Any]:
    """``run_predict`` on ``raster``: its summary plus ``cpu_s`` of every process involved."""
    wait_for_exit("MapWorker")  # the actor of the previous run, which Ray ends lazily
    with CpuSampler() as sampler:
        summary = run_predict(
            [raster],
            model_name,
            out,
            PredictConfig(
                tile_size=args.tile,
                overlap=args.overlap,
                batch_size=args.batch_size,
                num_classes=args.classes,
                stripe_width=args.stripe,
                pool=ActorPoolConfig(actors=args.actors, torch_threads=args.threads),
            ),
            measure_memory=True,
            log=None,
        )
    return {**summary, "cpu_s": sampler.seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=(1024, 2048), help="raster sides, px")
    parser.add_argument("--model", default="tiny", help="built-in model (default tiny)")
    parser.add_argument("--tile", type=int, default=256, help="window side, px")
    parser.add_argument("--overlap", type=int, default=64, help="window overlap, px")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per model call")
    parser.add_argument("--classes", type=int, default=4, help="classes of the student")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (bare and actor)")
    parser.add_argument("--actors", type=int, default=1, help="predictor actors")
    parser.add_argument("--stripe", type=int, default=4096, help="stripe width, px")
    parser.add_argument("--rounds", type=int, default=2, help="repetitions of the whole set")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    ray.init(
        num_cpus=args.cpus,
        object_store_memory=512 * 1024**2,
        include_dashboard=False,
        log_to_driver=False,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as folder:
        work = Path(folder)
        rasters = {size: write_large_geotiff(work / f"r{size}.tif", size) for size in args.sizes}
        for round_index in range(args.rounds):
            for size, raster in rasters.items():
                bare = bare_loop(raster, args.model, args, work)
                summary = pipeline(raster, work / f"m{size}-{round_index}.tif", args.model, args)
                rows.append(
                    {
                        "round": round_index + 1,
                        "size": size,
                        "pixels": size * size,
                        "bare_s": bare["seconds"],
                        "bare_cpu_s": bare["cpu_s"],
                        "bare_windows": bare["windows"],
                        "ray_s": summary["seconds"],
                        "ray_cpu_s": summary["cpu_s"],
                        "ray_windows": summary["windows"],
                        "peak_mb": summary["peak_memory_mb"],
                        "predict_peak_mb": summary["peak_predict_memory_mb"],
                        "rise_mb": summary["peak_memory_mb"] - summary["baseline_memory_mb"],
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    ray.shutdown()
    report(rows, args)


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    small, large = args.sizes
    print(
        f"\nmachine: {platform.node()}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; "
        f"load average {', '.join(f'{v:.1f}' for v in os.getloadavg())}; torch {torch.__version__}, "
        f"ray {ray.__version__}"
    )
    print(
        f"model {args.model}, {args.tile} px windows, overlap {args.overlap}, batch "
        f"{args.batch_size}, {args.threads} torch thread(s), {args.actors} actor(s)\n"
    )
    print(
        "| round | raster | bare Mpx/s | predict Mpx/s | ratio | bare CPU s | predict CPU s "
        "| peak MiB | rise MiB | driver + actor peak MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    steady = []
    for row in rows:
        bare, ray_rate = row["pixels"] / row["bare_s"] / 1e6, row["pixels"] / row["ray_s"] / 1e6
        print(
            f"| {row['round']} | {row['size']}² | {bare:.3f} | {ray_rate:.3f} | "
            f"{ray_rate / bare:.2f} | {row['bare_cpu_s']:.1f} | {row['ray_cpu_s']:.1f} | "
            f"{row['peak_mb']:.0f} | {row['rise_mb']:.0f} | {row['predict_peak_mb']:.0f} |"
        )
    for round_index in {row["round"] for row in rows}:
        pair = {row["size"]: row for row in rows if row["round"] == round_index}
        pixels = pair[large]["pixels"] - pair[small]["pixels"]
        bare = pixels / (pair[large]["bare_s"] - pair[small]["bare_s"]) / 1e6
        ray_rate = pixels / (pair[large]["ray_s"] - pair[small]["ray_s"]) / 1e6
        cpu_bare = pair[large]["bare_cpu_s"] - pair[small]["bare_cpu_s"]
        cpu_ray = pair[large]["ray_cpu_s"] - pair[small]["ray_cpu_s"]
        steady.append((bare, ray_rate, ray_rate / bare, cpu_bare / cpu_ray))
        print(
            f"\nsteady state, round {round_index}: bare {bare:.3f} Mpx/s, predict "
            f"{ray_rate:.3f} Mpx/s, ratio {ray_rate / bare:.2f}; CPU s per extra Mpx: bare "
            f"{cpu_bare / pixels * 1e6:.2f}, predict {cpu_ray / pixels * 1e6:.2f} "
            f"(ratio {cpu_bare / cpu_ray:.2f})"
        )
    print(
        f"median steady-state ratio: {statistics.median(s[2] for s in steady):.2f} (wall), "
        f"{statistics.median(s[3] for s in steady):.2f} (CPU)"
    )
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "steady": steady}, indent=2))


if __name__ == "__main__":
    main()
