"""nGPT: the normalized Transformer (Loshchilov, Hsieh, Sun, Ginsburg 2024, arXiv:2410.01131).

Every hidden state and every weight vector along the embedding dimension lies on the unit
hypersphere. A layer does not add its output to the residual stream; it moves the hidden state
towards the (normalised) output by a learnable per-dimension step, the *eigen learning rate*:

    h <- Norm(h + alpha_A * (Norm(Attn(h)) - h));   h <- Norm(h + alpha_M * (Norm(MLP(h)) - h))

Queries and keys are normalised per head after RoPE and scaled by ``s_qk`` (softmax scale
``sqrt(d_head)``, since ``q.k`` is now a cosine); the SwiGLU inputs are scaled by ``s_u``, ``s_v``
(times ``sqrt(n_embd)``); the logits by ``s_z``. There is no LayerNorm, no bias, no weight tying.
The weights are normalised at init and must be re-normalised after every optimizer step: the
training task does that (:class:`megaray.tasks.ngpt.NGPTTask`) over :meth:`NGPT.normalized_weights`.

Source followed: NVIDIA's reference ``model.py`` and ``train.py`` (github.com/NVIDIA/ngpt): the
names, the scalers' storage (``param * init_value / init_scaling``), ``abs(alpha)``, ``s_u`` and
``s_v`` both multiplied by ``sqrt(n_embd)``, which axis of each matrix is normalised. RoPE uses
megaray's half-split layout (:mod:`megaray.models.common.position`), a fixed permutation of the
reference's interleaved pairs.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from megaray.models.common.attention import KVCache, reference_attention, sdpa_attention
from megaray.models.common.checkpointing import run_block
from megaray.models.common.position import RopeTables, RotaryPosition, apply_rope
from megaray.models.ngpt.config import NGPTConfig


def unit_norm(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``x / ||x||_2`` along ``dim`` (the paper's ``Norm``; ``F.normalize``, eps 1e-12)."""
    return F.normalize(x, p=2.0, dim=dim)


class Scaler(nn.Module):
    """A learnable per-dimension scale stored as ``init_scaling * ones(n)`` and used as
    ``param * (init_value / init_scaling)`` (reference nGPT; section 2.5 of the paper).

    ``forward()`` returns the effective ``(n,)`` scale; ``times`` multiplies the result by a
    constant (``sqrt(n_embd)`` for ``s_u``, ``s_v``)."""

    def __init__(self, n: int, init_value: float, init_scaling: float, times: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.full((n,), float(init_scaling)))
        self.factor = init_value / init_scaling * times

    def forward(self) -> torch.Tensor:
        return self.weight * self.factor


class NormalizedAttention(nn.Module):
    """Causal self-attention with normalised, ``s_qk``-scaled queries and keys: ``(B, T, C) -> (B, T, C)``."""

    def __init__(self, cfg: NGPTConfig):
        super().__init__()
        C, self.n_head, self.head_dim = cfg.n_embd, cfg.n_head, cfg.head_dim
        self.query = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.c_proj = nn.Linear(C, C, bias=False)
        self.s_qk = Scaler(C, cfg.s_qk_init, cfg.scale)
        self.kernel = sdpa_attention if cfg.attn_backend == "sdpa" else reference_attention

    def forward(self, h: torch.Tensor, rope: RopeTables, cache: Optional[KVCache] = None) -> torch.Tensor:
        B, T, C = h.shape
        q, k, v = (
            lin(h).view(B, T, self.n_head, self.head_dim).transpose(1, 2) for lin in (self.query, self.key, self.value)
        )  # (B, nh, T, hd) each
        s_qk = self.s_qk().view(1, self.n_head, 1, self.head_dim)
        q = s_qk * unit_norm(apply_rope(q, rope))
        k = s_qk * unit_norm(apply_rope(k, rope))
        if cache is not None:
            k, v = cache.update(k, v)  # (B, nh, Tk, hd)
        y = self.kernel(q, k, v, None, 0.0, math.sqrt(self.head_dim))  # softmax scale sqrt(d_k)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class NormalizedMLP(nn.Module):
    """SwiGLU ``u * silu(v)`` with ``u``, ``v`` scaled by ``s_u``, ``s_v`` (times ``sqrt(n_embd)``)."""

    def __init__(self, cfg: NGPTConfig):
        super().__init__()
        H = cfg.hidden_dim
        self.c_fc = nn.Linear(cfg.n_embd, 2 * H, bias=False)  # [u | v]
        self.c_proj = nn.Linear(H, cfg.n_embd, bias=False)
        self.s_u = Scaler(H, cfg.s_uv_init, 1.0, times=math.sqrt(cfg.n_embd))
        self.s_v = Scaler(H, cfg.s_uv_init, 1.0, times=math.sqrt(cfg.n_embd))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        u, v = self.c_fc(h).chunk(2, dim=-1)  # (B, T, H) each
        return self.c_proj((u * self.s_u()) * F.silu(v * self.s_v()))


class NormalizedBlock(nn.Module):
    """One nGPT layer on the sphere: ``(B, T, C)`` unit rows -> ``(B, T, C)`` unit rows."""

    def __init__(self, cfg: NGPTConfig):
        super().__init__()
        self.attn = NormalizedAttention(cfg)
        self.mlp = NormalizedMLP(cfg)
        self.alpha_attn = Scaler(cfg.n_embd, cfg.alpha_attn_init, cfg.scale)  # alpha_A
        self.alpha_mlp = Scaler(cfg.n_embd, cfg.alpha_mlp_init, cfg.scale)  # alpha_M

    @staticmethod
    def _step(h: torch.Tensor, out: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        h = unit_norm(h)  # "normally not needed" (reference): h is already on the sphere
        return unit_norm(h + alpha.abs() * (unit_norm(out) - h))

    def forward(self, h: torch.Tensor, rope: RopeTables, cache: Optional[KVCache] = None) -> torch.Tensor:
        h = self._step(h, self.attn(h, rope, cache), self.alpha_attn())
        return self._step(h, self.mlp(h), self.alpha_mlp())


class NGPT(nn.Module):
    """nGPT language model (the GPT family's interface).

    Args:
        config: an :class:`NGPTConfig` (e.g. ``NGPTConfig.from_name("tiny")``).

    ``model(idx)`` maps ``(B, T)`` int64 ids to ``(B, T, V)`` float logits; ``model(idx, targets)``
    returns ``(logits, loss)``, ``loss`` the mean cross-entropy over targets that are not ``-1``.
    ``aux_loss`` is always 0 (no MoE). ``cache`` (:meth:`new_cache`) continues after the cached
    tokens, as :func:`megaray.models.gpt.sampling.generate` expects. ``config.activation_checkpointing``
    (or :meth:`set_activation_checkpointing`) recomputes each block in backward while training.
    """

    def __init__(self, config: NGPTConfig):
        super().__init__()
        self.config = config
        C, V = config.n_embd, config.vocab_size
        self.wte = nn.Embedding(V, C)
        self.rope = RotaryPosition(config.head_dim, config.rope_theta)
        self.blocks = nn.ModuleList([NormalizedBlock(config) for _ in range(config.n_layer)])
        self.lm_head = nn.Linear(C, V, bias=False)  # untied, as the paper
        self.s_z = Scaler(V, config.s_z_init, config.scale)
        self.aux_loss = torch.zeros(())
        self.activation_checkpointing = config.activation_checkpointing
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=config.scale)
        self.normalize_weights()

    def normalized_weights(self) -> List[Tuple[nn.Parameter, int]]:
        """``(weight, dim)`` of every matrix whose vectors along ``dim`` live on the unit sphere:
        the embedding-dimension side of each matrix (reference ``normalize_matrices``). Inputs
        from the hidden state (``wte``, ``lm_head``, ``query``/``key``/``value``, ``c_fc``:
        ``(out, n_embd)``) have unit rows (dim 1); outputs into it (the two ``c_proj``:
        ``(n_embd, in)``) unit columns (dim 0)."""
        out = [(self.wte.weight, 1), (self.lm_head.weight, 1)]
        for b in self.blocks:
            out += [
                (b.attn.query.weight, 1),
                (b.attn.key.weight, 1),
                (b.attn.value.weight, 1),
                (b.attn.c_proj.weight, 0),
                (b.mlp.c_fc.weight, 1),
                (b.mlp.c_proj.weight, 0),
            ]
        return out

    @torch.no_grad()
    def normalize_weights(self) -> "NGPT":
        """Project every :meth:`normalized_weights` matrix onto the sphere in place (for a plain
        optimizer; under DeepSpeed the task also updates the optimizer's fp32 master copy)."""
        for w, dim in self.normalized_weights():
            w.copy_(unit_norm(w.float(), dim).to(w.dtype))
        return self

    def forward(
        self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, *, cache: Optional[List[KVCache]] = None
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """``(B, T)`` int64 ids [, ``(B, T)`` int64 targets] -> ``(B, T, V)`` logits [, loss].

        Raises:
            ValueError: cached length + ``T`` exceeds ``block_size``.
        """
        B, T = idx.shape
        start = len(cache[0]) if cache else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        rope = self.rope.rope(torch.arange(start, start + T, device=idx.device))  # (T, hd) x2
        h = self.wte(idx)  # (B, T, C), unit rows
        ckpt = self.activation_checkpointing and self.training and cache is None
        for i, block in enumerate(self.blocks):
            h = run_block(block, h, rope, cache[i] if cache is not None else None, enabled=ckpt)
        logits = self.lm_head(h) * self.s_z()  # (B, T, V)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def set_activation_checkpointing(self, flag: bool) -> "NGPT":
        """Recompute each block in backward when training with ``flag`` True (as the GPT's)."""
        self.activation_checkpointing = bool(flag)
        return self

    def new_cache(self) -> List[KVCache]:
        """An empty KV cache, one :class:`KVCache` per layer, for ``forward(..., cache=)``."""
        return [KVCache() for _ in range(self.config.n_layer)]

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; ``non_embedding`` drops the token embedding (the LM head stays)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wte.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        """Training FLOPs per token, ``6 N + 12 L H Q T`` (PaLM appendix B, as
        :func:`megaray.models.gpt.flops.flops_per_token`); normalisations are not counted."""
        c = self.config
        T = seq_len or c.block_size
        return 6.0 * self.num_params(non_embedding=True) + 12.0 * c.n_layer * c.n_head * c.head_dim * T

    def generate(self, idx: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """``(B, T)`` -> ``(B, T + n)`` int64; see :func:`megaray.models.gpt.sampling.generate`."""
        from megaray.models.gpt.sampling import generate

        return generate(self, idx, max_new_tokens, **kwargs)
