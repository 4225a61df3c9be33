"""Position-wise feed-forward networks, ``(B, T, C) -> (B, T, C)``.

``build_mlp(cfg)`` picks by ``cfg.mlp`` (a key of :data:`MLPS`):

* ``gelu`` / ``relu`` / ``silu``: ``c_proj(act(c_fc(x)))`` (GPT-2). GELU is the tanh
  approximation that GPT-2 was trained with (HF ``gelu_new``).
* ``swiglu`` / ``geglu``: gated, ``c_proj(act(c_gate(x)) * c_fc(x))`` (Shazeer 2020, "GLU Variants
  Improve Transformer"; Llama's SwiGLU is ``down(silu(gate(x)) * up(x))``).
* ``convmlp``: :class:`ConvMLP`, ``c_proj(gelu(causal_dwconv(c_fc(x))))``, a depthwise causal 1-D
  convolution of ``cfg.mlp_conv_kernel`` taps over time between the two projections (PVT v2's
  convolutional feed-forward, made causal as Primer's depthwise convolutions).
* ``shufflemlp``: :class:`ShuffleMLP`, ``c_proj(shuffle(gelu(c_fc(x))))`` with ``c_fc`` / ``c_proj``
  grouped linear layers of ``cfg.mlp_groups`` groups and ShuffleNet's channel shuffle between them.

The hidden width is ``cfg.hidden_dim`` (4*C, or 8/3*C rounded to 64 for gated MLPs, unless
``cfg.mlp_hidden`` is set). The output projection is named ``c_proj`` so that the model's GPT-2
init scales it as a residual projection. Every kind is causal: only :class:`ConvMLP` mixes
positions, and only with earlier ones.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

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
    "convmlp": gelu_tanh,
    "shufflemlp": gelu_tanh,
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


class ConvMLP(nn.Module):
    """MLP with a causal depthwise convolution over time between its projections:
    ``(B, T, dim) -> (B, T, dim)``, ``c_proj(act(conv(c_fc(x))))``.

    ``conv`` is a depthwise ``nn.Conv1d`` (one ``kernel_size``-tap filter per hidden channel),
    left-padded by ``kernel_size - 1`` so output ``t`` reads hidden states ``t - kernel_size + 1 .. t``
    only (causal; a test perturbs a later token). Source: the convolutional feed-forward of PVT v2
    (Wang et al. 2022, "PVT v2: Improved Baselines with Pyramid Vision Transformer",
    arXiv:2106.13797, section 3.3: ``fc1 -> 3x3 depthwise conv -> GELU -> fc2``; HF transformers'
    ``VanMlpLayer`` keeps that order), made 1-D and causal as the width-3 depthwise convolutions
    Primer adds after its q/k/v projections (So et al. 2021, arXiv:2109.08668, section 3).
    Deviation: the convolution starts as the identity (newest tap 1, the others and the bias 0),
    so at init the layer equals :class:`MLP`; PVT v2 draws it from ``N(0, 2 / fan_out)``.

    Decoding: ``forward(x, cache)`` with a :class:`~megaray.models.common.attention.KVCache` keeps
    the last ``kernel_size - 1`` hidden states in ``cache.conv_state`` ``(B, hidden, kernel_size - 1)``
    (zeros before the first token, as the padding), so a token-by-token forward equals the full one.
    Packed documents (``doc_ids``) are not separated: the first ``kernel_size - 1`` positions of a
    document read the end of the previous one.
    """

    #: :class:`~megaray.models.gpt.model.Block` passes this layer's cache to ``forward``
    uses_cache = True

    def __init__(self, dim: int, hidden: int, act: Callable, bias: bool = True, kernel_size: int = 3):
        super().__init__()
        self.act, self.kernel_size = act, kernel_size
        self.c_fc = nn.Linear(dim, hidden, bias=bias)
        self.conv = nn.Conv1d(hidden, hidden, kernel_size, groups=hidden, bias=bias)
        self.c_proj = nn.Linear(hidden, dim, bias=bias)
        with torch.no_grad():  # identity: the newest tap is 1
            self.conv.weight.zero_()
            self.conv.weight[:, :, -1] = 1.0
            if self.conv.bias is not None:
                self.conv.bias.zero_()

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        h = self.c_fc(x).transpose(1, 2)  # (B, H, T)
        k = self.kernel_size - 1
        prev: Optional[torch.Tensor] = getattr(cache, "conv_state", None)
        full = F.pad(h, (k, 0)) if prev is None else torch.cat([prev.to(h.dtype), h], dim=-1)  # (B, H, k + T)
        if cache is not None:
            cache.conv_state = full[..., full.size(-1) - k :].detach()  # (B, H, k)
        h = self.conv(full).transpose(1, 2)  # (B, T, H); the module call lets ZeRO-3 gather the weight
        return self.c_proj(self.act(h))


class GroupedLinear(nn.Module):
    """``groups`` independent linear maps over contiguous channel groups: ``(..., in) -> (..., out)``;
    group ``g`` maps channels ``[g*in/G, (g+1)*in/G)`` to ``[g*out/G, (g+1)*out/G)`` (a 1x1 grouped
    convolution, ``nn.Conv1d(in, out, 1, groups=G)``). ``weight`` is ``(G, out/G, in/G)``, drawn from
    N(0, 0.02) (GPT-2's init; the GPT's init leaves modules other than ``nn.Linear`` alone), bias 0.

    Raises:
        ValueError: ``in`` or ``out`` not divisible by ``groups``.
    """

    def __init__(self, in_features: int, out_features: int, groups: int, bias: bool = True):
        super().__init__()
        if in_features % groups or out_features % groups:
            raise ValueError(
                f"grouped linear {in_features} -> {out_features}: both must be divisible by groups ({groups})"
            )
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(groups, out_features // groups, in_features // groups))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.normal_(self.weight, mean=0.0, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xg = x.unflatten(-1, (self.groups, -1))  # (..., G, in/G)
        y = torch.einsum("...gi,goi->...go", xg, self.weight).flatten(-2)  # (..., out)
        return y if self.bias is None else y + self.bias


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's channel shuffle over the last dim (Zhang et al. 2018, "ShuffleNet: An Extremely
    Efficient Convolutional Neural Network for Mobile Devices", section 3.1): view the ``C`` channels
    as ``(groups, C/groups)``, transpose, flatten, so each group of the next grouped layer receives
    channels from every group of the previous one. ``(..., C) -> (..., C)``."""
    return x.unflatten(-1, (groups, -1)).transpose(-1, -2).flatten(-2)


class ShuffleMLP(nn.Module):
    """Grouped MLP with a channel shuffle: ``(..., dim) -> (..., dim)``,
    ``c_proj(channel_shuffle(act(c_fc(x)), groups))`` with ``c_fc``, ``c_proj``
    :class:`GroupedLinear` layers of ``groups`` groups (ShuffleNet's grouped 1x1 convolutions and
    shuffle, Zhang et al. 2018, applied to the transformer feed-forward). Parameters and FLOPs are
    ``1/groups`` of :class:`MLP`'s; position-wise, so causal."""

    def __init__(self, dim: int, hidden: int, act: Callable, bias: bool = True, groups: int = 4):
        super().__init__()
        self.act, self.groups = act, groups
        self.c_fc = GroupedLinear(dim, hidden, groups, bias=bias)
        self.c_proj = GroupedLinear(hidden, dim, groups, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(channel_shuffle(self.act(self.c_fc(x)), self.groups))


#: MLP name -> module class; the activation comes from :data:`ACTIVATIONS`
MLPS: Dict[str, type] = {
    "gelu": MLP,
    "relu": MLP,
    "silu": MLP,
    "swiglu": GatedMLP,
    "geglu": GatedMLP,
    "convmlp": ConvMLP,
    "shufflemlp": ShuffleMLP,
}

#: MLP name -> {constructor argument: config field} for the kinds with options
MLP_OPTIONS: Dict[str, Dict[str, str]] = {
    "convmlp": {"kernel_size": "mlp_conv_kernel"},
    "shufflemlp": {"groups": "mlp_groups"},
}


def build_mlp(cfg) -> nn.Module:
    """The dense MLP named by ``cfg.mlp``, width ``cfg.n_embd -> cfg.hidden_dim -> cfg.n_embd``
    (``convmlp`` also reads ``cfg.mlp_conv_kernel``, ``shufflemlp`` ``cfg.mlp_groups``).

    Raises:
        ValueError: unknown MLP name; shufflemlp widths not divisible by ``mlp_groups``.
    """
    if cfg.mlp not in MLPS:
        raise ValueError(f"unknown mlp {cfg.mlp!r}; known: {', '.join(MLPS)}")
    options = {arg: getattr(cfg, field) for arg, field in MLP_OPTIONS.get(cfg.mlp, {}).items()}
    return MLPS[cfg.mlp](cfg.n_embd, cfg.hidden_dim, ACTIVATIONS[cfg.mlp], bias=cfg.bias, **options)
