"""Component tests for megaray.models.common (attention, position, norm, MLP, MoE) inside GPT.

Every valid attention x position x norm x placement x MLP combination is built at debug size,
run forward + backward on CPU, and checked for causality.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn as nn

from megaray.config import ConfigError
from megaray.models.common import attention as attn_mod
from megaray.models.common.attention import BACKENDS, KVCache, causal_mask, reference_attention, sdpa_attention
from megaray.models.common.mlp import build_mlp
from megaray.models.common.moe import MoE
from megaray.models.common.position import alibi_slopes, apply_rope, build_position
from megaray.models.gpt import GPT, GPTConfig

ATTN = {
    "mha": dict(attention="mha"),
    "mqa": dict(attention="mqa"),
    "gqa": dict(attention="gqa", n_kv_heads=2),
    "mla": dict(attention="mla", kv_lora_rank=16, qk_rope_head_dim=4),
    "mla_qlora": dict(attention="mla", kv_lora_rank=16, qk_rope_head_dim=4, q_lora_rank=12),
}
POSITIONS = ["learned", "sinusoidal", "rope", "alibi", "none"]
NORMS = [("layernorm", "pre"), ("layernorm", "post"), ("rmsnorm", "pre"), ("rmsnorm", "post")]
MLPS = ["gelu", "relu", "silu", "swiglu", "geglu"]
TINY = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32, mlp_hidden=48)


def tiny(**kw) -> GPTConfig:
    return GPTConfig.from_name(None, **{**TINY, **kw})


def _valid_combos():
    valid, invalid = [], []
    for (an, a), pos, (norm, place), mlp in itertools.product(ATTN.items(), POSITIONS, NORMS, MLPS):
        kw = dict(**a, position=pos, norm=norm, norm_placement=place, mlp=mlp)
        try:
            tiny(**kw)
        except ConfigError:
            invalid.append((an, pos))
            continue
        valid.append(pytest.param(kw, id=f"{an}-{pos}-{norm}-{place}-{mlp}"))
    return valid, sorted(set(invalid))


VALID, INVALID = _valid_combos()


def _check_causal(model: GPT, T: int = 8, t: int = 5) -> None:
    """Changing token t must leave logits at positions < t unchanged, and change some at >= t."""
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, model.config.vocab_size, (2, T), generator=g)
    idx2 = idx.clone()
    idx2[:, t] = (idx2[:, t] + 1) % model.config.vocab_size
    with torch.no_grad():
        a, b = model(idx), model(idx2)
    torch.testing.assert_close(a[:, :t], b[:, :t], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(a[:, t:], b[:, t:]), "changing a token changed nothing after it"


def test_combination_grid_is_complete():
    # 4 attentions (+ mla with q_lora) x 5 positions x 4 norm placements x 5 MLPs; mla needs rope
    assert len(VALID) == (3 * 5 + 2 * 1) * 4 * 5
    assert INVALID == sorted((m, p) for m in ("mla", "mla_qlora") for p in POSITIONS if p != "rope")


@pytest.mark.parametrize("kw", VALID)
def test_combination_forward_backward_causal(kw):
    torch.manual_seed(0)
    model = GPT(tiny(**kw))
    idx = torch.randint(0, 64, (2, 8))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 8, 64) and torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    model.eval()
    _check_causal(model)


@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rope", "alibi", "none"])
def test_mla_needs_rope_but_others_validate(pos):
    if pos == "rope":
        tiny(**ATTN["mla"], position=pos)
    else:
        with pytest.raises(ConfigError, match="mla"):
            tiny(**ATTN["mla"], position=pos)


@pytest.mark.parametrize("attn", list(ATTN))
@pytest.mark.parametrize(
    "extra", [dict(qk_norm=True), dict(n_experts=4, moe_top_k=2), dict(bias=False)], ids=["qknorm", "moe", "nobias"]
)
def test_variants_with_qknorm_moe_nobias(attn, extra):
    torch.manual_seed(0)
    model = GPT(tiny(**ATTN[attn], position="rope", **extra))
    idx = torch.randint(0, 64, (2, 8))
    _, loss = model(idx, idx)
    (loss + model.aux_loss).backward()
    assert all(p.grad is not None for p in model.parameters())
    if extra.get("qk_norm"):
        assert isinstance(model.transformer.h[0].attn.q_norm, nn.RMSNorm)
    model.eval()
    _check_causal(model)


# ----------------------------------------------------------------------------- attention kernels


def _copy(cfg_kw, backend, src=None) -> GPT:
    torch.manual_seed(0)
    m = GPT(tiny(**cfg_kw, attn_backend=backend)).eval()
    if src is not None:
        m.load_state_dict(src.state_dict())
    return m


KERNEL_CASES = [
    pytest.param(dict(**ATTN[a], position=p, qk_norm=a == "gqa"), id=f"{a}-{p}")
    for a in ATTN
    for p in ["rope", "alibi", "learned"]
    if not (a.startswith("mla") and p != "rope")
]


@pytest.mark.parametrize("kw", KERNEL_CASES)
def test_sdpa_matches_reference(kw):
    ref = _copy(kw, "reference")
    idx = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        want = ref(idx)
        for backend in ("sdpa", "auto"):  # auto = sdpa on CPU
            torch.testing.assert_close(_copy(kw, backend, ref)(idx), want, atol=1e-5, rtol=1e-5)
        # cached path: Tq < Tk, bottom-right aligned causal mask
        for backend in ("reference", "sdpa"):
            m = _copy(kw, backend, ref)
            cache = m.new_cache()
            first = m(idx[:, :7], cache=cache)
            rest = m(idx[:, 7:], cache=cache)
            torch.testing.assert_close(torch.cat([first, rest], 1), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_kv", [4, 2, 1])
@pytest.mark.parametrize("alibi", [False, True])
@pytest.mark.parametrize("Tq,Tk", [(6, 6), (1, 6), (3, 9)])
def test_kernels_agree(n_kv, alibi, Tq, Tk):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, Tq, 8), torch.randn(2, n_kv, Tk, 8), torch.randn(2, n_kv, Tk, 8)
    bias = None
    if alibi:
        bias = build_position(tiny(position="alibi")).attn_bias(torch.arange(Tk - Tq, Tk), torch.arange(Tk))
    torch.testing.assert_close(sdpa_attention(q, k, v, bias), reference_attention(q, k, v, bias), atol=1e-5, rtol=1e-5)


def test_causal_mask_is_bottom_right_aligned():
    m = causal_mask(2, 4, torch.device("cpu"))
    assert m.tolist() == [[True, True, True, False], [True, True, True, True]]


def test_flash_backend_errors_clearly_on_cpu():
    if not attn_mod.FLASH_AVAILABLE:
        with pytest.raises(ValueError, match="flash-attn"):
            GPT(tiny(attn_backend="flash"))
    else:
        with pytest.raises(ValueError, match="ALiBi"):
            GPT(tiny(attn_backend="flash", position="alibi"))
        m = GPT(tiny(attn_backend="flash"))
        with pytest.raises(RuntimeError, match="CUDA"):
            m(torch.zeros(1, 4, dtype=torch.long))
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(RuntimeError):
        BACKENDS["flash"](q, q, q, torch.zeros(2, 3, 3))


def test_kv_cache_grows_along_time():
    c = KVCache()
    assert len(c) == 0
    k = torch.zeros(2, 1, 3, 4)
    c.update(k, k)
    a, b = c.update(torch.ones(2, 1, 2, 4), torch.ones(2, 1, 2, 4))
    assert len(c) == 5 and a.shape == (2, 1, 5, 4) and a[:, :, 3:].eq(1).all()


def test_mla_cache_stores_compressed_latent():
    cfg = tiny(**ATTN["mla"], position="rope")
    m = GPT(cfg).eval()
    cache = m.new_cache()
    m(torch.randint(0, 64, (2, 5)), cache=cache)
    c_kv, k_pe = cache[0].data
    assert c_kv.shape == (2, 5, cfg.kv_lora_rank) and k_pe.shape == (2, 1, 5, cfg.qk_rope_head_dim)


# ----------------------------------------------------------------------------- positions


def test_alibi_slopes_match_hf_bloom():
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    for n in [1, 2, 3, 4, 6, 8, 12, 16, 20, 40]:
        T = 7
        want = bloom.build_alibi_tensor(torch.ones(1, T), n, torch.float32).view(n, T)  # slope * j
        got = build_position(tiny(position="alibi", n_head=n, n_embd=8 * n)).attn_bias(
            torch.tensor([T - 1]), torch.arange(T)
        )[:, 0]  # slope * (j - (T-1))
        torch.testing.assert_close(got + alibi_slopes(n)[:, None] * (T - 1), want)
    # paper: n=8 -> 1/2, 1/4, ..., 1/256
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0**-i for i in range(1, 9)]))


def test_rope_matches_hf_llama_rotate_half():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    cfg = tiny(position="rope", rope_theta=500.0)
    pos = torch.arange(3, 9)
    cos, sin = build_position(cfg).rope(pos)
    q, k = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    inv = 1.0 / (500.0 ** (torch.arange(0, 8, 2).float() / 8))
    emb = torch.cat([pos[:, None] * inv] * 2, -1)
    q_ref, k_ref = llama.apply_rotary_pos_emb(q, k, emb.cos()[None], emb.sin()[None])
    torch.testing.assert_close(apply_rope(q, (cos, sin)), q_ref)
    torch.testing.assert_close(apply_rope(k, (cos, sin)), k_ref)
    # relative: <rope(q, m), rope(k, n)> depends on m - n only
    rope = build_position(cfg).rope
    q1, k1 = q[..., :1, :], k[..., :1, :]

    def score(m: int, n: int) -> torch.Tensor:
        return (apply_rope(q1, rope(torch.tensor([m]))) * apply_rope(k1, rope(torch.tensor([n])))).sum()

    torch.testing.assert_close(score(5, 2), score(13, 10), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(score(5, 2), score(5, 4), atol=1e-3)


def test_sinusoidal_matches_vaswani_formula():
    p = build_position(tiny(position="sinusoidal"))
    pe = p.embed(torch.zeros(1, 10, 32), torch.arange(10))[0]
    for pos, i in [(3, 0), (7, 5), (9, 15)]:
        angle = pos / 10000 ** (2 * i / 32)
        assert pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
        assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)


def test_learned_positions_reject_overflow_and_forward_rejects_long_input():
    m = GPT(tiny(position="learned"))
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="learned positions"):
        m.transformer.pos.embed(torch.zeros(1, 1, 32), torch.tensor([16]))


# ----------------------------------------------------------------------------- norm / mlp / init


def test_norm_kinds_placement_and_bias():
    m = GPT(tiny(norm="layernorm", bias=False))
    assert isinstance(m.transformer.h[0].ln_1, nn.LayerNorm) and m.transformer.h[0].ln_1.bias is None
    assert all(mod.bias is None for mod in m.modules() if isinstance(mod, nn.Linear))
    m = GPT(tiny(norm="rmsnorm", norm_placement="post", norm_eps=1e-6))
    assert isinstance(m.transformer.h[0].ln_1, nn.RMSNorm) and m.transformer.h[0].ln_1.eps == 1e-6
    assert isinstance(m.transformer.ln_f, nn.Identity)
    # post-norm output of each block is normalised: unit RMS at init (weights 1)
    x = torch.randn(2, 8, 32)
    y = m.transformer.h[0](x)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(2, 8), atol=1e-3, rtol=1e-3)
    assert isinstance(GPT(tiny(norm_placement="pre")).transformer.ln_f, nn.LayerNorm)


def test_mlp_activations():
    torch.manual_seed(0)
    x = torch.randn(3, 32)
    for name, act in [
        ("gelu", lambda h: torch.nn.functional.gelu(h, approximate="tanh")),
        ("relu", torch.relu),
        ("silu", torch.nn.functional.silu),
    ]:
        mlp = build_mlp(tiny(mlp=name))
        torch.testing.assert_close(mlp(x), mlp.c_proj(act(mlp.c_fc(x))))
    for name, act in [
        ("swiglu", torch.nn.functional.silu),
        ("geglu", lambda h: torch.nn.functional.gelu(h, approximate="tanh")),
    ]:
        mlp = build_mlp(tiny(mlp=name))
        torch.testing.assert_close(mlp(x), mlp.c_proj(act(mlp.c_gate(x)) * mlp.c_fc(x)))
    assert tiny(mlp="swiglu", mlp_hidden=None, n_embd=96).hidden_dim == 256


def test_gpt2_init_and_weight_tying():
    torch.manual_seed(0)
    cfg = GPTConfig.from_name("debug", n_layer=8)
    m = GPT(cfg)
    assert m.transformer.wte.weight is m.lm_head.weight
    cproj = torch.cat([b.mlp.c_proj.weight.flatten() for b in m.transformer.h])
    fc = torch.cat([b.mlp.c_fc.weight.flatten() for b in m.transformer.h])
    assert cproj.std().item() == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.03)
    assert fc.std().item() == pytest.approx(0.02, rel=0.03)
    assert all(b.attn.c_attn.bias.abs().sum() == 0 for b in m.transformer.h)
    untied = GPT(GPTConfig.from_name("debug", tie_embeddings=False))
    assert untied.transformer.wte.weight is not untied.lm_head.weight
    assert (
        untied.num_params(non_embedding=False) - GPT(GPTConfig.from_name("debug")).num_params(non_embedding=False)
        == 512 * 64
    )


def test_dropout_only_in_training():
    torch.manual_seed(0)
    m = GPT(tiny(dropout=0.5))
    idx = torch.randint(0, 64, (2, 8))
    assert not torch.equal(m(idx), m(idx))
    m.eval()
    assert torch.equal(m(idx), m(idx))


# ----------------------------------------------------------------------------- MoE


def test_moe_aux_loss_positive_and_reaches_router():
    torch.manual_seed(0)
    m = GPT(tiny(n_experts=4, moe_top_k=2, moe_aux_loss_coef=0.01))
    idx = torch.randint(0, 64, (2, 8))
    _, loss = m(idx, idx)
    assert m.aux_loss.item() > 0
    m.aux_loss.backward()
    for b in m.transformer.h:
        assert b.mlp.router.weight.grad is not None and b.mlp.router.weight.grad.abs().sum() > 0
    assert GPT(tiny())(idx) is not None and GPT(tiny()).aux_loss.item() == 0.0


def test_moe_aux_loss_values_uniform_and_collapsed():
    cfg = tiny(n_experts=4, moe_top_k=1, moe_aux_loss_coef=0.1)
    moe = MoE(cfg)
    x = torch.randn(2, 8, 32)
    nn.init.zeros_(moe.router.weight)  # uniform probabilities: aux = coef
    moe(x)
    assert moe.aux_loss.item() == pytest.approx(0.1, rel=1e-5)
    with torch.no_grad():  # every token to expert 0 with prob ~1: aux -> coef * E
        moe.router.weight.zero_()
        moe.router.weight[0] = 1000.0
    moe(x.abs() + 0.1)
    assert moe.aux_loss.item() == pytest.approx(0.4, rel=1e-3)


def test_moe_equals_dense_mixture_when_all_experts_chosen():
    torch.manual_seed(0)
    cfg = tiny(n_experts=3, moe_top_k=3, mlp="swiglu")
    moe = MoE(cfg)
    x = torch.randn(2, 5, 32)
    p = moe.router(x).softmax(-1)  # (B, T, E)
    want = sum(p[..., e : e + 1] * moe.experts[e](x) for e in range(3))
    torch.testing.assert_close(moe(x), want, atol=1e-6, rtol=1e-5)


def test_moe_top1_routes_each_token_to_one_expert():
    torch.manual_seed(0)
    moe = MoE(tiny(n_experts=4, moe_top_k=1))
    x = torch.randn(1, 6, 32)
    p = moe.router(x).softmax(-1)[0]
    e = p.argmax(-1)
    want = torch.stack([p[t, e[t]] * moe.experts[int(e[t])](x[0, t]) for t in range(6)])
    torch.testing.assert_close(moe(x)[0], want, atol=1e-6, rtol=1e-5)
