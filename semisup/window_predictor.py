"""The student ``semisup predict`` runs, and the Ray Data actor class that runs it on windows.

``resolve_model`` turns ``--model`` (a run folder, an adapter, or a built-in name) into a
``PredictModel``, checked in the driver before anything is written. ``WindowPredictor`` loads
it once per actor and predicts the windows of the jobs it is handed (``semisup.stitch.Job``),
reading them itself (``raster_windows.read_strip``). Nothing here imports Ray.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch

from semisup import blend
from semisup import columns as C
from semisup.model_input import INFERENCE_BATCH
from semisup.raster_windows import RasterSource, read_strip, source_arrays

PROBABILITIES: Final = "probabilities"  # per-window K×T×T float16 softmax, added by the actors
JOB: Final = "job"  # per-window int64: the job (window row of a stripe) it came from
DEFAULT_TILE: Final = 256  # px, built-in models only: an adapter runs at its training size
GDAL_CACHE_MB: Final = 64  # per actor; GDAL's default is 5% of the machine's RAM
ADAPTER: Final = "adapter"  # PredictModel.kind: a student adapter on its base
ONNX: Final = "onnx"  # PredictModel.kind: a model written by `semisup export`


@dataclass(frozen=True)
class PredictModel:
    """The student the actors load: an adapter file on its base (checkpoint or seed), or an
    exported ONNX model (``semisup export``), which carries its base merged in."""

    file: str  # student adapter (.safetensors), or the .onnx model for kind "onnx"
    model_type: str
    num_classes: int
    image_size: int  # px, the window side
    base_checkpoint: str | None  # official SAM weights the adapter was trained on
    seed: int  # draws the frozen base when there is no base checkpoint
    name: str  # what --model said
    kind: str = ADAPTER  # ADAPTER or ONNX

    def identity(self) -> dict[str, Any]:
        """What decides the predictions (recorded beside each output, compared on resume)."""
        if self.kind == ONNX:
            from semisup.onnx_student import read_metadata

            metadata = read_metadata(self.file)
            return {
                "model": ONNX,
                "adapter_sha256": metadata.adapter_sha256,
                "precision": metadata.precision,
                "model_type": self.model_type,
                "num_classes": self.num_classes,
                "seed": metadata.seed,
            }
        from semisup.sam import checkpoint_sha256

        return {
            "model": self.name if self.name in _builtin_names() else "adapter",
            "adapter_sha256": checkpoint_sha256(Path(self.file)),
            "model_type": self.model_type,
            "num_classes": self.num_classes,
            "seed": self.seed if self.base_checkpoint is None else None,
        }

    @property
    def label(self) -> str:
        """Short name for ``{adapter}`` in output paths: the file's or run folder's stem."""
        return Path(self.name).stem


def _builtin_names() -> tuple[str, ...]:
    from semisup.sam import SAM_SPECS

    return tuple(SAM_SPECS)


def resolve_model(
    model: str,
    *,
    workdir: Path,
    base_checkpoint: str | None = None,
    seed: int | None = None,
    num_classes: int = 2,
    tile_size: int | None = None,
) -> PredictModel:
    """What ``--model`` names, checked before anything is written.

    - a run directory of ``semisup train`` (``config.yaml`` + ``best/adapter.safetensors``):
      the best adapter, on the run's ``student.checkpoint`` with the run's ``train.seed``;
    - an adapter file (or a folder holding one): on ``base_checkpoint`` with ``seed`` (0);
    - a built-in name (``tiny``, ``vit_b``, ...): a student with ``num_classes`` classes at
      ``tile_size`` px, its decoder drawn from ``seed`` (for tests and benchmarks), saved as an
      adapter into ``workdir`` so that every actor loads the same weights.

    - an ONNX model written by ``semisup export`` (``.onnx``): run by onnxruntime, without
      PyTorch's SAM stack (``resolve_onnx``).

    Raises ``FileNotFoundError`` when ``model`` is none of these, ``student.AdapterError`` when
    the adapter was trained on another base (checkpoint hash, or none), ``ValueError`` when
    ``tile_size`` contradicts the adapter's size.
    """
    if Path(model).suffix.lower() == ".onnx":
        return resolve_onnx(model, base_checkpoint=base_checkpoint, seed=seed, tile_size=tile_size)
    from semisup import student
    from semisup.config import load_config
    from semisup.student import adapter_file

    path = Path(model).expanduser()
    if path.is_dir() and (path / "config.yaml").is_file():
        best = path / "best" / "adapter.safetensors"
        if not best.is_file():
            raise FileNotFoundError(f"{path}: the run has no best adapter yet ({best})")
        config = load_config(path / "config.yaml")
        base_checkpoint = base_checkpoint or config.student.checkpoint
        seed = config.train.seed if seed is None else seed
        path = best
    elif path.exists():
        path = adapter_file(path)
    elif model in _builtin_names():
        size = tile_size or DEFAULT_TILE
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed or 0)  # as train and the teacher seed a random-init base
            built = student.build_student(
                model, num_classes, size, checkpoint=base_checkpoint, mode="decoder"
            )
        adapter = student.save_adapter(built, workdir / f"{model}.safetensors")
        return PredictModel(
            str(adapter), model, num_classes, size, base_checkpoint, seed or 0, model
        )
    else:
        raise FileNotFoundError(
            f"--model {model!r}: not a run directory, an adapter file or a built-in model "
            f"({', '.join(_builtin_names())})"
        )
    spec = student.read_adapter_spec(path)
    check_adapter_base(path, spec, base_checkpoint)
    check_tile_size(path, "trained on", spec.image_size, tile_size)
    return PredictModel(
        str(path),
        spec.model_type,
        spec.num_classes,
        spec.image_size,
        base_checkpoint,
        seed or 0,
        model,
    )


def check_tile_size(path: Path, made: str, size: int, tile_size: int | None) -> None:
    """``ValueError`` when ``--tile-size`` is given and is not the model's own ``size``."""
    if tile_size is not None and tile_size != size:
        raise ValueError(
            f"{path} was {made} {size} px windows; --tile-size {tile_size} cannot be used with it"
        )


def resolve_onnx(
    model: str, *, base_checkpoint: str | None, seed: int | None, tile_size: int | None
) -> PredictModel:
    """The exported model at ``model``, read from its metadata; ``ValueError`` when a flag
    that describes an adapter's base is given (the export carries its base) or ``tile_size``
    is not the exported one. Imports neither peft nor segment_anything."""
    from semisup.onnx_student import read_metadata

    path = Path(model).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--model {model}: no such ONNX model")
    metadata = read_metadata(path)
    if base_checkpoint is not None or seed is not None:
        raise ValueError(
            f"--model {model} is an exported model with its base merged in; "
            "--base-checkpoint and --seed do not apply to it"
        )
    check_tile_size(path, "exported for", metadata.tile_size, tile_size)
    return PredictModel(
        str(path),
        metadata.model_type,
        metadata.num_classes,
        metadata.tile_size,
        None,
        metadata.seed or 0,
        model,
        kind=ONNX,
    )


def check_adapter_base(path: Path, spec: Any, base_checkpoint: str | None) -> None:
    """``AdapterError`` unless the adapter at ``path`` loads onto ``base_checkpoint``: an
    unmerged student adapter trained on exactly that checkpoint (by hash), or on none."""
    from semisup.sam import checkpoint_sha256, resolve_checkpoint
    from semisup.student import MODES, AdapterError

    if spec.mode not in MODES:
        raise AdapterError(f"{path} has mode {spec.mode!r}; expected a student adapter")
    given = checkpoint_sha256(resolve_checkpoint(base_checkpoint)) if base_checkpoint else None
    if given != spec.base_checkpoint_sha256:
        raise AdapterError(
            f"{path} is an adapter for the {spec.model_type} base "
            f"{spec.base_checkpoint_sha256 or 'without checkpoint (random init)'}, given base "
            f"{given or 'none'}{f' ({base_checkpoint})' if base_checkpoint else ''}; "
            "pass the checkpoint it was trained on as --base-checkpoint"
        )


def load_model(model: PredictModel) -> Any:
    """The student as a module: B×3×S×S float RGB in [0, 1] -> B×K×S×S logits; on the CPU, in
    eval mode, built as ``student.load_trained_student`` builds it."""
    from semisup.student import load_trained_student

    trained, _ = load_trained_student(
        model.file,
        model_type=model.model_type,
        image_size=model.image_size,
        base_checkpoint=model.base_checkpoint,
        seed=model.seed,
    )
    return trained


class WindowPredictor:
    """Ray Data callable class: reads the windows of jobs and predicts them with the student.

    Input rows: jobs (``seq``, ``output``, ``y0``, ``first_col``, ``last_col``, see ``Job``).
    Output: one row per window: ``JOB``, ``Y0``, ``X0`` (int64), ``VALID`` T×T bool and
    ``PROBABILITIES`` K×T×T float16 softmax. The model runs on ``batch_size`` windows at a
    time; windows without a valid pixel are not run (probabilities 0, ignored by the blender).
    Reading here rather than in separate tasks keeps one window row per actor in flight,
    whatever the raster's size, and no extra worker processes.

    ``models``: ``PredictModel`` fields of one exported model, or of adapters of one base
    (``check_swappable``); ``sources[i]`` is output i's raster and ``output_models[i]`` its
    model (default: the first). The base is loaded once; a job of another adapter swaps only
    the adapter's weights in (``student.load_adapter``).
    """

    def __init__(
        self,
        models: Sequence[Mapping[str, Any]],
        sources: Sequence[RasterSource],
        tile: int,
        overlap: int,
        batch_size: int = INFERENCE_BATCH,
        device: str = "cpu",
        torch_threads: int | None = None,
        output_models: Sequence[int] | None = None,
    ) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        # GDAL keeps decoded blocks of open rasters up to 5% of RAM by default; each window row
        # is read once, so a small cache is enough and keeps the actor's memory flat
        os.environ.setdefault("GDAL_CACHEMAX", str(GDAL_CACHE_MB))
        self.sources, self.tile, self.overlap = list(sources), tile, overlap
        self.batch_size = batch_size
        self._opened: dict[int, tuple[Any, Any]] = {}  # source index -> open image/valid arrays
        self.models = [PredictModel(**model) for model in models]
        self.output_models = list(output_models or [0] * len(self.sources))
        self.num_classes = self.models[0].num_classes
        self.current = 0  # index into models of the adapter loaded now
        if self.models[0].kind == ONNX:
            from semisup.onnx_student import OnnxStudent

            self.network: Any = OnnxStudent(self.models[0].file, threads=torch_threads)
            return
        from semisup.student import load_student
        from semisup.teacher import select_device

        first = self.models[0]
        self.device = select_device(device)
        self.network = load_student(
            first.file, base_checkpoint=first.base_checkpoint, seed=first.seed
        ).to(self.device)

    def __call__(self, jobs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        windows = read_job_windows(
            jobs, sources=self.sources, tile=self.tile, overlap=self.overlap, opened=self._opened
        )
        images = windows.pop(C.IMAGE)
        valid = windows[C.VALID]
        probabilities = np.zeros((len(images), self.num_classes, self.tile, self.tile), np.float16)
        output_of_job = dict(
            zip(jobs[C.JOB_SEQ].tolist(), jobs[C.JOB_OUTPUT].tolist(), strict=True)
        )
        model_of_window = np.array(
            [self.output_models[output_of_job[seq]] for seq in windows[JOB].tolist()], np.int64
        )
        todo = np.flatnonzero(valid.reshape(len(valid), -1).any(1))
        for model in np.unique(model_of_window[todo]).tolist():
            self._use(model)
            mine = todo[model_of_window[todo] == model]
            for start in range(0, len(mine), self.batch_size):
                chosen = mine[start : start + self.batch_size]
                probabilities[chosen] = self.predict(images[chosen])
        return {**windows, PROBABILITIES: probabilities}

    def _use(self, model: int) -> None:
        """Swap adapter ``model``'s weights into the loaded base (the base stays as it is)."""
        if model != self.current:
            from semisup.student import load_adapter

            load_adapter(self.network, self.models[model].file)
            self.current = model

    def predict(self, images: np.ndarray) -> np.ndarray:
        """B×3×T×T float32 in [0, 1] -> B×K×T×T float16 class probabilities."""
        if self.models[0].kind == ONNX:
            return self.network(images).astype(np.float16)
        pixels = torch.from_numpy(images).to(self.device)
        bf16 = self.device.type == "cuda"
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=bf16):
            probabilities = self.network(pixels).float().softmax(1)
        return probabilities.cpu().numpy().astype(np.float16)


def check_swappable(models: Sequence[PredictModel]) -> None:
    """``ValueError`` naming the first of several ``models`` that cannot share one loaded base
    with the first: an exported model, or an adapter of another base (type, classes, tile size,
    checkpoint or seed) or layout (mode, LoRA targets, rank, alpha, hires path)."""
    if len(models) < 2:
        return
    from semisup.student import read_adapter_spec

    first = models[0]
    for model in models:
        if model.kind != ADAPTER:
            raise ValueError(
                f"--model {model.name}: several --model swap adapters on one base; an exported "
                "model is run alone"
            )
    first_spec = read_adapter_spec(first.file)
    for model in models[1:]:
        spec = read_adapter_spec(model.file)
        differences = {
            "base": (spec.base(), first_spec.base()),
            "adapter layout": (spec.adapter_layout(), first_spec.adapter_layout()),
            "base checkpoint": (model.base_checkpoint, first.base_checkpoint),
            "seed of the random-init base": (model.seed, first.seed),
        }
        for what, (own, wanted) in differences.items():
            if own != wanted:
                raise ValueError(
                    f"--model {model.name}: its {what} ({own}) differs from that of "
                    f"{first.name} ({wanted}); swapped adapters share one base and layout"
                )


def read_job_windows(
    batch: dict[str, np.ndarray],
    *,
    sources: Sequence[RasterSource],
    tile: int,
    overlap: int,
    opened: dict[int, tuple[Any, Any]] | None = None,
) -> dict[str, np.ndarray]:
    """Job rows -> one row per window: ``raster_windows.read_strip``'s ``IMAGE`` and ``VALID``
    plus ``JOB``, ``Y0``, ``X0``. ``opened`` keeps the current source's open arrays across calls."""
    opened = {} if opened is None else opened
    parts = []
    for seq, output, y0, first, last in zip(
        batch[C.JOB_SEQ],
        batch[C.JOB_OUTPUT],
        batch[C.Y0],
        batch[C.FIRST_COL],
        batch[C.LAST_COL],
        strict=True,
    ):
        source = sources[int(output)]
        starts = blend.window_starts(source.width, tile, overlap)[int(first) : int(last)]
        if int(output) not in opened:
            opened.clear()  # jobs come raster by raster: keep only the current one open
            opened[int(output)] = source_arrays(source)
        windows = read_strip(source, int(y0), starts, tile, opened[int(output)])
        count = len(starts)
        windows[JOB] = np.full(count, int(seq), np.int64)
        windows[C.Y0] = np.full(count, int(y0), np.int64)
        windows[C.X0] = np.asarray(starts, np.int64)
        parts.append(windows)
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
