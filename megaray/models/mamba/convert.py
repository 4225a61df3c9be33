"""Hugging Face ``Mamba2ForCausalLM`` -> megaray :class:`Mamba`, weights copied, logits equal in float32.

HF's parameter names are ``mamba_ssm``'s except ``backbone.embeddings`` (``mamba_ssm``:
``backbone.embedding``), so the copy is a rename. Only configurations megaray computes the same
way convert: SiLU activation, no ``time_step_limit`` clamp. Needs ``transformers``.
"""

from __future__ import annotations

import math

from megaray.models.mamba.config import MambaConfig
from megaray.models.mamba.model import Mamba


def from_hf(hf_model) -> Mamba:
    """A :class:`Mamba` with the weights of ``hf_model`` (a ``transformers`` ``Mamba2ForCausalLM``),
    in its dtype, in eval mode. ``block_size`` is set to 2048 (HF configs carry none).

    Raises:
        ValueError: not a Mamba-2 model, or a setting megaray does not implement (named).
    """
    c = hf_model.config
    if getattr(c, "model_type", None) != "mamba2":
        raise ValueError(f"from_hf: expected a Mamba2ForCausalLM, got model_type {getattr(c, 'model_type', None)!r}")
    bad = []
    if c.hidden_act not in ("silu", "swish"):
        bad.append(f"hidden_act {c.hidden_act!r} (megaray uses silu)")
    lo, hi = c.time_step_limit
    if lo > 0.0 or not math.isinf(hi):
        bad.append(f"time_step_limit {tuple(c.time_step_limit)} (megaray does not clamp dt)")
    if c.num_heads * c.head_dim != c.expand * c.hidden_size:
        bad.append(f"num_heads * head_dim ({c.num_heads * c.head_dim}) != expand * hidden_size")
    if bad:
        raise ValueError("cannot convert this Mamba2 model: " + "; ".join(bad))
    cfg = MambaConfig(
        vocab_size=c.vocab_size,
        block_size=2048,
        n_layer=c.num_hidden_layers,
        d_model=c.hidden_size,
        d_state=c.state_size,
        d_conv=c.conv_kernel,
        expand=c.expand,
        headdim=c.head_dim,
        n_groups=c.n_groups,
        chunk_size=c.chunk_size,
        norm_eps=c.layer_norm_epsilon,
        bias=c.use_bias,
        conv_bias=c.use_conv_bias,
        tie_embeddings=bool(c.tie_word_embeddings),
    )
    sd = {
        k.replace("backbone.embeddings.", "backbone.embedding."): v.detach().clone()
        for k, v in hf_model.state_dict().items()
    }
    dtype = next(hf_model.parameters()).dtype
    model = Mamba(cfg)
    model.load_state_dict(sd, strict=True)
    return model.to(dtype).eval()
