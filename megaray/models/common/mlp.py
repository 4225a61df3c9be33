"""Position-wise feed-forward networks, ``(B, T, C) -> (B, T, C)``.

``build_mlp(cfg)`` picks by ``cfg.mlp`` (a key of :data:`MLPS`):

* ``gelu`` / ``relu`` / ``silu``: ``c_proj(act(c_fc(x)))`` (GPT-2). GELU is the tanh
  approximation that GPT-2 was trained with (HF ``gelu_new``).
* ``swiglu`` / ``geglu``: gated, ``c_proj(act(c_gate(x)) * c_fc(x))`` (Shazeer 2020, "GLU Variants
  Improve Transformer"; Llama's SwiGLU is ``down(silu(gate(x)) * up(x))``).

The hidden width is ``cfg.hidden_dim`` (4*C, or 8/3*C rounded to 64 for gated MLPs, unless
``cfg.mlp_hidden`` is set). The output projection is named ``c_proj`` so that the model's GPT-2
init scales it as a residual projection.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn as nn
import torch.nn.functional as F


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation (Hendrycks & Gimpel 2016; GPT-2's and HF's ``gelu_new``)."""
    return F.gelu(x, approximate="tanh")


#: activation name used by each MLP kind
ACTIVATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": gelu_tanh,
    "relu": F.relu,
    "silu": F.silu,
    "swiglu": F.silu,
    "geglu": gelu_tanh,
}


class MLP(nn.Module):
    """Two-layer MLP ``c_proj(act(c_fc(x)))``: ``(..., dim) -> (..., dim)``."""

    def __init__(self, dim: int, hidden: int, act: Callable, bias: bool = True):
        super().__init__()
        self.act = act
        self.c_fc = nn.Linear(dim, hidden, bias=bias)
        self.c_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GatedMLP(nn.Module):
    """Gated linear unit MLP ``c_proj(act(c_gate(x)) * c_fc(x))``: ``(..., dim) -> (..., dim)``."""

    def __init__(self, dim: int, hidden: int, act: Callable, bias: bool = False):
        super().__init__()
        self.act = act
        self.c_gate = nn.Linear(dim, hidden, bias=bias)
        self.c_fc = nn.Linear(dim, hidden, bias=bias)
        self.c_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_gate(x)) * self.c_fc(x))


#: MLP name -> module class; the activation comes from :data:`ACTIVATIONS`
MLPS: Dict[str, type] = {"gelu": MLP, "relu": MLP, "silu": MLP, "swiglu": GatedMLP, "geglu": GatedMLP}


def build_mlp(cfg) -> nn.Module:
    """The dense MLP named by ``cfg.mlp``, width ``cfg.n_embd -> cfg.hidden_dim -> cfg.n_embd``.

    Raises:
        ValueError: unknown MLP name.
    """
    if cfg.mlp not in MLPS:
        raise ValueError(f"unknown mlp {cfg.mlp!r}; known: {', '.join(MLPS)}")
    return MLPS[cfg.mlp](cfg.n_embd, cfg.hidden_dim, ACTIVATIONS[cfg.mlp], bias=cfg.bias)
