"""megaray.models.common.conv: ResNet block, down/upsampling. CPU only, no Ray."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megaray.models.common.conv import Downsample2d, ResnetBlock2d, Upsample2d, group_norm


def _by_hand(block: ResnetBlock2d, x, emb):
    """The LDM ResnetBlock written with functional ops on the block's own weights."""
    n1, n2 = block.norm1, block.norm2
    h = F.conv2d(
        F.silu(F.group_norm(x, n1.num_groups, n1.weight, n1.bias, n1.eps)),
        block.conv1.weight,
        block.conv1.bias,
        padding=1,
    )
    e = F.silu(emb) if block.emb_act else emb
    if block.emb_proj is not None:
        h = h + (e @ block.emb_proj.weight.T + block.emb_proj.bias)[:, :, None, None]
    h = F.group_norm(h, n2.num_groups, n2.weight, n2.bias, n2.eps)
    if block.film is not None:
        gamma, beta = (e @ block.film.weight.T + block.film.bias).chunk(2, dim=1)
        h = h * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]
    h = F.conv2d(F.silu(h), block.conv2.weight, block.conv2.bias, padding=1)
    skip = x if block.skip.__class__.__name__ == "Identity" else F.conv2d(x, block.skip.weight, block.skip.bias)
    return skip + h


@pytest.mark.parametrize("cin,cout,mode,act", [(16, 32, "add", True), (32, 32, "film", True), (8, 16, "film", False)])
def test_resnet_block_matches_hand_computation(cin, cout, mode, act):
    torch.manual_seed(0)
    block = ResnetBlock2d(cin, cout, emb_dim=12, emb_mode=mode, emb_act=act, groups=8).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)  # FiLM starts at zero; make every term count
    x, emb = torch.randn(2, cin, 6, 10), torch.randn(2, 12)
    out = block(x, emb)
    assert out.shape == (2, cout, 6, 10)
    torch.testing.assert_close(out, _by_hand(block, x, emb), atol=1e-5, rtol=1e-5)


def test_resnet_block_film_starts_neutral_and_add_mode_uses_the_embedding():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 4, 4)
    film = ResnetBlock2d(8, 8, emb_dim=5, emb_mode="film")
    assert torch.equal(film(x, torch.randn(2, 5)), film(x, torch.randn(2, 5)))  # zero-initialised FiLM
    add = ResnetBlock2d(8, 8, emb_dim=5, emb_mode="add", groups=4)
    assert not torch.allclose(add(x, torch.randn(2, 5)), add(x, torch.randn(2, 5)))
    # with one channel per group, norm2 removes a per-channel bias: the "add" embedding has no effect
    lone = ResnetBlock2d(8, 8, emb_dim=5, emb_mode="add", groups=8)
    torch.testing.assert_close(lone(x, torch.randn(2, 5)), lone(x, torch.randn(2, 5)))
    plain = ResnetBlock2d(8, 4)
    assert plain(x).shape == (2, 4, 4, 4) and plain.emb_proj is None and plain.film is None
    assert group_norm(48).num_groups == 16 and group_norm(64).num_groups == 32
    with pytest.raises(ValueError, match="emb_mode"):
        ResnetBlock2d(8, 8, emb_dim=4, emb_mode="scale")


def test_downsample_asymmetric_is_ldm_and_symmetric_is_padding_one():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 12)
    down = Downsample2d(4)
    assert down(x).shape == (2, 4, 4, 6)
    torch.testing.assert_close(down(x), F.conv2d(F.pad(x, (0, 1, 0, 1)), down.weight, down.bias, stride=2))
    sym = Downsample2d(4, (2, 1), padding="symmetric")
    assert sym(x).shape == (2, 4, 4, 12)
    torch.testing.assert_close(sym(x), F.conv2d(x, sym.weight, sym.bias, stride=(2, 1), padding=1))
    assert Downsample2d(4)(torch.randn(1, 4, 7, 7)).shape == (1, 4, 3, 3)  # LDM floors odd sizes
    with pytest.raises(ValueError, match="padding"):
        Downsample2d(4, padding="same")


def test_upsample_is_nearest_repeat_then_conv():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 5)
    up = Upsample2d(3, (2, 1))
    rep = x.repeat_interleave(2, dim=2)  # nearest neighbour, by hand
    assert up(x).shape == (2, 3, 8, 5)
    torch.testing.assert_close(up(x), F.conv2d(rep, up.weight, up.bias, padding=1))
    assert Upsample2d(3)(x).shape == (2, 3, 8, 10)
