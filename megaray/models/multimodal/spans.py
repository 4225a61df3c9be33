"""Continuous spans in a token sequence: patch layouts, placing a span's embeddings into the
sequence and reading its outputs back, and the per-modality adapter (patch in, patch out).

A span of ``N`` patches occupies positions ``[start, start + N)`` of a row; ``start = -1`` means
the row has no such span. Patch layouts:

* audio ``(B, n_mels, F)`` -> ``(B, F // p, n_mels * p)``: token ``i`` holds frames
  ``[i p, (i + 1) p)``, flattened mel-major (``m * p + j``);
* image ``(B, C, H, W)`` -> ``(B, (H // s) * (W // s), C * s * s)``: row-major patches (patch
  ``(r, c)`` is token ``r * W // s + c``, as ViT / DiT ``patchify``), each flattened ``(C, s, s)``.

A linear map of a flattened patch is a convolution with kernel = stride = patch (ViT's patch
embedding; for audio a strided ``Conv1d`` over frames). No wider kernel is used: a token must not
see frames of the next patch, or the regression head's next-patch prediction would leak.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn


def patchify_audio(mel: torch.Tensor, patch: int) -> torch.Tensor:
    """``(B, M, F)`` frames -> ``(B, F // patch, M * patch)`` patches (``F % patch == 0``)."""
    B, M, F = mel.shape
    return mel.reshape(B, M, F // patch, patch).permute(0, 2, 1, 3).reshape(B, F // patch, M * patch)


def unpatchify_audio(patches: torch.Tensor, n_mels: int) -> torch.Tensor:
    """Inverse of :func:`patchify_audio`: ``(B, N, M * p)`` -> ``(B, M, N * p)``."""
    B, N, D = patches.shape
    p = D // n_mels
    return patches.reshape(B, N, n_mels, p).permute(0, 2, 1, 3).reshape(B, n_mels, N * p)


def patchify_image(img: torch.Tensor, patch: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, (H // s) * (W // s), C * s * s)`` row-major patches, ``s = patch``."""
    B, C, H, W = img.shape
    x = img.reshape(B, C, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // patch) * (W // patch), C * patch * patch)


def unpatchify_image(patches: torch.Tensor, channels: int, patch: int, grid: int) -> torch.Tensor:
    """Inverse of :func:`patchify_image` for a square ``grid x grid`` of patches -> ``(B, C, H, W)``."""
    B = patches.shape[0]
    x = patches.reshape(B, grid, grid, channels, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, channels, grid * patch, grid * patch)


def span_index(start: torch.Tensor, n: int, T: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``start (B,)`` -> ``(inside (B, T) bool, offset (B, T) int64)``: whether position ``t`` lies
    in ``[start, start + n)`` (never for ``start < 0``) and ``t - start`` clamped to ``[0, n)``."""
    pos = torch.arange(T, device=start.device)[None, :]  # (1, T)
    rel = pos - start[:, None]  # (B, T)
    inside = (start[:, None] >= 0) & (rel >= 0) & (rel < n)
    return inside, rel.clamp(0, n - 1)


def place_span(x: torch.Tensor, content: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Put ``content (B, N, C)`` at positions ``[start, start + N)`` of ``x (B, T, C)`` (rows with
    ``start < 0`` unchanged); differentiable in both."""
    B, T, C = x.shape
    inside, rel = span_index(start, content.size(1), T)
    gathered = content.gather(1, rel[..., None].expand(B, T, C))  # (B, T, C)
    return torch.where(inside[..., None], gathered, x)


def read_span(h: torch.Tensor, start: torch.Tensor, n: int, shift: int = 0) -> torch.Tensor:
    """``h (B, T, C)`` -> ``(B, n, C)`` rows ``h[b, start_b + shift + i]``; positions outside
    ``[0, T)`` (rows without a span) are clamped: mask them in the loss."""
    idx = (start[:, None] + shift + torch.arange(n, device=h.device)[None, :]).clamp(0, h.size(1) - 1)  # (B, n)
    return h.gather(1, idx[..., None].expand(-1, -1, h.size(-1)))


def check_spans(start: torch.Tensor, n: int, T: int, name: str, first: int = 0) -> None:
    """Raise ValueError when a row's span ``[start, start + n)`` does not fit ``[first, T)``."""
    has = start >= 0
    if bool((has & ((start < first) | (start + n > T))).any()):
        raise ValueError(
            f"{name}_start: a span of {n} tokens must lie in positions [{first}, {T}) of the "
            f"sequence; got starts {start.tolist()} (-1 = no {name})"
        )


class SpanAdapter(nn.Module):
    """One continuous modality's input and output maps.

    ``embed(patches (B, N, D), t_emb (B, C) | None, offset=0) -> (B, N, C)``: a linear patch
    embedding, plus the fixed position table rows ``[offset, offset + N)`` when one is given (the
    2-D sin-cos table of an image grid), plus the diffusion timestep embedding added to every patch
    (Transfusion, section 3). ``predict(h (B, N, C)) -> (B, N, D)``: a linear map from final
    (normed) hidden states back to patches (the next patch under the regression head, the noise
    under the diffusion head).

    Args:
        patch_dim: ``D``, numbers per patch. n_embd: ``C``.
        positions: ``(N, C)`` float table added inside the span, or None.
    """

    def __init__(self, patch_dim: int, n_embd: int, positions: Optional[torch.Tensor] = None):
        super().__init__()
        self.proj_in = nn.Linear(patch_dim, n_embd)
        self.proj_out = nn.Linear(n_embd, patch_dim)
        self.register_buffer("positions", positions, persistent=False)

    def embed(self, patches: torch.Tensor, t_emb: Optional[torch.Tensor] = None, offset: int = 0) -> torch.Tensor:
        x = self.proj_in(patches.to(self.proj_in.weight.dtype))  # (B, N, C)
        if self.positions is not None:
            x = x + self.positions[offset : offset + x.size(1)].to(x.dtype)
        if t_emb is not None:
            x = x + t_emb[:, None, :].to(x.dtype)
        return x

    def predict(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj_out(h)
