"""Normalisation layers and where they sit around a residual branch.

* ``build_norm(cfg, dim)``: ``cfg.norm`` in :data:`NORMS` (``layernorm``: ``nn.LayerNorm`` with a
  bias iff ``cfg.bias``; ``rmsnorm``: ``nn.RMSNorm``, Zhang & Sennrich 2019), eps ``cfg.norm_eps``.
* ``RESIDUALS[cfg.norm_placement]``: how a block applies ``norm`` and a branch ``fn``:
  ``pre`` (GPT-2, Llama: ``x + fn(norm(x))``), ``post`` (Vaswani et al. 2017:
  ``norm(x + fn(x))``) or ``sandwich`` (``x + post(fn(norm(x)))``: a pre-norm residual whose branch
  also ends in a norm; Sandwich-LN of CogView, Ding et al. 2021, arXiv:2105.13290; Gemma 2's
  ``post_attention_layernorm`` / ``post_feedforward_layernorm``; Huginn's blocks). The block
  builds the branch's output norm with ``build_post_norm(cfg)`` (None unless sandwich) and passes
  ``fn`` already followed by it, so ``sandwich`` is :func:`pre_norm` on that branch.
* ``build_final_norm(cfg)``: the norm before the LM head; pre-norm and sandwich stacks need it,
  post-norm stacks already end in a norm, so it is ``nn.Identity``.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

#: norm name -> builder ``(dim, cfg) -> nn.Module`` acting over the last dim
NORMS: Dict[str, Callable[[int, object], nn.Module]] = {
    "layernorm": lambda dim, cfg: nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias),
    "rmsnorm": lambda dim, cfg: nn.RMSNorm(dim, eps=cfg.norm_eps),
}


def build_norm(cfg, dim: Optional[int] = None) -> nn.Module:
    """The norm named by ``cfg.norm`` over the last dim ``dim`` (default ``cfg.n_embd``).

    Raises:
        ValueError: unknown norm name.
    """
    if cfg.norm not in NORMS:
        raise ValueError(f"unknown norm {cfg.norm!r}; known: {', '.join(NORMS)}")
    return NORMS[cfg.norm](dim or cfg.n_embd, cfg)


def pre_norm(x: torch.Tensor, norm: nn.Module, fn: Callable, drop: nn.Module) -> torch.Tensor:
    """``x + drop(fn(norm(x)))``: the residual stream itself is never normalised."""
    return x + drop(fn(norm(x)))


def post_norm(x: torch.Tensor, norm: nn.Module, fn: Callable, drop: nn.Module) -> torch.Tensor:
    """``norm(x + drop(fn(x)))``: the original Transformer's placement."""
    return norm(x + drop(fn(x)))


#: placement name -> ``(x, norm, fn, drop) -> x`` (sandwich: ``fn`` already ends in its post norm)
RESIDUALS: Dict[str, Callable[..., torch.Tensor]] = {"pre": pre_norm, "post": post_norm, "sandwich": pre_norm}


def build_post_norm(cfg) -> Optional[nn.Module]:
    """The norm at the end of a residual branch: ``build_norm(cfg)`` for ``norm_placement``
    ``sandwich``, else None (no such norm)."""
    return build_norm(cfg) if cfg.norm_placement == "sandwich" else None


def build_final_norm(cfg) -> nn.Module:
    """Norm applied to the last hidden state: ``build_norm(cfg)`` for pre-norm and sandwich
    stacks (their residual stream is never normalised), identity for post-norm."""
    return build_norm(cfg) if cfg.norm_placement in ("pre", "sandwich") else nn.Identity()
