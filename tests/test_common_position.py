"""megaray.models.common.position: 2-D positions for image patches (sin-cos, axial RoPE). CPU only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megaray.models.common.position import apply_rope, rope_2d, sincos_1d, sincos_2d


def _mae_2d(embed_dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """MAE ``util/pos_embed.py`` (numpy, as published; the grid generalised to H x W)."""

    def get_1d(embed_dim, pos):
        omega = np.arange(embed_dim // 2, dtype=np.float64)
        omega /= embed_dim / 2.0
        omega = 1.0 / 10000**omega
        pos = pos.reshape(-1)
        out = np.einsum("m,d->md", pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(grid_w, dtype=np.float32), np.arange(grid_h, dtype=np.float32))  # w goes first
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_h, grid_w])
    emb_h = get_1d(embed_dim // 2, grid[0])
    emb_w = get_1d(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


@pytest.mark.parametrize("dim,h,w", [(16, 4, 4), (64, 3, 5), (1152, 16, 16)])
def test_sincos_2d_equals_mae_get_2d_sincos_pos_embed(dim, h, w):
    ours = sincos_2d(dim, h, w)
    assert ours.shape == (h * w, dim) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, torch.from_numpy(_mae_2d(dim, h, w)).float())


def test_sincos_2d_layout_and_errors():
    emb = sincos_2d(8, 2, 3)
    # patch (r, c) = row r * 3 + c; first half depends only on c, second half only on r
    assert torch.equal(emb[1, :4], emb[4, :4]) and torch.equal(emb[3, 4:], emb[5, 4:])
    assert not torch.equal(emb[0, 4:], emb[3, 4:])
    torch.testing.assert_close(emb[:3, :4], sincos_1d(4, torch.arange(3)))
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(6, 2, 2)
    with pytest.raises(ValueError, match="even"):
        sincos_1d(5, torch.arange(3))


def test_rope_2d_scores_depend_only_on_the_patch_offset():
    torch.manual_seed(0)
    H, W, d = 5, 6, 16
    cos, sin = rope_2d(d, H, W)
    assert cos.shape == sin.shape == (H * W, d)
    q, k = torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d)

    def score(p, r):  # q at patch p, k at patch r, both (row, col)
        qp = apply_rope(q, (cos[[p[0] * W + p[1]]], sin[[p[0] * W + p[1]]]))
        kr = apply_rope(k, (cos[[r[0] * W + r[1]]], sin[[r[0] * W + r[1]]]))
        return (qp * kr).sum().item()

    base = score((1, 2), (3, 1))
    assert abs(score((2, 4), (4, 3)) - base) < 1e-5  # same (row, col) offset elsewhere on the grid
    assert abs(score((1, 2), (3, 2)) - base) > 1e-3  # column offset changed
    assert abs(score((1, 2), (2, 1)) - base) > 1e-3  # row offset changed
    # patch (0, 0) is not rotated; in row 0 only the column half of the pairs turns
    assert torch.equal(cos[0], torch.ones(d)) and torch.equal(sin[0, d // 4 : d // 2], torch.zeros(d // 4))
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_2d(6, 2, 2)
