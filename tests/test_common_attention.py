"""megaray.models.common.attention: causal flag, bidirectional spans (Transfusion), cross-attention.

CPU only, no Ray. The GPT's own attention tests live in test_gpt_components.py.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from megaray.models.common.attention import (
    BACKENDS,
    CrossAttention,
    SelfAttention,
    causal_mask,
    reference_attention,
    sdpa_attention,
    span_mask,
)
from megaray.models.gpt import GPT, GPTConfig

TINY = dict(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32, mlp_hidden=48)


# --------------------------------------------------------------------------- the mask


def test_span_mask_without_spans_is_the_causal_mask():
    ids = torch.zeros(3, 7, dtype=torch.long)
    assert span_mask(ids).shape == (3, 1, 7, 7)
    assert torch.equal(span_mask(ids), causal_mask(7, 7, ids.device).expand(3, 1, 7, 7))
    assert torch.equal(span_mask(ids, Tq=2)[0, 0], causal_mask(2, 7, ids.device))


def test_span_mask_is_bidirectional_inside_a_span_and_causal_elsewhere():
    #          text  [ image 1 ]  text  [image 2]  text
    ids = torch.tensor([[0, 1, 1, 1, 0, 2, 2, 0]])
    m = span_mask(ids)[0, 0].int()
    expect = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0],  # image 1 sees all of image 1 ...
            [1, 1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0],  # ... and nothing after it
            [1, 1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1, 1, 1, 1],
        ]
    )
    assert torch.equal(m, expect)
    # the properties, on a random layout: in-span tokens see later tokens of their span only
    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(1, 40, dtype=torch.long)
    for k, start in enumerate(sorted(torch.randperm(36, generator=g)[:3].tolist()), start=1):
        ids[0, start : start + 4] = k
    m = span_mask(ids)[0, 0]
    for i in range(40):
        for j in range(i + 1, 40):
            assert bool(m[i, j]) == bool(ids[0, i] > 0 and ids[0, i] == ids[0, j]), (i, j)
        assert m[i, : i + 1].all()


@pytest.mark.parametrize("with_bias", [False, True])
def test_kernels_agree_with_a_span_mask(with_bias):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    ids = torch.tensor([[0, 1, 1, 1, 0, 0, 2, 2, 0], [3, 3, 3, 0, 0, 0, 0, 0, 0]])
    mask = span_mask(ids)
    bias = torch.randn(4, 9, 9) if with_bias else None
    ref = reference_attention(q, k, v, bias, mask=mask)
    torch.testing.assert_close(sdpa_attention(q, k, v, bias, mask=mask), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(BACKENDS["auto"](q, k, v, bias, mask=mask), ref, atol=1e-5, rtol=1e-5)
    # by hand: softmax over allowed keys only
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = q @ kk.transpose(-2, -1) / math.sqrt(8) + (0 if bias is None else bias)
    torch.testing.assert_close(ref, s.masked_fill(~mask, float("-inf")).softmax(-1) @ vv, atol=1e-5, rtol=1e-5)


def test_non_causal_kernels_attend_everywhere():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 8)
    full = F.scaled_dot_product_attention(q, k, v)
    for name in ("reference", "sdpa", "auto"):
        torch.testing.assert_close(BACKENDS[name](q, k, v, causal=False), full, atol=1e-5, rtol=1e-5)
    bias = torch.randn(4, 5, 7)
    torch.testing.assert_close(
        sdpa_attention(q, k, v, bias, causal=False),
        reference_attention(q, k, v, bias, causal=False),
        atol=1e-5,
        rtol=1e-5,
    )


def test_flash_refuses_a_mask():
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(RuntimeError):
        BACKENDS["flash"](q, q, q, None, mask=torch.ones(3, 3, dtype=torch.bool))


# --------------------------------------------------------------------------- modules


def _attn_cfg(**kw):
    base = dict(
        n_embd=32,
        n_head=4,
        kv_heads=2,
        head_dim=8,
        bias=True,
        qk_norm=False,
        norm_eps=1e-5,
        dropout=0.0,
        attn_backend="sdpa",
    )
    return SimpleNamespace(**{**base, **kw})


def test_self_attention_causal_flag():
    torch.manual_seed(0)
    causal, bidir = SelfAttention(_attn_cfg()), SelfAttention(_attn_cfg(), causal=False)
    bidir.load_state_dict(causal.state_dict())
    x = torch.randn(2, 6, 32)
    x2 = x.clone()
    x2[:, -1] += 1.0  # change only the last token
    assert torch.equal(causal(x)[:, :-1], causal(x2)[:, :-1])  # earlier tokens cannot see it
    assert not torch.allclose(bidir(x)[:, 0], bidir(x2)[:, 0])  # bidirectional: they can
    ref = SelfAttention(_attn_cfg(attn_backend="reference"), causal=False)
    ref.load_state_dict(causal.state_dict())
    torch.testing.assert_close(ref(x), bidir(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_cross_attention_equals_torch_multihead_attention(masked):
    torch.manual_seed(0)
    dim, ctx_dim, nh = 32, 24, 4
    ours = CrossAttention(dim, ctx_dim, nh)
    ref = torch.nn.MultiheadAttention(dim, nh, kdim=ctx_dim, vdim=ctx_dim, batch_first=True)
    with torch.no_grad():
        ref.q_proj_weight.copy_(ours.q_proj.weight)
        ref.k_proj_weight.copy_(ours.k_proj.weight)
        ref.v_proj_weight.copy_(ours.v_proj.weight)
        ref.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        ref.out_proj.weight.copy_(ours.c_proj.weight)
        ref.out_proj.bias.copy_(ours.c_proj.bias)
    x, ctx = torch.randn(2, 5, dim), torch.randn(2, 7, ctx_dim)
    keep = torch.tensor([[True] * 7, [True] * 4 + [False] * 3]) if masked else None
    expect, _ = ref(x, ctx, ctx, key_padding_mask=None if keep is None else ~keep, need_weights=False)
    out = ours(x, ctx, keep)
    assert out.shape == (2, 5, dim)
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)
    if masked:  # padded context positions have no influence
        ctx2 = ctx.clone()
        ctx2[1, 4:] = 100.0
        torch.testing.assert_close(ours(x, ctx2, keep), out)
    with pytest.raises(ValueError, match="divisible"):
        CrossAttention(30, 8, 4)


# --------------------------------------------------------------------------- inside the GPT


@pytest.mark.parametrize(
    "variant",
    [
        dict(),
        dict(attn_backend="reference"),
        dict(position="rope", attention="gqa", n_kv_heads=2),
        dict(position="alibi"),
        dict(attention="mla", position="rope"),
    ],
)
def test_gpt_with_all_zero_span_ids_equals_plain_causal(variant):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, **variant)).eval()
    idx = torch.randint(0, 64, (2, 12))
    plain = model(idx)
    # same mask, but an explicit (B, 1, T, T) one: SDPA may pick another kernel, so allow float noise
    torch.testing.assert_close(model(idx, span_ids=torch.zeros(2, 12, dtype=torch.long)), plain, atol=1e-6, rtol=1e-6)
    sdpa_ref = GPT(GPTConfig(**TINY, **{**variant, "attn_backend": "reference"})).eval()
    sdpa_ref.load_state_dict(model.state_dict())
    spans = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0, 2, 2, 0, 0]] * 2)
    torch.testing.assert_close(model(idx, span_ids=spans), sdpa_ref(idx, span_ids=spans), atol=1e-5, rtol=1e-5)


def test_gpt_span_tokens_see_their_span_but_not_the_future_outside_it():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, position="rope")).eval()
    spans = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0, 0, 0]])
    idx = torch.randint(0, 64, (1, 10))
    base = model(idx, span_ids=spans)
    in_span = idx.clone()
    in_span[0, 5] = (idx[0, 5] + 1) % 64  # last token of the span
    assert not torch.allclose(model(in_span, span_ids=spans)[0, 2], base[0, 2])  # first span token sees it
    after = idx.clone()
    after[0, 6] = (idx[0, 6] + 1) % 64  # the text token right after the span
    assert torch.equal(model(after, span_ids=spans)[0, :6], base[0, :6])  # nobody before it sees it


def test_gpt_spans_with_kv_cache_and_activation_checkpointing():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, position="rope"))
    idx = torch.randint(0, 64, (2, 12))
    spans = torch.tensor([[0, 1, 1, 1, 0, 0, 2, 2, 2, 0, 0, 0]] * 2)
    model.eval()
    full = model(idx, span_ids=spans)
    cache = model.new_cache()
    first = model(idx[:, :10], cache=cache, span_ids=spans[:, :10])
    rest = model(idx[:, 10:], cache=cache, span_ids=spans)  # span ids cover cached + new positions
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, atol=1e-5, rtol=1e-5)
    model.train()
    targets = torch.randint(0, 64, (2, 12))
    _, loss = model(idx, targets, span_ids=spans)
    model.set_activation_checkpointing(True)
    _, loss_ckpt = model(idx, targets, span_ids=spans)
    assert torch.equal(loss, loss_ckpt)
