"""Position information: 1-D schemes for token sequences, 2-D sin-cos tables for image patches.

Every scheme is a :class:`Position` module with the same three hooks, so the model never branches
on the scheme name:

* :meth:`Position.embed` adds an absolute embedding to the token embeddings (learned, sinusoidal);
* :meth:`Position.rope` returns the ``(cos, sin)`` tables that attention applies to q and k (rope);
* :meth:`Position.attn_bias` returns an additive attention bias (alibi).

The hooks a scheme does not use are identities / ``None``. Select a scheme with
``build_position(cfg)``, where ``cfg.position`` is one of :data:`POSITIONS`, or a list of them
applied together (:class:`CombinedPosition`, e.g. ``[learned, rope]``: the absolute embedding at the
input and RoPE on q/k; :func:`~megaray.models.common.position_spec.check_positions` says which
lists are valid).

For a grid of image patches (ViT / MAE / DiT), :func:`sincos_2d` gives the fixed 2-D table
that DiT adds to its patch embeddings, and :func:`rope_2d` axial rotary tables for
:func:`apply_rope`.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from megaray.models.common.position_spec import check_positions, position_names

RopeTables = Tuple[torch.Tensor, torch.Tensor]


class Position(nn.Module):
    """No position information (``"none"``): the causal mask alone breaks permutation symmetry.

    Positions ``pos`` are absolute int64 indices ``(T,)``; with a KV cache the new tokens start at
    the cache length, so every hook sees the true position of every token.
    """

    def embed(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """``(B, T, C)`` token embeddings, ``(T,)`` positions -> ``(B, T, C)``."""
        return x

    def rope(self, pos: torch.Tensor) -> Optional[RopeTables]:
        """``(T,)`` positions -> ``(cos, sin)`` each ``(T, d_rot)`` float32, or ``None``."""
        return None

    def attn_bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> Optional[torch.Tensor]:
        """``(Tq,)``, ``(Tk,)`` positions -> additive bias ``(nh, Tq, Tk)`` float32, or ``None``."""
        return None


class LearnedPosition(Position):
    """Learned absolute embeddings ``wpe`` (GPT-2, Radford et al. 2019), ``block_size`` rows.

    Raises:
        ValueError: a position ``>= block_size`` (the table has no row for it).
    """

    def __init__(self, block_size: int, n_embd: int):
        super().__init__()
        self.block_size = block_size
        self.wpe = nn.Embedding(block_size, n_embd)

    def embed(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if pos.numel() and int(pos[-1]) >= self.block_size:
            raise ValueError(
                f"learned positions cover 0..{self.block_size - 1}, got position {int(pos[-1])}: "
                "crop the sequence to block_size"
            )
        return x + self.wpe(pos)  # (B, T, C) + (T, C)


class SinusoidalPosition(Position):
    """Fixed sinusoids of Vaswani et al. 2017 §3.5: ``PE[p, 2i] = sin(p / 10000^(2i/d))``,
    ``PE[p, 2i+1] = cos(p / 10000^(2i/d))``. Computed on the fly, so any length works."""

    def __init__(self, n_embd: int, base: float = 10000.0):
        super().__init__()
        self.n_embd, self.base = n_embd, base

    def embed(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        i2 = torch.arange(0, self.n_embd, 2, dtype=torch.float32, device=pos.device)
        angle = pos.float()[:, None] * torch.exp(i2 * (-math.log(self.base) / self.n_embd))[None, :]  # (T, C/2)
        pe = torch.zeros(pos.numel(), self.n_embd, device=x.device, dtype=torch.float32)
        pe[:, 0::2] = torch.sin(angle)
        pe[:, 1::2] = torch.cos(angle[:, : self.n_embd // 2])
        return x + pe.to(x.dtype)


class RotaryPosition(Position):
    """Rotary embeddings (RoFormer, Su et al. 2021) in the half-split ("rotate_half") layout of
    GPT-NeoX / HF Llama: dimension ``i`` pairs with ``i + d/2``, so HF Llama q/k weights copy
    without permutation. ``inv_freq[i] = theta^(-2i/d)``; tables are ``cat(freqs, freqs)``.

    Args:
        dim: rotated dims per head (``head_dim``; MLA: ``qk_rope_head_dim``), even.
        theta: base ``rope_theta``.
    """

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"rope needs an even dimension, got {dim}")
        self.dim, self.theta = dim, theta

    def rope(self, pos: torch.Tensor) -> RopeTables:
        # computed per call in float32 (cheap), so casting the model to bf16 cannot degrade it
        inv_freq = 1.0 / (
            self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.float32, device=pos.device) / self.dim)
        )
        freqs = pos.float()[:, None] * inv_freq[None, :]  # (T, d/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, d)
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dim (halves), as HF Llama's ``rotate_half``."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, tables: Optional[RopeTables]) -> torch.Tensor:
    """Rotate ``x (B, h, T, d)`` by ``tables = (cos, sin)`` each ``(T, d)``; identity for ``None``.

    Computed in float32 and cast back to ``x.dtype``.
    """
    if tables is None:
        return x
    cos, sin = tables
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def alibi_slopes(n_head: int) -> torch.Tensor:
    """Per-head ALiBi slopes ``(n_head,)`` (Press et al. 2022 §3; same values as HF bloom's
    ``build_alibi_tensor``): the geometric sequence ``2^(-8/n), 2^(-16/n), ...`` for ``n`` the
    largest power of two ``<= n_head``, then every other slope of the ``2n`` sequence."""
    closest = 2 ** math.floor(math.log2(n_head))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = base ** torch.arange(1, closest + 1, dtype=torch.float32)
    if closest != n_head:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        n_extra = min(closest, n_head - closest)
        extra = extra_base ** torch.arange(1, 1 + 2 * n_extra, 2, dtype=torch.float32)
        slopes = torch.cat([slopes, extra])
    return slopes


class ALiBiPosition(Position):
    """Attention with Linear Biases (Press et al. 2022): ``bias[h, i, j] = m_h * (j - i)``, i.e.
    ``-m_h`` times the distance from query ``i`` back to key ``j`` (0 on the diagonal). Future keys
    get positive values here; the causal mask removes them."""

    def __init__(self, n_head: int):
        super().__init__()
        self.n_head = n_head

    def attn_bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        rel = (k_pos[None, :] - q_pos[:, None]).float()  # (Tq, Tk)
        return alibi_slopes(self.n_head).to(rel.device)[:, None, None] * rel[None]  # (nh, Tq, Tk)


def _rope_dim(cfg) -> int:
    return cfg.qk_rope_head_dim if cfg.attention == "mla" else cfg.head_dim


#: scheme name -> builder ``(cfg) -> Position``
POSITIONS: Dict[str, Callable[..., Position]] = {
    "none": lambda cfg: Position(),
    "learned": lambda cfg: LearnedPosition(cfg.block_size, cfg.n_embd),
    "sinusoidal": lambda cfg: SinusoidalPosition(cfg.n_embd),
    "rope": lambda cfg: RotaryPosition(_rope_dim(cfg), cfg.rope_theta),
    "alibi": lambda cfg: ALiBiPosition(cfg.n_head),
}


class CombinedPosition(Position):
    """Several schemes applied together (``cfg.position`` a list): every scheme's :meth:`embed` in
    list order (at most one is absolute, so the order does not change the result), the RoPE tables
    of the ``rope`` member and the ALiBi bias of the ``alibi`` member. Members live in
    :attr:`schemes` (an ``nn.ModuleDict`` by name: a learned table is ``schemes.learned.wpe``).

    Raises:
        ValueError: an invalid list (see :func:`~megaray.models.common.position_spec.check_positions`).
    """

    def __init__(self, names: Sequence[str], cfg):
        super().__init__()
        check_positions(names)
        self.schemes = nn.ModuleDict({n: POSITIONS[n](cfg) for n in names})

    def embed(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        for scheme in self.schemes.values():
            x = scheme.embed(x, pos)
        return x

    def rope(self, pos: torch.Tensor) -> Optional[RopeTables]:
        return self.schemes["rope"].rope(pos) if "rope" in self.schemes else None

    def attn_bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> Optional[torch.Tensor]:
        return self.schemes["alibi"].attn_bias(q_pos, k_pos) if "alibi" in self.schemes else None


def build_position(cfg) -> Position:
    """The :class:`Position` named by ``cfg.position`` (a key of :data:`POSITIONS`), or a
    :class:`CombinedPosition` when it is a list of several names (a one-name list is that scheme).

    Raises:
        ValueError: unknown scheme name, or an invalid list (see
            :func:`~megaray.models.common.position_spec.check_positions`).
    """
    names = position_names(cfg.position)
    if len(names) != 1:
        return CombinedPosition(names, cfg)
    if names[0] not in POSITIONS:
        raise ValueError(f"unknown position {names[0]!r}; known: {', '.join(POSITIONS)}")
    return POSITIONS[names[0]](cfg)


# ----------------------------------------------------------------------------- 2-D (image patches)


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """MAE's 1-D table: positions ``(N,)`` -> ``(N, dim)`` float32, ``[sin(p * w), cos(p * w)]``
    with ``w[i] = 10000^(-i / (dim/2))``, ``i < dim/2`` (sines first, not interleaved).

    Raises:
        ValueError: odd ``dim``.
    """
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dim, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))  # (dim/2,)
    out = pos.to(torch.float64).reshape(-1)[:, None] * omega[None]  # (N, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1).float()


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D sin-cos table of a ``grid_h x grid_w`` patch grid -> ``(grid_h * grid_w, dim)``.

    Row-major over patches (patch ``(r, c)`` is row ``r * grid_w + c``, the order of
    ``x.flatten(2).transpose(1, 2)`` after a patch-embedding conv). The first ``dim/2`` columns
    encode the column index ``c``, the last ``dim/2`` the row index ``r``, each with
    :func:`sincos_1d`: this is ``get_2d_sincos_pos_embed`` of MAE (He et al. 2022,
    github.com/facebookresearch/mae ``util/pos_embed.py``), which DiT (Peebles & Xie 2023) uses.
    Computed in float64, returned float32.

    Raises:
        ValueError: ``dim`` not a multiple of 4.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs dim divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")  # (H, W) each
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)  # (H*W, dim)


def rope_2d(dim: int, grid_h: int, grid_w: int, theta: float = 10000.0) -> RopeTables:
    """Axial 2-D rotary tables for a row-major ``grid_h x grid_w`` patch grid: ``(cos, sin)``
    each ``(grid_h * grid_w, dim)`` float32, to use with :func:`apply_rope` (head dim ``dim``).

    :func:`apply_rope` rotates pairs ``(i, i + dim/2)``; here the first ``dim/4`` pairs turn with
    the column index and the last ``dim/4`` with the row index, each axis with the 1-D
    frequencies ``theta^(-2k / (dim/2))`` (axial RoPE, Heo et al. 2024, arXiv:2403.13298), so a
    query-key score depends only on the row and column offsets between two patches.

    Raises:
        ValueError: ``dim`` not a multiple of 4.
    """
    if dim % 4:
        raise ValueError(f"2-D rope needs a head dim divisible by 4, got {dim}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim // 2, 2, dtype=torch.float32) / (dim // 2)))  # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")  # (H, W) each
    angles = torch.cat(
        [cols.reshape(-1, 1).float() * inv_freq, rows.reshape(-1, 1).float() * inv_freq], dim=1
    )  # (HW, dim/2)
    emb = torch.cat([angles, angles], dim=-1)  # (HW, dim)
    return emb.cos(), emb.sin()
