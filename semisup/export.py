"""Shipping a trained student: ``semisup export``, a run's best adapter as one ONNX model.

The adapter is loaded onto its base (``student.load_student``) and folded into it
(``student.merge_adapter``), and the merged student with a softmax on top goes through torch's
exporter (``torch.onnx.export``, dynamo, opset :data:`OPSET`) with a dynamic batch axis. The
model is checked with ``onnx.checker``; its metadata says what it takes (tile size, band
scaling; ``semisup.onnx_student``). ``--quantize int8`` stores the weights of its matrix
products and convolutions as int8 through onnxruntime's dynamic quantisation (activations are
quantised on the fly, per call). The file appears at ``--out`` only once complete.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

import torch
from torch import Tensor, nn

from semisup.onnx_student import (
    BAND_SCALING,
    INPUT_NAME,
    METADATA_KEY,
    OUTPUT_NAME,
    OnnxMetadata,
)

FORMATS: Final = ("onnx",)
QUANTISATIONS: Final = ("int8",)
OPSET: Final = 18  # the torch exporter's default opset; 17 is the least that has LayerNormalization
PROTOBUF_LIMIT: Final = 2**31  # bytes: one ONNX file without external data holds at most 2 GiB


class ProbabilityOutput(nn.Module):
    """A student whose output is its class probabilities: B×3×T×T [0, 1] -> B×K×T×T softmax."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> Tensor:
        return self.model(image).softmax(1)


def export_run(
    run: str | Path,
    out: str | Path,
    *,
    format: str = "onnx",
    quantize: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Export the best adapter of the ``semisup train`` run ``run``, merged into its base, to
    ``out``; returns a JSON-safe summary.

    Bad input raises before any work, naming the input: ``FileNotFoundError`` for a missing run
    or a run without a best adapter, ``FileExistsError`` for an existing ``out`` without
    ``overwrite``, ``ValueError`` for an unknown ``format`` or ``quantize``.
    """
    from semisup.window_predictor import resolve_model

    started = time.perf_counter()
    run, out = Path(run), Path(out)
    if format not in FORMATS:
        raise ValueError(f"--format {format!r}: unknown; known: {', '.join(FORMATS)}")
    if quantize is not None and quantize not in QUANTISATIONS:
        raise ValueError(f"--quantize {quantize!r}: unknown; known: {', '.join(QUANTISATIONS)}")
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"--run {run}: no such run (no {run / 'config.yaml'})")
    if out.exists() and not overwrite:
        raise FileExistsError(f"--out {out} exists; pass --overwrite to replace it")
    model = resolve_model(str(run), workdir=run)  # refuses a run without a best adapter
    merged, metadata = _merged_student(model, precision=quantize or "fp32")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".semisup-export-", dir=out.parent) as work:
        fp32 = export_onnx(merged, Path(work) / "fp32.onnx", metadata)
        written = quantize_int8(fp32, Path(work) / "int8.onnx", metadata) if quantize else fp32
        fp32_bytes = fp32.stat().st_size
        os.replace(written, out)  # the file appears complete or not at all
    return {
        "run": str(run),
        "out": str(out),
        "format": format,
        "precision": metadata.precision,
        "opset": OPSET,
        "bytes": out.stat().st_size,
        "fp32_bytes": fp32_bytes,
        "model_type": metadata.model_type,
        "num_classes": metadata.num_classes,
        "tile_size": metadata.tile_size,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _merged_student(model: Any, precision: str) -> tuple[nn.Module, OnnxMetadata]:
    """The ``PredictModel``'s student with its adapter folded in, and what to record of it."""
    from semisup import student

    loaded = student.load_student(
        model.file, base_checkpoint=model.base_checkpoint, seed=model.seed
    )
    spec = student.read_adapter_spec(model.file)
    size = 4 * sum(parameter.numel() for parameter in loaded.parameters())  # float32 bytes
    if size >= PROTOBUF_LIMIT:
        raise ValueError(
            f"{model.file}: a {spec.model_type} student holds {size / 2**30:.1f} GiB of "
            "weights, more than one ONNX file can (2 GiB)"
        )
    metadata = OnnxMetadata(
        model_type=spec.model_type,
        num_classes=spec.num_classes,
        tile_size=spec.image_size,
        mode=spec.mode,
        precision=precision,
        adapter_sha256=model.identity()["adapter_sha256"],
        base_checkpoint_sha256=spec.base_checkpoint_sha256,
        seed=model.seed if model.base_checkpoint is None else None,
        pixel_mean=tuple(loaded.pixel_mean.flatten().tolist()),
        pixel_std=tuple(loaded.pixel_std.flatten().tolist()),
        band_scaling=BAND_SCALING,
    )
    return student.merge_adapter(loaded), metadata


def export_onnx(model: nn.Module, path: Path, metadata: OnnxMetadata) -> Path:
    """``model`` (B×3×T×T [0, 1] -> B×K×T×T logits) as an fp32 ONNX graph of its
    probabilities at ``path``, batch axis dynamic, with ``metadata``; checked. Returns ``path``."""
    import onnx

    tile = metadata.tile_size
    example = torch.rand(2, 3, tile, tile)  # two images: a batch of one would fix the axis
    torch.onnx.export(
        ProbabilityOutput(model).eval(),
        (example,),
        str(path),
        dynamo=True,
        opset_version=OPSET,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        external_data=False,
        verbose=False,
    )
    graph = onnx.load(str(path))
    # The exporter's intermediate shape annotations can contradict onnx's own shape inference
    # (measured: a 256 vs 32 clash that stops quantize_dynamic); the ops alone define the model.
    del graph.graph.value_info[:]
    _save_checked(graph, path, metadata)
    return path


def quantize_int8(fp32: Path, path: Path, metadata: OnnxMetadata) -> Path:
    """The fp32 model at ``fp32`` with int8 weights (onnxruntime's dynamic quantisation: each
    MatMul/Gemm/Conv weight tensor stored as int8 with one scale; activations quantised per
    call) at ``path``, with ``metadata`` marked int8; checked. Returns ``path``."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(path), weight_type=QuantType.QInt8)
    _save_checked(onnx.load(str(path)), path, replace(metadata, precision="int8"))
    return path


def _save_checked(graph: Any, path: Path, metadata: OnnxMetadata) -> None:
    import onnx

    del graph.metadata_props[:]  # quantize_dynamic leaves its own note; ours is the record
    graph.metadata_props.add(key=METADATA_KEY, value=metadata.to_json())
    onnx.checker.check_model(graph)
    onnx.save(graph, str(path))


# ---------------------------------------------------------------------------------------------
# Command line: `semisup export`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``semisup export`` flags to ``parser``."""
    parser.add_argument(
        "--run", required=True, type=Path, help="a `semisup train` run folder (its best adapter)"
    )
    parser.add_argument(
        "--format",
        default="onnx",
        metavar="FORMAT",
        help=f"output format: {', '.join(FORMATS)} (default onnx)",
    )
    parser.add_argument("--out", required=True, type=Path, help="the model file to write")
    parser.add_argument(
        "--quantize",
        metavar="KIND",
        help="int8: weights stored as int8 (onnxruntime dynamic quantisation); default fp32",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out when it exists (else refused)"
    )


def run_cli(args: argparse.Namespace) -> int:
    """Run ``semisup export``; prints the summary as JSON; returns the exit status."""
    summary = export_run(
        args.run, args.out, format=args.format, quantize=args.quantize, overwrite=args.overwrite
    )
    print(json.dumps(summary, indent=2))
    return 0
