"""Mamba-2 language model (Dao & Gu 2024, "Transformers are SSMs"), pure PyTorch plus optional kernels.

Read top to bottom: :class:`GatedRMSNorm`, :class:`MambaCache` (one layer's recurrent state),
:class:`Mamba2Mixer` (the SSD layer), :class:`Block` (pre-norm residual around the mixer, and an
optional feed-forward / MoE), :class:`Mamba` (embedding, blocks, final norm, tied LM head).

Mixer, as ``mamba_ssm/modules/mamba2.py`` (``Mamba2``, ``rmsnorm=True, norm_before_gate=False``)::

    z, xBC, dt = in_proj(u)                       # (B, T, d_inner), (B, T, d_inner + 2GN), (B, T, H)
    x, B, C    = silu(causal_depthwise_conv1d(xBC))
    y          = SSD(x, softplus(dt + dt_bias), A = -exp(A_log), B, C) + D * x     # ssd.py
    out        = out_proj(rmsnorm_grouped(y * silu(z)))

Parameter names are ``mamba_ssm``'s (``backbone.embedding``, ``backbone.layers.i.mixer.in_proj``,
``...A_log``, ``backbone.norm_f``, ``lm_head``), so its checkpoints and HF's (see ``convert.py``)
load by name. Initialisation follows ``mamba_ssm`` (``Mamba2.__init__`` and
``mixer_seq_simple._init_weights``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from megaray.models.common.checkpointing import run_block
from megaray.models.common.experts import StackedLinear
from megaray.models.common.moe import MoE, build_feed_forward, gather_moe_losses
from megaray.models.mamba.config import MambaConfig
from megaray.models.mamba.ssd import kernel_available, ssd_chunked, ssd_mamba_ssm, ssd_recurrent


class GatedRMSNorm(nn.Module):
    """``weight * rmsnorm_g(y * silu(z))`` over groups of ``group_size`` channels (float32 inside):
    ``(..., d) x (..., d) -> (..., d)``; ``mamba_ssm``'s ``RMSNormGated(norm_before_gate=False)``."""

    def __init__(self, dim: int, group_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size, self.eps = group_size, eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = y.float() * F.silu(z.float())
        g = h.unflatten(-1, (-1, self.group_size))  # (..., groups, group_size)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * g.flatten(-2)).to(y.dtype)


@dataclass
class MambaCache:
    """One layer's recurrent state for decoding; ``len(cache)`` is the number of tokens it has seen.

    Attributes:
        conv_state: ``(B, conv_dim, d_conv - 1)``: the last conv inputs (None before the first call).
        ssm_state: ``(B, H, P, N)`` SSM state, float32 (float64 for a float64 model); None before the first call.
    """

    conv_state: Optional[torch.Tensor] = None
    ssm_state: Optional[torch.Tensor] = None
    seqlen: int = 0

    def __len__(self) -> int:
        return self.seqlen


class Mamba2Mixer(nn.Module):
    """The Mamba-2 (SSD) layer: ``(B, T, d_model) -> (B, T, d_model)``; continues ``cache`` if given."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.cfg = cfg
        H, G, N = cfg.n_heads, cfg.n_groups, cfg.d_state
        self.conv_dim = cfg.d_inner + 2 * G * N
        self.in_proj = nn.Linear(cfg.d_model, cfg.d_inner + self.conv_dim + H, bias=cfg.bias)  # [z, xBC, dt]
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.d_conv, groups=self.conv_dim, bias=cfg.conv_bias)
        # dt_bias: softplus^-1 of dt ~ log-uniform [dt_min, dt_max] (floored); A ~ -U[A_init_min, A_init_max]
        dt = torch.exp(torch.rand(H) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
        dt = dt.clamp(min=cfg.dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # (H,)
        self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(cfg.A_init_min, cfg.A_init_max)))  # (H,)
        self.D = nn.Parameter(torch.ones(H))  # (H,)
        self.norm = GatedRMSNorm(cfg.d_inner, cfg.d_inner // G, cfg.norm_eps)
        self.out_proj = nn.Linear(cfg.d_inner, cfg.d_model, bias=cfg.bias)

    def forward(self, u: torch.Tensor, cache: Optional[MambaCache] = None) -> torch.Tensor:
        cfg = self.cfg
        Bsz, T, _ = u.shape
        H, P, G, N = cfg.n_heads, cfg.headdim, cfg.n_groups, cfg.d_state
        z, xBC, dt = self.in_proj(u).split([cfg.d_inner, self.conv_dim, H], dim=-1)
        x, B, C = self._conv(xBC, cache).split([cfg.d_inner, G * N, G * N], dim=-1)
        dt = F.softplus((dt + self.dt_bias).float())  # (B, T, H)
        A = -torch.exp(self.A_log.float())  # (H,)
        state = cache.ssm_state if cache is not None else None
        y, state = self._scan(
            x.reshape(Bsz, T, H, P),
            dt,
            A,
            B.reshape(Bsz, T, G, N),
            C.reshape(Bsz, T, G, N),
            state,
            step=cache is not None and T == 1,
        )  # (B, T, H, P), (B, H, P, N)
        if cache is not None:
            cache.ssm_state, cache.seqlen = state, cache.seqlen + T
        return self.out_proj(self.norm(y.reshape(Bsz, T, cfg.d_inner), z))

    def _conv(self, xBC: torch.Tensor, cache: Optional[MambaCache]) -> torch.Tensor:
        """Causal depthwise conv1d + SiLU, ``(B, T, conv_dim) -> (B, T, conv_dim)``; the window starts
        with the cached last ``d_conv - 1`` inputs (zeros without a cache) and refreshes them."""
        xt = xBC.transpose(1, 2)  # (B, conv_dim, T)
        k = self.cfg.d_conv - 1
        prev = cache.conv_state if cache is not None else None
        full = F.pad(xt, (k, 0)) if prev is None else torch.cat([prev.to(xt.dtype), xt], dim=-1)  # (B, D, k + T)
        if cache is not None:
            cache.conv_state = full[..., full.size(-1) - k :].clone()
        return F.silu(self.conv1d(full)).transpose(1, 2)  # the module call: ZeRO-3 gathers its weight

    def _scan(self, x, dt, A, B, C, state, step: bool):
        """SSD by the recurrence for one decoding step, else by the fused ``mamba_ssm`` kernel
        (``ssd_backend`` ``mamba_ssm``, or ``auto`` when importable on CUDA), else by the PyTorch
        chunked scan; arguments as :func:`megaray.models.mamba.ssd.ssd_chunked`."""
        if step:
            return ssd_recurrent(x, dt, A, B, C, self.D, state)
        backend = self.cfg.ssd_backend
        kernel = backend == "mamba_ssm" or (backend == "auto" and kernel_available(x.device))
        return (ssd_mamba_ssm if kernel else ssd_chunked)(x, dt, A, B, C, self.cfg.chunk_size, self.D, state)


class Block(nn.Module):
    """``x + mixer(norm(x))`` then, when configured, ``x + mlp(norm2(x))``: ``(B, T, C) -> (B, T, C)``."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer = Mamba2Mixer(cfg)
        self.norm2 = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps) if cfg.has_ffn else None
        self.mlp = build_feed_forward(cfg) if cfg.has_ffn else None

    def forward(self, x: torch.Tensor, cache: Optional[MambaCache] = None) -> torch.Tensor:
        x = x + self.mixer(self.norm(x), cache)
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x


class Mamba(nn.Module):
    """Mamba-2 language model.

    Args:
        config: a :class:`MambaConfig` (e.g. ``MambaConfig.from_name("tiny")``).

    ``model(idx)`` maps ``(B, T)`` int64 ids to ``(B, T, V)`` float logits; ``model(idx, targets)``
    returns ``(logits, loss)``, the mean cross-entropy over targets that are not ``-1``.
    :attr:`aux_loss` is the MoE loss of the last forward (0 without MoE) and :attr:`moe_stats` its
    detached logging scalars, as :class:`~megaray.models.gpt.model.GPT`. ``model(idx, cache=c)``
    with ``c = model.new_cache()`` continues after the tokens ``c`` has seen (the recurrent state
    replaces the KV cache; ``T == 1`` steps run the exact recurrence). Any ``T`` works:
    ``block_size`` is only the training length. ``config.activation_checkpointing`` (or
    :meth:`set_activation_checkpointing`) recomputes each block in backward while training.
    """

    def __init__(self, config: MambaConfig):
        super().__init__()
        self.config = config
        self.backbone = nn.ModuleDict(
            dict(
                embedding=nn.Embedding(config.vocab_size, config.d_model),
                layers=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                norm_f=nn.RMSNorm(config.d_model, eps=config.norm_eps),
            )
        )
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.aux_loss = torch.zeros(())
        self.moe_stats: Dict[str, torch.Tensor] = {}
        self.activation_checkpointing = config.activation_checkpointing
        self._init_weights()
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    def _init_weights(self) -> None:
        """``mamba_ssm``: zero Linear biases, N(0, 0.02) embedding, residual output projections
        (``out_proj``, the MLP's ``c_proj``, each MoE expert's ``c_proj`` slice) Kaiming-uniform /
        sqrt(residuals per layer * n_layer)."""
        n_residuals = (2 if self.config.has_ffn else 1) * self.config.n_layer
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in ("out_proj", "c_proj"):
                nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5))
                with torch.no_grad():
                    m.weight /= math.sqrt(n_residuals)
            elif isinstance(m, StackedLinear) and name.rsplit(".", 1)[-1] == "c_proj":  # MoE experts' c_proj
                with torch.no_grad():
                    for e in range(m.weight.shape[0]):
                        nn.init.kaiming_uniform_(m.weight[e], a=math.sqrt(5))
                    m.weight /= math.sqrt(n_residuals)

    def forward(
        self,
        idx: torch.Tensor,
        targets: Optional[torch.Tensor] = None,
        *,
        cache: Optional[List[MambaCache]] = None,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """``(B, T)`` int64 ids [, ``(B, T)`` int64 targets] -> ``(B, T, V)`` logits [, loss]."""
        x = self.backbone.embedding(idx)  # (B, T, C)
        ckpt = self.activation_checkpointing and self.training and cache is None
        for i, layer in enumerate(self.backbone.layers):
            x = run_block(layer, x, cache[i] if cache is not None else None, enabled=ckpt)
        logits = self.lm_head(self.backbone.norm_f(x))  # (B, T, V)
        self.aux_loss, stats = gather_moe_losses(self, idx.device)
        if stats is not None:
            self.moe_stats = stats
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def set_activation_checkpointing(self, flag: bool) -> "Mamba":
        """Recompute each block in backward when training with ``flag`` True (as the GPT's)."""
        self.activation_checkpointing = bool(flag)
        return self

    def new_cache(self) -> List[MambaCache]:
        """An empty recurrent-state cache, one :class:`MambaCache` per layer (states are allocated
        by the first call, which fixes the batch size)."""
        return [MambaCache() for _ in range(self.config.n_layer)]

    def num_params(self, non_embedding: bool = True, active: bool = False) -> int:
        """Parameter count (tied weights once); ``non_embedding`` drops an untied input embedding
        (the LM head stays, as nanoGPT); ``active`` counts the experts one token uses per MoE layer."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and not self.config.tie_embeddings:
            n -= self.backbone.embedding.weight.numel()
        if active:
            for m in self.modules():
                if isinstance(m, MoE):
                    per_expert = sum(p.numel() for p in m.experts[0].parameters())
                    n -= int((m.n_experts - m.active_experts) * per_expert)
        return n

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        """Training FLOPs per token (forward + backward = 3 x forward, matmuls only, as PaLM's MFU):
        ``6 N + 6 L (Q (G N_s + H P) + 2 H P N_s)`` with ``N`` active non-embedding parameters and
        the chunked scan's per-token terms: ``C B^T`` and its product with ``x`` over a chunk of
        ``Q = min(chunk_size, T)`` tokens, the chunk-state write and read-out (``N_s = d_state``)."""
        c = self.config
        Q = min(c.chunk_size, seq_len or c.block_size)
        scan = Q * (c.n_groups * c.d_state + c.n_heads * c.headdim) + 2 * c.n_heads * c.headdim * c.d_state
        return 6.0 * self.num_params(non_embedding=True, active=True) + 6.0 * c.n_layer * scan

    def generate(self, idx: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """``(B, T)`` -> ``(B, T + n)`` int64 with the recurrent cache; see
        :func:`megaray.models.gpt.sampling.generate` (same arguments)."""
        from megaray.models.gpt.sampling import generate

        return generate(self, idx, max_new_tokens, **kwargs)
