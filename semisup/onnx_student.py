"""An exported student (``semisup export``) as an ONNX model, and running it with onnxruntime.

The graph takes ``image``: B×3×T×T float32 in [0, 1] (the band rule below already applied) and
gives ``probabilities``: B×K×T×T float32 softmax over the K classes; SAM's pixel normalisation
is inside the graph. Everything a reader needs besides the graph is in the model's
``metadata_props`` under :data:`METADATA_KEY`, as JSON (:class:`OnnxMetadata`).

Nothing here imports peft, segment_anything or the teacher: a deployment needs onnxruntime,
NumPy and this module only.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

METADATA_KEY: Final = "semisup.export"
FORMAT_VERSION: Final = 1
INPUT_NAME: Final = "image"
OUTPUT_NAME: Final = "probabilities"

# How a raster's bands become the graph's input; the same rule as training
# (steps.prepare_batch) and prediction (raster_windows.read_strip).
BAND_SCALING: Final = {
    "bands": "the first three bands; a single band is replicated, two bands are refused",
    "scale": "(value - band_low) / (band_high - band_low), clipped to [0, 1]",
    "band_range": "uint8: 0..255; other dtypes: the raster's 2nd and 98th percentiles",
    "input_range": [0.0, 1.0],
}


class OnnxModelError(ValueError):
    """A file is not an ONNX model written by ``semisup export``; the message says why."""


@dataclass(frozen=True)
class OnnxMetadata:
    """What an exported model records about itself (JSON in its ``metadata_props``)."""

    model_type: str
    num_classes: int
    tile_size: int  # px, the window side the graph takes
    mode: str  # the fine-tuning mode of the adapter that was merged
    precision: str  # "fp32" or "int8" (onnxruntime dynamic quantisation of the weights)
    adapter_sha256: str  # prefix of the merged adapter file's SHA-256
    base_checkpoint_sha256: str | None  # prefix of the base SAM checkpoint's SHA-256, if any
    seed: int | None  # the seed that drew a random-init base (None with a checkpoint)
    pixel_mean: tuple[float, ...]  # SAM's normalisation, in 0-255 units, applied in the graph
    pixel_std: tuple[float, ...]
    band_scaling: dict[str, Any]  # BAND_SCALING

    def to_json(self) -> str:
        return json.dumps({"format_version": FORMAT_VERSION, **asdict(self)}, sort_keys=True)


def read_metadata(path: str | Path) -> OnnxMetadata:
    """The :class:`OnnxMetadata` of the exported model at ``path`` (read without its weights)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf's DecodeError, or OSError
        raise OnnxModelError(f"{path} cannot be read as an ONNX model ({err})") from None
    props = {prop.key: prop.value for prop in model.metadata_props}
    if METADATA_KEY not in props:
        raise OnnxModelError(f"{path} is not a semisup export (no {METADATA_KEY!r} metadata)")
    fields = json.loads(props[METADATA_KEY])
    version = fields.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise OnnxModelError(
            f"{path} has export format {version}, this code reads {FORMAT_VERSION}"
        )
    fields["pixel_mean"] = tuple(fields["pixel_mean"])
    fields["pixel_std"] = tuple(fields["pixel_std"])
    return OnnxMetadata(**fields)


class OnnxStudent:
    """An exported student on onnxruntime's CPU provider: [0, 1] windows -> probabilities."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.metadata = read_metadata(path)
        self.session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """``images``: B×3×T×T float32 in [0, 1] -> B×K×T×T float32 class probabilities."""
        (probabilities,) = self.session.run(
            [OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(images, np.float32)}
        )
        return np.asarray(probabilities)
