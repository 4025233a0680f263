"""`semisup export` and exported models: ONNX parity with PyTorch on real Dubai tiles (fp32 and
int8), the metadata a reader needs, bad input refused in one line before any work, and
`semisup predict --model model.onnx` through the same windowed path without the SAM stack."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torch import Tensor

from data_prep.labels import colors_to_ids, parse_color_map
from semisup import columns as C
from semisup.cli import main as semisup_main
from semisup.config import ExperimentConfig, TrainConfig, save_config
from semisup.export import OPSET, export_run
from semisup.known_imagery import DUBAI_COLOURS
from semisup.onnx_student import BAND_SCALING, OnnxStudent, read_metadata
from semisup.student import build_student, load_student, save_adapter

TILE = 128  # px: small windows keep the export and the parity checks within seconds
SEED = 3  # the run's train.seed: draws the frozen random-init base
STEPS = 12  # enough for predictions that are not noise (int8 agreement 0.9999 after 24)


def dubai_crops(dubai_dir: Path, tile: str, parts: tuple[str, ...]) -> tuple[Tensor, Tensor]:
    """Four TILE px crops of each Dubai image part: (N×3×T×T float32 in [0, 1], N×T×T int64
    labels with IGNORE_INDEX for unlabelled pixels)."""
    colours = parse_color_map(DUBAI_COLOURS)
    images, labels = [], []
    for part in parts:
        rgb = np.asarray(Image.open(dubai_dir / tile / "images" / f"image_part_{part}.jpg"))
        mask = np.asarray(
            Image.open(dubai_dir / tile / "masks" / f"image_part_{part}.png").convert("RGB")
        )
        ids = colors_to_ids(mask, colours)
        for y, x in ((0, 0), (0, 300), (300, 0), (300, 300)):
            images.append(rgb[y : y + TILE, x : x + TILE])
            labels.append(ids[y : y + TILE, x : x + TILE])
    image = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return image.contiguous(), torch.from_numpy(np.stack(labels).astype(np.int64))


@pytest.fixture(scope="module")
def run(dubai_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `semisup train`-shaped run: a tiny LoRA student (peft on qkv) trained for a few steps
    on real Dubai crops, so that its predictions are not noise and its LoRA update is not 0."""
    folder = tmp_path_factory.mktemp("export") / "run"
    (folder / "best").mkdir(parents=True)
    save_config(ExperimentConfig(train=TrainConfig(seed=SEED)), folder / "config.yaml")
    images, labels = dubai_crops(dubai_dir, "tile_1", ("001", "002", "005", "006"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)  # as train does before build_student
        model = build_student("tiny", 5, TILE, mode="lora", lora_targets="qkv")
        optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 3e-3)
        for step in range(STEPS):
            chosen = torch.arange(4) + 4 * (step % 4)
            loss = torch.nn.functional.cross_entropy(
                model(images[chosen]), labels[chosen], ignore_index=C.IGNORE_INDEX
            )
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    save_adapter(model.eval(), folder / "best" / "adapter.safetensors")
    return folder


@pytest.fixture(scope="module")
def exported(run: Path) -> dict[str, Path]:
    """The run exported as fp32 (export_run) and as int8 (through the command line)."""
    fp32, int8 = run.parent / "student.onnx", run.parent / "student_int8.onnx"
    export_run(run, fp32)
    argv = ["export", "--run", str(run), "--out", str(int8), "--quantize", "int8"]
    assert semisup_main(argv) == 0
    return {"fp32": fp32, "int8": int8}


def test_onnx_matches_pytorch_on_dubai_tiles(
    run: Path, exported: dict[str, Path], dubai_dir: Path
) -> None:
    """fp32: every class probability within 1e-4 of the unmerged PyTorch student's; int8: the
    same class on at least 98 % of pixels; both record their tile size and band scaling."""
    images, _ = dubai_crops(dubai_dir, "tile_3", ("001", "003"))  # not trained on
    student = load_student(run / "best" / "adapter.safetensors", seed=SEED)
    with torch.inference_mode():
        expected = student(images).softmax(1).numpy()
    fp32 = OnnxStudent(exported["fp32"])(images.numpy())
    int8 = OnnxStudent(exported["int8"])(images.numpy())
    max_difference = float(np.abs(fp32 - expected).max())
    agreement = float((int8.argmax(1) == expected.argmax(1)).mean())
    print(f"fp32 max |Δp| {max_difference:.2e}, int8 argmax agreement {agreement:.4f}")
    assert max_difference <= 1e-4
    assert agreement >= 0.98
    assert len(np.unique(expected.argmax(1))) > 1  # a trained model, not one constant class
    assert exported["int8"].stat().st_size < exported["fp32"].stat().st_size / 2  # int8 weights
    for precision, path in exported.items():
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
        assert {o.domain: o.version for o in model.opset_import}[""] >= OPSET >= 17
        metadata = read_metadata(path)
        assert (metadata.tile_size, metadata.num_classes) == (TILE, 5)
        assert metadata.precision == precision
        assert metadata.band_scaling == BAND_SCALING and metadata.mode == "lora"
        assert metadata.seed == SEED and len(metadata.pixel_mean) == 3


def test_export_refuses_bad_input_in_one_line_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    save_config(ExperimentConfig(), unfinished / "config.yaml")
    existing = tmp_path / "existing.onnx"
    existing.write_bytes(b"keep me")
    out = str(tmp_path / "new.onnx")
    cases = {
        "--run /nowhere/run: no such run": ["--run", "/nowhere/run", "--out", out],
        "the run has no best adapter yet": ["--run", str(unfinished), "--out", out],
        f"--out {existing} exists; pass --overwrite": [
            "--run",
            str(unfinished),
            "--out",
            str(existing),
        ],
        "--format 'tflite': unknown; known: onnx": [
            "--run",
            str(unfinished),
            "--out",
            out,
            "--format",
            "tflite",
        ],
        "--quantize 'int4': unknown; known: int8": [
            "--run",
            str(unfinished),
            "--out",
            out,
            "--quantize",
            "int4",
        ],
    }
    for message, argv in cases.items():
        assert semisup_main(["export", *argv]) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and message in error, error
    assert existing.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.onnx", "unfinished"]


# Runs `semisup predict` in a fresh interpreter with the actors' work done in-process (the same
# WindowPredictor, windowing, stitching and writer; no Ray), then lists the SAM-stack modules
# that got imported.
PREDICT_WITHOUT_RAY = textwrap.dedent(
    """
    import contextlib, dataclasses, json, sys
    import numpy as np
    import semisup.predict as predict, semisup.runtime as runtime
    from semisup.window_predictor import WindowPredictor

    def in_process(jobs, outputs, models, output_models, windows):
        actor = WindowPredictor([dataclasses.asdict(m) for m in models],
                                [s for s, _ in outputs], windows.tile, windows.overlap,
                                windows.batch_size, output_models=output_models)
        for job in jobs:
            yield actor({name: np.array([getattr(job, name)])
                         for name in ("seq", "output", "y0", "first_col", "last_col")})

    predict._pipeline = in_process
    runtime.ray_runtime = lambda config: contextlib.nullcontext()
    from semisup.cli import main
    status = main(["predict", *sys.argv[1:]])
    names = ("peft", "segment_anything", "semisup.teacher", "semisup.student", "semisup.sam")
    print(json.dumps({"status": status, "imported": [n for n in names if n in sys.modules]}))
    """
)


def test_predict_with_onnx_imports_no_sam_stack(
    exported: dict[str, Path], dubai_dir: Path, tmp_path: Path
) -> None:
    raster = dubai_dir / "tile_3" / "images" / "image_part_002.jpg"
    argv = [str(raster), "--model", str(exported["fp32"]), "--out", str(tmp_path / "map.tif")]
    done = subprocess.run(
        [sys.executable, "-c", PREDICT_WITHOUT_RAY, *argv],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"status": 0, "imported": []}
    assert (tmp_path / "map.tif").is_file()


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_predict_with_onnx_writes_the_run_s_map(
    ray_session: None, run: Path, exported: dict[str, Path], dubai_dir: Path, tmp_path: Path
) -> None:
    """`semisup predict --model student.onnx`: the windows, blending and outputs of predicting
    with the run itself (probabilities within 1e-4, so classes differ only on near-ties)."""
    import rasterio

    from semisup.actor_pool import ActorPoolConfig
    from semisup.predict import PredictConfig, run_predict

    raster = dubai_dir / "tile_3" / "images" / "image_part_002.jpg"
    maps = {}
    for name, model in (("run", run), ("onnx", exported["fp32"])):
        summary = run_predict(
            [raster],
            str(model),
            tmp_path / f"{name}.tif",
            PredictConfig(pool=ActorPoolConfig(actors=1, torch_threads=1)),
            log=None,
        )
        assert summary["windows"] > 20 and summary["model"]["tile_size"] == TILE
        with rasterio.open(tmp_path / f"{name}.tif") as ds:
            maps[name] = ds.read().astype(np.int64)  # class, confidence_percent
    assert summary["model"]["kind"] == "onnx"
    assert (maps["onnx"][0] == maps["run"][0]).mean() >= 0.999
    assert np.abs(maps["onnx"][1] - maps["run"][1]).max() <= 1
