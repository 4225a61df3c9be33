"""Attention layers and the kernels that run them.

Modules, all ``(B, T, C) -> (B, T, C)``:

* ``mha`` / ``mqa`` / ``gqa``: :class:`SelfAttention` with ``cfg.kv_heads`` key/value heads
  (``n_head``, 1, or ``n_kv_heads``; Shazeer 2019, Ainslie et al. 2023), one fused ``c_attn``;
  causal by default, bidirectional with ``causal=False`` (DiT, ViT);
* ``mla``: :class:`MultiHeadLatentAttention`, DeepSeek-V2 §2.1 (arXiv:2405.04434): keys and values
  are rebuilt from a low-rank latent ``c_kv`` (``kv_lora_rank``) and a RoPE key ``k_pe`` shared by
  all heads (``qk_rope_head_dim``); the KV cache stores only ``c_kv`` and ``k_pe``;
* :class:`CrossAttention`: queries from ``x``, keys/values from another sequence ``context``
  (text conditioning of a diffusion model), optionally with a key padding mask.

Masks (boolean, True where query ``i`` may attend key ``j``), passed as ``mask=``:

* :func:`causal_mask`: bottom-right aligned, query ``i`` sees keys ``j <= i + Tk - Tq`` (what a
  KV cache needs); the default of the causal modules when no mask is given;
* :func:`span_mask`: causal across the sequence and bidirectional inside each span (Transfusion,
  Zhou et al. 2024, arXiv:2408.11039, section 2.2: every image is one span), from per-position
  span ids; with no span it equals :func:`causal_mask`.

Kernels (``cfg.attn_backend``, keys of :data:`BACKENDS`) share one signature
``(q (B, nh, Tq, dk), k (B, nkv, Tk, dk), v (B, nkv, Tk, dv), bias (nh, Tq, Tk) | None,
dropout_p, scale, *, mask=None, causal=True) -> (B, nh, Tq, dv)``; ``mask`` (broadcastable to
``(B, nh, Tq, Tk)``) replaces the causal pattern when given; ``causal=False`` without a mask
attends everywhere:

* ``reference``: plain matmul + softmax, the ground truth of the tests;
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (ALiBi as an additive float mask);
* ``flash``: ``flash_attn.flash_attn_func`` (Dao 2023); needs the package, CUDA, fp16/bf16, no
  ALiBi and no ``mask``, and raises otherwise;
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
from megaray.models.common.position_spec import position_names

FLASH_AVAILABLE = importlib.util.find_spec("flash_attn") is not None


class KVCache:
    """One layer's cache: tensors grown along dim -2 (time) by :meth:`update`.

    Standard attention stores ``k, v`` ``(B, nkv, T, hs)``; MLA stores ``c_kv (B, T, r)`` and
    ``k_pe (B, 1, T, dr)``. A :class:`~megaray.models.common.mlp.ConvMLP` in the same layer keeps its
    last hidden states in :attr:`conv_state` ``(B, hidden, kernel_size - 1)``.
    """

    def __init__(self) -> None:
        self.data: Optional[Tuple[torch.Tensor, ...]] = None
        self.conv_state: Optional[torch.Tensor] = None

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


def span_mask(span_ids: torch.Tensor, Tq: Optional[int] = None) -> torch.Tensor:
    """Causal mask with bidirectional spans: ``span_ids (B, Tk)`` int -> bool ``(B, 1, Tq, Tk)``.

    ``span_ids[b, j]`` is 0 for a position outside any span (text) and a positive id shared by all
    positions of one span (an image); give each span its own id. Query ``i`` (the last ``Tq`` of
    the ``Tk`` positions, as with a KV cache) sees key ``j`` when ``j <= i`` (causal) or when both
    lie in the same span, so a span token also sees the later tokens of its own span and never a
    later token outside it. All-zero ids give exactly :func:`causal_mask`.
    """
    Tk = span_ids.size(1)
    Tq = Tk if Tq is None else Tq
    q_ids = span_ids[:, Tk - Tq :]  # (B, Tq)
    same = (q_ids[:, :, None] == span_ids[:, None, :]) & (q_ids[:, :, None] > 0)  # (B, Tq, Tk)
    return (causal_mask(Tq, Tk, span_ids.device)[None] | same)[:, None]  # (B, 1, Tq, Tk)


def _needs_mask(q, k, mask, causal):
    """The boolean mask a kernel must apply, or None for full attention."""
    if mask is None and causal:
        return causal_mask(q.size(-2), k.size(-2), q.device)
    return mask


def reference_attention(
    q,
    k,
    v,
    bias=None,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    *,
    mask: Optional[torch.Tensor] = None,
    causal: bool = True,
):
    """Matmul-softmax attention (softmax in float32); the readable ground truth."""
    rep = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, nh, Tk, d)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.size(-1))
    att = (q @ k.transpose(-2, -1)).float() * scale  # (B, nh, Tq, Tk)
    if bias is not None:
        att = att + bias
    mask = _needs_mask(q, k, mask, causal)
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    att = F.dropout(att.softmax(dim=-1), p=dropout_p, training=dropout_p > 0).to(v.dtype)
    return att @ v  # (B, nh, Tq, dv)


def _sdpa_mask(q, k, bias, mask, causal) -> Tuple[Optional[torch.Tensor], bool]:
    """``(attn_mask, is_causal)`` for SDPA: ``is_causal`` for the plain square causal case, else a
    float mask in ``q.dtype`` (``-inf`` where masked, plus the bias) or None for full attention."""
    Tq, Tk = q.size(-2), k.size(-2)
    if mask is None and causal:
        if bias is None and Tq == Tk:
            return None, True
        if bias is None and Tq == 1:  # one new query sees every key: no mask
            return None, False
        mask = causal_mask(Tq, Tk, q.device)
    if mask is None:
        return (None if bias is None else bias.to(q.dtype)), False
    additive = torch.zeros(mask.shape, device=q.device).masked_fill(~mask, float("-inf"))
    return (additive if bias is None else additive + bias).to(q.dtype), False


def sdpa_attention(
    q,
    k,
    v,
    bias=None,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    *,
    mask: Optional[torch.Tensor] = None,
    causal: bool = True,
):
    """``F.scaled_dot_product_attention``; ``is_causal`` when square, causal and unbiased, else a mask."""
    mask, is_causal = _sdpa_mask(q, k, bias, mask, causal)
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=k.size(1) != q.size(1),
    )


def flash_attention(
    q,
    k,
    v,
    bias=None,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    *,
    mask: Optional[torch.Tensor] = None,
    causal: bool = True,
):
    """``flash_attn_func`` on ``(B, T, h, d)`` layouts (GQA native, causal bottom-right aligned).

    Raises:
        RuntimeError: flash-attn missing, not CUDA, not fp16/bf16, or an ALiBi bias or a mask was given.
    """
    if not FLASH_AVAILABLE:
        raise RuntimeError("attn_backend 'flash' needs the flash-attn package (pip install 'megaray[gpu]')")
    if bias is not None:
        raise RuntimeError("attn_backend 'flash' does not take an additive bias (ALiBi); use 'sdpa' or 'auto'")
    if mask is not None:
        raise RuntimeError("attn_backend 'flash' does not take a mask (spans, padding); use 'sdpa' or 'auto'")
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError(f"attn_backend 'flash' needs CUDA fp16/bf16 tensors, got {q.device} {q.dtype}")
    from flash_attn import flash_attn_func

    dv, dq = v.size(-1), q.size(-1)
    scale = scale if scale is not None else 1.0 / math.sqrt(dq)
    if dv < dq:  # MLA: v narrower than q/k; pad, then slice the output
        v = F.pad(v, (0, dq - dv))
    elif dv > dq:  # MLA with v_head_dim > qk dim: zero-padding q and k leaves the scores unchanged
        q, k = F.pad(q, (0, dv - dq)), F.pad(k, (0, dv - dq))
    out = flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p, softmax_scale=scale, causal=causal
    )  # (B, Tq, nh, d)
    return out.transpose(1, 2)[..., :dv]


def auto_attention(
    q,
    k,
    v,
    bias=None,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    *,
    mask: Optional[torch.Tensor] = None,
    causal: bool = True,
):
    """flash-attn when importable, on CUDA, fp16/bf16 and without bias or mask; else SDPA."""
    if FLASH_AVAILABLE and bias is None and mask is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return flash_attention(q, k, v, None, dropout_p, scale, causal=causal)
    return sdpa_attention(q, k, v, bias, dropout_p, scale, mask=mask, causal=causal)


#: backend name -> kernel
BACKENDS: Dict[str, Callable[..., torch.Tensor]] = {
    "auto": auto_attention,
    "sdpa": sdpa_attention,
    "flash": flash_attention,
    "reference": reference_attention,
}


def resolve_backend(name: str, position=None) -> Callable[..., torch.Tensor]:
    """The kernel named ``name`` (``attn_backend``); checks at build time what can be checked then.
    ``position`` is the config's scheme: a name, a list of names, or None.

    Raises:
        ValueError: unknown backend, or ``flash`` with ALiBi (``position``) or without flash-attn installed.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown attn_backend {name!r}; known: {', '.join(BACKENDS)}")
    if name == "flash" and not FLASH_AVAILABLE:
        raise ValueError("attn_backend 'flash' needs the flash-attn package (pip install 'megaray[gpu]'); use 'auto'")
    if name == "flash" and position is not None and "alibi" in position_names(position):
        raise ValueError("attn_backend 'flash' cannot add the ALiBi bias; use 'sdpa' or 'auto' with position 'alibi'")
    return BACKENDS[name]


# ----------------------------------------------------------------------------- modules


def _qk_norm(cfg, dim: int) -> nn.Module:
    """QK-norm (Dehghani et al. 2023; OLMo 2, Qwen3): RMSNorm over each head's ``dim``."""
    return nn.RMSNorm(dim, eps=cfg.norm_eps) if cfg.qk_norm else nn.Identity()


class SelfAttention(nn.Module):
    """Multi-head / multi-query / grouped-query self-attention (``cfg.kv_heads`` KV heads).

    ``forward(x (B, T, C), rope, bias, cache, mask) -> (B, T, C)``; ``rope`` are the ``(cos, sin)``
    tables of the new positions (or None), ``bias`` an additive ``(nh, Tq, Tk)`` (ALiBi) or None,
    ``mask`` a boolean ``(B | 1, 1 | nh, Tq, Tk)`` (e.g. :func:`span_mask`) that replaces the
    causal pattern, or None.

    Args:
        cfg: any object with ``n_embd``, ``n_head``, ``kv_heads``, ``head_dim``, ``bias``,
            ``qk_norm``, ``norm_eps``, ``dropout``, ``attn_backend`` and optionally ``position``
            (a GPTConfig is one).
        causal: causal (decoder) or bidirectional (encoder, DiT) when no mask is given.
    """

    def __init__(self, cfg, causal: bool = True):
        super().__init__()
        self.causal = causal
        self.n_head, self.n_kv, self.hd = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.c_attn = nn.Linear(cfg.n_embd, (self.n_head + 2 * self.n_kv) * self.hd, bias=cfg.bias)
        self.c_proj = nn.Linear(self.n_head * self.hd, cfg.n_embd, bias=cfg.bias)
        self.q_norm, self.k_norm = _qk_norm(cfg, self.hd), _qk_norm(cfg, self.hd)
        self.attend, self.dropout = resolve_backend(cfg.attn_backend, getattr(cfg, "position", None)), cfg.dropout

    def forward(
        self,
        x,
        rope: Optional[RopeTables] = None,
        bias=None,
        cache: Optional[KVCache] = None,
        mask: Optional[torch.Tensor] = None,
    ):
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split([self.n_head * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], dim=-1)
        q = q.view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rope(self.q_norm(q), rope), apply_rope(self.k_norm(k), rope)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, nkv, Tk, hs)
        drop = self.dropout if self.training else 0.0
        y = self.attend(q, k, v, bias, drop, None, mask=mask, causal=self.causal)  # (B, nh, T, hs)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))


class MultiHeadLatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2 §2.1, arXiv:2405.04434; reference code
    ``DeepseekV3Attention`` in HF transformers, logits equal within 1e-5: tests/test_gpt_mla_parity.py),
    with ``d = qk_nope_head_dim`` for the non-rotary part of q/k, ``dv = v_head_dim`` for v (both
    default to ``head_dim``: ``cfg.nope_head_dim`` / ``cfg.value_head_dim`` when present) and
    ``dr = qk_rope_head_dim``:

    * queries: ``wq`` = one Linear ``C -> nh*(d+dr)``, or with ``q_lora_rank`` the low-rank
      ``C -> d_c' -> RMSNorm -> nh*(d+dr)``; per head ``[q_nope (d), q_pe (dr)]``;
    * keys/values: ``kv_down: C -> r + dr`` gives the latent ``c_kv`` (RMSNorm'd) and the decoupled
      key ``k_pe`` (one head, rotated by RoPE); ``kv_up: r -> nh*(d+dv)`` rebuilds per head
      ``[k_nope (d), v (dv)]``;
    * scores use ``[q_nope, rope(q_pe)] . [k_nope, rope(k_pe)]`` scaled by ``1/sqrt(d + dr)``;
      QK-norm (if on) normalises ``q_nope`` and ``k_nope``. RoPE is the half-split layout;
      DeepSeek's interleaved layout (``rope_interleave``) is the same map after permuting the rope
      rows of the weights (done by :func:`megaray.models.gpt.convert.from_hf`).

    The cache holds ``c_kv (B, T, r)`` and ``k_pe (B, 1, T, dr)``, ``r + dr`` numbers per token.
    ``forward`` and ``causal`` as :class:`SelfAttention`.
    """

    def __init__(self, cfg, causal: bool = True):
        super().__init__()
        self.causal = causal
        nh, dr, r = cfg.n_head, cfg.qk_rope_head_dim, cfg.kv_lora_rank
        d, dv = getattr(cfg, "nope_head_dim", cfg.head_dim), getattr(cfg, "value_head_dim", cfg.head_dim)
        self.nh, self.d, self.dv, self.dr, self.r = nh, d, dv, dr, r
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
        self.kv_up = nn.Linear(r, nh * (d + dv), bias=cfg.bias)
        self.c_proj = nn.Linear(nh * dv, cfg.n_embd, bias=cfg.bias)
        self.q_norm, self.k_norm = _qk_norm(cfg, d), _qk_norm(cfg, d)
        self.attend, self.dropout = resolve_backend(cfg.attn_backend, getattr(cfg, "position", None)), cfg.dropout

    def forward(
        self,
        x,
        rope: Optional[RopeTables] = None,
        bias=None,
        cache: Optional[KVCache] = None,
        mask: Optional[torch.Tensor] = None,
    ):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.nh, self.d + self.dr).transpose(1, 2)  # (B, nh, T, d+dr)
        q_nope, q_pe = q.split([self.d, self.dr], dim=-1)
        c_kv, k_pe = self.kv_down(x).split([self.r, self.dr], dim=-1)  # (B, T, r), (B, T, dr)
        c_kv, k_pe = self.kv_norm(c_kv), apply_rope(k_pe.unsqueeze(1), rope)  # (B, 1, T, dr)
        if cache is not None:
            c_kv, k_pe = cache.update(c_kv, k_pe)  # (B, Tk, r), (B, 1, Tk, dr)
        Tk = c_kv.size(1)
        kv = self.kv_up(c_kv).view(B, Tk, self.nh, self.d + self.dv).transpose(1, 2)  # (B, nh, Tk, d+dv)
        k_nope, v = kv.split([self.d, self.dv], dim=-1)
        q = torch.cat([self.q_norm(q_nope), apply_rope(q_pe, rope)], dim=-1)  # (B, nh, T, d+dr)
        k = torch.cat([self.k_norm(k_nope), k_pe.expand(B, self.nh, Tk, self.dr)], dim=-1)  # (B, nh, Tk, d+dr)
        scale = 1.0 / math.sqrt(self.d + self.dr)
        drop = self.dropout if self.training else 0.0
        y = self.attend(q, k, v, bias, drop, scale, mask=mask, causal=self.causal)  # (B, nh, T, dv)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.dv))


class CrossAttention(nn.Module):
    """Multi-head cross-attention: ``x (B, Tq, dim)`` attends ``context (B, Tk, context_dim)`` -> ``(B, Tq, dim)``.

    ``q = q_proj(x)``, ``k = k_proj(context)``, ``v = v_proj(context)``, softmax over all context
    positions (or those where ``context_mask (B, Tk)`` is True), then ``c_proj``; the same map
    as ``torch.nn.MultiheadAttention(dim, n_head, kdim=context_dim, vdim=context_dim)`` (tested).
    A query whose context is fully masked gets NaN; keep at least one key per row.

    Args:
        dim, context_dim, n_head: widths and heads (``dim % n_head == 0``).
        bias: biases in the four projections. dropout: on the attention weights in training.
        backend: a key of :data:`BACKENDS` (``flash`` only without ``context_mask``).
    """

    def __init__(
        self, dim: int, context_dim: int, n_head: int, bias: bool = True, dropout: float = 0.0, backend: str = "auto"
    ):
        super().__init__()
        if dim % n_head:
            raise ValueError(f"dim ({dim}) must be divisible by n_head ({n_head})")
        self.n_head, self.hd, self.dropout = n_head, dim // n_head, dropout
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(context_dim, dim, bias=bias)
        self.v_proj = nn.Linear(context_dim, dim, bias=bias)
        self.c_proj = nn.Linear(dim, dim, bias=bias)
        self.attend = resolve_backend(backend)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, context_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        B, Tq, _ = x.shape
        Tk = context.size(1)
        q = self.q_proj(x).view(B, Tq, self.n_head, self.hd).transpose(1, 2)  # (B, nh, Tq, hs)
        k = self.k_proj(context).view(B, Tk, self.n_head, self.hd).transpose(1, 2)  # (B, nh, Tk, hs)
        v = self.v_proj(context).view(B, Tk, self.n_head, self.hd).transpose(1, 2)  # (B, nh, Tk, hs)
        mask = None if context_mask is None else context_mask.bool()[:, None, None, :]  # (B, 1, 1, Tk)
        drop = self.dropout if self.training else 0.0
        y = self.attend(q, k, v, None, drop, None, mask=mask, causal=False)  # (B, nh, Tq, hs)
        return self.c_proj(y.transpose(1, 2).reshape(B, Tq, self.n_head * self.hd))


#: attention name -> module class
ATTENTIONS: Dict[str, type] = {
    "mha": SelfAttention,
    "mqa": SelfAttention,
    "gqa": SelfAttention,
    "mla": MultiHeadLatentAttention,
}


def build_attention(cfg, causal: bool = True) -> nn.Module:
    """The self-attention module named by ``cfg.attention``, causal or bidirectional.

    Raises:
        ValueError: unknown attention name or an impossible backend (see :func:`resolve_backend`).
    """
    if cfg.attention not in ATTENTIONS:
        raise ValueError(f"unknown attention {cfg.attention!r}; known: {', '.join(ATTENTIONS)}")
    return ATTENTIONS[cfg.attention](cfg, causal)
