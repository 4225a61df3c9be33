"""megaray.models.common.conditioning: FiLM, adaLN-Zero, timestep embedding. CPU only, no Ray."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from megaray.models.common.attention import SelfAttention
from megaray.models.common.conditioning import AdaLNZero, FiLM, TimestepEmbedder, modulate, timestep_embedding
from megaray.models.common.mlp import MLP, gelu_tanh


def test_film_starts_as_identity_then_matches_the_formula():
    film = FiLM(6, 4)
    h, c = torch.randn(3, 4, 5, 7), torch.randn(3, 6)
    assert torch.equal(film(h, c), h)
    with torch.no_grad():
        film.weight.normal_()
        film.bias.normal_()
    gamma, beta = (c @ film.weight.T + film.bias).chunk(2, dim=1)  # (B, C) each
    expect = h * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]
    torch.testing.assert_close(film(h, c), expect)
    # 1-D (B, C, T) maps broadcast the same way
    torch.testing.assert_close(film(h[..., 0], c), expect[..., 0])


class DiTBlock(nn.Module):
    """DiT's block (Peebles & Xie 2023, ``models.py``) assembled from the common components."""

    def __init__(self, dim: int, n_head: int):
        super().__init__()
        cfg = SimpleNamespace(
            n_embd=dim,
            n_head=n_head,
            kv_heads=n_head,
            head_dim=dim // n_head,
            bias=True,
            qk_norm=False,
            norm_eps=1e-6,
            dropout=0.0,
            attn_backend="sdpa",
        )
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(cfg, causal=False)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(dim, 4 * dim, gelu_tanh)
        self.ada = AdaLNZero(dim, dim, 6)

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.ada(c)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


def test_adaln_zero_block_starts_as_identity_and_still_learns():
    torch.manual_seed(0)
    block = DiTBlock(32, 4)
    x, c = torch.randn(2, 9, 32), torch.randn(2, 32)
    out = block(x, c)
    assert torch.equal(out, x)  # every gate is exactly 0 at init
    shapes = [t.shape for t in block.ada(c)]
    assert shapes == [(2, 1, 32)] * 6
    # zero-initialised, yet the modulation gets a gradient (through the gates), so training moves it
    (out * torch.randn_like(out)).sum().backward()
    assert block.ada.proj.weight.grad.abs().sum() > 0
    with torch.no_grad():
        block.ada.proj.weight -= 0.1 * block.ada.proj.weight.grad
    assert not torch.allclose(block(x, c), x)


def test_modulate_formula():
    x, shift, scale = torch.randn(2, 5, 8), torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    torch.testing.assert_close(modulate(x, shift, scale), x + x * scale + shift)


def _formula(t: float, dim: int, max_period: float = 10000.0):
    """DiT's timestep_embedding written out element by element."""
    half = dim // 2
    freqs = [math.exp(-math.log(max_period) * i / half) for i in range(half)]
    row = [math.cos(t * f) for f in freqs] + [math.sin(t * f) for f in freqs]
    return row + [0.0] * (dim % 2)


@pytest.mark.parametrize("dim", [8, 9, 256])
def test_timestep_embedding_matches_the_formula(dim):
    t = torch.tensor([0.0, 1.0, 17.5, 999.0])
    emb = timestep_embedding(t, dim)
    assert emb.shape == (4, dim) and emb.dtype == torch.float32
    expect = torch.tensor([_formula(float(v), dim) for v in t])
    torch.testing.assert_close(emb, expect, atol=2e-4, rtol=1e-5)  # float32 arguments up to ~1e3 rad


def test_timestep_embedding_matches_diffusers_when_installed():
    emb_mod = pytest.importorskip("diffusers.models.embeddings")
    t = torch.tensor([0, 3, 250, 999])
    ref = emb_mod.get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(timestep_embedding(t, 256), ref)


def test_timestep_embedder_shapes_and_init():
    torch.manual_seed(0)
    emb = TimestepEmbedder(64, freq_dim=32)
    out = emb(torch.tensor([0.0, 0.5, 10.0]))
    assert out.shape == (3, 64)
    assert not torch.allclose(out[0], out[1])  # fractional timesteps are distinguished
    assert torch.count_nonzero(emb.mlp[0].bias) == 0 and abs(emb.mlp[0].weight.std().item() - 0.02) < 0.004
    assert emb.to(torch.bfloat16)(torch.tensor([3.0])).dtype == torch.bfloat16
