"""GPT variants: ConvMLP / ShuffleMLP feed-forwards, sandwich norm, position combinations, and the
large presets (gpt2_xl, llama_1b) counted on the meta device against Hugging Face."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from megaray.config import ConfigError
from megaray.models.common.mlp import MLP, ConvMLP, GroupedLinear, ShuffleMLP, build_mlp, channel_shuffle, gelu_tanh
from megaray.models.common.position import (
    ALiBiPosition,
    CombinedPosition,
    LearnedPosition,
    RotaryPosition,
    SinusoidalPosition,
    build_position,
)
from megaray.models.gpt import GPT, GPTConfig

TINY = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32, mlp_hidden=48)
MLA = dict(attention="mla", kv_lora_rank=16, qk_rope_head_dim=4)


def tiny(**kw) -> GPTConfig:
    return GPTConfig.from_name(None, **{**TINY, **kw})


def build(**kw) -> GPT:
    torch.manual_seed(0)
    model = GPT(tiny(**kw))
    with torch.no_grad():  # ConvMLP starts as the identity conv: give it taps that mix positions
        for m in model.modules():
            if isinstance(m, ConvMLP):
                m.conv.weight.normal_(0.0, 0.5)
    return model


def _forward_backward_causal(model: GPT, T: int = 8, t: int = 5) -> None:
    """Finite loss and a gradient for every parameter; changing token ``t`` leaves the logits of
    positions ``< t`` unchanged and changes some at ``>= t``."""
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, model.config.vocab_size, (2, T), generator=g)
    logits, loss = model(idx, idx)
    assert logits.shape == (2, T, model.config.vocab_size) and torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    model.eval()
    idx2 = idx.clone()
    idx2[:, t] = (idx2[:, t] + 1) % model.config.vocab_size
    with torch.no_grad():
        a, b = model(idx), model(idx2)
    torch.testing.assert_close(a[:, :t], b[:, :t], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(a[:, t:], b[:, t:]), "changing a token changed nothing after it"


def _cache_equals_full(model: GPT, T: int = 9) -> None:
    """Prefill 3 tokens, then 2, then one at a time: the cached logits equal the full forward's."""
    model.eval()
    idx = torch.randint(0, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache()
        steps = [model(idx[:, :3], cache=cache), model(idx[:, 3:5], cache=cache)]
        steps += [model(idx[:, i : i + 1], cache=cache) for i in range(5, T)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- ConvMLP / ShuffleMLP


@pytest.mark.parametrize("mlp", ["convmlp", "shufflemlp"])
@pytest.mark.parametrize("attn", ["mha", "mla"])
def test_new_mlps_forward_backward_causal(mlp, attn):
    kw = dict(MLA, position="rope") if attn == "mla" else {}
    model = build(mlp=mlp, **kw)
    assert isinstance(model.transformer.h[0].mlp, ConvMLP if mlp == "convmlp" else ShuffleMLP)
    _forward_backward_causal(model)


def test_convmlp_receptive_field_is_the_kernel_and_causal():
    torch.manual_seed(0)
    m = ConvMLP(8, 16, gelu_tanh, kernel_size=3)
    nn.init.normal_(m.conv.weight)
    x = torch.randn(1, 10, 8)
    t = 4
    x2 = x.clone()
    x2[:, t] += 1.0
    with torch.no_grad():
        changed = (m(x) - m(x2)).abs().amax(-1)[0] > 1e-6  # (T,)
    assert changed.tolist() == [i in (t, t + 1, t + 2) for i in range(10)]  # t .. t + kernel - 1 only


def test_convmlp_starts_as_the_plain_mlp():
    torch.manual_seed(0)
    conv = ConvMLP(8, 16, gelu_tanh)
    plain = MLP(8, 16, gelu_tanh)
    plain.load_state_dict({k: v for k, v in conv.state_dict().items() if not k.startswith("conv.")})
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(conv(x), plain(x))
    assert conv.conv.weight.shape == (16, 1, 3) and tiny(mlp="convmlp").mlp_conv_kernel == 3


@pytest.mark.parametrize(
    "kw",
    [dict(position="rope"), dict(position=["learned", "alibi"]), dict(MLA, position="rope")],
    ids=["rope", "learned+alibi", "mla"],
)
def test_convmlp_kv_cache_decoding_equals_full_forward(kw):
    _cache_equals_full(build(mlp="convmlp", mlp_conv_kernel=4, **kw))


def test_shufflemlp_is_grouped_convs_with_a_channel_shuffle():
    torch.manual_seed(0)
    g, dim, hidden = 4, 8, 16
    m = ShuffleMLP(dim, hidden, gelu_tanh, groups=g)
    x = torch.randn(2, 5, dim)
    # each GroupedLinear is a 1x1 grouped conv (ShuffleNet's GConv)
    fc = nn.Conv1d(dim, hidden, 1, groups=g)
    proj = nn.Conv1d(hidden, dim, 1, groups=g)
    with torch.no_grad():
        fc.weight.copy_(m.c_fc.weight.reshape(hidden, dim // g, 1)), fc.bias.copy_(m.c_fc.bias)
        proj.weight.copy_(m.c_proj.weight.reshape(dim, hidden // g, 1)), proj.bias.copy_(m.c_proj.bias)
    h = gelu_tanh(fc(x.transpose(1, 2)))  # (B, hidden, T)
    B, C, T = h.shape
    h = h.view(B, g, C // g, T).transpose(1, 2).reshape(B, C, T)  # ShuffleNet's reshape-transpose-flatten
    torch.testing.assert_close(m(x), proj(h).transpose(1, 2), atol=1e-6, rtol=1e-5)
    assert channel_shuffle(torch.arange(6.0), 2).tolist() == [0, 3, 1, 4, 2, 5]
    dense = sum(p.numel() for p in MLP(dim, hidden, gelu_tanh, bias=False).parameters())
    assert sum(p.numel() for p in ShuffleMLP(dim, hidden, gelu_tanh, bias=False, groups=g).parameters()) == dense // g
    assert build_mlp(tiny(mlp="shufflemlp", mlp_groups=2)).groups == 2
    with pytest.raises(ValueError, match="divisible by groups"):
        GroupedLinear(6, 8, 4)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(mlp="shufflemlp", mlp_groups=5), "mlp_groups"),
        (dict(mlp="convmlp", n_experts=4), "dense feed-forward"),
        (dict(mlp="shufflemlp", n_experts=4, moe_router="expert_choice"), "dense feed-forward"),
    ],
)
def test_new_mlps_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        tiny(**kw)


# ----------------------------------------------------------------------------- sandwich norm


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize(
    "extra",
    [{}, dict(residual="rezero"), dict(MLA, position="rope", mlp="swiglu")],
    ids=["plain", "rezero", "mla-swiglu"],
)
def test_sandwich_forward_backward_causal(norm, extra):
    model = build(norm=norm, norm_placement="sandwich", **extra)
    if extra.get("residual") == "rezero":  # every block starts as the identity; open the gates to test causality
        with torch.no_grad():
            for b in model.transformer.h:
                b.alpha_attn.fill_(0.5), b.alpha_mlp.fill_(0.5)
    _forward_backward_causal(model)


def test_sandwich_block_is_pre_and_post_norm_on_each_branch():
    model = build(norm_placement="sandwich", norm="rmsnorm")
    block = model.transformer.h[0]
    assert isinstance(block.ln_1_post, nn.RMSNorm) and isinstance(block.ln_2_post, nn.RMSNorm)
    assert isinstance(model.transformer.ln_f, nn.RMSNorm)  # the residual stream is never normalised
    with torch.no_grad():  # non-trivial norm weights, so a missing norm would show
        for n in (block.ln_1, block.ln_1_post, block.ln_2, block.ln_2_post):
            n.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        h = x + block.ln_1_post(block.attn(block.ln_1(x)))
        want = h + block.ln_2_post(block.mlp(block.ln_2(h)))
        torch.testing.assert_close(block(x), want)
    pre = build(norm_placement="pre", norm="rmsnorm")
    assert pre.transformer.h[0].ln_1_post is None
    assert sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in pre.parameters()) == 2 * 2 * 32


def test_sandwich_rules_with_rezero_admin_and_export():
    model = build(norm_placement="sandwich", residual="rezero")
    x = torch.randn(2, 6, 32)
    torch.testing.assert_close(model.transformer.h[0](x), x)  # rezero: identity at init
    with pytest.raises(ConfigError, match="admin"):
        tiny(norm_placement="sandwich", init="admin")
    from megaray.models.gpt import to_hf

    with pytest.raises(ValueError, match="norm_placement='sandwich'"):
        to_hf(GPT(tiny(norm_placement="sandwich", vocab_size=64)))


# ----------------------------------------------------------------------------- position combinations


COMBOS = [
    ["learned", "rope"],
    ["learned", "alibi"],
    ["learned", "rope", "alibi"],
    ["sinusoidal", "rope"],
    ["sinusoidal", "alibi"],
    ["sinusoidal", "rope", "alibi"],
    ["rope", "alibi"],
]
COMBO_CASES = [pytest.param(dict(position=c), id="+".join(c)) for c in COMBOS] + [
    pytest.param(dict(MLA, position=c), id="mla-" + "+".join(c)) for c in COMBOS if "rope" in c
]


@pytest.mark.parametrize("kw", COMBO_CASES)
def test_position_combination_forward_backward_causal_and_cache(kw):
    model = build(**kw)
    assert isinstance(model.transformer.pos, CombinedPosition)
    assert list(model.transformer.pos.schemes) == kw["position"]
    _forward_backward_causal(model)
    _cache_equals_full(model)


def test_combined_position_applies_every_member():
    cfg = tiny(position=["learned", "rope", "alibi"])
    torch.manual_seed(0)
    combo = build_position(cfg)
    learned = LearnedPosition(16, 32)
    learned.load_state_dict({"wpe.weight": combo.schemes["learned"].wpe.weight})
    x, pos, k_pos = torch.randn(2, 5, 32), torch.arange(3, 8), torch.arange(8)
    torch.testing.assert_close(combo.embed(x, pos), learned.embed(x, pos))
    for got, want in zip(combo.rope(pos), RotaryPosition(8).rope(pos)):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(combo.attn_bias(pos, k_pos), ALiBiPosition(4).attn_bias(pos, k_pos))
    sin_alibi = build_position(tiny(position=["sinusoidal", "alibi"]))
    torch.testing.assert_close(sin_alibi.embed(x, pos), SinusoidalPosition(32).embed(x, pos))
    assert sin_alibi.rope(pos) is None and sin_alibi.attn_bias(pos, k_pos) is not None
    # the learned table is a position parameter: non_embedding drops it, as for position 'learned'
    m = GPT(tiny(position=["learned", "rope"]))
    assert m.num_params(non_embedding=False) - m.num_params() == 16 * 32


@pytest.mark.parametrize(
    "position,match",
    [
        (["none", "rope"], "'none'"),
        (["learned", "sinusoidal"], "learned, sinusoidal"),
        (["rope", "rope"], "repeats rope"),
        (["rope", "bogus"], "'bogus'"),
        ([], "empty"),
        ("rpoe", "did you mean 'rope'"),
    ],
)
def test_invalid_position_lists_name_the_schemes(position, match):
    with pytest.raises(ConfigError, match="model.position") as e:
        tiny(position=position)
    assert match in str(e.value)


def test_mla_needs_rope_in_the_list_and_single_forms_stay_strings():
    with pytest.raises(ConfigError, match="mla"):
        tiny(**MLA, position=["learned", "alibi"])
    tiny(**MLA, position=["learned", "rope"])
    assert tiny(position=["rope"]).position == "rope"  # a one-scheme list is that scheme
    assert tiny(position="alibi").positions == ("alibi",)
    assert tiny(position=("learned", "rope")).positions == ("learned", "rope")
    with pytest.raises(ConfigError, match="even head_dim"):
        tiny(position=["learned", "rope"], n_embd=36, n_head=4, mlp_hidden=None)


# ----------------------------------------------------------------------------- large presets


PRESET_COUNTS = {"gpt2_xl": 1_557_611_200, "llama_1b": 1_235_814_400}


def _hf_reference(name: str):
    transformers = pytest.importorskip("transformers")
    if name == "gpt2_xl":
        return transformers.GPT2LMHeadModel(
            transformers.GPT2Config(n_layer=48, n_head=25, n_embd=1600, vocab_size=50257, n_positions=1024)
        )
    return transformers.LlamaForCausalLM(
        transformers.LlamaConfig(  # Llama 3.2 1B's config.json
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
            max_position_embeddings=8192,
        )
    )


@pytest.mark.parametrize("name", list(PRESET_COUNTS))
def test_large_presets_match_hugging_face_parameter_counts_on_meta(name):
    cfg = GPTConfig.from_name(name)
    with torch.device("meta"):
        model = GPT(cfg)
        hf = _hf_reference(name)
    assert next(model.parameters()).device.type == "meta"
    assert model.num_params(non_embedding=False) == PRESET_COUNTS[name] == hf.num_parameters()
    hf_shapes = sorted(tuple(p.shape) for p in hf.parameters())
    if name == "llama_1b":  # same tensors, up to megaray's fused q/k/v (c_attn)
        assert cfg.position == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu" and cfg.kv_heads == 8
        assert cfg.rope_theta == 500000.0 and cfg.tie_embeddings and cfg.hidden_dim == 8192
        assert len(hf_shapes) == len(list(model.parameters())) + 2 * 16
