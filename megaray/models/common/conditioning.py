"""Conditioning a network on a vector (a speaker, a class, a diffusion timestep).

* :class:`FiLM`: feature-wise linear modulation (Perez et al. 2018, arXiv:1709.07871),
  ``h * (1 + gamma(c)) + beta(c)`` per channel, zero-initialised so it starts as the identity.
* :class:`AdaLNZero` and :func:`modulate`: DiT's adaptive layer norm with zero-initialised gates
  (Peebles & Xie 2023, arXiv:2212.09748, section 3.2; reference github.com/facebookresearch/DiT
  ``models.py``: ``adaLN_modulation = Sequential(SiLU(), Linear(hidden, 6 * hidden))``,
  ``modulate(x, shift, scale) = x * (1 + scale) + shift``). With the projection zero-initialised
  every gate is 0, so each residual block ``x + gate * f(modulate(norm(x), shift, scale))``
  starts as the identity.
* :func:`timestep_embedding` and :class:`TimestepEmbedder`: DiT's ``TimestepEmbedder`` (the
  sinusoidal features of DDPM / "Attention is all you need", cosines first, then an MLP). The
  features equal ``diffusers.models.embeddings.get_timestep_embedding(t, dim,
  flip_sin_to_cos=True, downscale_freq_shift=0)``.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn


class FiLM(nn.Linear):
    """``(h (B, C, *spatial), cond (B, cond_dim)) -> (B, C, *spatial)``: ``h * (1 + gamma) + beta``.

    The module *is* the ``Linear(cond_dim, 2 * C)`` that predicts ``(gamma, beta)`` (so its
    parameters are ``weight`` and ``bias``), zero-initialised: the modulation starts as the identity.
    Channels are dim 1 (convolutional layout); ``gamma``/``beta`` broadcast over the rest.
    """

    def __init__(self, cond_dim: int, channels: int):
        super().__init__(cond_dim, 2 * channels)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        params = super().forward(cond)  # (B, 2C)
        gamma, beta = params.view(*params.shape, *([1] * (h.dim() - 2))).chunk(2, dim=1)  # (B, C, 1, ...) each
        return h * (1 + gamma) + beta


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """DiT's ``x * (1 + scale) + shift`` for ``x (B, T, D)`` and ``shift``, ``scale`` ``(B, 1, D)``."""
    return x * (1 + scale) + shift


class AdaLNZero(nn.Module):
    """``cond (B, cond_dim) -> n_chunks`` tensors ``(B, 1, dim)``: DiT's ``adaLN_modulation``.

    ``SiLU -> Linear(cond_dim, n_chunks * dim)`` with weight and bias zero-initialised. A DiT
    block uses ``n_chunks = 6``: ``shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp,
    gate_mlp``; its final layer uses 2 (``shift, scale``). Pair it with a
    ``LayerNorm(dim, elementwise_affine=False, eps=1e-6)``, as DiT does.
    """

    def __init__(self, dim: int, cond_dim: int, n_chunks: int = 6):
        super().__init__()
        self.n_chunks = n_chunks
        self.proj = nn.Linear(cond_dim, n_chunks * dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, cond: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return self.proj(F.silu(cond)).unsqueeze(1).chunk(self.n_chunks, dim=-1)  # n x (B, 1, dim)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, freq_shift: float = 0.0) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps: ``(N,) -> (N, dim)`` float32.

    ``freqs[i] = max_period ** (-i / (half - freq_shift))`` for ``i < half = dim // 2``; the output
    is ``[cos(t * freqs), sin(t * freqs)]``, zero-padded by one column when ``dim`` is odd (DiT's
    ``TimestepEmbedder.timestep_embedding`` with ``freq_shift=0``; diffusers'
    ``DiTTransformer2DModel`` uses ``downscale_freq_shift=1``).
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    )
    args = t.float()[:, None] * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Timesteps ``(N,)`` -> ``(N, hidden)``: :func:`timestep_embedding` of ``freq_dim`` features,
    then ``Linear(freq_dim, hidden) -> SiLU -> Linear(hidden, hidden)`` (DiT; weights normal with
    std 0.02 as DiT's ``initialize_weights``, biases zero)."""

    def __init__(self, hidden: int, freq_dim: int = 256, max_period: float = 10000.0, freq_shift: float = 0.0):
        super().__init__()
        self.freq_dim, self.max_period, self.freq_shift = freq_dim, max_period, freq_shift
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        for layer in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.freq_dim, self.max_period, self.freq_shift)  # (N, freq_dim)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))
