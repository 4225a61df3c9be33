"""Weight conversion between megaray :class:`GPT` and Hugging Face ``transformers`` models.

* ``from_hf(hf_model) -> GPT`` for ``GPT2LMHeadModel`` (``model_type == "gpt2"``),
  ``LlamaForCausalLM`` (``"llama"``) and all-dense ``DeepseekV3ForCausalLM`` (``"deepseek_v3"``,
  multi-head latent attention; DeepSeek's interleaved RoPE is turned into megaray's half-split RoPE
  by permuting the rope rows of ``q`` and ``kv_a``), weights copied, logits equal in float32.
* ``to_hf(model) -> PreTrainedModel`` for a GPT whose config is GPT-2-shaped (mha, learned
  positions, LayerNorm, pre-norm, GELU MLP) or Llama-shaped (mha/mqa/gqa, RoPE, RMSNorm, pre-norm,
  SwiGLU); anything else raises ``ValueError`` naming what does not fit.

Layouts: HF GPT-2 stores ``c_attn``/``c_proj``/``c_fc`` as ``Conv1D`` with ``(in, out)`` weights,
transposed here into ``nn.Linear``'s ``(out, in)``. HF Llama's RoPE is the half-split
``rotate_half`` convention, which megaray's RoPE uses too, so ``q_proj``/``k_proj`` copy without
a permutation; q, k, v are concatenated into megaray's fused ``c_attn``. GPT-2's GELU is the tanh
approximation (``gelu_new``), as is megaray's ``gelu``. Needs ``transformers``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List

import torch

from megaray.models.gpt.config import GPTConfig
from megaray.models.gpt.model import GPT

_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")


def _attention_kind(n_head: int, n_kv: int) -> Dict[str, Any]:
    if n_kv == n_head:
        return dict(attention="mha", n_kv_heads=None)
    if n_kv == 1:
        return dict(attention="mqa", n_kv_heads=None)
    return dict(attention="gqa", n_kv_heads=n_kv)


def _load(model: GPT, sd: Dict[str, torch.Tensor], dtype: torch.dtype) -> GPT:
    model.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=True)
    return model.to(dtype).eval()


# ----------------------------------------------------------------------------- from HF


def _gpt2_from_hf(hf) -> GPT:
    c = hf.config
    bad = []
    if c.activation_function not in _GELU_TANH:
        bad.append(f"activation_function {c.activation_function!r} (megaray gelu is tanh-GELU: {_GELU_TANH})")
    if not c.scale_attn_weights or c.scale_attn_by_inverse_layer_idx:
        bad.append("attention scaling other than 1/sqrt(head_dim)")
    if getattr(c, "add_cross_attention", False):
        bad.append("cross-attention")
    if bad:
        raise ValueError("cannot convert this GPT-2: " + "; ".join(bad))
    cfg = GPTConfig(
        vocab_size=c.vocab_size, block_size=c.n_positions, n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd,
        mlp_hidden=c.n_inner or 4 * c.n_embd, norm_eps=c.layer_norm_epsilon, dropout=c.resid_pdrop,
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", True)),
        position="learned", norm="layernorm", mlp="gelu", attention="mha", bias=True,
    )  # fmt: skip
    src = hf.state_dict()
    sd = {
        "transformer.wte.weight": src["transformer.wte.weight"],
        "transformer.pos.wpe.weight": src["transformer.wpe.weight"],
        "transformer.ln_f.weight": src["transformer.ln_f.weight"],
        "transformer.ln_f.bias": src["transformer.ln_f.bias"],
        "lm_head.weight": hf.get_output_embeddings().weight,
    }
    for i in range(c.n_layer):
        a, b = f"transformer.h.{i}.", f"transformer.h.{i}."
        for n in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias",
                  "attn.c_attn.bias", "attn.c_proj.bias", "mlp.c_fc.bias", "mlp.c_proj.bias"):  # fmt: skip
            sd[b + n] = src[a + n]
        for n in ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"):
            sd[b + n] = src[a + n].t()  # Conv1D (in, out) -> Linear (out, in)
    return _load(GPT(cfg), sd, hf.dtype)


def _llama_from_hf(hf) -> GPT:
    c = hf.config
    rope = dict(getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {})
    theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    bad = []
    if c.hidden_act != "silu":
        bad.append(f"hidden_act {c.hidden_act!r} (megaray swiglu uses silu)")
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        bad.append(f"rope_type {rope.get('rope_type')!r} (only the default RoPE)")
    if head_dim * c.num_attention_heads != c.hidden_size:
        bad.append(f"head_dim {head_dim} != hidden_size / num_attention_heads")
    if bool(c.attention_bias) != bool(getattr(c, "mlp_bias", False)):
        bad.append("attention_bias != mlp_bias (megaray has one bias flag)")
    if bad:
        raise ValueError("cannot convert this Llama: " + "; ".join(bad))
    n_kv = c.num_key_value_heads or c.num_attention_heads
    cfg = GPTConfig(
        vocab_size=c.vocab_size, block_size=c.max_position_embeddings, n_layer=c.num_hidden_layers,
        n_head=c.num_attention_heads, n_embd=c.hidden_size, **_attention_kind(c.num_attention_heads, n_kv),
        position="rope", rope_theta=theta, norm="rmsnorm", norm_eps=c.rms_norm_eps, mlp="swiglu",
        mlp_hidden=c.intermediate_size, bias=bool(c.attention_bias), dropout=0.0,
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
    )  # fmt: skip
    src = hf.state_dict()
    sd = {
        "transformer.wte.weight": src["model.embed_tokens.weight"],
        "transformer.ln_f.weight": src["model.norm.weight"],
        "lm_head.weight": hf.get_output_embeddings().weight,
    }
    kinds = ["weight", "bias"] if cfg.bias else ["weight"]
    for i in range(c.num_hidden_layers):
        a, b = f"model.layers.{i}.", f"transformer.h.{i}."
        sd[b + "ln_1.weight"] = src[a + "input_layernorm.weight"]
        sd[b + "ln_2.weight"] = src[a + "post_attention_layernorm.weight"]
        for k in kinds:
            sd[b + f"attn.c_attn.{k}"] = torch.cat([src[a + f"self_attn.{p}_proj.{k}"] for p in "qkv"], dim=0)
            sd[b + f"attn.c_proj.{k}"] = src[a + f"self_attn.o_proj.{k}"]
            sd[b + f"mlp.c_gate.{k}"] = src[a + f"mlp.gate_proj.{k}"]
            sd[b + f"mlp.c_fc.{k}"] = src[a + f"mlp.up_proj.{k}"]
            sd[b + f"mlp.c_proj.{k}"] = src[a + f"mlp.down_proj.{k}"]
    return _load(GPT(cfg), sd, hf.dtype)


def _deinterleave(w: torch.Tensor, start: int, dr: int) -> torch.Tensor:
    """Rows ``start : start+dr`` of ``w`` reordered ``[0, 2, 4, ..., 1, 3, 5, ...]``.

    DeepSeek's interleaved RoPE rotates pairs ``(x_2i, x_2i+1)`` and returns ``cat(evens', odds')``;
    that is exactly half-split RoPE (megaray's) applied to ``cat(evens, odds)``, so permuting the
    rope output rows of the projection makes the two models compute the same q, k."""
    perm = torch.cat([torch.arange(0, dr, 2), torch.arange(1, dr, 2)]) + start
    w = w.clone()
    w[start : start + dr] = w[perm]
    return w


def _deepseek_v3_from_hf(hf) -> GPT:
    c = hf.config
    rope = dict(getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {})
    theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
    nh, dn, dr, dv = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    bad = []
    if (c.first_k_dense_replace or 0) < c.num_hidden_layers:
        bad.append(
            f"first_k_dense_replace {c.first_k_dense_replace} < num_hidden_layers {c.num_hidden_layers} "
            "(MoE layers with DeepSeek's grouped sigmoid router and shared experts; only all-dense models)"
        )
    if c.hidden_act != "silu":
        bad.append(f"hidden_act {c.hidden_act!r} (megaray swiglu uses silu)")
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        bad.append(f"rope_type {rope.get('rope_type')!r} (only the default RoPE; YaRN is not implemented)")
    if c.attention_bias:
        bad.append("attention_bias (DeepSeek biases only some projections; megaray has one bias flag)")
    if c.num_key_value_heads != nh:
        bad.append(f"num_key_value_heads {c.num_key_value_heads} != num_attention_heads {nh}")
    if c.hidden_size % nh:
        bad.append(f"hidden_size {c.hidden_size} not divisible by num_attention_heads {nh}")
    if c.rms_norm_eps != 1e-6:
        bad.append(f"rms_norm_eps {c.rms_norm_eps} (DeepSeek's latent norms always use 1e-6; megaray one norm_eps)")
    if bad:
        raise ValueError("cannot convert this DeepseekV3: " + "; ".join(bad))
    cfg = GPTConfig(
        vocab_size=c.vocab_size, block_size=c.max_position_embeddings, n_layer=c.num_hidden_layers, n_head=nh,
        n_embd=c.hidden_size, attention="mla", q_lora_rank=c.q_lora_rank, kv_lora_rank=c.kv_lora_rank,
        qk_rope_head_dim=dr, qk_nope_head_dim=dn, v_head_dim=dv, position="rope", rope_theta=theta,
        norm="rmsnorm", norm_eps=c.rms_norm_eps, mlp="swiglu", mlp_hidden=c.intermediate_size, bias=False,
        dropout=0.0, tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
    )  # fmt: skip
    src = hf.state_dict()
    sd = {
        "transformer.wte.weight": src["model.embed_tokens.weight"],
        "transformer.ln_f.weight": src["model.norm.weight"],
        "lm_head.weight": hf.get_output_embeddings().weight,
    }

    def q_rows(w: torch.Tensor) -> torch.Tensor:  # (nh*(dn+dr), in): de-interleave each head's rope rows
        if not c.rope_interleave:
            return w
        w = w.view(nh, dn + dr, -1)
        return torch.stack([_deinterleave(h, dn, dr) for h in w]).reshape(nh * (dn + dr), -1)

    for i in range(c.num_hidden_layers):
        a, b = f"model.layers.{i}.", f"transformer.h.{i}."
        at = a + "self_attn."
        sd[b + "ln_1.weight"] = src[a + "input_layernorm.weight"]
        sd[b + "ln_2.weight"] = src[a + "post_attention_layernorm.weight"]
        if c.q_lora_rank:
            sd[b + "attn.wq.0.weight"] = src[at + "q_a_proj.weight"]
            sd[b + "attn.wq.1.weight"] = src[at + "q_a_layernorm.weight"]
            sd[b + "attn.wq.2.weight"] = q_rows(src[at + "q_b_proj.weight"])
        else:
            sd[b + "attn.wq.weight"] = q_rows(src[at + "q_proj.weight"])
        kv_a = src[at + "kv_a_proj_with_mqa.weight"]
        sd[b + "attn.kv_down.weight"] = _deinterleave(kv_a, c.kv_lora_rank, dr) if c.rope_interleave else kv_a
        sd[b + "attn.kv_norm.weight"] = src[at + "kv_a_layernorm.weight"]
        sd[b + "attn.kv_up.weight"] = src[at + "kv_b_proj.weight"]
        sd[b + "attn.c_proj.weight"] = src[at + "o_proj.weight"]
        sd[b + "mlp.c_gate.weight"] = src[a + "mlp.gate_proj.weight"]
        sd[b + "mlp.c_fc.weight"] = src[a + "mlp.up_proj.weight"]
        sd[b + "mlp.c_proj.weight"] = src[a + "mlp.down_proj.weight"]
    return _load(GPT(cfg), sd, hf.dtype)


#: HF ``config.model_type`` -> converter
FROM_HF: Dict[str, Callable[[Any], GPT]] = {
    "gpt2": _gpt2_from_hf,
    "llama": _llama_from_hf,
    "deepseek_v3": _deepseek_v3_from_hf,
}


def from_hf(hf_model) -> GPT:
    """A :class:`GPT` with the weights of a HF causal LM, in eval mode and the HF dtype.

    Args:
        hf_model: ``transformers.GPT2LMHeadModel``, ``LlamaForCausalLM``, or a
            ``DeepseekV3ForCausalLM`` whose layers are all dense (``first_k_dense_replace >=
            num_hidden_layers``), converted to ``attention="mla"``.
    Raises:
        ValueError: another ``model_type``, or a variant megaray cannot express (e.g. exact-erf
            GELU, scaled RoPE, different attention/MLP bias flags, DeepSeek MoE layers); the
            message says which.
    """
    mt = getattr(hf_model.config, "model_type", None)
    if mt not in FROM_HF:
        raise ValueError(f"from_hf supports model_type {sorted(FROM_HF)}, got {mt!r}")
    return FROM_HF[mt](hf_model)


# ----------------------------------------------------------------------------- to HF

_GPT2_SHAPE = dict(attention="mha", position="learned", norm="layernorm", norm_placement="pre", mlp="gelu",
                   qk_norm=False, n_experts=0)  # fmt: skip
_LLAMA_SHAPE = dict(position="rope", norm="rmsnorm", norm_placement="pre", mlp="swiglu", qk_norm=False, n_experts=0)


def _mismatch(cfg: GPTConfig, shape: Dict[str, Any]) -> List[str]:
    return [f"{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in shape.items() if getattr(cfg, k) != v]


def _gpt2_to_hf(model: GPT):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.config
    hc = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_inner=cfg.hidden_dim, activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
        tie_word_embeddings=cfg.tie_embeddings, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    hf = GPT2LMHeadModel(hc)
    src = model.state_dict()
    get = lambda k, like: src[k] if k in src else torch.zeros_like(like)  # noqa: E731  (bias=False -> 0)
    dst = hf.state_dict()
    sd = {
        "transformer.wte.weight": src["transformer.wte.weight"],
        "transformer.wpe.weight": src["transformer.pos.wpe.weight"],
        "transformer.ln_f.weight": src["transformer.ln_f.weight"],
        "transformer.ln_f.bias": get("transformer.ln_f.bias", dst["transformer.ln_f.bias"]),
        "lm_head.weight": src["lm_head.weight"],
    }
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        for n in ("ln_1.weight", "ln_2.weight"):
            sd[p + n] = src[p + n]
        for n in ("ln_1.bias", "ln_2.bias", "attn.c_attn.bias", "attn.c_proj.bias", "mlp.c_fc.bias", "mlp.c_proj.bias"):
            sd[p + n] = get(p + n, dst[p + n])
        for n in ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"):
            sd[p + n] = src[p + n].t()  # Linear (out, in) -> Conv1D (in, out)
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    params = {n for n, _ in hf.named_parameters()}
    if unexpected or [k for k in missing if k in params and k != "lm_head.weight"]:
        raise RuntimeError(f"to_hf(gpt2): missing {missing}, unexpected {unexpected}")
    return hf


def _llama_to_hf(model: GPT):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = model.config
    hc = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, attention_bias=cfg.bias,
        mlp_bias=cfg.bias, tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu",
        bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    hf = LlamaForCausalLM(hc)
    src = model.state_dict()
    sd = {
        "model.embed_tokens.weight": src["transformer.wte.weight"],
        "model.norm.weight": src["transformer.ln_f.weight"],
        "lm_head.weight": src["lm_head.weight"],
    }
    splits = [cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim]
    for i in range(cfg.n_layer):
        a, b = f"model.layers.{i}.", f"transformer.h.{i}."
        sd[a + "input_layernorm.weight"] = src[b + "ln_1.weight"]
        sd[a + "post_attention_layernorm.weight"] = src[b + "ln_2.weight"]
        for k in ["weight", "bias"] if cfg.bias else ["weight"]:
            for p, t in zip("qkv", src[b + f"attn.c_attn.{k}"].split(splits, dim=0)):
                sd[a + f"self_attn.{p}_proj.{k}"] = t
            sd[a + f"self_attn.o_proj.{k}"] = src[b + f"attn.c_proj.{k}"]
            sd[a + f"mlp.gate_proj.{k}"] = src[b + f"mlp.c_gate.{k}"]
            sd[a + f"mlp.up_proj.{k}"] = src[b + f"mlp.c_fc.{k}"]
            sd[a + f"mlp.down_proj.{k}"] = src[b + f"mlp.c_proj.{k}"]
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"to_hf(llama): missing {missing}, unexpected {unexpected}")
    return hf


def to_hf(model: GPT):
    """A HF ``GPT2LMHeadModel`` or ``LlamaForCausalLM`` with ``model``'s weights (eval mode, same
    dtype). GPT-2 is chosen for GPT-2-shaped configs (``bias=False`` is written as zero biases),
    Llama for Llama-shaped ones.

    Raises:
        ValueError: the config matches neither; the message lists the fields that differ.
    """
    cfg = model.config
    gpt2_bad, llama_bad = _mismatch(cfg, _GPT2_SHAPE), _mismatch(cfg, _LLAMA_SHAPE)
    if cfg.attention == "mla":
        llama_bad.append("attention='mla' (needs mha/mqa/gqa)")
    if not gpt2_bad:
        hf = _gpt2_to_hf(model)
    elif not llama_bad:
        hf = _llama_to_hf(model)
    else:
        raise ValueError(
            "to_hf: no Hugging Face architecture matches this GPTConfig. "
            f"GPT-2 would need: {', '.join(gpt2_bad)}. Llama would need: {', '.join(llama_bad)}."
        )
    dtype = next(model.parameters()).dtype
    return hf.to(dtype).eval()
