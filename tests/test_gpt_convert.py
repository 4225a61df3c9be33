"""HF <-> megaray conversion: tiny randomly initialised GPT-2 and Llama built in-test (no download)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megaray.models.gpt import GPT, GPTConfig, from_hf, generate, to_hf  # noqa: E402

V, T = 96, 12


def _perturb_norms_around_one(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values in every parameter (norm gains around 1, biases too), so a swapped or
    skipped tensor shows up in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if ("ln_" in name or "norm" in name) and name.endswith("weight") else 0.0
            p.copy_(base + torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def gpt2(tie=True, **kw):
    cfg = transformers.GPT2Config(
        vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4, tie_word_embeddings=tie,
        bos_token_id=0, eos_token_id=0, **kw,
    )  # fmt: skip
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return _perturb_norms_around_one(transformers.GPT2LMHeadModel(cfg))


def llama(n_kv=2, tie=False, bias=False, theta=500.0):
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=n_kv, max_position_embeddings=32, rms_norm_eps=1e-6, tie_word_embeddings=tie,
        attention_bias=bias, mlp_bias=bias, rope_parameters={"rope_type": "default", "rope_theta": theta},
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return _perturb_norms_around_one(transformers.LlamaForCausalLM(cfg))


def _idx():
    return torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(5))


def _check(hf, expect_attention=None):
    idx = _idx()
    with torch.no_grad():
        ref = hf(idx).logits
        m = from_hf(hf)
        assert isinstance(m, GPT) and not m.training
        torch.testing.assert_close(m(idx), ref, atol=1e-5, rtol=1e-5)
        if expect_attention:
            assert m.config.attention == expect_attention
        back = to_hf(m)
        assert type(back) is type(hf)
        torch.testing.assert_close(back(idx).logits, ref, atol=1e-5, rtol=1e-5)
        src = hf.state_dict()
        for k, v in back.state_dict().items():
            if k in src:
                torch.testing.assert_close(v, src[k], msg=k)
    return m


@pytest.mark.parametrize("tie", [True, False])
def test_gpt2_from_hf_logits_and_round_trip(tie):
    m = _check(gpt2(tie=tie))
    c = m.config
    assert (c.position, c.norm, c.mlp, c.attention, c.bias, c.tie_embeddings) == (
        "learned",
        "layernorm",
        "gelu",
        "mha",
        True,
        tie,
    )
    assert (m.transformer.wte.weight is m.lm_head.weight) == tie


@pytest.mark.parametrize("n_kv,attention", [(4, "mha"), (2, "gqa"), (1, "mqa")])
def test_llama_from_hf_logits_and_round_trip(n_kv, attention):
    m = _check(llama(n_kv=n_kv), expect_attention=attention)
    c = m.config
    assert (c.position, c.norm, c.mlp, c.rope_theta, c.norm_eps, c.hidden_dim) == (
        "rope",
        "rmsnorm",
        "swiglu",
        500.0,
        1e-6,
        56,
    )


def test_llama_with_bias_and_tied_embeddings():
    m = _check(llama(tie=True, bias=True))
    assert m.config.bias and m.transformer.wte.weight is m.lm_head.weight


def test_converted_llama_greedy_generation_matches_hf():
    hf = llama()
    m = from_hf(hf)
    idx = _idx()[:, :5]
    ours = generate(m, idx, 6, temperature=0)
    theirs = hf.generate(idx, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, theirs)


def test_from_hf_rejects_unsupported():
    with pytest.raises(ValueError, match="activation_function"):
        from_hf(gpt2(activation_function="relu"))
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=56, num_hidden_layers=1,
                                   num_attention_heads=4, hidden_act="gelu")  # fmt: skip
    with pytest.raises(ValueError, match="hidden_act"):
        from_hf(transformers.LlamaForCausalLM(cfg))
    bert = transformers.BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
    )
    with pytest.raises(ValueError, match="model_type"):
        from_hf(transformers.BertForMaskedLM(bert))


def test_to_hf_rejects_unrepresentable_configs():
    for kw in [dict(attention="mla", position="rope"), dict(position="alibi"), dict(norm_placement="post"),
               dict(n_experts=2), dict(position="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True)]:  # fmt: skip
        with pytest.raises(ValueError, match="no Hugging Face architecture"):
            to_hf(GPT(GPTConfig.from_name("debug", **kw)))


def test_to_hf_from_megaray_models():
    """Models trained in megaray export: GPT-2 shape without biases (zeros), Llama shape with GQA."""
    idx = torch.randint(0, 512, (2, 8))
    for kw in [
        dict(bias=False),
        dict(
            position="rope",
            norm="rmsnorm",
            mlp="swiglu",
            attention="gqa",
            n_kv_heads=2,
            bias=False,
            tie_embeddings=False,
        ),
    ]:
        torch.manual_seed(0)
        m = GPT(GPTConfig.from_name("debug", **kw)).eval()
        _perturb_norms_around_one(m)
        with torch.no_grad():
            torch.testing.assert_close(to_hf(m)(idx).logits, m(idx), atol=1e-5, rtol=1e-5)
