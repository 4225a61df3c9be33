"""megaray's multi-head latent attention is DeepSeek's: ``from_hf`` of a tiny randomly initialised,
all-dense HF ``DeepseekV3ForCausalLM`` (built in-test, nothing downloads) gives equal logits (fp32)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megaray.models.gpt import from_hf  # noqa: E402

V, T = 96, 12


def deepseek(q_lora_rank=24, rope_interleave=True, **kw):
    """Dims all different (nope 12, rope 8, v 10, kv rank 16) so a swapped split shows up."""
    cfg = transformers.DeepseekV3Config(
        vocab_size=V, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=q_lora_rank,
        qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10, first_k_dense_replace=2, n_routed_experts=4,
        n_group=1, topk_group=1, num_experts_per_tok=2, max_position_embeddings=32, rope_interleave=rope_interleave,
        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=None, **kw,
    )  # fmt: skip
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(cfg).float()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random values everywhere (norm gains around 1): a skipped tensor shows
        for name, p in hf.named_parameters():
            base = 1.0 if "norm" in name else 0.0
            p.copy_(base + torch.randn(p.shape, generator=g) * 0.2)
    return hf.eval()


@pytest.mark.parametrize(
    "q_lora_rank,interleave", [(24, True), (None, True), (24, False)], ids=["qlora-interleave", "fullq", "halfsplit"]
)
def test_from_hf_deepseek_v3_dense_equal_logits(q_lora_rank, interleave):
    hf = deepseek(q_lora_rank, interleave)
    assert all(type(layer.mlp).__name__ == "DeepseekV3MLP" for layer in hf.model.layers)  # all dense
    model = from_hf(hf)
    c = model.config
    assert (c.attention, c.qk_nope_head_dim, c.v_head_dim, c.qk_rope_head_dim) == ("mla", 12, 10, 8)
    idx = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf(idx).logits
        got = model(idx)
    assert want.abs().max() > 1.0  # the comparison is not between two near-zero tensors
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_interleaved_rope_needs_the_row_permutation():
    """Without the de-interleave the logits differ: the permutation is what makes them equal."""
    hf = deepseek(24, True)
    model = from_hf(hf)
    hf.config.rope_interleave = False  # HF now applies half-split RoPE to the same weights
    idx = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (model(idx) - hf(idx).logits).abs().max() > 1e-3


def test_from_hf_deepseek_v3_with_moe_layers_is_rejected():
    cfg = transformers.DeepseekV3Config(
        vocab_size=V, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
        qk_nope_head_dim=12, v_head_dim=10, first_k_dense_replace=1, n_routed_experts=4, n_group=1, topk_group=1,
        num_experts_per_tok=2, max_position_embeddings=32,
    )  # fmt: skip
    with pytest.raises(ValueError, match="first_k_dense_replace"):
        from_hf(transformers.DeepseekV3ForCausalLM(cfg))
