"""Benchmark: Ray Data streaming from a Zarr tile store against a bare single-process zarr loop.

Builds synthetic stores of 256×256×3 uint8 tiles (smooth texture that compresses with zstd
about like real aerial imagery, ~1.1×; segment-like labels), then

1. throughput: ``read_tiles(...).iter_batches(...)`` consumed in the driver, against a loop that
   reads each tile's image, label and valid window with zarr in this process. Both are warm:
   each runs once untimed first (Ray's workers up, page cache hot), then the timed passes
   alternate, and the medians are compared. CPU time per tile (this process and all its
   descendants: driver, raylet, GCS, workers) is printed too: on a shared machine it varies
   much less than wall time;
2. memory: under a deliberately small object store, peak RSS (and PSS, which counts shared
   object-store pages once) of the driver plus Ray workers, sampled with psutil in a
   background thread, and peak object store usage, for a store of ``--tiles`` and one of
   ``--large-tiles`` (several times the object store).

Run from the repository root::

    python bench/bench_stream.py --tiles 1024 --large-tiles 2496
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the synthetic store builder shared with the tests

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import ray  # noqa: E402
from store_factory import SourceSpec, build_store  # noqa: E402

from semisup import _zarr_datasource as zarr_datasource  # noqa: E402
from semisup import columns as C  # noqa: E402
from semisup import store as tile_store  # noqa: E402
from semisup.data import read_tiles  # noqa: E402

TILE = 256
TILES_PER_SOURCE_ROW = 8  # sources are 8 tiles (2048 px) wide
MiB = 1024**2
TILE_BYTES = TILE * TILE * 5  # decoded: image 3 B + label 1 B + valid 1 B per pixel


def build_benchmark_store(path: Path, num_tiles: int, seed: int = 0) -> None:
    """A store of ``num_tiles`` 256×256×3 uint8 tiles in sources of up to 8×8 tiles."""
    full_rows, leftover = divmod(num_tiles, TILES_PER_SOURCE_ROW)
    shapes = [
        (min(TILES_PER_SOURCE_ROW, full_rows - row), TILES_PER_SOURCE_ROW)
        for row in range(0, full_rows, TILES_PER_SOURCE_ROW)
    ]
    if leftover:
        shapes.append((1, leftover))
    sources = [
        SourceSpec(f"s{i:04d}", rows * TILE, cols * TILE, texture="smooth")
        for i, (rows, cols) in enumerate(shapes)
    ]
    build_store(str(path), sources, tile_size=TILE, seed=seed, keep_arrays=False)


# ---------------------------------------------------------------------------------------------
# Throughput


def ray_pass(store: str, batch_size: int, **read_kwargs: Any) -> int:
    """Stream every tile through iter_batches in the driver; returns the number of tiles."""
    count = 0
    ds = read_tiles(store, **read_kwargs)
    # pulls numpy batches into the driver while read tasks run ahead (streaming execution)
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        count += len(batch[C.TILE_ID])
    return count


def bare_pass(store: str) -> int:
    """Read every tile's image, label and valid with zarr in this process; no Ray."""
    root = tile_store.open_store(store)
    index = tile_store.read_tile_index(store).to_pydict()
    arrays: dict[str, tuple[Any, ...]] = {}
    count = 0
    for source, y0, x0 in zip(index[C.SOURCE], index[C.Y0], index[C.X0], strict=True):
        if source not in arrays:
            group: Any = root[source]
            arrays[source] = (group[C.IMAGE], group[C.LABEL], group[C.VALID])
        window = (slice(y0, y0 + TILE), slice(x0, x0 + TILE))
        image, _, _ = (array[window] for array in arrays[source])
        count += image.shape[0] == TILE
    return count


def cpu_seconds(with_children: bool) -> dict[int, float]:
    """CPU seconds of this process and, optionally, its descendants (raylet, GCS, workers)."""
    processes = [psutil.Process()]
    if with_children:
        processes += psutil.Process().children(recursive=True)
    seconds = {}
    for process in processes:
        with suppress(psutil.Error):
            times = process.cpu_times()
            seconds[process.pid] = times.user + times.system
    return seconds


@dataclass
class Pass:
    tiles: int
    wall_s: float
    cpu_s: float

    @property
    def rate(self) -> float:
        return self.tiles / self.wall_s

    @property
    def cpu_ms_per_tile(self) -> float:
        return 1e3 * self.cpu_s / self.tiles


def timed(fn: Callable[[], int], with_children: bool = True) -> Pass:
    """Run ``fn``; CPU time of processes that exit meanwhile (idle Ray workers) is not counted."""
    wall, before = time.perf_counter(), cpu_seconds(with_children)
    tiles = fn()
    wall, after = time.perf_counter() - wall, cpu_seconds(with_children)
    cpu = sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())
    return Pass(tiles, wall, cpu)


# ---------------------------------------------------------------------------------------------
# Memory


@dataclass
class Peaks:
    rss_bytes: int = 0  # driver + Ray worker processes, summed at each sample
    pss_bytes: int = 0  # the same as proportional set size: shared pages counted once
    driver_rss_bytes: int = 0
    processes: int = 0  # driver + workers alive at the largest RSS sample
    object_store_bytes: int = 0
    spilled_bytes: int = 0


def driver_and_workers() -> list[psutil.Process]:
    """This process and its descendants that are Ray workers (titled ``ray::...``)."""
    processes = [psutil.Process()]
    for child in processes[0].children(recursive=True):
        with suppress(psutil.Error):
            if child.cmdline()[:1] and child.cmdline()[0].startswith("ray::"):
                processes.append(child)
    return processes


def object_store_stats() -> tuple[int, int]:
    """(bytes used, bytes spilled so far) of the object store, from the raylet (private API)."""
    from ray._private import internal_api

    address = ray.get_runtime_context().gcs_address
    reply = internal_api.get_memory_info_reply(internal_api.get_state_from_address(address))
    return reply.store_stats.object_store_bytes_used, reply.store_stats.spilled_bytes_total


@contextmanager
def sample_peaks(interval_s: float = 0.1) -> Iterator[Peaks]:
    """Sample memory in a background thread while the block runs; yields the running peaks."""
    peaks, stop = Peaks(), threading.Event()

    def sample() -> None:
        while not stop.is_set():
            processes = driver_and_workers()  # workers come and go
            rss = pss = 0
            for process in processes:
                with suppress(psutil.Error):
                    memory = process.memory_full_info()
                    rss, pss = rss + memory.rss, pss + memory.pss
            used, spilled = object_store_stats()
            if rss > peaks.rss_bytes:
                peaks.rss_bytes, peaks.processes = rss, len(processes)
            with suppress(psutil.Error):
                driver_rss = processes[0].memory_info().rss
                peaks.driver_rss_bytes = max(peaks.driver_rss_bytes, driver_rss)
            peaks.pss_bytes = max(peaks.pss_bytes, pss)
            peaks.object_store_bytes = max(peaks.object_store_bytes, used)
            peaks.spilled_bytes = max(peaks.spilled_bytes, spilled)
            stop.wait(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peaks
    finally:
        stop.set()
        thread.join()


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Ray Data streaming from Zarr against a bare zarr loop (see module docstring)."
    )
    parser.add_argument("--tiles", type=int, default=1024, help="tiles in the throughput store")
    parser.add_argument(
        "--large-tiles",
        type=int,
        default=2496,
        help="tiles in the large memory store (2496 = 780 MiB decoded); 0 skips the memory part",
    )
    parser.add_argument("--tiles-per-task", type=int, default=64, help="read_tiles tiles_per_task")
    parser.add_argument("--read-cpus", type=float, default=0.5, help="read_tiles read_cpus")
    parser.add_argument(
        "--block-mib", type=float, default=None, help="override the datasource's block size"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="iter_batches batch_size")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes of each reader")
    parser.add_argument(
        "--object-store-mib",
        type=int,
        default=512,
        help="object store for the throughput part (512: RayConfig's default)",
    )
    parser.add_argument(
        "--memory-object-store-mib",
        type=int,
        default=128,
        help="deliberately small object store for the memory part",
    )
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs given to Ray")
    parser.add_argument("--workdir", default=None, help="where stores are built (default: /tmp)")
    return parser.parse_args(argv)


def start_ray(num_cpus: int, object_store_mib: int) -> None:
    # starts a local Ray with an object store of the given size
    ray.init(
        num_cpus=num_cpus,
        object_store_memory=object_store_mib * MiB,
        include_dashboard=False,
        log_to_driver=False,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False


def measure_throughput(args: argparse.Namespace, store: str) -> None:
    """Interleaved warm passes of both readers; prints each pass and the medians."""
    read_kwargs = {"tiles_per_task": args.tiles_per_task, "read_cpus": args.read_cpus}
    start_ray(args.num_cpus, args.object_store_mib)
    cold = timed(lambda: ray_pass(store, args.batch_size, **read_kwargs))
    bare_pass(store)  # warm-up for the bare loop too
    print(f"ray first pass (workers starting): {cold.rate:.0f} tiles/s")
    bare_runs, ray_runs = [], []
    for repeat in range(args.repeats):
        bare_runs.append(timed(lambda: bare_pass(store), with_children=False))
        ray_runs.append(timed(lambda: ray_pass(store, args.batch_size, **read_kwargs)))
        assert bare_runs[-1].tiles == ray_runs[-1].tiles == args.tiles
        print(
            f"pass {repeat + 1}: ray {ray_runs[-1].rate:.0f} tiles/s "
            f"({ray_runs[-1].cpu_ms_per_tile:.2f} CPU ms/tile), bare zarr "
            f"{bare_runs[-1].rate:.0f} tiles/s ({bare_runs[-1].cpu_ms_per_tile:.2f} CPU "
            f"ms/tile), ratio {ray_runs[-1].rate / bare_runs[-1].rate:.2f}; load {load()}"
        )
    ray_rate = statistics.median(run.rate for run in ray_runs)
    bare_rate = statistics.median(run.rate for run in bare_runs)
    print(
        f"median: ray {ray_rate:.0f} tiles/s, bare zarr {bare_rate:.0f} tiles/s, "
        f"ratio ray/bare {ray_rate / bare_rate:.2f}; CPU ms/tile ray "
        f"{statistics.median(r.cpu_ms_per_tile for r in ray_runs):.2f}, bare "
        f"{statistics.median(r.cpu_ms_per_tile for r in bare_runs):.2f}"
    )
    ray.shutdown()


def measure_memory(args: argparse.Namespace, stores: list[tuple[int, str]]) -> None:
    """One streaming pass per store under a small object store; prints the peaks."""
    read_kwargs = {"tiles_per_task": args.tiles_per_task, "read_cpus": args.read_cpus}
    start_ray(args.num_cpus, args.memory_object_store_mib)
    ray_pass(stores[0][1], args.batch_size, **read_kwargs)  # workers up before sampling
    for num_tiles, path in stores:
        with sample_peaks() as peaks:
            run = timed(partial(ray_pass, path, args.batch_size, **read_kwargs))
        decoded_mib = num_tiles * TILE_BYTES / MiB
        print(
            f"memory, {num_tiles} tiles ({decoded_mib:.0f} MiB decoded, "
            f"{decoded_mib / args.memory_object_store_mib:.1f}x the "
            f"{args.memory_object_store_mib} MiB object store): {run.rate:.0f} tiles/s, "
            f"peak RSS of driver + {peaks.processes - 1} workers {peaks.rss_bytes / MiB:.0f} MiB "
            f"(PSS {peaks.pss_bytes / MiB:.0f} MiB; driver alone {peaks.driver_rss_bytes / MiB:.0f}"
            f" MiB), peak object store "
            f"{peaks.object_store_bytes / MiB:.0f} MiB, spilled {peaks.spilled_bytes / MiB:.0f} MiB"
        )
    ray.shutdown()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.block_mib is not None:  # tuning only: the block size is not part of the public API
        zarr_datasource.TARGET_BLOCK_BYTES = int(args.block_mib * MiB)
    print(f"machine: {os.cpu_count()} CPUs, {cpu_model()}; load average {load()}")
    print(f"settings: {vars(args)}")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        small = str(Path(tmp) / "small.zarr")
        start = time.perf_counter()
        build_benchmark_store(Path(small), args.tiles)
        print(f"built {args.tiles} tiles in {time.perf_counter() - start:.1f} s")
        measure_throughput(args, small)
        if args.large_tiles:
            large = str(Path(tmp) / "large.zarr")
            build_benchmark_store(Path(large), args.large_tiles, seed=1)
            measure_memory(args, [(args.tiles, small), (args.large_tiles, large)])


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
