"""One training step and one validation step of the student (Ray-free).

The per-worker loop in ``semisup.train`` only wires things together; everything that decides what
the model learns is here, as functions of tensors:

- ``unlabeled_targets``: the consistency target (offline pseudo-label, EMA teacher, or both);
- ``compute_losses``: supervised + confidence-masked consistency on the strong view;
- ``train_step``: one optimiser step, then the EMA update; returns floats for logging;
- ``validation_counts``: the confusion matrix and calibration counts of validation pixels.

Data parallelism is exact: losses and per-class statistics are normalised over the global batch
through a ``Collective``, the loss is scaled by the worker count before ``backward`` (DDP then
averages the gradients back), and each sample's augmentation is seeded by its SAMPLE_KEY, so N
workers with B/N tiles each take the step one worker takes with B.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semisup import columns as C
from semisup.augment import strong_view, weak_view
from semisup.collective import Collective
from semisup.config import AugmentConfig, SslConfig
from semisup.ema import ema_update
from semisup.losses import (
    LOCAL,
    consistency_loss,
    ramp_up,
    supervised_loss,
)
from semisup.metrics import confusion_matrix
from semisup.model_input import Batch
from semisup.sampling import STRONG_VIEW, WEAK_VIEW, derive_keys
from semisup.thresholds import (
    ThresholdSettings,
    align_distribution,
    initial_statistics,
    pixel_weights,
    update_marginal,
    update_statistics,
)


@dataclass(frozen=True)
class StepRecipe:
    """What a training step optimises: the consistency and augmentation settings and the classes."""

    ssl: SslConfig
    augment: AugmentConfig
    num_classes: int
    dice_weight: float = 1.0
    calibrated_threshold: float | None = None  # the teacher's 90 %-accuracy confidence

    @property
    def thresholds(self) -> ThresholdSettings:
        return ThresholdSettings(
            mode=self.ssl.threshold_mode,
            num_classes=self.num_classes,
            base_threshold=self.ssl.confidence_threshold,
            momentum=self.ssl.threshold_momentum,
            calibrated_threshold=self.calibrated_threshold,
        )


def view_keys(batch: Batch, view: int) -> Tensor | None:
    """The per-sample keys of one view of ``batch`` (None without SAMPLE_KEY: fresh draws)."""
    return derive_keys(batch[C.SAMPLE_KEY], view) if C.SAMPLE_KEY in batch else None


def combine_targets(
    pseudo: Tensor, pseudo_conf: Tensor, ema: Tensor, ema_conf: Tensor
) -> tuple[Tensor, Tensor]:
    """Merge the offline SAM pseudo-label with the EMA teacher's prediction (B×H×W each).

    Where they agree, the class is kept with the higher confidence. Where they disagree, the more
    confident one wins but its confidence is scaled by (1 − the other's confidence), so a
    confident disagreement falls below the threshold. Where the offline label is IGNORE_INDEX the
    EMA prediction is used as it is.
    """
    agree = pseudo == ema
    pseudo_wins = pseudo_conf >= ema_conf
    label = torch.where(agree | pseudo_wins, pseudo, ema)
    confidence = torch.where(
        agree,
        torch.maximum(pseudo_conf, ema_conf),
        torch.where(pseudo_wins, pseudo_conf * (1 - ema_conf), ema_conf * (1 - pseudo_conf)),
    )
    missing = pseudo == C.IGNORE_INDEX
    return torch.where(missing, ema, label), torch.where(missing, ema_conf, confidence)


@torch.no_grad()
def teacher_prediction(
    teacher: nn.Module,
    image: Tensor,
    valid: Tensor,
    ssl_state: dict[str, Tensor] | None = None,
    recipe: StepRecipe | None = None,
    collective: Collective = LOCAL,
) -> tuple[Tensor, Tensor]:
    """(label B×H×W int64, confidence B×H×W float): argmax and max of the teacher's softmax,
    aligned to the labelled class marginal first when ``ssl.distribution_alignment``."""
    probabilities = teacher(image).float().softmax(1)  # B×K×H×W
    if recipe is not None and ssl_state is not None and recipe.ssl.distribution_alignment:
        marginal = ssl_state["teacher_marginal"]
        update_marginal(marginal, probabilities, valid, recipe.ssl.threshold_momentum, collective)
        probabilities = align_distribution(probabilities, ssl_state["labeled_marginal"], marginal)
    confidence, label = probabilities.max(1)
    return label, confidence


def unlabeled_targets(
    weak: Batch,
    teacher: nn.Module | None,
    ssl: SslConfig,
    ssl_state: dict[str, Tensor] | None = None,
    recipe: StepRecipe | None = None,
    collective: Collective = LOCAL,
) -> Batch:
    """Put the consistency target of ``ssl.target`` into PSEUDO_LABEL/CONFIDENCE of ``weak``.

    ``oracle`` takes the tiles' ground truth (LABEL) at confidence 1: a run that cannot beat
    labels-only with it has a broken consistency path, whatever its teacher.
    """
    out = dict(weak)
    invalid = ~weak[C.VALID]
    if ssl.target == "oracle":
        if C.LABEL not in weak:
            raise ValueError("ssl.target='oracle' needs the unlabeled tiles' ground truth")
        truth = weak[C.LABEL].masked_fill(invalid, C.IGNORE_INDEX)
        out[C.PSEUDO_LABEL] = truth
        out[C.CONFIDENCE] = (truth != C.IGNORE_INDEX).float()
        return out
    if ssl.uses_ema_teacher:
        if teacher is None:
            raise ValueError(f"ssl.target={ssl.target!r} needs an EMA teacher")
        ema_label, ema_conf = teacher_prediction(
            teacher, weak[C.IMAGE], weak[C.VALID], ssl_state, recipe, collective
        )
        ema_label = ema_label.masked_fill(invalid, C.IGNORE_INDEX)
        ema_conf = ema_conf.masked_fill(invalid, 0.0)
    if ssl.target == "ema":
        out[C.PSEUDO_LABEL], out[C.CONFIDENCE] = ema_label, ema_conf
    elif ssl.target == "both":
        if C.PSEUDO_LABEL not in weak:
            raise ValueError("ssl.target='both' needs pseudo-labels in the store")
        out[C.PSEUDO_LABEL], out[C.CONFIDENCE] = combine_targets(
            weak[C.PSEUDO_LABEL], weak[C.CONFIDENCE], ema_label, ema_conf
        )
    elif C.PSEUDO_LABEL not in weak:
        raise ValueError("ssl.target='pseudo' needs pseudo-labels in the store")
    return out


def compute_losses(
    model: nn.Module,
    labeled: Batch,
    unlabeled: Batch | None,
    *,
    teacher: nn.Module | None,
    recipe: StepRecipe,
    step: int,
    collective: Collective = LOCAL,
    ssl_state: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """``loss`` (with graph) and its parts for one step, each the value of the global batch.

    Labeled tiles train through a weak view; unlabeled tiles get their target on the weak view
    and the student predicts ``ssl.strong_views`` strong views of the same tiles (geometry
    moves the target too), each pixel weighted by ``ssl.threshold_mode``; with
    ``ssl.feature_dropout`` the student also predicts the weak view from channel-dropped encoder
    features (UniMatch's feature stream) against the same target. ``ssl_state`` holds
    the adaptive statistics (``semisup.thresholds.initial_statistics``), updated in place; None
    starts from the initial ones. Where the unlabeled tiles carry LABEL (ground truth the split
    hides), it is used only to measure the targets (``pseudo_correct``/``pseudo_judged``).
    """
    ssl, augment = recipe.ssl, recipe.augment
    weak_labeled = weak_view(labeled, augment, view_keys(labeled, WEAK_VIEW))
    logits = model(weak_labeled[C.IMAGE])
    parts = supervised_loss(logits, weak_labeled[C.LABEL], recipe.dice_weight, collective)
    loss = parts["loss_sup"]
    if unlabeled is None or not ssl.enabled:
        return {"loss": loss, **parts}
    if ssl_state is None:
        ssl_state = initial_statistics(recipe.num_classes, logits.device)
    if ssl.distribution_alignment:
        one_hot = F.one_hot(
            weak_labeled[C.LABEL].clamp(max=recipe.num_classes - 1), recipe.num_classes
        )
        labelled = weak_labeled[C.LABEL] != C.IGNORE_INDEX
        update_marginal(
            ssl_state["labeled_marginal"],
            one_hot.permute(0, 3, 1, 2),
            labelled,
            ssl.threshold_momentum,
            collective,
        )
    weak_unlabeled = weak_view(unlabeled, augment, view_keys(unlabeled, WEAK_VIEW))
    weak = unlabeled_targets(weak_unlabeled, teacher, ssl, ssl_state, recipe, collective)
    settings = recipe.thresholds
    update_statistics(ssl_state, weak[C.CONFIDENCE], weak[C.PSEUDO_LABEL], settings, collective)
    views = []
    for view in range(ssl.strong_views):
        strong = strong_view(weak, augment, view_keys(unlabeled, STRONG_VIEW + view))
        weight = pixel_weights(strong[C.CONFIDENCE], strong[C.PSEUDO_LABEL], ssl_state, settings)
        views.append(
            consistency_loss(
                model(strong[C.IMAGE]),
                strong[C.PSEUDO_LABEL],
                weight,
                strong[C.VALID],
                collective,
                truth=strong.get(C.LABEL),
                dice_weight=ssl.dice_weight,
            )
        )
    cons = {name: torch.stack([v[name] for v in views]).mean(0) for name in views[0]}
    if ssl.feature_dropout > 0:  # UniMatch: 0.5 × image views + 0.5 × the feature stream
        weight = pixel_weights(weak[C.CONFIDENCE], weak[C.PSEUDO_LABEL], ssl_state, settings)
        perturbed = consistency_loss(
            model(weak[C.IMAGE], feature_dropout=ssl.feature_dropout),
            weak[C.PSEUDO_LABEL],
            weight,
            weak[C.VALID],
            collective,
            dice_weight=ssl.dice_weight,
        )
        cons["loss_cons"] = 0.5 * (cons["loss_cons"] + perturbed["loss_cons"])
        cons["loss_feature"] = perturbed["loss_cons"]
    ramp = ramp_up(step, ssl.ramp_up_steps)
    loss = loss + ssl.unlabeled_weight * ramp * cons["loss_cons"]
    parts = {**parts, **cons, "unlabeled_weight": torch.tensor(ssl.unlabeled_weight * ramp)}
    return {"loss": loss, **parts}


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    labeled: Batch,
    unlabeled: Batch | None,
    *,
    teacher: nn.Module | None,
    recipe: StepRecipe,
    step: int,
    autocast_dtype: torch.dtype | None = None,
    collective: Collective = LOCAL,
    ssl_state: dict[str, Tensor] | None = None,
) -> dict[str, float]:
    """One optimiser step (and EMA update); returns ``loss`` and its parts as floats.

    The global loss is scaled by the worker count before ``backward``: each worker's gradient
    is then that of its own terms of the global loss times N, and DDP's average is the gradient
    of the global loss.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    device_type = labeled[C.IMAGE].device.type
    with torch.autocast(
        device_type, dtype=autocast_dtype or torch.float32, enabled=bool(autocast_dtype)
    ):
        parts = compute_losses(
            model,
            labeled,
            unlabeled,
            teacher=teacher,
            recipe=recipe,
            step=step,
            collective=collective,
            ssl_state=ssl_state,
        )
    (parts["loss"] * collective.world_size).backward()
    optimizer.step()
    if teacher is not None:
        ema_update(teacher, unwrap(model), recipe.ssl.ema_momentum)
    return scalar_parts(parts)


def scalar_parts(parts: dict[str, Tensor]) -> dict[str, float]:
    """Loss parts as floats for logging; a K-vector part becomes ``name_0`` .. ``name_{K-1}``."""
    out: dict[str, float] = {}
    for name, value in parts.items():
        value = value.detach()
        if value.ndim == 0:
            out[name] = float(value)
        else:
            out |= {f"{name}_{k}": float(v) for k, v in enumerate(value.flatten().tolist())}
    return out


@torch.no_grad()
def validation_counts(
    model: nn.Module, batch: Batch, num_classes: int, bins: int
) -> tuple[Tensor, Tensor]:
    """One forward pass: the K×K confusion matrix of the argmax on valid, labelled pixels, and
    3×``bins`` float64 calibration counts of the same pixels per confidence bin of [0, 1]:
    pixels, correct pixels and the sum of their confidences (``semisup.calibration``)."""
    model.eval()
    confidence, prediction = model(batch[C.IMAGE]).float().softmax(1).max(1)
    label = batch[C.LABEL]
    labelled = label != C.IGNORE_INDEX
    which = (confidence[labelled] * bins).long().clamp(max=bins - 1)
    right = (prediction == label)[labelled].double()
    counts = torch.stack(
        [
            torch.bincount(which, minlength=bins).double(),
            torch.bincount(which, weights=right, minlength=bins),
            torch.bincount(which, weights=confidence[labelled].double(), minlength=bins),
        ]
    )
    return confusion_matrix(prediction, label, num_classes), counts


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    inner = getattr(model, "module", model)
    return inner if isinstance(inner, nn.Module) else model
