"""Sums over data-parallel workers, for losses and statistics that must be global (Ray-free).

With N workers, DDP averages the gradients of N local losses. That equals the gradient of one
worker on the whole global batch only if each local loss is normalised by *global* counts (valid
pixels of every worker) and every per-class statistic is summed over workers first. A
``Collective`` does those sums; ``Collective()`` (one worker, no process group) leaves every
tensor as it is, so the same loss code runs in a notebook, in ``--debug`` and under DDP.

Tensors are reduced on their own device: under NCCL (workers with GPUs) a collective on a CPU
tensor fails, so callers keep statistics on the model's device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Collective:
    """Sums over ``world_size`` workers of the default process group (1: no communication)."""

    world_size: int = 1

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``tensor`` over workers (a new tensor, no gradient)."""
        total = tensor.detach().clone()
        if self.world_size > 1:
            dist.all_reduce(total)
        return total

    def global_sum(self, local: torch.Tensor) -> torch.Tensor:
        """Value: the sum of ``local`` over workers; gradient: that of this worker's term only.

        Scaling the final loss by ``world_size`` (``train_step`` does) then makes DDP's gradient
        average equal the gradient of the global loss.
        """
        if self.world_size == 1:
            return local
        return local + (self.sum(local) - local.detach())


LOCAL = Collective()  # one worker: every sum stays local


def current_collective() -> Collective:
    """The collective of the default process group, or the one-worker one without it."""
    if dist.is_available() and dist.is_initialized():
        return Collective(dist.get_world_size())
    return Collective()
