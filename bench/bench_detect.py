"""Benchmark: the detection student's training step and windowed prediction through our code
against bare torchvision loops on the same tiles, windows and model.

Data: generated scenes (``semisup.synthetic``, buildings as boxes) ingested as a tile store;
their GeoTIFFs are the rasters predicted. The model: a random-init Faster R-CNN
(``--arch``, default the MobileNetV3 FPN), all layers trained.

- training, ours: ``detection.train_task.box_batch`` (our batch preparation: band scaling, the
  store's boxes of each tile) then ``detection.steps.detection_step`` (the weak box view,
  torchvision's four losses, backward, AdamW step), from the tiles as ``TileReader`` hands them;
- training, bare: ``loss = sum(model(images, targets).values()); loss.backward(); opt.step()``
  on the same batches, already converted to tensors;
- prediction, ours: ``detection.predict.BoxPredictor`` called on the jobs of the rasters (reads
  its windows from the GeoTIFFs, detects, shifts the boxes to raster pixels);
- prediction, bare: ``model.eval()(images)`` under ``torch.inference_mode`` on the same windows,
  read beforehand, in batches of the same size.

Both sides start from the same weights; they alternate in rounds (ours, bare, ours, ...) so a
change in the machine's load falls on both, and the first round of each (warm-up) is left out.
Reported: median seconds per step and images/s of each, their ratios, wall and CPU seconds
(this process, all threads) and the 1-minute load average before and after.

Run from the repository root::

    nice -n 0 python bench/bench_detect.py --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_prep.ingest import build_store  # noqa: E402
from semisup import columns as C  # noqa: E402
from semisup.detection.model import build_detector  # noqa: E402
from semisup.detection.predict import BoxPredictor, DetectionRun, RasterBoxes  # noqa: E402
from semisup.detection.steps import DetectionRecipe, detection_step, targets  # noqa: E402
from semisup.detection.targets import BoxTargets  # noqa: E402
from semisup.detection.train_task import box_batch, detector_state  # noqa: E402
from semisup.raster_windows import open_sources  # noqa: E402
from semisup.stitch import plan_jobs  # noqa: E402
from semisup.store import band_scales, open_store, read_store_meta, read_tile_index, store_facts  # noqa: E402  # noqa: E402
from semisup.synthetic import BOXES_FILE, write_scenes  # noqa: E402
from semisup.tile_reader import TileReader  # noqa: E402
from semisup.window_predictor import read_job_windows  # noqa: E402

COLUMNS = (C.IMAGE, C.VALID, C.SOURCE, C.TILE_ID, C.Y0, C.X0)


def scene_store(folder: Path, scenes: int, size: int, tile: int) -> tuple[str, Path]:
    """Generated scenes with their building boxes as a tile store; (store, images folder)."""
    images, masks = write_scenes(folder / "scenes", count=scenes, size=size, seed=0)
    made = build_store(
        [images],
        folder / "store.zarr",
        labels=[masks],
        boxes=[folder / "scenes" / BOXES_FILE],
        config={"tile_size": tile},
        quiet=True,
    )
    return str(made.path), images


def tile_batches(store: str, batch: int, count: int) -> list[dict[str, Any]]:
    """``count`` batches of ``batch`` tiles holding boxes, as ``TileReader`` reads them."""
    root = open_store(store)
    boxes = BoxTargets(root, store)
    index = read_tile_index(store).to_pandas()
    with_boxes = [
        int(r[C.TILE_ID])
        for _, r in index.iterrows()
        if len(boxes.tile(r[C.SOURCE], int(r[C.Y0]), int(r[C.X0])).boxes)
    ]
    reader = TileReader(store, with_boxes, columns=COLUMNS)
    picked = [
        with_boxes[(i * batch + k) % len(with_boxes)] for i in range(count) for k in range(batch)
    ]
    return [reader.read(picked[i : i + batch]) for i in range(0, len(picked), batch)]


def alternate(
    sides: dict[str, Callable[[int], None]], rounds: int, steps: int
) -> dict[str, dict[str, float]]:
    """Run each side ``steps`` times per round, sides alternating, ``rounds`` rounds; the
    first round is warm-up. Per side: median seconds per call, wall and CPU seconds."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    cpu = dict.fromkeys(sides, 0.0)
    wall = dict.fromkeys(sides, 0.0)
    for r in range(rounds + 1):
        for name, call in sides.items():
            for i in range(steps):
                start, cpu_start = time.perf_counter(), time.process_time()
                call(i)
                if r:  # round 0 warms up
                    times[name].append(time.perf_counter() - start)
                    wall[name] += times[name][-1]
                    cpu[name] += time.process_time() - cpu_start
    return {
        name: {
            "median_s": statistics.median(t),
            "wall_s": wall[name],
            "cpu_s": cpu[name],
            "calls": len(t),
        }
        for name, t in times.items()
    }


def bench_training(store: str, args: argparse.Namespace) -> dict[str, Any]:
    """Our step against the bare torchvision step, same batches, same start."""
    facts = store_facts(store)
    scale = band_scales(facts)
    boxes = BoxTargets(open_store(store), store)
    batches = tile_batches(store, args.batch, args.steps)
    model = build_detector(1, arch=args.arch, finetune="full", tile_size=facts["tile_size"])
    ours_model, bare_model = copy.deepcopy(model), copy.deepcopy(model)
    ours_opt = torch.optim.AdamW(ours_model.parameters(), lr=1e-4)
    bare_opt = torch.optim.AdamW(bare_model.parameters(), lr=1e-4)
    recipe = DetectionRecipe()
    device = torch.device("cpu")
    prepared = [box_batch(b, boxes, scale, device) for b in batches]  # outside the bare timing
    bare_inputs = [(list(p.images), targets(p)) for p in prepared]

    def ours(i: int) -> None:
        batch = box_batch(batches[i], boxes, scale, device)
        detection_step(ours_model, ours_opt, batch, None, teacher=None, recipe=recipe, step=i)

    def bare(i: int) -> None:
        bare_model.train()
        images, target = bare_inputs[i]
        loss = sum(bare_model(images, target).values())
        bare_opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[union-attr]
        bare_opt.step()

    measured = alternate({"ours": ours, "bare": bare}, args.rounds, args.steps)
    for side in measured.values():
        side["images_per_s"] = args.batch / side["median_s"]
    ratio = measured["ours"]["median_s"] / measured["bare"]["median_s"]
    return {**measured, "ours_over_bare_time": ratio, "batch": args.batch}


def bench_prediction(store: str, images: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``BoxPredictor`` on the rasters' jobs against the bare model on the same windows."""
    tile = read_store_meta(open_store(store)).tile_size
    overlap = tile // 4
    model = build_detector(1, arch=args.arch, finetune="full", tile_size=tile)
    sources = open_sources([images])
    jobs = plan_jobs([(s, RasterBoxes(s)) for s in sources], tile, overlap)
    job_rows = [
        {
            "seq": np.array([j.seq]),
            "output": np.array([j.output]),
            "y0": np.array([j.y0]),
            "first_col": np.array([j.first_col]),
            "last_col": np.array([j.last_col]),
        }
        for j in jobs
    ]
    with tempfile.TemporaryDirectory() as folder:
        weights = Path(folder) / "detector.pt"
        torch.save(detector_state(model), weights)
        run = DetectionRun(str(weights), args.arch, ("building",), tile, 0.05, 0.5, 300, "bench")
        predictor = BoxPredictor(asdict(run), sources, tile, overlap, batch_size=args.batch)
        bare_model = predictor.model  # the same loaded weights, eval mode
        windows = [
            read_job_windows(row, sources=sources, tile=tile, overlap=overlap) for row in job_rows
        ]
        # BoxPredictor skips windows without a valid pixel (the nodata corner): so does bare
        valid = [w[C.VALID].reshape(len(w[C.VALID]), -1).any(1) for w in windows]
        counts = [int(v.sum()) for v in valid]

        def ours(i: int) -> None:
            predictor(job_rows[i])

        def bare(i: int) -> None:
            pixels = torch.from_numpy(windows[i][C.IMAGE][valid[i]])
            with torch.inference_mode():
                for lo in range(0, len(pixels), args.batch):
                    bare_model(list(pixels[lo : lo + args.batch]))

        measured = alternate({"ours": ours, "bare": bare}, args.rounds, len(job_rows))
    per_round = sum(counts)
    for side in measured.values():
        side["images_per_s"] = per_round * args.rounds / side["wall_s"]
    ratio = measured["ours"]["images_per_s"] / measured["bare"]["images_per_s"]
    return {
        **measured,
        "ours_over_bare_images_per_s": ratio,
        "windows": per_round,
        "jobs": len(job_rows),
        "tile": tile,
        "overlap": overlap,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arch",
        default="fasterrcnn_mobilenet_v3_large_fpn",
        choices=["fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_resnet50_fpn_v2"],
        help="detector architecture (random weights)",
    )
    parser.add_argument("--scenes", type=int, default=2, help="generated scenes")
    parser.add_argument("--scene-size", type=int, default=768, help="px per scene side")
    parser.add_argument("--tile", type=int, default=256, help="tile and window size, px")
    parser.add_argument("--batch", type=int, default=2, help="tiles per step and per forward")
    parser.add_argument("--steps", type=int, default=4, help="training steps per side per round")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds (after a warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()
    started, cpu_started = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as folder:
        store, images = scene_store(Path(folder), args.scenes, args.scene_size, args.tile)
        training = bench_training(store, args)
        prediction = bench_prediction(store, images, args)
    result = {
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}, {args.threads} threads",
        "arch": args.arch,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "wall_s": time.perf_counter() - started,
        "cpu_s": time.process_time() - cpu_started,
        "training": training,
        "prediction": prediction,
    }
    print(json.dumps(result, indent=2, default=float))
    print(
        f"training:   ours {training['ours']['median_s']:.3f} s/step, bare "
        f"{training['bare']['median_s']:.3f} s/step: ours/bare {training['ours_over_bare_time']:.3f}"
        " (target <= 1.1)"
    )
    print(
        f"prediction: ours {prediction['ours']['images_per_s']:.2f} windows/s, bare "
        f"{prediction['bare']['images_per_s']:.2f}: ours/bare "
        f"{prediction['ours_over_bare_images_per_s']:.3f} (target >= 0.9)"
    )
    print(
        f"load average before {load_before}, after {result['load_after']}; wall "
        f"{result['wall_s']:.1f} s, CPU {result['cpu_s']:.1f} s"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
