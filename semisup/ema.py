"""The EMA teacher: an exponential moving average of the student's parameters and buffers."""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_ema_teacher(student: nn.Module) -> nn.Module:
    """A frozen copy of ``student`` to be updated by ``ema_update``."""
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher ← momentum · teacher + (1 − momentum) · student, for parameters *and* buffers.

    Floating-point buffers (e.g. BatchNorm running statistics) are averaged like parameters;
    integer buffers (e.g. ``num_batches_tracked``) are copied. Parameters the student does not
    train (a frozen encoder) are skipped: they are equal already, and averaging equal values
    would only add rounding drift. ``momentum`` in [0, 1]; 0.999 is the Mean Teacher / UniMatch
    default.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    trained = {name: p for name, p in student.named_parameters() if p.requires_grad}
    student_state = trained | dict(student.named_buffers())
    for name, value in list(teacher.named_parameters()) + list(teacher.named_buffers()):
        if name not in student_state:
            continue
        source = student_state[name].detach()
        if value.dtype.is_floating_point:
            value.mul_(momentum).add_(source.to(value.dtype), alpha=1.0 - momentum)
        else:
            value.copy_(source)
