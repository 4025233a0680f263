"""How much each unlabeled pixel counts: fixed, self-adaptive or calibrated thresholds (pure).

A weak or uncalibrated early teacher is the usual case (the demo's teacher puts 1 % of pixels
above 0.95, and its 0.9–1.0 bin is 71 % right), so a fixed high threshold keeps too few pixels
and the wrong ones. The modes of ``ssl.threshold_mode``:

- ``fixed``: confidence above ``ssl.confidence_threshold`` (FixMatch, Sohn et al. 2020).
- ``freematch``: self-adaptive thresholds (FreeMatch, Wang et al. 2023). A global threshold
  follows the EMA of the mean confidence; class ``c``'s is scaled by the EMA of the mean
  probability mass the teacher gives ``c`` over the maximum of those: a class the teacher is
  unsure of (or rarely predicts) gets a lower threshold.
- ``flexmatch``: curriculum thresholds (FlexMatch, Zhang et al. 2021). Class ``c``'s learning
  effect σ_c is the EMA share of pixels predicted ``c`` above the base threshold; with
  β_c = σ_c / max(max_k σ_k, unused share) the threshold is base · β_c / (2 − β_c).
- ``softmatch``: a soft weight instead of a cut (SoftMatch, Chen et al. 2023): 1 above the EMA
  mean confidence μ, a Gaussian exp(−(conf − μ)² / (2σ²/4)) below it (σ² the EMA variance; the
  /4 is SoftMatch's n_sigma = 2).
- ``calibrated``: confidence above the threshold at which the teacher's pseudo-labels were
  measured 90 % right on labelled monitor tiles (``semisup.calibration``).

The teacher gives a class and a confidence per pixel, not a distribution, so FreeMatch's mean
probability of class ``c`` is estimated as the mean of confidence · [label = c] over valid
pixels. Statistics are sums over every worker's pixels (``Collective``) and live in the
checkpointed SSL state, so they survive a resume.

Distribution alignment (``ssl.distribution_alignment``, ReMixMatch, Berthelot et al. 2020)
multiplies the EMA teacher's class probabilities by p_labelled(c) / p_teacher(c), the running
class marginals of the labelled pixels and of the teacher's predictions, and renormalises: a
teacher that under-predicts a class the labels hold is pushed back towards it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import torch

from semisup.collective import LOCAL, Collective
from semisup.columns import IGNORE_INDEX
from semisup.config import ThresholdMode

SOFTMATCH_N_SIGMA: Final = 2.0  # SoftMatch's width: the Gaussian's sigma is sigma_t / n_sigma


@dataclass(frozen=True)
class ThresholdSettings:
    """What the weights depend on besides the statistics."""

    mode: ThresholdMode
    num_classes: int
    base_threshold: float  # fixed/flexmatch: the cut; freematch/softmatch: unused
    momentum: float  # EMA momentum of the statistics per step
    calibrated_threshold: float | None = None  # calibrated mode: measured by the teacher stage


def initial_statistics(
    num_classes: int, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """The statistics before the first step (FreeMatch's and SoftMatch's initial values: 1/K)."""
    chance = 1.0 / num_classes
    return {
        "confidence_mean": torch.tensor(chance, device=device),
        "confidence_var": torch.tensor(1.0, device=device),
        "class_mass": torch.full((num_classes,), chance, device=device),
        "class_confident_share": torch.zeros(num_classes, device=device),
        "labeled_marginal": torch.full((num_classes,), chance, device=device),
        "teacher_marginal": torch.full((num_classes,), chance, device=device),
    }


@torch.no_grad()
def update_statistics(
    statistics: dict[str, torch.Tensor],
    confidence: torch.Tensor,
    target: torch.Tensor,
    settings: ThresholdSettings,
    collective: Collective = LOCAL,
) -> None:
    """EMA-update ``statistics`` in place with one step's targets (B×H×W), over all workers.

    Pixels whose target is IGNORE_INDEX (nodata, outside the tile, no pseudo-label) do not count.
    A step without a single valid pixel anywhere leaves the statistics as they are.
    """
    valid = target != IGNORE_INDEX
    labels, values = target[valid], confidence[valid].float()
    k = settings.num_classes
    sums = collective.sum(
        torch.cat(
            [
                torch.stack([valid.sum().float(), values.sum(), values.square().sum()]),
                torch.bincount(labels, weights=values, minlength=k)[:k].float(),
                torch.bincount(labels[values > settings.base_threshold], minlength=k)[:k].float(),
            ]
        )
    )
    pixels = sums[0]
    if pixels <= 0:
        return
    mean = sums[1] / pixels
    observed = {
        "confidence_mean": mean,
        "confidence_var": (sums[2] / pixels - mean.square()).clamp(min=0),
        "class_mass": sums[3 : 3 + k] / pixels,
        "class_confident_share": sums[3 + k :] / pixels,
    }
    for name, value in observed.items():
        statistics[name].mul_(settings.momentum).add_(
            value.to(statistics[name]), alpha=1 - settings.momentum
        )


def class_thresholds(
    statistics: dict[str, torch.Tensor], settings: ThresholdSettings
) -> torch.Tensor:
    """K per-class thresholds of the cut modes (fixed, freematch, flexmatch, calibrated)."""
    k, mode = settings.num_classes, settings.mode
    device = statistics["class_mass"].device
    if mode == "freematch":
        mass = statistics["class_mass"]
        return statistics["confidence_mean"] * mass / mass.max().clamp(min=1e-12)
    if mode == "flexmatch":
        share = statistics["class_confident_share"]
        unused = (1 - share.sum()).clamp(min=0)
        effect = share / torch.maximum(share.max(), unused).clamp(min=1e-12)
        return settings.base_threshold * effect / (2 - effect)
    if mode == "calibrated":
        if settings.calibrated_threshold is None:
            raise ValueError("ssl.threshold_mode='calibrated' needs the teacher's calibration")
        return torch.full((k,), settings.calibrated_threshold, device=device)
    if mode == "fixed":
        return torch.full((k,), settings.base_threshold, device=device)
    raise ValueError(f"ssl.threshold_mode={mode!r} has no per-class cut")


def pixel_weights(
    confidence: torch.Tensor,
    target: torch.Tensor,
    statistics: dict[str, torch.Tensor],
    settings: ThresholdSettings,
) -> torch.Tensor:
    """B×H×W float weights in [0, 1] of the consistency term: 0 where the target is not set."""
    has_target = target != IGNORE_INDEX
    if settings.mode == "softmatch":
        mean, var = statistics["confidence_mean"], statistics["confidence_var"]
        width = 2 * var.clamp(min=1e-12) / SOFTMATCH_N_SIGMA**2
        below = (confidence.float() - mean).clamp(max=0)
        weight = torch.exp(-below.square() / width)
    else:
        cut = class_thresholds(statistics, settings)
        weight = (confidence.float() > cut[target.clamp(max=settings.num_classes - 1)]).float()
    return weight * has_target


@torch.no_grad()
def update_marginal(
    marginal: torch.Tensor,
    probabilities: torch.Tensor,
    valid: torch.Tensor,
    momentum: float,
    collective: Collective = LOCAL,
) -> None:
    """EMA-update a class marginal (K) in place with the mean of ``probabilities`` (B×K×H×W,
    or one-hot labels) over the ``valid`` pixels (B×H×W) of every worker."""
    weights = probabilities.float() * valid[:, None]
    sums = collective.sum(torch.cat([weights.sum((0, 2, 3)), valid.sum().float()[None]]))
    if sums[-1] <= 0:
        return
    marginal.mul_(momentum).add_(sums[:-1] / sums[-1], alpha=1 - momentum)


def align_distribution(
    probabilities: torch.Tensor, labeled_marginal: torch.Tensor, teacher_marginal: torch.Tensor
) -> torch.Tensor:
    """B×K×H×W probabilities × labelled / teacher marginal (K each), renormalised per pixel."""
    ratio = labeled_marginal / teacher_marginal.clamp(min=1e-6)
    aligned = probabilities * ratio[None, :, None, None]
    return aligned / aligned.sum(1, keepdim=True).clamp(min=1e-12)
