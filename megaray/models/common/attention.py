"""Causal self-attention variants and the kernels that run them.

Variants (``cfg.attention``, keys of :data:`ATTENTIONS`), all ``(B, T, C) -> (B, T, C)``:

* ``mha`` / ``mqa`` / ``gqa``: :class:`CausalSelfAttention` with ``cfg.kv_heads`` key/value heads
  (``n_head``, 1, or ``n_kv_heads``; Shazeer 2019, Ainslie et al. 2023), one fused ``c_attn``.
* ``mla``: :class:`MultiHeadLatentAttention`, DeepSeek-V2 §2.1 (arXiv:2405.04434): keys and values
  are rebuilt from a low-rank latent ``c_kv`` (``kv_lora_rank``) and a RoPE key ``k_pe`` shared by
  all heads (``qk_rope_head_dim``); the KV cache stores only ``c_kv`` and ``k_pe``.

Kernels (``cfg.attn_backend``, keys of :data:`BACKENDS`) share one signature
``(q (B, nh, Tq, dk), k (B, nkv, Tk, dk), v (B, nkv, Tk, dv), bias (nh, Tq, Tk) | None,
dropout_p, scale) -> (B, nh, Tq, dv)``; the causal mask is bottom-right aligned, so query ``i`` sees
keys ``j <= i + Tk - Tq`` (that is what a KV cache needs):

* ``reference``: plain matmul + softmax, the ground truth of the tests;
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (ALiBi as an additive float mask);
* ``flash``: ``flash_attn.flash_attn_func`` (Dao 2023); needs the package, CUDA, fp16/bf16 and no
  ALiBi, and raises otherwise;
* ``auto``: ``flash`` when all of that holds for the call, else ``sdpa``.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from megaray.models.common.position import RopeTables, apply_rope

FLASH_AVAILABLE = importlib.util.find_spec("flash_attn") is not None


class KVCache:
    """One layer's cache: tensors grown along dim -2 (time) by :meth:`update`.

    Standard attention stores ``k, v`` ``(B, nkv, T, hs)``; MLA stores ``c_kv (B, T, r)`` and
    ``k_pe (B, 1, T, dr)``.
    """

    def __init__(self) -> None:
        self.data: Optional[Tuple[torch.Tensor, ...]] = None

    def __len__(self) -> int:
        """Cached time steps."""
        return 0 if self.data is None else self.data[0].shape[-2]

    def update(self, *new: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Append ``new`` tensors (same order every call) and return the full cached tensors."""
        if self.data is not None:
            new = tuple(torch.cat([old, n], dim=-2) for old, n in zip(self.data, new))
        self.data = tuple(new)
        return self.data


# ----------------------------------------------------------------------------- kernels


def causal_mask(Tq: int, Tk: int, device: torch.device) -> torch.Tensor:
    """Bool ``(Tq, Tk)``, True where query ``i`` may attend key ``j`` (``j <= i + Tk - Tq``)."""
    return torch.ones(Tq, Tk, dtype=torch.bool, device=device).tril(diagonal=Tk - Tq)


def reference_attention(q, k, v, bias=None, dropout_p: float = 0.0, scale: Optional[float] = None):
    """Matmul-softmax attention (softmax in float32); the readable ground truth."""
    rep = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, nh, Tk, d)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.size(-1))
    att = (q @ k.transpose(-2, -1)).float() * scale  # (B, nh, Tq, Tk)
    if bias is not None:
        att = att + bias
    att = att.masked_fill(~causal_mask(q.size(-2), k.size(-2), q.device), float("-inf"))
    att = F.dropout(att.softmax(dim=-1), p=dropout_p, training=dropout_p > 0).to(v.dtype)
    return att @ v  # (B, nh, Tq, dv)


def sdpa_attention(q, k, v, bias=None, dropout_p: float = 0.0, scale: Optional[float] = None):
    """``F.scaled_dot_product_attention``; ``is_causal`` when square and unbiased, else a float mask."""
    Tq, Tk = q.size(-2), k.size(-2)
    mask, is_causal = None, bias is None and Tq == Tk
    if not is_causal and not (bias is None and Tq == 1):  # one new query sees every key: no mask
        mask = torch.zeros(Tq, Tk, device=q.device).masked_fill(~causal_mask(Tq, Tk, q.device), float("-inf"))
        mask = (mask if bias is None else mask + bias).to(q.dtype)  # (Tq, Tk) or (nh, Tq, Tk)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
        enable_gqa=k.size(1) != q.size(1),
    )


def flash_attention(q, k, v, bias=None, dropout_p: float = 0.0, scale: Optional[float] = None):
    """``flash_attn_func`` on ``(B, T, h, d)`` layouts (GQA native, causal bottom-right aligned).

    Raises:
        RuntimeError: flash-attn missing, not CUDA, not fp16/bf16, or an ALiBi bias was given.
    """
    if not FLASH_AVAILABLE:
        raise RuntimeError("attn_backend 'flash' needs the flash-attn package (pip install 'megaray[gpu]')")
    if bias is not None:
        raise RuntimeError("attn_backend 'flash' does not take an additive bias (ALiBi); use 'sdpa' or 'auto'")
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError(f"attn_backend 'flash' needs CUDA fp16/bf16 tensors, got {q.device} {q.dtype}")
    from flash_attn import flash_attn_func

    dv = v.size(-1)
    if dv != q.size(-1):  # MLA: v is narrower than q/k; pad, then slice the output
        v = F.pad(v, (0, q.size(-1) - dv))
    out = flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p, softmax_scale=scale, causal=True
    )  # (B, Tq, nh, d)
    return out.transpose(1, 2)[..., :dv]


def auto_attention(q, k, v, bias=None, dropout_p: float = 0.0, scale: Optional[float] = None):
    """flash-attn when importable, on CUDA, fp16/bf16 and without bias; else SDPA."""
    if FLASH_AVAILABLE and bias is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return flash_attention(q, k, v, None, dropout_p, scale)
    return sdpa_attention(q, k, v, bias, dropout_p, scale)


#: backend name -> kernel
BACKENDS: Dict[str, Callable[..., torch.Tensor]] = {
    "auto": auto_attention,
    "sdpa": sdpa_attention,
    "flash": flash_attention,
    "reference": reference_attention,
}


def resolve_backend(cfg) -> Callable[..., torch.Tensor]:
    """The kernel for ``cfg.attn_backend``; checks at build time what can be checked then.

    Raises:
        ValueError: unknown backend, or ``flash`` with ALiBi or without flash-attn installed.
    """
    name = cfg.attn_backend
    if name not in BACKENDS:
        raise ValueError(f"unknown attn_backend {name!r}; known: {', '.join(BACKENDS)}")
    if name == "flash" and not FLASH_AVAILABLE:
        raise ValueError("attn_backend 'flash' needs the flash-attn package (pip install 'megaray[gpu]'); use 'auto'")
    if name == "flash" and cfg.position == "alibi":
        raise ValueError("attn_backend 'flash' cannot add the ALiBi bias; use 'sdpa' or 'auto' with position 'alibi'")
    return BACKENDS[name]


# ----------------------------------------------------------------------------- modules


def _qk_norm(cfg, dim: int) -> nn.Module:
    """QK-norm (Dehghani et al. 2023; OLMo 2, Qwen3): RMSNorm over each head's ``dim``."""
    return nn.RMSNorm(dim, eps=cfg.norm_eps) if cfg.qk_norm else nn.Identity()


class CausalSelfAttention(nn.Module):
    """Multi-head / multi-query / grouped-query causal self-attention (``cfg.kv_heads`` KV heads).

    ``forward(x (B, T, C), rope, bias, cache) -> (B, T, C)``; ``rope`` are the ``(cos, sin)``
    tables of the new positions (or None), ``bias`` an additive ``(nh, Tq, Tk)`` (ALiBi) or None.
    """

    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv, self.hd = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.c_attn = nn.Linear(cfg.n_embd, (self.n_head + 2 * self.n_kv) * self.hd, bias=cfg.bias)
        self.c_proj = nn.Linear(self.n_head * self.hd, cfg.n_embd, bias=cfg.bias)
        self.q_norm, self.k_norm = _qk_norm(cfg, self.hd), _qk_norm(cfg, self.hd)
        self.attend, self.dropout = resolve_backend(cfg), cfg.dropout

    def forward(self, x, rope: Optional[RopeTables] = None, bias=None, cache: Optional[KVCache] = None):
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split([self.n_head * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], dim=-1)
        q = q.view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rope(self.q_norm(q), rope), apply_rope(self.k_norm(k), rope)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, nkv, Tk, hs)
        y = self.attend(q, k, v, bias, self.dropout if self.training else 0.0, None)  # (B, nh, T, hs)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))


class MultiHeadLatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2 §2.1, arXiv:2405.04434; reference code
    ``DeepseekV2Attention`` in HF transformers), with ``d = head_dim`` for the non-rotary part of
    q/k and for v, and ``dr = qk_rope_head_dim``:

    * queries: ``wq`` = one Linear ``C -> nh*(d+dr)``, or with ``q_lora_rank`` the low-rank
      ``C -> d_c' -> RMSNorm -> nh*(d+dr)``;
    * keys/values: ``kv_down: C -> r + dr`` gives the latent ``c_kv`` (RMSNorm'd) and the decoupled
      key ``k_pe`` (one head, rotated by RoPE); ``kv_up: r -> nh*2d`` rebuilds ``k_nope, v``;
    * scores use ``[q_nope, rope(q_pe)] . [k_nope, rope(k_pe)]`` scaled by ``1/sqrt(d + dr)``;
      QK-norm (if on) normalises ``q_nope`` and ``k_nope``.

    The cache holds ``c_kv (B, T, r)`` and ``k_pe (B, 1, T, dr)``, ``r + dr`` numbers per token.
    """

    def __init__(self, cfg):
        super().__init__()
        nh, d, dr, r = cfg.n_head, cfg.head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
        self.nh, self.d, self.dr, self.r = nh, d, dr, r
        if cfg.q_lora_rank:
            self.wq = nn.Sequential(
                nn.Linear(cfg.n_embd, cfg.q_lora_rank, bias=cfg.bias),
                nn.RMSNorm(cfg.q_lora_rank, eps=cfg.norm_eps),
                nn.Linear(cfg.q_lora_rank, nh * (d + dr), bias=cfg.bias),
            )
        else:
            self.wq = nn.Linear(cfg.n_embd, nh * (d + dr), bias=cfg.bias)
        self.kv_down = nn.Linear(cfg.n_embd, r + dr, bias=cfg.bias)
        self.kv_norm = nn.RMSNorm(r, eps=cfg.norm_eps)
        self.kv_up = nn.Linear(r, nh * 2 * d, bias=cfg.bias)
        self.c_proj = nn.Linear(nh * d, cfg.n_embd, bias=cfg.bias)
        self.q_norm, self.k_norm = _qk_norm(cfg, d), _qk_norm(cfg, d)
        self.attend, self.dropout = resolve_backend(cfg), cfg.dropout

    def forward(self, x, rope: Optional[RopeTables] = None, bias=None, cache: Optional[KVCache] = None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.nh, self.d + self.dr).transpose(1, 2)  # (B, nh, T, d+dr)
        q_nope, q_pe = q.split([self.d, self.dr], dim=-1)
        c_kv, k_pe = self.kv_down(x).split([self.r, self.dr], dim=-1)  # (B, T, r), (B, T, dr)
        c_kv, k_pe = self.kv_norm(c_kv), apply_rope(k_pe.unsqueeze(1), rope)  # (B, 1, T, dr)
        if cache is not None:
            c_kv, k_pe = cache.update(c_kv, k_pe)  # (B, Tk, r), (B, 1, Tk, dr)
        Tk = c_kv.size(1)
        kv = self.kv_up(c_kv).view(B, Tk, self.nh, 2 * self.d).transpose(1, 2)  # (B, nh, Tk, 2d)
        k_nope, v = kv.split([self.d, self.d], dim=-1)
        q = torch.cat([self.q_norm(q_nope), apply_rope(q_pe, rope)], dim=-1)  # (B, nh, T, d+dr)
        k = torch.cat([self.k_norm(k_nope), k_pe.expand(B, self.nh, Tk, self.dr)], dim=-1)  # (B, nh, Tk, d+dr)
        scale = 1.0 / math.sqrt(self.d + self.dr)
        y = self.attend(q, k, v, bias, self.dropout if self.training else 0.0, scale)  # (B, nh, T, d)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.d))


#: attention name -> module class
ATTENTIONS: Dict[str, type] = {
    "mha": CausalSelfAttention,
    "mqa": CausalSelfAttention,
    "gqa": CausalSelfAttention,
    "mla": MultiHeadLatentAttention,
}


def build_attention(cfg) -> nn.Module:
    """The attention module named by ``cfg.attention``.

    Raises:
        ValueError: unknown attention name or an impossible backend (see :func:`resolve_backend`).
    """
    if cfg.attention not in ATTENTIONS:
        raise ValueError(f"unknown attention {cfg.attention!r}; known: {', '.join(ATTENTIONS)}")
    return ATTENTIONS[cfg.attention](cfg)
