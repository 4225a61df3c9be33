"""EMA of the model's weights (``train.ema_decay``): updated after every optimizer step, saved in
checkpoints, restored on resume, used for evaluation and sampling when on.

``ema = decay * ema + (1 - decay) * weights`` after each optimizer step (Polyak averaging as in
DiT / fast-DiT's ``update_ema``, which starts the copy from the initial weights). The copy is
kept in fp32 whatever the training precision: ``torch.optim.swa_utils.AveragedModel`` keeps the
model's dtype, and in bf16 an update of ``(1 - 0.9999) * delta`` is below the format's
resolution and is lost. Buffers (e.g. batch-norm statistics) are copied, not averaged.

Every rank keeps a full copy (data parallel ranks hold identical weights); ZeRO-3 partitions
the weights across ranks, so EMA is refused there (:func:`check_supported`).
"""

from __future__ import annotations

import copy
from typing import Any, Dict

import torch

from megaray.config import ConfigError, RunConfig


def check_supported(cfg: RunConfig) -> None:
    """Raise :class:`ConfigError` when ``train.ema_decay`` is set under ZeRO-3."""
    if cfg.train.ema_decay is not None and cfg.train.zero_stage == 3:
        raise ConfigError(
            "train.ema_decay: EMA needs the model's full weights on every rank after each step, but "
            "ZeRO stage 3 partitions them across ranks; use train.zero_stage <= 2 or unset train.ema_decay"
        )


class EMA:
    """An fp32 exponential moving average of ``module``'s parameters.

    Args:
        module: the trained network (the plain module, not its DeepSpeed engine).
        decay: ``train.ema_decay`` in (0, 1), e.g. 0.9999.
    """

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = float(decay)
        self.module = copy.deepcopy(module).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        """One EMA step towards ``module``'s current weights."""
        for e, p in zip(self.module.parameters(), module.parameters()):
            e.lerp_(p.detach().to(e.dtype), 1.0 - self.decay)
        for b_ema, b in zip(self.module.buffers(), module.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> Dict[str, Any]:
        return self.module.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.module.load_state_dict(state)
