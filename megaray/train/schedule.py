"""Learning-rate schedule: linear warmup then cosine decay to ``min_lr`` (nanoGPT's ``get_lr``).

Implemented as a ``torch.optim.lr_scheduler.LambdaLR`` that DeepSpeed steps once per optimizer
step and saves in its checkpoints. (DeepSpeed's ``WarmupCosineLR`` spends its first two steps
at lr 0, which matters on short runs.)
"""

from __future__ import annotations

import math
from typing import Callable

import torch


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based).

    ``(step+1)/warmup`` during warmup, then cosine from 1 to ``min_ratio`` at ``max_steps``,
    and ``min_ratio`` after it.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= max_steps:
        return min_ratio
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - min_ratio)


def warmup_cosine(
    warmup_steps: int, max_steps: int, min_ratio: float
) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LambdaLR]:
    """A factory ``optimizer -> LambdaLR`` as ``deepspeed.initialize(lr_scheduler=...)`` accepts."""

    def make(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup_steps, max_steps, min_ratio))

    return make
