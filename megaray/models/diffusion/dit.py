"""DiT: the diffusion transformer network (the process is in :mod:`.process`).

Peebles & Xie 2023, "Scalable Diffusion Models with Transformers" (arXiv:2212.09748); reference
github.com/facebookresearch/DiT ``models.py``, followed module for module:

* patchify: ``Conv2d(C, D, kernel=p, stride=p)`` -> ``(B, N, D)`` tokens, ``N = (H/p) * (W/p)``
  (row-major), plus the fixed 2-D sin-cos table of MAE
  (:func:`megaray.models.common.position.sincos_2d`) for the ``(H/p, W/p)`` grid;
* conditioning vector ``c = t_embedder(t) + y_embedder(y)`` (sinusoidal timestep features -> MLP;
  a class table with one extra row, the null class ``num_classes``, for classifier-free guidance;
  ``class_dropout_prob`` of the labels are replaced by it in training);
* ``depth`` adaLN-Zero blocks (:class:`megaray.models.common.conditioning.AdaLNZero`):
  ``x += gate_msa * attn(modulate(norm1(x), shift_msa, scale_msa))``, then
  ``x += gate_mlp * mlp(modulate(norm2(x), shift_mlp, scale_mlp))``; every gate is zero at init;
* final layer: ``linear(modulate(norm(x), shift, scale))`` (zero-initialised) -> ``p*p*C_out``
  per token, unpatchified to ``(B, C_out, H, W)``.

Added for text conditioning (``context_dim > 0``): a cross-attention sub-block after the
self-attention of every block, ``x += cross_attn(norm_cross(x), context, context_mask)`` with its
output projection zero-initialised (PixArt-alpha, Chen et al. 2023, arXiv:2310.00426, section 2.3).
A sample whose context is fully masked (or dropped for guidance) gets exactly the no-context
output. With ``text_vocab_size > 0`` the context may be token ids ``(B, L)``, embedded by a learned
table plus fixed 1-D sin-cos positions.

Inputs of any ``(H, W)`` divisible by ``patch_size`` work (mels: 1 channel, ``n_mels x frames``);
the sin-cos table is recomputed for a grid other than the configured one.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from megaray.models.common.attention import CrossAttention, SelfAttention
from megaray.models.common.conditioning import AdaLNZero, TimestepEmbedder, modulate
from megaray.models.common.mlp import MLP, gelu_tanh
from megaray.models.common.position import sincos_1d, sincos_2d
from megaray.models.diffusion.config import DiTConfig


def _attention_cfg(cfg: DiTConfig) -> SimpleNamespace:
    """The fields :class:`SelfAttention` reads, from a DiTConfig (biased qkv, no dropout, as DiT)."""
    return SimpleNamespace(
        n_embd=cfg.hidden_size,
        n_head=cfg.num_heads,
        kv_heads=cfg.num_heads,
        head_dim=cfg.head_dim,
        bias=True,
        qk_norm=False,
        norm_eps=1e-6,
        dropout=0.0,
        attn_backend=cfg.attn_backend,
    )


class LabelEmbedder(nn.Module):
    """Class ids ``(B,)`` -> ``(B, D)``; row ``num_classes`` is the null class (present when
    ``dropout_prob > 0``, as DiT's ``LabelEmbedder``)."""

    def __init__(self, num_classes: int, hidden: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden)
        nn.init.normal_(self.embedding_table.weight, std=0.02)

    def forward(self, y: torch.Tensor, drop: Optional[torch.Tensor] = None) -> torch.Tensor:
        if drop is not None:
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)


class DiTBlock(nn.Module):
    """One adaLN-Zero block (plus cross-attention when ``cfg.context_dim``): ``(B, N, D) -> (B, N, D)``."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.hidden_size
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(_attention_cfg(cfg), causal=False)
        self.cross_attn: Optional[CrossAttention] = None
        if cfg.context_dim:
            self.norm_cross = nn.LayerNorm(D, eps=1e-6)
            backend = "auto" if cfg.attn_backend == "flash" else cfg.attn_backend  # masks need sdpa
            self.cross_attn = CrossAttention(D, cfg.context_dim, cfg.num_heads, backend=backend)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=cfg.norm_eps)
        self.mlp = MLP(D, cfg.mlp_hidden, gelu_tanh)
        self.adaLN_modulation = AdaLNZero(D, D, 6)

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        context: Optional[torch.Tensor] = None,
        context_mask: Optional[torch.Tensor] = None,
        context_keep: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``x (B, N, D)``, ``c (B, D)``; ``context (B, L, context_dim)``, ``context_mask (B, L)`` bool
        (no fully-False rows), ``context_keep (B, 1, 1)`` 0/1 (0 = ignore this sample's context)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c)  # 6 x (B, 1, D)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if self.cross_attn is not None and context is not None:
            x = x + context_keep * self.cross_attn(self.norm_cross(x), context, context_mask)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """``(B, N, D), c (B, D) -> (B, N, p*p*C_out)``: adaLN (shift, scale) then a zero-initialised linear."""

    def __init__(self, hidden: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch_size * patch_size * out_channels)
        self.adaLN_modulation = AdaLNZero(hidden, hidden, 2)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)  # (B, 1, D) each
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """``DiT(cfg)(x, t, y=None, context=None, context_mask=None) -> (B, C_out, H, W)``.

    Args (forward):
        x: ``(B, C, H, W)`` float, ``H`` and ``W`` divisible by ``patch_size``.
        t: ``(B,)`` int64 or float timesteps (a 0-dim tensor is broadcast).
        y: ``(B,)`` int64 class ids, ``num_classes`` = the null class; None = the null class (or
            nothing when ``num_classes == 0``).
        context: ``(B, L, context_dim)`` float features, or ``(B, L)`` int64 token ids when
            ``text_vocab_size > 0``; None = no text.
        context_mask: ``(B, L)`` bool, True = attend this position; a row with no True position
            is treated as no context.

    In training mode, ``class_dropout_prob`` of the samples have their class set to the null
    class and their context dropped (the same samples for both), for classifier-free guidance.

    Returns:
        ``(B, C_out, H, W)``, ``C_out = 2C`` with ``learn_sigma`` (epsilon or v first, then the
        variance interpolation values).

    Raises:
        ValueError: a shape not divisible by the patch, a class or context given to a model
            without that conditioning.
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        cfg = self.config = config
        D, p = cfg.hidden_size, cfg.patch_size
        self.x_embedder = nn.Conv2d(cfg.in_channels, D, kernel_size=p, stride=p)
        self.t_embedder = TimestepEmbedder(D, freq_shift=cfg.freq_shift)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D, cfg.class_dropout_prob) if cfg.num_classes else None
        self.token_embedder = nn.Embedding(cfg.text_vocab_size, cfg.context_dim) if cfg.text_vocab_size else None
        gh, gw = cfg.grid_input[0] // p, cfg.grid_input[1] // p
        self.register_buffer("pos_embed", sincos_2d(D, gh, gw)[None], persistent=False)  # (1, N, D), fixed
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(D, p, cfg.out_channels)
        self.activation_checkpointing = cfg.activation_checkpointing
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT's ``initialize_weights``: xavier-uniform linears and patch conv (as a linear), zero
        biases; the embedders' and the zero-initialised modulations keep their own init."""
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        for block in self.blocks:  # re-zero what the loop above overwrote
            for proj in (block.adaLN_modulation.proj,) + ((block.cross_attn.c_proj,) if block.cross_attn else ()):
                nn.init.zeros_(proj.weight)
                nn.init.zeros_(proj.bias)
        if self.token_embedder is not None:
            nn.init.normal_(self.token_embedder.weight, std=0.02)

    # -- pieces ----------------------------------------------------------------------------
    def positions(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """The ``(1, grid_h * grid_w, D)`` sin-cos table (the buffer when the grid is the configured one)."""
        if (grid_h, grid_w) == self._grid():
            return self.pos_embed
        return sincos_2d(self.config.hidden_size, grid_h, grid_w)[None].to(self.pos_embed.device)

    def _grid(self) -> Tuple[int, int]:
        h, w = self.config.grid_input
        return h // self.config.patch_size, w // self.config.patch_size

    def unpatchify(self, x: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        """``(B, gh*gw, p*p*C) -> (B, C, gh*p, gw*p)`` (DiT's ``unpatchify``, non-square grids too)."""
        p, c = self.config.patch_size, self.config.out_channels
        x = x.reshape(x.shape[0], grid_h, grid_w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, grid_h * p, grid_w * p)

    def embed_context(self, context: torch.Tensor) -> torch.Tensor:
        """Token ids ``(B, L)`` -> ``(B, L, context_dim)`` (table + 1-D sin-cos positions); features pass through."""
        if context.is_floating_point():
            return context
        if self.token_embedder is None:
            raise ValueError("context given as token ids but text_vocab_size is 0: pass (B, L, context_dim) features")
        pos = sincos_1d(self.config.context_dim, torch.arange(context.shape[1])).to(context.device)  # (L, Dc)
        emb = self.token_embedder(context)
        return emb + pos.to(emb.dtype)

    def _condition(
        self, t: torch.Tensor, y: Optional[torch.Tensor], drop: Optional[torch.Tensor], B: int
    ) -> torch.Tensor:
        """``c (B, D)`` = timestep embedding (+ class embedding)."""
        t = t.expand(B) if t.dim() == 0 else t
        c = self.t_embedder(t)
        if self.y_embedder is None:
            if y is not None:
                raise ValueError("class labels given to a DiT with num_classes 0")
            return c
        if y is None:
            if self.y_embedder.embedding_table.num_embeddings == self.config.num_classes:
                raise ValueError("y=None means the null class, which a DiT with class_dropout_prob 0 does not have")
            y = torch.full((B,), self.config.num_classes, dtype=torch.long, device=t.device)
        return c + self.y_embedder(y, drop)

    def _context(self, context, context_mask, drop, B):
        """``(context, safe_mask, keep (B, 1, 1))`` for the blocks, or ``(None, None, None)``."""
        if context is None:
            return None, None, None
        if not self.config.context_dim:
            raise ValueError("context given to a DiT with context_dim 0")
        context = self.embed_context(context)  # (B, L, Dc)
        mask = (
            torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
            if context_mask is None
            else context_mask.bool()
        )
        if drop is not None:
            mask = mask & ~drop[:, None]
        keep = mask.any(dim=1)  # (B,)
        safe = mask | ~keep[:, None]  # rows with nothing to attend see everything, then are zeroed by keep
        return context, safe, keep.to(context.dtype)[:, None, None]

    # -- forward ---------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: Optional[torch.Tensor] = None,
        context: Optional[torch.Tensor] = None,
        context_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        B, _, H, W = x.shape
        p = self.config.patch_size
        if H % p or W % p:
            raise ValueError(f"input {H}x{W} is not divisible by patch_size {p}: pad or crop it")
        gh, gw = H // p, W // p
        drop = None
        if self.training and self.config.class_dropout_prob > 0:
            drop = torch.rand(B, device=x.device) < self.config.class_dropout_prob  # (B,)
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.positions(gh, gw).to(x.dtype)  # (B, N, D)
        c = self._condition(t, y, drop, B)  # (B, D)
        ctx, mask, keep = self._context(context, context_mask, drop, B)
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                h = checkpoint(block, h, c, ctx, mask, keep, use_reentrant=False)
            else:
                h = block(h, c, ctx, mask, keep)
        return self.unpatchify(self.final_layer(h, c), gh, gw)  # (B, C_out, H, W)

    # -- utilities -------------------------------------------------------------------------
    def set_activation_checkpointing(self, flag: bool) -> "DiT":
        """Recompute each block in backward when training with ``flag`` True."""
        self.activation_checkpointing = bool(flag)
        return self

    def num_params(self, include_pos_embed: bool = True) -> int:
        """Parameter count; with ``include_pos_embed`` the fixed sin-cos table counts too, as in
        the DiT reference (a frozen ``nn.Parameter`` there) and its published model sizes."""
        n = sum(p.numel() for p in self.parameters())
        return n + (self.pos_embed.numel() if include_pos_embed else 0)
