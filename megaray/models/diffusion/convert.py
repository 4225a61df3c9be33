"""Build a megaray :class:`DiT` from a diffusers ``DiTTransformer2DModel`` (weights copied).

diffusers (``models/transformers/dit_transformer_2d.py``, checked against 0.42.1) holds the same
network as the DiT reference, laid out differently:

* ``pos_embed.proj`` is the patch conv; ``transformer_blocks[i]`` are ``BasicTransformerBlock``s
  with ``norm_type="ada_norm_zero"``: ``norm1.linear`` is the block's adaLN-Zero projection
  (same chunk order: shift, scale, gate for attention, then for the MLP), ``attn1.to_q/k/v``
  fuse into our ``c_attn``, ``attn1.to_out.0`` is ``c_proj``, ``ff.net.0.proj`` / ``ff.net.2``
  the tanh-GELU MLP, ``norm3`` (eps ``norm_eps``) the LayerNorm before it;
* every block has its own timestep/label embedder ``norm1.emb`` (``CombinedTimestepLabelEmbeddings``;
  749,826,464 parameters at XL/2 instead of 675M), but the forward pass uses block 0's for the
  final layer and checkpoints converted from the original weights hold identical copies: we take
  block 0's and require the others to be equal;
* its timestep features use ``downscale_freq_shift=1`` (DiT's reference: 0), carried over as
  ``freq_shift=1``; ``proj_out_1`` / ``proj_out_2`` are the final layer.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from megaray.models.diffusion.config import DiTConfig
from megaray.models.diffusion.dit import DiT


def _config(hf) -> DiTConfig:
    """The DiTConfig of a ``DiTTransformer2DModel``. Raises ValueError for what megaray cannot hold."""
    c = hf.config
    bad: List[str] = []
    if c.norm_type != "ada_norm_zero":
        bad.append(f"norm_type {c.norm_type!r} (only 'ada_norm_zero')")
    if c.norm_elementwise_affine:
        bad.append("norm_elementwise_affine=True (DiT's norms have no affine parameters)")
    if c.activation_fn != "gelu-approximate":
        bad.append(f"activation_fn {c.activation_fn!r} (only 'gelu-approximate')")
    if not c.attention_bias:
        bad.append("attention_bias=False (DiT's attention has biases)")
    out = hf.out_channels
    if out not in (c.in_channels, 2 * c.in_channels):
        bad.append(f"out_channels {out} (must be in_channels {c.in_channels} or twice it)")
    if bad:
        raise ValueError("cannot convert this DiTTransformer2DModel: " + "; ".join(bad))
    hidden = c.num_attention_heads * c.attention_head_dim
    ff_inner = hf.transformer_blocks[0].ff.net[0].proj.out_features
    return DiTConfig(
        input_size=c.sample_size,
        in_channels=c.in_channels,
        patch_size=c.patch_size,
        hidden_size=hidden,
        depth=c.num_layers,
        num_heads=c.num_attention_heads,
        mlp_ratio=ff_inner / hidden,
        norm_eps=c.norm_eps,
        freq_shift=1.0,
        num_classes=c.num_embeds_ada_norm,
        class_dropout_prob=hf.transformer_blocks[0].norm1.emb.class_embedder.dropout_prob,
        learn_sigma=out == 2 * c.in_channels,
    )


def _check_tied(hf) -> Dict[str, torch.Tensor]:
    """Block 0's ``norm1.emb`` state dict, after checking every block holds the same tensors.

    Raises:
        ValueError: naming the first block (and tensor) whose embedder differs from block 0's.
    """
    first = hf.transformer_blocks[0].norm1.emb.state_dict()
    for i, block in enumerate(hf.transformer_blocks[1:], start=1):
        for k, v in block.norm1.emb.state_dict().items():
            if v.shape != first[k].shape or not torch.equal(v, first[k]):
                raise ValueError(
                    f"transformer_blocks.{i}.norm1.emb.{k} differs from transformer_blocks.0.norm1.emb.{k}: megaray's "
                    "DiT has one timestep/label embedder (as DiT's reference), so every block's must be equal "
                    "(checkpoints converted from facebookresearch/DiT are); this model's are not"
                )
    return first


def from_diffusers(hf) -> DiT:
    """A :class:`DiT` with the weights of diffusers' ``DiTTransformer2DModel`` ``hf``, in float32.

    ``DiT(x, t, y)`` then equals ``hf(x, timestep=t, class_labels=y).sample`` (within 1e-4 in
    fp32; ``tests/test_diffusion_model.py``).

    Raises:
        ValueError: a configuration megaray's DiT does not express, or per-block embedders that differ.
    """
    cfg = _config(hf)
    emb = _check_tied(hf)
    sd = {k: v.detach().float() for k, v in hf.state_dict().items()}
    out: Dict[str, torch.Tensor] = {
        "x_embedder.weight": sd["pos_embed.proj.weight"],
        "x_embedder.bias": sd["pos_embed.proj.bias"],
        "t_embedder.mlp.0.weight": emb["timestep_embedder.linear_1.weight"].float(),
        "t_embedder.mlp.0.bias": emb["timestep_embedder.linear_1.bias"].float(),
        "t_embedder.mlp.2.weight": emb["timestep_embedder.linear_2.weight"].float(),
        "t_embedder.mlp.2.bias": emb["timestep_embedder.linear_2.bias"].float(),
        "y_embedder.embedding_table.weight": emb["class_embedder.embedding_table.weight"].float(),
        "final_layer.adaLN_modulation.proj.weight": sd["proj_out_1.weight"],
        "final_layer.adaLN_modulation.proj.bias": sd["proj_out_1.bias"],
        "final_layer.linear.weight": sd["proj_out_2.weight"],
        "final_layer.linear.bias": sd["proj_out_2.bias"],
    }
    for i in range(cfg.depth):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.c_attn.{kind}"] = torch.cat([sd[src + f"attn1.to_{n}.{kind}"] for n in "qkv"])
            out[dst + f"attn.c_proj.{kind}"] = sd[src + f"attn1.to_out.0.{kind}"]
            out[dst + f"mlp.c_fc.{kind}"] = sd[src + f"ff.net.0.proj.{kind}"]
            out[dst + f"mlp.c_proj.{kind}"] = sd[src + f"ff.net.2.{kind}"]
            out[dst + f"adaLN_modulation.proj.{kind}"] = sd[src + f"norm1.linear.{kind}"]
    model = DiT(cfg)
    model.load_state_dict(out, strict=True)
    return model
