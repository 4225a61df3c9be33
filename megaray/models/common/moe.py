"""Mixture-of-experts feed-forward layer with two routers: token-choice top-k and expert choice.

``cfg.moe_router`` picks the router (``"top_k"`` when the config has no such field):

* ``top_k`` (Mixtral, Jiang et al. 2024 / HF ``MixtralSparseMoeBlock``): softmax over the expert
  logits, each token keeps its top ``k`` experts and renormalises their weights to sum to 1 (for
  ``k == 1`` the raw probability is kept, as in Switch, so the router still gets a gradient from
  the task loss). No capacity limit: no token is dropped, experts may be unevenly loaded.
* ``expert_choice`` (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing", eq. 1-2):
  token-to-expert scores ``S = softmax(X W_g)`` ``(N, E)``; each expert takes the ``k`` tokens with
  the highest score in its column, ``G, I = top_k(S^T, k)``, with capacity
  ``k = ceil(N * moe_capacity_factor / E)`` (``N = B*T`` tokens of the batch, clamped to ``[1, N]``),
  and the output is ``sum_e G[e, j] * expert_e(x_I[e, j])``. Every expert processes exactly ``k``
  tokens (perfect load balance by construction); a token may be taken by several experts or by
  none (a *dropped* token: its feed-forward output is 0, only the residual carries it). Routing
  depends on the other tokens of the batch, so it is not causal: a decoder trained with it sees a
  little of the batch's future through the routing, and per-token decoding routes differently
  from the training batch (the paper's caveat for auto-regressive decoding).

Each expert is a dense MLP from :func:`megaray.models.common.mlp.build_mlp`.

Auxiliary losses (both routers):

* load balancing, the Switch Transformer loss (Fedus et al. 2022, eq. 4)
  ``balance = E * sum_i f_i * P_i`` with ``f_i`` the fraction of the token->expert assignments that
  go to expert ``i`` (not differentiable) and ``P_i`` the mean router probability of expert ``i``;
  1 when routing is uniform, up to ``E`` when collapsed. Under expert choice ``f_i = 1/E`` exactly,
  so ``balance = sum_i P_i = 1`` with zero gradient (logged for comparison only).
  (HF's ``load_balancing_loss_func`` counts fractions per top-k slot and is ``k`` times this.)
* router z-loss (ST-MoE, Zoph et al. 2022, eq. 5) ``z = mean_tokens(logsumexp_j(logit_j)^2)``,
  which keeps router logits small (numerically stable in bf16).

:attr:`MoE.aux_loss` = ``moe_aux_loss_coef * balance + moe_z_loss_coef * z`` is what to add to the
training loss. :attr:`MoE.stats` holds detached scalars for logging: ``moe_aux``
(``moe_aux_loss_coef * balance``), ``moe_z_loss`` (``z``, unweighted) and ``moe_dropped_frac``
(fraction of tokens no expert took; 0 under top-k). ``build_feed_forward(cfg)`` returns this layer
when ``cfg.n_experts > 0``, else the dense MLP.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from megaray.models.common.mlp import build_mlp

ROUTERS = ("top_k", "expert_choice")


def expert_capacity(n_tokens: int, n_experts: int, capacity_factor: float) -> int:
    """Tokens each expert takes under expert choice: ``ceil(n_tokens * capacity_factor / n_experts)``
    clamped to ``[1, n_tokens]`` (Zhou et al. 2022: ``k = n * c / e``)."""
    return max(1, min(n_tokens, math.ceil(n_tokens * capacity_factor / n_experts)))


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss ``mean_i (logsumexp_j logits[i, j])^2`` of ``(N, E)`` logits (float32)."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


class MoE(nn.Module):
    """Routed experts: ``(B, T, C) -> (B, T, C)``; sets :attr:`aux_loss` (scalar, coefficients
    applied), :attr:`stats` (detached logging scalars) and :attr:`tokens_per_expert` ``(E,)`` on
    every forward.

    Args:
        cfg: a GPTConfig-like object with ``n_embd``, ``n_experts``, ``moe_top_k``,
            ``moe_aux_loss_coef`` and the fields :func:`build_mlp` reads; optionally
            ``moe_router`` (default ``"top_k"``), ``moe_capacity_factor`` (1.0) and
            ``moe_z_loss_coef`` (0.0).
    Raises:
        ValueError: unknown ``moe_router``.
    """

    def __init__(self, cfg):
        super().__init__()
        self.n_experts, self.top_k, self.coef = cfg.n_experts, cfg.moe_top_k, cfg.moe_aux_loss_coef
        self.router_kind = getattr(cfg, "moe_router", "top_k")
        if self.router_kind not in ROUTERS:
            raise ValueError(f"unknown moe_router {self.router_kind!r}; known: {', '.join(ROUTERS)}")
        self.capacity_factor = float(getattr(cfg, "moe_capacity_factor", 1.0))
        self.z_coef = float(getattr(cfg, "moe_z_loss_coef", 0.0))
        self.router = nn.Linear(cfg.n_embd, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList([build_mlp(cfg) for _ in range(cfg.n_experts)])
        self.aux_loss = torch.zeros(())
        self.stats: Dict[str, torch.Tensor] = {}
        self.tokens_per_expert = torch.zeros(cfg.n_experts)

    @property
    def active_experts(self) -> float:
        """Experts applied per token on average: ``moe_top_k``, or the capacity factor under expert choice."""
        return self.capacity_factor if self.router_kind == "expert_choice" else float(self.top_k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        xf = x.reshape(B * T, C)  # (N, C)
        logits = self.router(xf).float()  # (N, E)
        probs = logits.softmax(dim=-1)  # (N, E)
        route = self._expert_choice if self.router_kind == "expert_choice" else self._top_k
        out, assigned = route(xf, probs)  # (N, C), (N, E) 0/1 token->expert assignments
        counts = assigned.sum(dim=0)  # (E,)
        frac = counts / counts.sum()  # f_i, sums to 1
        balance = self.n_experts * (frac * probs.mean(dim=0)).sum()
        z = router_z_loss(logits)
        self.aux_loss = self.coef * balance + (self.z_coef * z if self.z_coef else 0.0)
        self.tokens_per_expert = counts.detach()
        self.stats = {
            "moe_aux": (self.coef * balance).detach(),
            "moe_z_loss": z.detach(),
            "moe_dropped_frac": (assigned.sum(dim=1) == 0).float().mean(),
        }
        return out.view(B, T, C)

    def _top_k(self, xf: torch.Tensor, probs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        weight, chosen = probs.topk(self.top_k, dim=-1)  # (N, k)
        if self.top_k > 1:
            weight = weight / weight.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(xf)
        for e, expert in enumerate(self.experts):
            # every expert runs (possibly on 0 rows) so all parameters take part in autograd
            tok, slot = (chosen == e).nonzero(as_tuple=True)  # (n_e,), (n_e,)
            y = expert(xf[tok]) * weight[tok, slot, None].to(xf.dtype)  # (n_e, C)
            out = out.index_add(0, tok, y)
        assigned = torch.zeros_like(probs).scatter_(1, chosen, 1.0)  # (N, E)
        return out, assigned

    def _expert_choice(self, xf: torch.Tensor, probs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        N = xf.size(0)
        k = expert_capacity(N, self.n_experts, self.capacity_factor)
        gate, tok = probs.t().topk(k, dim=-1)  # (E, k) each: expert e's k best tokens
        out = torch.zeros_like(xf)
        for e, expert in enumerate(self.experts):
            y = expert(xf[tok[e]]) * gate[e, :, None].to(xf.dtype)  # (k, C)
            out = out.index_add(0, tok[e], y)
        assigned = torch.zeros_like(probs.t()).scatter_(1, tok, 1.0).t()  # (N, E)
        return out, assigned


def build_feed_forward(cfg) -> nn.Module:
    """:class:`MoE` when ``cfg.n_experts > 0``, else the dense ``build_mlp(cfg)``."""
    return MoE(cfg) if cfg.n_experts else build_mlp(cfg)


def gather_moe_losses(model: nn.Module, device: torch.device) -> Tuple[torch.Tensor, Optional[Dict[str, torch.Tensor]]]:
    """After a forward: the model's MoE auxiliary loss (every :class:`MoE` layer's ``aux_loss``
    summed; a zero scalar for dense models) and its per-step statistics (``moe_aux`` summed over
    layers, ``moe_z_loss`` and ``moe_dropped_frac`` averaged), or None when there is no MoE.
    Shared by the GPT and Mamba families."""
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    if not moes:
        return torch.zeros((), device=device), None
    stat = lambda k: torch.stack([m.stats[k] for m in moes])  # noqa: E731
    stats = dict(moe_aux=stat("moe_aux").sum(), moe_z_loss=stat("moe_z_loss").mean(),
                 moe_dropped_frac=stat("moe_dropped_frac").mean())
    return torch.stack([m.aux_loss for m in moes]).sum(), stats

