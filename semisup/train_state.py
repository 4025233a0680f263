"""What a training checkpoint holds, and how it is written and read back (Ray-free).

A checkpoint holds everything that decides the future of a run, so a resumed run takes the same
steps an uninterrupted one takes:

- ``model``: the student's trainable weights (adapter, decoder, head; the whole model in
  ``full`` mode). The frozen base is rebuilt from its checkpoint or from the run's seed. The
  detection student keeps its whole state dict (``Trainables.weights_of``): its batch norms'
  running statistics move while it trains;
- ``optimizer``: the optimiser's state (AdamW moments, or SGD momentum);
- ``teacher``: the EMA teacher's trainable weights, when the run has one;
- ``ssl``: state of the consistency term that evolves with training (adaptive thresholds,
  class statistics), as named tensors; empty while the configured method keeps none;
- ``rng``: torch's generators (CPU, and CUDA where used);
- ``progress``: the ``TrainState`` below as JSON: step, epoch, early-stopping counters, the
  history and the running sums of the current epoch;
- ``data``: the position of each training split in its seeded order, for logs and for a check
  on resume (the order itself is a function of the run's seed and the step: ``semisup.sampling``).

The learning-rate schedule is a function of the step, so the step restores it. Reading back is
strict: a key missing from the file or from the model, or one the file has that the run does
not expect, is an error that names it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from semisup.sampling import DataPosition

STATE_FILE = "state.pt"
CHECKPOINT_FORMAT = 2  # 1: weights, optimiser and progress only (before exact resumption)
CHECKPOINT_KEYS = frozenset(
    {"format", "model", "optimizer", "teacher", "ssl", "rng", "progress", "data"}
)


class CheckpointError(ValueError):
    """A checkpoint that does not fit the run restoring it."""


@dataclass
class TrainState:
    """The progress of a run, checkpointed with its weights."""

    step: int = 0  # optimiser steps taken (global: every worker takes each step)
    epoch: int = 0  # epochs completed
    # the validation score (mIoU of segmentation, box AP of detection) of the best trained
    # epoch, and its epoch
    best_score: float = -1.0
    best_epoch: int = -1
    initial: dict[str, Any] | None = None  # validation metrics before the first step
    reference_score: float = -1.0  # best of the initial and every epoch's score: to improve on
    stale_epochs: int = 0  # epochs in a row that did not improve on reference_score
    stopped_early: bool = False
    resumed_at: list[int] = field(default_factory=list)  # steps this run was restored at
    history: list[dict[str, Any]] = field(default_factory=list)  # validation metrics per epoch
    epoch_sums: dict[str, float] = field(default_factory=dict)  # loss parts summed this epoch
    epoch_steps: int = 0  # steps taken this epoch
    step_seconds: list[float] = field(default_factory=list)  # this epoch's step times

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        saved = json.loads(text)
        for old, new in _RENAMED.items():  # checkpoints written while only mIoU was scored
            if old in saved:
                saved[new] = saved.pop(old)
        return cls(**saved)


_RENAMED = {"best_miou": "best_score", "reference_miou": "reference_score"}


@dataclass
class Trainables:
    """The objects a checkpoint restores in place."""

    model: nn.Module  # the student (unwrapped from DDP)
    optimizer: torch.optim.Optimizer
    teacher: nn.Module | None = None  # the EMA teacher
    ssl_state: dict[str, torch.Tensor] = field(default_factory=dict)
    # the weights a checkpoint holds of the model (and of its teacher, by the same names);
    # None: its trainable parameters (``trainable_state``)
    weights_of: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None

    def weights(self) -> dict[str, torch.Tensor]:
        return (self.weights_of or trainable_state)(self.model)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters of ``model`` by name (what an adapter holds), on the CPU."""
    from semisup.student import adapter_state_dict

    return adapter_state_dict(model)  # type: ignore[arg-type]


def _teacher_state(teacher: nn.Module, keys: set[str]) -> dict[str, torch.Tensor]:
    """The EMA teacher's values of the student's trainable weights ``keys`` (its frozen rest
    equals the student's base)."""
    state = teacher.state_dict()
    return {name: state[name].detach().cpu().contiguous() for name in sorted(keys)}


def rng_state() -> dict[str, torch.Tensor]:
    """The CPU (and, once initialised, CUDA) random-number states of torch."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(
    folder: Path,
    state: TrainState,
    trainables: Trainables,
    positions: dict[str, DataPosition],
) -> Path:
    """Write ``folder/state.pt``; returns its path."""
    weights = trainables.weights()
    saved = {
        "format": CHECKPOINT_FORMAT,
        "model": weights,
        "optimizer": trainables.optimizer.state_dict(),
        "teacher": (
            None if trainables.teacher is None else _teacher_state(trainables.teacher, set(weights))
        ),
        "ssl": {name: value.detach().cpu() for name, value in trainables.ssl_state.items()},
        "rng": rng_state(),
        "progress": state.to_json(),
        "data": json.dumps({name: asdict(where) for name, where in positions.items()}),
    }
    path = folder / STATE_FILE
    torch.save(saved, path)
    return path


def load_checkpoint(
    folder: Path,
    trainables: Trainables,
    positions: Callable[[int], dict[str, DataPosition]],
) -> TrainState:
    """Restore ``trainables`` (in place) and the RNG from ``folder/state.pt``; returns the state.

    ``positions(step)``: where each training split stands at ``step``, as the run recomputes it
    from its seed; at the saved step it must equal the saved position.

    Raises:
        CheckpointError: a key is missing or unexpected, a shape differs, or the data position
            does not match; the message names it.
    """
    path = folder / STATE_FILE
    saved = torch.load(path, map_location="cpu", weights_only=True)
    _check_keys(path, "checkpoint", set(saved), set(CHECKPOINT_KEYS))
    if saved["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: checkpoint format {saved['format']}, expected {CHECKPOINT_FORMAT}"
        )
    expected = trainables.weights()
    _load_exact(path, "model", trainables.model, saved["model"], expected)
    if (saved["teacher"] is None) != (trainables.teacher is None):
        has = "has no" if saved["teacher"] is None else "has an"
        raise CheckpointError(
            f"{path}: the checkpoint {has} EMA teacher ('teacher'), the run "
            f"{'expects one' if trainables.teacher is not None else 'has none'} (ssl.target)"
        )
    if trainables.teacher is not None:
        _load_exact(path, "teacher", trainables.teacher, saved["teacher"], expected)
    _check_keys(path, "ssl", set(saved["ssl"]), set(trainables.ssl_state))
    for name, value in saved["ssl"].items():
        trainables.ssl_state[name].copy_(value)
    trainables.optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"]["torch"])
    if "cuda" in saved["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["rng"]["cuda"])
    state = TrainState.from_json(saved["progress"])
    recorded = {name: DataPosition(**where) for name, where in json.loads(saved["data"]).items()}
    if recorded != positions(state.step):
        raise CheckpointError(
            f"{path}: the saved data position {recorded} is not where step {state.step} of this "
            f"run's order stands ({positions(state.step)}); the splits, batch size or seed changed"
        )
    return state


def _check_keys(path: Path, what: str, found: set[str], expected: set[str]) -> None:
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing:
        raise CheckpointError(f"{path}: {what} key {missing[0]!r} is missing from the checkpoint")
    if unexpected:
        raise CheckpointError(
            f"{path}: unexpected {what} key {unexpected[0]!r} in the checkpoint (the run "
            "does not have it)"
        )


def _load_exact(
    path: Path,
    what: str,
    module: nn.Module,
    weights: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
) -> None:
    """Load ``weights`` into ``module``; they must be exactly its trainable ``expected`` keys."""
    _check_keys(path, what, set(weights), set(expected))
    for name, value in weights.items():
        if value.shape != expected[name].shape:
            raise CheckpointError(
                f"{path}: {what} key {name!r} has shape {tuple(value.shape)}, the run's "
                f"{tuple(expected[name].shape)}"
            )
    # strict=False only because the frozen base is not in the file; every key it does hold was
    # checked against the trainable weights above
    module.load_state_dict(weights, strict=False)
