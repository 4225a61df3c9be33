"""Grokfast EMA gradient filter (Lee et al. 2024, "Grokfast: Accelerated Grokking by Amplifying Slow
Gradients", arXiv:2405.20233, Algorithm 2 ``gradfilter_ema``).

Between backward and the optimizer step, every gradient ``g_t`` is replaced by
``g_t + lamb * mu_t`` with ``mu_t = alpha * mu_{t-1} + (1 - alpha) * g_t`` and ``mu_1 = g_1`` (the
reference code starts the EMA at the first gradient): the slow (low-frequency) component of the
gradient is amplified. ``train.grokfast: {alpha: 0.98, lamb: 2.0}`` turns it on (the paper's
defaults); null (default) leaves the step alone.

Under DeepSpeed the filter runs once per optimizer step, at the gradient-accumulation boundary,
on the gradient the optimizer will use (accumulated and averaged over data-parallel ranks), and
before DeepSpeed's gradient clipping. The gradients are read and written through DeepSpeed's
public ``deepspeed.utils.safe_get_full_grad`` / ``safe_set_full_grad``, which cover every place
DeepSpeed keeps them:

* ZeRO 0: ``param.grad``; with bf16, the fp32 accumulation buffer of the ``BF16_Optimizer``;
* ZeRO 1 and 2: ``stage_1_and_2.py`` has already reduced the gradients into its flat partitioned
  buffers (``averaged_gradients``) and released ``param.grad``; ``safe_get_full_grad`` assembles a
  parameter's full gradient with one all-reduce and ``safe_set_full_grad`` writes back this rank's
  partition. Cost: one all-reduce of the model's gradients per optimizer step, and a full fp32
  EMA copy of the parameters on every rank (not partitioned).
* ZeRO 3 is rejected by :class:`megaray.config.TrainConfig` (gathering every full gradient each
  step defeats ZeRO-3's partitioning; this path is untested).

The EMA is not saved in checkpoints: a resumed run restarts it from the next gradient.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch


class GrokfastEMA:
    """The EMA state ``mu`` per parameter name and the filter step.

    Args:
        alpha: EMA momentum in ``[0, 1)`` (paper: 0.98).
        lamb: amplification of the slow component (paper: 2.0).
    """

    def __init__(self, alpha: float = 0.98, lamb: float = 2.0):
        self.alpha, self.lamb = float(alpha), float(lamb)
        self.ema: Dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def filter(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """``grad + lamb * mu`` after updating ``mu`` (float32) with ``grad``; same shape and dtype."""
        g = grad.float()
        mu = self.ema.get(name)
        mu = g.clone() if mu is None else mu.mul_(self.alpha).add_(g, alpha=1 - self.alpha)
        self.ema[name] = mu
        return (g + self.lamb * mu).to(grad.dtype)

    @torch.no_grad()
    def apply(self, module: torch.nn.Module) -> None:
        """Filter the gradients of a plain module in place (``param.grad``; no DeepSpeed)."""
        for name, p in module.named_parameters():
            if p.grad is not None:
                p.grad.copy_(self.filter(name, p.grad))

    @torch.no_grad()
    def apply_deepspeed(self, engine: Any) -> None:
        """Filter the gradients held by a DeepSpeed engine (ZeRO 0-2) in place; call after
        ``engine.backward`` at the accumulation boundary, before ``engine.step``."""
        from deepspeed.utils import safe_get_full_grad, safe_set_full_grad

        for name, p in engine.module.named_parameters():
            if not p.requires_grad:
                continue
            grad: Optional[torch.Tensor] = safe_get_full_grad(p)
            if grad is not None:
                safe_set_full_grad(p, self.filter(name, grad))


def attach(engine: Any, alpha: float, lamb: float) -> GrokfastEMA:
    """Make ``engine.step()`` run the filter first at every accumulation boundary, so every task's
    ``train_step`` (``engine.backward`` then ``engine.step``) gets it unchanged. The filter is kept
    as ``engine.grokfast``. Returns it."""
    filt = GrokfastEMA(alpha, lamb)
    step = engine.step

    def step_with_grokfast(*args, **kwargs):
        if engine.is_gradient_accumulation_boundary():
            filt.apply_deepspeed(engine)
        return step(*args, **kwargs)

    engine.step = step_with_grokfast
    engine.grokfast = filt
    return filt
