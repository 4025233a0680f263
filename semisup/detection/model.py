"""The detection student: torchvision Faster R-CNN, its fine-tuning modes and checkpoints.

Two backbones: ResNet-50-FPN (v2) for accuracy and MobileNetV3-Large-FPN for edge use. Weights
cannot be downloaded here, so models are built with random weights and a torchvision-format
checkpoint given as a path is loaded with ``weights_only=True`` (a plain state dict, or the
``{"model": state_dict, ...}`` that torchvision's reference scripts save). A checkpoint made for
another number of classes (a COCO detector) loads everything but the box predictor, which starts
anew for this task's classes.

Fine-tuning modes parallel the SAM student's:
- ``full``: everything trains;
- ``head``: the backbone (body and FPN) is frozen, the region proposal network and box head
  train: detection's "decoder-only", the first thing to try;
- ``backbone_layers``: the FPN, heads and the last ``trainable_backbone_layers`` stages of the
  body train (torchvision's own counting: 0-5 for ResNet-50, 0-6 for MobileNetV3).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final, TypeVar

import torch
from torch import nn
from torchvision.models.detection import (
    FasterRCNN,
    fasterrcnn_mobilenet_v3_large_fpn,
    fasterrcnn_resnet50_fpn_v2,
)

from semisup.config import DetectorArch, DetectorFinetune

ARCHS: Final = {
    "fasterrcnn_resnet50_fpn_v2": fasterrcnn_resnet50_fpn_v2,
    "fasterrcnn_mobilenet_v3_large_fpn": fasterrcnn_mobilenet_v3_large_fpn,
}
PREDICTOR: Final = "roi_heads.box_predictor."
ModelT = TypeVar("ModelT", bound=nn.Module)  # a detector, or DistributedDataParallel around one
_RESNET_STAGES: Final = ("layer4", "layer3", "layer2", "layer1", "conv1")  # last first


class DetectorCheckpointError(ValueError):
    """A detector checkpoint that cannot be read or does not fit; the message names the key."""


def build_detector(
    num_classes: int,
    *,
    arch: DetectorArch = "fasterrcnn_resnet50_fpn_v2",
    finetune: DetectorFinetune = "head",
    trainable_backbone_layers: int = 3,
    checkpoint: str | Path | None = None,
    tile_size: int = 512,
    score_threshold: float = 0.05,
    nms_iou: float = 0.5,
    detections_per_tile: int = 300,
) -> FasterRCNN:
    """Faster R-CNN for ``num_classes`` object classes (background is added as class 0).

    Tiles enter at ``tile_size`` unchanged (torchvision would resize them to 800 px).
    ``score_threshold`` and ``nms_iou`` filter its detections; ``detections_per_tile`` caps them
    (an orthophoto tile holds more crowns than COCO's 100).
    """
    if arch not in ARCHS:
        raise ValueError(f"detector arch {arch!r}: expected one of {', '.join(ARCHS)}")
    if num_classes < 1:
        raise ValueError(f"detector num_classes: got {num_classes}, expected >= 1")
    model = ARCHS[arch](
        weights=None,
        weights_backbone=None,
        num_classes=num_classes + 1,  # all layers trainable
        min_size=tile_size,
        max_size=tile_size,
        box_score_thresh=score_threshold,
        box_nms_thresh=nms_iou,
        box_detections_per_img=detections_per_tile,
    )
    if checkpoint is not None:
        load_detector_checkpoint(model, checkpoint)
    set_trainable(model, finetune, trainable_backbone_layers)
    return model


def set_trainable(model: FasterRCNN, finetune: str, layers: int = 3) -> None:
    """``requires_grad`` by fine-tuning mode (see the module's docstring)."""
    model.requires_grad_(True)
    if finetune == "full":
        return
    if finetune == "head":
        model.backbone.requires_grad_(False)
        return
    if finetune != "backbone_layers":
        raise ValueError(
            f"detector finetune {finetune!r}: expected 'full', 'head' or 'backbone_layers'"
        )
    stages = body_stages(model.backbone.body)
    if not 0 <= layers <= len(stages):
        raise ValueError(
            f"detector trainable_backbone_layers: got {layers}, expected 0..{len(stages)} for "
            "this backbone"
        )
    frozen = {name for stage in stages[layers:] for name in stage}
    for name, module in model.backbone.body.named_children():
        module.requires_grad_(name not in frozen)


def body_stages(body: nn.Module) -> list[list[str]]:
    """The backbone body's stages as lists of child names, last stage first."""
    names = [name for name, _ in body.named_children()]
    if "layer4" in names:  # ResNet: conv1 and its norm are one stage, as torchvision counts
        return [[s] if s != "conv1" else ["conv1", "bn1"] for s in _RESNET_STAGES]
    children = list(body.children())  # MobileNet: a stage starts at each strided block
    starts = [0] + [i for i, b in enumerate(children) if getattr(b, "_is_cn", False)]
    starts += [len(children) - 1]
    bounds = list(zip(starts, starts[1:] + [len(children)], strict=True))
    return [names[a:b] for a, b in reversed(bounds)]


def load_detector_checkpoint(model: FasterRCNN, path: str | Path) -> None:
    """Load a torchvision-format detector checkpoint into ``model`` (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise DetectorCheckpointError(f"detector checkpoint {path}: no such file")
    try:
        data: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle that weights_only refuses, or not a torch file
        raise DetectorCheckpointError(f"detector checkpoint {path}: cannot load ({err})") from err
    state = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DetectorCheckpointError(
            f"detector checkpoint {path}: expected a state dict (or {{'model': state_dict}})"
        )
    own = model.state_dict()
    other_classes = any(
        k.startswith(PREDICTOR) and k in own and v.shape != own[k].shape for k, v in state.items()
    )
    if other_classes:  # a detector of other classes: all but the predictor (kept as built) fits
        state = {k: v for k, v in state.items() if not k.startswith(PREDICTOR)}
    for key, value in state.items():
        if key in own and value.shape != own[key].shape:
            raise DetectorCheckpointError(
                f"detector checkpoint {path}: {key} has shape {tuple(value.shape)}, the model "
                f"expects {tuple(own[key].shape)} (another arch?)"
            )
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not (other_classes and k.startswith(PREDICTOR))]
    if missing or result.unexpected_keys:
        key = (missing or result.unexpected_keys)[0]
        raise DetectorCheckpointError(
            f"detector checkpoint {path}: {'missing' if missing else 'unexpected'} key {key!r} "
            f"({len(missing)} missing, {len(result.unexpected_keys)} unexpected; another arch?)"
        )


def train_mode(model: ModelT) -> ModelT:
    """``model.train()``, with the batch norms of frozen parts kept in eval mode.

    A frozen stage must stay what the checkpoint made it: in train mode its batch norms would
    still move their running statistics to the new imagery.
    """
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in module.parameters()
        ):
            module.eval()
    return model
