"""2-D convolutional building blocks of latent-diffusion autoencoders and U-Nets.

Sources: the DDPM / latent-diffusion autoencoder (Rombach et al. 2022, arXiv:2112.10752;
github.com/CompVis/latent-diffusion ``ldm/modules/diffusionmodules/model.py``: ``ResnetBlock``,
``Downsample``, ``Upsample``), whose layout ``diffusers`` keeps in ``ResnetBlock2D``,
``Downsample2D`` and ``Upsample2D``. All layers are channels-first ``(B, C, H, W)``; ``H`` and
``W`` may be any 2-D grid (an image, or mel bands x frames).
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from megaray.models.common.conditioning import FiLM

Factor = Union[int, Tuple[int, int]]


def group_norm(channels: int, groups: int = 32, eps: float = 1e-6) -> nn.GroupNorm:
    """``GroupNorm`` with ``gcd(channels, groups)`` groups (so any width works; LDM uses 32)."""
    return nn.GroupNorm(math.gcd(channels, groups), channels, eps=eps)


class ResnetBlock2d(nn.Module):
    """LDM ``ResnetBlock``: ``x (B, Cin, H, W)`` [, ``emb (B, emb_dim)``] -> ``(B, Cout, H, W)``::

        h = conv1(silu(norm1(x)))                          # 3x3
        emb_mode "add":  h = h + emb_proj(act(emb))[..., None, None]   (DDPM / LDM time embedding)
        h = norm2(h)
        emb_mode "film": h = film(h, act(emb))             (scale-shift; diffusers "scale_shift")
        h = conv2(dropout(silu(h)))                        # 3x3
        return skip(x) + h                                 # skip: 1x1 conv when Cin != Cout

    Args:
        cin, cout: channels in / out.
        emb_dim: width of the conditioning vector (a timestep or speaker embedding); 0 = none.
        emb_mode: ``"add"`` (a bias per channel) or ``"film"`` (:class:`FiLM`, zero-initialised).
        emb_act: apply SiLU to ``emb`` before projecting it (LDM and diffusers do).
        groups, eps: GroupNorm groups (``gcd`` with the width) and epsilon. With ``"add"`` keep
            several channels per group: a per-channel bias is removed again by ``norm2`` when
            every channel is its own group (tested).
        dropout: before ``conv2``.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        emb_dim: int = 0,
        emb_mode: Literal["add", "film"] = "add",
        emb_act: bool = True,
        groups: int = 32,
        eps: float = 1e-6,
        dropout: float = 0.0,
    ):
        super().__init__()
        if emb_mode not in ("add", "film"):
            raise ValueError(f"emb_mode must be 'add' or 'film', got {emb_mode!r}")
        self.emb_mode, self.emb_act = emb_mode, emb_act
        self.norm1, self.conv1 = group_norm(cin, groups, eps), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = group_norm(cout, groups, eps), nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.emb_proj = nn.Linear(emb_dim, cout) if emb_dim and emb_mode == "add" else None
        self.film = FiLM(emb_dim, cout) if emb_dim and emb_mode == "film" else None

    def forward(self, x: torch.Tensor, emb: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, Cout, H, W)
        if emb is not None and self.emb_act:
            emb = F.silu(emb)
        if self.emb_proj is not None:
            h = h + self.emb_proj(emb)[:, :, None, None]
        h = self.norm2(h)
        if self.film is not None:
            h = self.film(h, emb)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Downsample2d(nn.Conv2d):
    """Strided 3x3 conv: ``(B, C, H, W) -> (B, C, H / fh, W / fw)`` for ``factor = (fh, fw)``.

    ``padding="asymmetric"`` pads one zero row/column at the bottom/right only and convolves
    without padding (LDM ``Downsample``, ``diffusers.Downsample2D``); ``"symmetric"`` uses
    ``padding=1``. Both divide even sizes exactly; they differ by a half-pixel
    shift. The module is the conv itself (parameters ``weight``, ``bias``).

    A stride ``s > 2`` along an axis (symmetric padding only) uses a kernel of ``s + 2`` there, so
    windows overlap by one frame on each side and every input frame is seen; a size divisible by
    ``s`` maps to exactly ``size / s``. Strides 1 and 2 keep the 3x3 kernel.
    """

    def __init__(self, channels: int, factor: Factor = 2, padding: Literal["asymmetric", "symmetric"] = "asymmetric"):
        if padding not in ("asymmetric", "symmetric"):
            raise ValueError(f"padding must be 'asymmetric' or 'symmetric', got {padding!r}")
        stride = (factor, factor) if isinstance(factor, int) else tuple(factor)
        kernel = tuple(s + 2 if s > 2 else 3 for s in stride)
        if padding == "asymmetric" and kernel != (3, 3):
            raise ValueError(f"asymmetric padding supports strides of 1 or 2, got {stride}")
        super().__init__(channels, channels, kernel, stride=stride, padding=0 if padding == "asymmetric" else 1)
        self.asymmetric = padding == "asymmetric"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric:
            x = F.pad(x, (0, 1, 0, 1))  # (left, right, top, bottom)
        return super().forward(x)


class Upsample2d(nn.Conv2d):
    """Nearest-neighbour upsampling by ``factor = (fh, fw)`` then a 3x3 conv (LDM ``Upsample``):
    ``(B, C, H, W) -> (B, C, H * fh, W * fw)``. The module is the conv itself."""

    def __init__(self, channels: int, factor: Factor = 2):
        super().__init__(channels, channels, 3, padding=1)
        self.factor = (factor, factor) if isinstance(factor, int) else tuple(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.interpolate(x, scale_factor=self.factor, mode="nearest"))
