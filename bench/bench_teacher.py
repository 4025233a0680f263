"""Benchmark: the SAM teacher pipeline (Ray Data read -> actor pool -> write back) against a bare
loop that calls the same teacher on tiles already in memory.

Both sides run the same teacher (``MaskTeacher``: tiny SAM, automatic mode, the same points per
side, batch size and total torch threads). The pipeline side is ``run_pseudo_label`` on a fresh copy
of a synthetic store of 256×256×3 tiles: it reads tiles with Ray Data, labels them in the actor
pool and writes ``pseudo_label``/``confidence`` and the manifest back into the store.

Reported per configuration:

- end to end: tiles / wall time of the whole call, actor start-up (process, imports, model)
  included;
- steady state: the difference of two runs, every tile and a quarter of them, so that the
  fixed costs of a run (actor start-up, planning, compaction) cancel. The ratio is taken on
  this number (the bare loop's model is built before its clock starts too), against one bare
  loop per actor with the actor's torch threads, scaled perfectly: A actors × T threads are
  compared with A × (bare loop at T threads).

Two torch threads in one process were measured slower than one on these 2-core machines
whenever anything else ran (OpenMP threads waiting on a descheduled sibling), so the default
configurations use one thread per actor. Run on an otherwise idle machine.

Run from the repository root::

    python bench/bench_teacher.py --tiles 64 --points-per-side 8 --batch-size 8 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the synthetic store builder shared with the tests

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import ray  # noqa: E402
from store_factory import SourceSpec, build_store  # noqa: E402

from semisup import columns as C  # noqa: E402
from semisup import store as tile_store  # noqa: E402
from semisup.actor_pool import ActorPoolConfig  # noqa: E402
from semisup.masks import MaskFilter  # noqa: E402
from semisup.pseudo_label import run_pseudo_label  # noqa: E402
from semisup.teacher import TeacherConfig, build_teacher  # noqa: E402

TILE = 256
TILES_PER_SOURCE_SIDE = 4  # sources of 4×4 tiles (1024 px)
# Random tiny weights fail SAM's quality rules; keep every mask so painting costs what it would.
LENIENT = MaskFilter(min_predicted_iou=-1e9, min_stability=0.0)


def build_benchmark_store(path: Path, num_tiles: int) -> None:
    """Smooth synthetic sources of up to 4×4 tiles of 256 px, ``num_tiles`` tiles in all."""
    per_source = TILES_PER_SOURCE_SIDE**2
    sources, left = [], num_tiles
    while left > 0:
        rows = min(TILES_PER_SOURCE_SIDE, -(-min(left, per_source) // TILES_PER_SOURCE_SIDE))
        cols = min(left, per_source) // rows if left < per_source else TILES_PER_SOURCE_SIDE
        sources.append(
            SourceSpec(f"s{len(sources):03d}", rows * TILE, cols * TILE, texture="smooth")
        )
        left -= rows * cols
    build_store(str(path), sources, tile_size=TILE, keep_arrays=False)


def teacher_config(points_per_side: int) -> TeacherConfig:
    return TeacherConfig(
        mode="automatic", model_type="tiny", points_per_side=points_per_side, mask_filter=LENIENT
    )


def in_memory_batches(store: str, batch_size: int) -> list[dict[str, np.ndarray]]:
    """Every tile of the store as read_tiles-like batches, read before any clock starts."""
    root: Any = tile_store.open_store(store)
    index = tile_store.read_tile_index(store).to_pydict()
    rows = list(zip(index[C.TILE_ID], index[C.SOURCE], index[C.Y0], index[C.X0], strict=True))
    batches = []
    for start in range(0, len(rows), batch_size):
        part = rows[start : start + batch_size]
        tiles = [tile_store.read_tile(root[source], y0, x0, TILE) for _, source, y0, x0 in part]
        batches.append(
            {
                C.IMAGE: np.stack([t[C.IMAGE] for t in tiles]),
                C.VALID: np.stack([t[C.VALID] for t in tiles]),
                C.TILE_ID: np.array([r[0] for r in part], np.int64),
                C.SOURCE: np.array([r[1] for r in part], dtype=object),
                C.Y0: np.array([r[2] for r in part], np.int64),
                C.X0: np.array([r[3] for r in part], np.int64),
            }
        )
    return batches


@dataclass
class Rate:
    """Tiles over wall-clock seconds."""

    tiles: int
    wall_s: float

    @property
    def per_s(self) -> float:
        return self.tiles / self.wall_s


def bare_loop(store: str, *, batch_size: int, threads: int, points_per_side: int) -> Rate:
    """The teacher called in this process on in-memory batches (model built, one warm-up)."""
    torch.set_num_threads(threads)
    config = teacher_config(points_per_side)
    teacher = build_teacher(store, config, device="cpu", torch_threads=threads)
    batches = in_memory_batches(store, batch_size)
    teacher(batches[0])  # warm-up: first-call allocations, lazy inits
    start = time.perf_counter()
    tiles = sum(len(teacher(batch)[C.TILE_ID]) for batch in batches)
    return Rate(tiles, time.perf_counter() - start)


def pipeline_run(
    store: Path,
    workdir: Path,
    *,
    actors: int,
    threads: int,
    batch_size: int,
    points_per_side: int,
    max_tiles: int | None = None,
) -> Rate:
    """One ``run_pseudo_label`` on a fresh copy of ``store``: tiles and wall seconds."""
    copy = workdir / "run.zarr"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(store, copy)
    start = time.perf_counter()
    summary = run_pseudo_label(
        str(copy),
        teacher_config(points_per_side),
        pool=ActorPoolConfig(actors=actors, torch_threads=threads),
        split=None,
        batch_size=batch_size,
        max_tiles=max_tiles,
        log=None,
    )
    return Rate(summary["tiles_processed"], time.perf_counter() - start)


def pipeline(store: Path, workdir: Path, *, tiles: int, **kwargs: Any) -> tuple[Rate, Rate]:
    """(end to end, steady state) of the pipeline.

    Steady state is the difference of two runs, every tile and a quarter of them: the fixed
    costs of a run (actor start-up, planning, manifest compaction) cancel out.
    """
    few = pipeline_run(store, workdir, max_tiles=max(tiles // 4, 1), **kwargs)
    every = pipeline_run(store, workdir, **kwargs)
    steady = Rate(every.tiles - few.tiles, every.wall_s - few.wall_s)
    return every, steady


def measure_round(
    store: Path, workdir: Path, configs: list[tuple[int, int]], args: argparse.Namespace
) -> dict[tuple[int, int], tuple[float, float, Rate]]:
    """Per configuration: (steady tiles/s, reference tiles/s, end-to-end rate) of one round.

    The bare loops run first in the round, so both sides see similar machine load.
    """
    options = {"batch_size": args.batch_size, "points_per_side": args.points_per_side}
    bare = {
        threads: bare_loop(str(store), threads=threads, **options)
        for threads in sorted({threads for _, threads in configs})
    }
    results = {}
    for actors, threads in configs:
        end_to_end, steady = pipeline(
            store, workdir, tiles=args.tiles, actors=actors, threads=threads, **options
        )
        # the reference: one bare loop per actor with the actor's threads, scaling perfectly
        results[(actors, threads)] = (steady.per_s, actors * bare[threads].per_s, end_to_end)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", type=int, default=64, help="tiles in the store (default 64)")
    parser.add_argument("--batch-size", type=int, default=8, help="tiles per teacher call")
    parser.add_argument(
        "--points-per-side", type=int, default=8, help="automatic point grid (default 8)"
    )
    parser.add_argument(
        "--configs",
        default="1x1,2x1",
        help="pipeline configurations ACTORSxTHREADS, comma-separated (default 1x1,2x1)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds; medians are reported")
    args = parser.parse_args()
    cpus = os.cpu_count() or 1
    configs = [(int(a), int(t)) for a, t in (c.split("x") for c in args.configs.split(","))]
    print(
        f"load average {os.getloadavg()[0]:.1f}; {platform.machine()}, {cpus} CPUs, torch "
        f"{torch.__version__}, ray {ray.__version__}; {args.tiles} tiles of {TILE} px, tiny "
        f"SAM automatic, {args.points_per_side}² points, batch {args.batch_size}"
    )
    rounds = []
    with tempfile.TemporaryDirectory(prefix="bench_teacher_") as tmp:
        workdir = Path(tmp)
        store = workdir / "bench.zarr"
        build_benchmark_store(store, args.tiles)
        # one local Ray for every pipeline run, sized to the machine
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            for index in range(args.rounds):
                rounds.append(measure_round(store, workdir, configs, args))
                for (actors, threads), (steady, reference, whole) in rounds[-1].items():
                    print(
                        f"round {index + 1}, {actors} actor(s) × {threads} thread(s): pipeline "
                        f"steady {steady:.2f} tiles/s, bare loop reference {reference:.2f} "
                        f"tiles/s, ratio {steady / reference:.2f}; end to end "
                        f"{whole.per_s:.2f} tiles/s ({whole.tiles} tiles in {whole.wall_s:.1f} "
                        "s, actor start-up included)"
                    )
        finally:
            ray.shutdown()
    for config in configs:
        steady = float(np.median([r[config][0] for r in rounds]))
        reference = float(np.median([r[config][1] for r in rounds]))
        ratio = float(np.median([r[config][0] / r[config][1] for r in rounds]))
        print(
            f"median, {config[0]} actor(s) × {config[1]} thread(s): pipeline {steady:.2f} "
            f"tiles/s, bare loop {reference:.2f} tiles/s, ratio {ratio:.2f}"
        )
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
