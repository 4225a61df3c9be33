"""GPT: a decoder-only transformer whose parts are chosen by :class:`GPTConfig` strings.

Read top to bottom: :class:`Block` (norm + attention + norm + feed-forward, joined by the residual
placement of ``cfg.norm_placement``) and :class:`GPT` (token embedding, position scheme, blocks,
final norm, LM head). Every variant lives in :mod:`megaray.models.common`:

=============  ==================================================  ===========================
slot           choices                                             module
=============  ==================================================  ===========================
attention      mha, mqa, gqa, mla; backends auto/sdpa/flash/ref     ``common/attention.py``
position       learned, sinusoidal, rope, alibi, none; or a list    ``common/position.py``
norm           layernorm, rmsnorm; pre / post / sandwich; final     ``common/norm.py``
feed-forward   gelu, relu, silu, swiglu, geglu, convmlp,            ``common/mlp.py``, ``moe.py``
               shufflemlp; MoE if n_experts
               (router top_k or expert_choice, MH-MoE moe_heads;   ``experts.py``, ``peer.py``
               router peer: PEER product-key experts)
residual       plain (by norm_placement), rezero; init gpt2/admin   this module
=============  ==================================================  ===========================

Sources: nanoGPT ``model.py`` (Karpathy) for the layout, names and GPT-2 init; litgpt for
config-driven variants.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megaray.models.common.attention import KVCache, build_attention, causal_mask, span_mask
from megaray.models.common.experts import SparseFeedForward, StackedLinear
from megaray.models.common.moe import build_feed_forward, gather_moe_losses
from megaray.models.common.norm import RESIDUALS, build_final_norm, build_norm, build_post_norm
from megaray.models.common.position import build_position
from megaray.models.gpt.config import GPTConfig


class Block(nn.Module):
    """One transformer layer: ``(B, T, C) -> (B, T, C)``.

    ``forward(x, rope, bias, cache, mask)`` passes the position tables (``rope``), the additive
    attention bias (``bias``), this layer's :class:`KVCache` (or None) and a boolean attention
    mask (or None: causal) to attention.

    Each of the two sublayers ``f`` (attention, feed-forward) joins the residual stream as
    ``cfg.norm_placement`` says (``x + f(norm(x))``, ``norm(x + f(x))``, or with ``sandwich``
    ``x + post(f(norm(x)))``, ``post`` = ``ln_1_post`` / ``ln_2_post``), or:

    * ``residual="rezero"`` (Bachlechner et al. 2020, "ReZero is All You Need"):
      ``x + alpha * f(norm(x))`` (sandwich: ``x + alpha * post(f(norm(x)))``) with one scalar
      ``alpha`` per sublayer, 0 at init, so every block starts as the identity;
    * ``init="admin"`` (Liu et al. 2020, "Understanding the Difficulty of Training Transformers"):
      ``norm(x * omega + f(x))`` with ``omega`` ``(C,)`` per sublayer, set by :meth:`GPT.admin_init`.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = build_norm(config)
        self.attn = build_attention(config)
        self.ln_2 = build_norm(config)
        self.mlp = build_feed_forward(config)
        self.ln_1_post, self.ln_2_post = build_post_norm(config), build_post_norm(config)  # sandwich only
        self.mlp_uses_cache = getattr(self.mlp, "uses_cache", False)  # ConvMLP keeps a conv state
        self.drop = nn.Dropout(config.dropout)
        self.residual = RESIDUALS[config.norm_placement]
        self.rezero, self.admin = config.residual == "rezero", config.init == "admin"
        if self.rezero:
            self.alpha_attn, self.alpha_mlp = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
        if self.admin:
            self.omega_attn = nn.Parameter(torch.ones(config.n_embd))
            self.omega_mlp = nn.Parameter(torch.ones(config.n_embd))
        #: set to a list by :meth:`GPT.admin_init`: each sublayer appends ``Var[f(x)]`` (float)
        self.admin_profile: Optional[List[float]] = None

    def forward(self, x, rope=None, bias=None, cache: Optional[KVCache] = None, mask=None) -> torch.Tensor:
        x = self._sublayer(x, self.ln_1, lambda h: self.attn(h, rope, bias, cache, mask), "attn", self.ln_1_post)
        mlp = (lambda h: self.mlp(h, cache)) if self.mlp_uses_cache else self.mlp
        return self._sublayer(x, self.ln_2, mlp, "mlp", self.ln_2_post)

    def _sublayer(self, x: torch.Tensor, norm: nn.Module, fn, name: str, post: Optional[nn.Module]) -> torch.Tensor:
        if post is not None:  # sandwich: the branch ends in its own norm
            branch = fn
            fn = lambda h: post(branch(h))  # noqa: E731
        if self.rezero:
            return x + getattr(self, f"alpha_{name}") * self.drop(fn(norm(x)))
        if self.admin:
            fx = self.drop(fn(x))
            if self.admin_profile is not None:
                self.admin_profile.append(float(fx.float().var()))
            return norm(x * getattr(self, f"omega_{name}") + fx)
        return self.residual(x, norm, fn, self.drop)


class GPT(nn.Module):
    """Decoder-only language model.

    Args:
        config: a :class:`GPTConfig` (e.g. ``GPTConfig.from_name("debug")``).

    ``model(idx)`` maps ``(B, T)`` int64 token ids to ``(B, T, V)`` float logits;
    ``model(idx, targets)`` returns ``(logits, loss)`` with ``loss`` the mean cross-entropy over
    positions whose target is not ``-1``. The MoE auxiliary loss of the last forward
    (load balancing + router z-loss, coefficients applied, summed over layers; 0 for dense models)
    is :attr:`aux_loss`: add it to ``loss`` when training. :attr:`moe_stats` holds the last
    forward's detached ``moe_aux``, ``moe_z_loss``, ``moe_dropped_frac`` (PEER: ``moe_aux``,
    ``moe_expert_usage``; see :mod:`megaray.models.common.moe`). ``T`` (plus the cache length) must not exceed ``config.block_size``.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                pos=build_position(config),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=build_final_norm(config),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight  # weight tying (Press & Wolf 2017)
        self.activation_checkpointing = config.activation_checkpointing
        self.aux_loss = torch.zeros(())
        self.moe_stats: Dict[str, torch.Tensor] = {}
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer) (two per block)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.init == "admin":
            self.admin_init()

    @torch.no_grad()
    def admin_init(self, idx: Optional[torch.Tensor] = None) -> List[float]:
        """Admin's profiling pass (Liu et al. 2020, section 4.3): with every ``omega = 1``, one
        forward (eval mode) records ``Var[x_0]`` (the embedded input of the first block) and
        ``Var[f_j(x_{j-1})]`` of every sublayer ``j`` in order (attn 0, mlp 0, attn 1, ...); then
        ``omega_i = sqrt(Var[x_0] + sum_{j<i} Var[f_j(x_{j-1})])``, the accumulated variance of the
        residual stream entering sublayer ``i`` (the paper's ``sum_{j<i}``, with the embedding
        counted as the first term so ``omega_1`` is not 0).

        Args:
            idx: ``(B, T)`` token ids to profile on; default ``B=2``, ``T=min(block_size, 128)``
                ids drawn from a generator seeded 0 (at init the statistics barely depend on data).
        Returns:
            ``[Var[x_0], Var[f_1], ..., Var[f_{2L}]]``.
        """
        cfg, tr = self.config, self.transformer
        if idx is None:
            gen = torch.Generator().manual_seed(0)
            idx = torch.randint(0, cfg.vocab_size, (2, min(cfg.block_size, 128)), generator=gen)
        idx = idx.to(self.lm_head.weight.device)
        blocks = list(tr.h)
        profile: List[float] = []
        for b in blocks:
            b.omega_attn.fill_(1.0), b.omega_mlp.fill_(1.0)
            b.admin_profile = profile
        handle = tr.drop.register_forward_hook(lambda m, i, out: profile.append(float(out.float().var())))
        was_training = self.training
        try:
            self.eval()
            self(idx)
        finally:
            handle.remove()
            self.train(was_training)
            for b in blocks:
                b.admin_profile = None
        acc = torch.tensor(profile, dtype=torch.float64).cumsum(0)  # acc[i] = Var[x_0] + sum_{j<=i} Var[f_j]
        omegas = acc[:-1].sqrt()  # one per sublayer, in order
        for i, b in enumerate(blocks):
            b.omega_attn.fill_(float(omegas[2 * i])), b.omega_mlp.fill_(float(omegas[2 * i + 1]))
        return profile

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, StackedLinear):  # MoE experts: one nn.Linear init per expert
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # -- forward ---------------------------------------------------------------------------
    def forward(
        self,
        idx: torch.Tensor,
        targets: Optional[torch.Tensor] = None,
        *,
        cache: Optional[List[KVCache]] = None,
        span_ids: Optional[torch.Tensor] = None,
        doc_ids: Optional[torch.Tensor] = None,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """``(B, T)`` int64 ids [, ``(B, T)`` int64 targets] -> ``(B, T, V)`` logits [, loss].

        ``cache`` (from :meth:`new_cache`) makes the call continue after the cached tokens.
        ``span_ids`` ``(B, cached + T)`` int: bidirectional spans inside the causal sequence
        (0 = none; see :func:`megaray.models.common.attention.span_mask`); None = plain causal.
        ``doc_ids`` ``(B, T)`` int (no cache): packed documents; position ``i`` attends only to
        earlier positions with the same id (a document mask, for packed fine-tuning records).

        Raises:
            ValueError: cached length + ``T`` exceeds ``block_size``.
        """
        B, T = idx.shape
        start = len(cache[0]) if cache else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        tr = self.transformer
        q_pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        k_pos = torch.arange(0, start + T, device=idx.device)  # (Tk,)
        x = tr.drop(tr.pos.embed(tr.wte(idx), q_pos))  # (B, T, C)
        rope, bias = tr.pos.rope(q_pos), tr.pos.attn_bias(q_pos, k_pos)  # (T, d) x2, (nh, T, Tk)
        mask = None if span_ids is None else span_mask(span_ids, T)  # (B, 1, T, Tk)
        if doc_ids is not None:  # document mask: causal and within one packed document
            same = (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]  # (B, 1, T, T)
            mask = same & (causal_mask(T, T, idx.device) if mask is None else mask)
        for i, block in enumerate(tr.h):
            if self.activation_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, rope, bias, None, mask, use_reentrant=False)
            else:
                x = block(x, rope, bias, cache[i] if cache is not None else None, mask)
        logits = self.lm_head(tr.ln_f(x))  # (B, T, V)
        self.aux_loss, stats = gather_moe_losses(self, idx.device)
        if stats is not None:
            self.moe_stats = stats
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    # -- utilities -------------------------------------------------------------------------
    def new_cache(self) -> List[KVCache]:
        """An empty KV cache, one :class:`KVCache` per layer, for ``forward(..., cache=)``."""
        return [KVCache() for _ in range(self.config.n_layer)]

    def set_activation_checkpointing(self, flag: bool) -> "GPT":
        """Recompute each block in backward (``torch.utils.checkpoint``, non-reentrant) when
        training with ``flag`` True; trades about one extra forward for activation memory."""
        self.activation_checkpointing = bool(flag)
        return self

    def num_params(self, non_embedding: bool = True, active: bool = False) -> int:
        """Parameter count (tied weights once).

        ``non_embedding`` drops the position table and, when untied, the token embedding (the
        LM head stays: it is a matmul), as nanoGPT. ``active`` counts only the experts one token
        applies per routed layer (``moe_top_k``, times ``moe_heads`` sub-tokens or PEER heads; see
        :meth:`~megaray.models.common.experts.SparseFeedForward.inactive_params`).
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(p.numel() for p in self.transformer.pos.parameters())
            if not self.config.tie_embeddings:
                n -= self.transformer.wte.weight.numel()
        if active:
            n -= sum(m.inactive_params() for m in self.modules() if isinstance(m, SparseFeedForward))
        return n

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        """Training FLOPs per token (forward + backward) at ``T = seq_len or block_size``; see
        :func:`megaray.models.gpt.flops.flops_per_token` (MoE: active parameters only)."""
        from megaray.models.gpt.flops import flops_per_token

        return flops_per_token(self.config, self.num_params(non_embedding=True, active=True), seq_len)

    def generate(self, idx: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """``(B, T)`` -> ``(B, T + n)`` int64; see :func:`megaray.models.gpt.sampling.generate`."""
        from megaray.models.gpt.sampling import generate

        return generate(self, idx, max_new_tokens, **kwargs)
