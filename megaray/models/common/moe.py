"""Mixture-of-experts feed-forward layers: token-choice top-k, expert choice, multi-head (MH-MoE)
sub-token routing, and PEER (:mod:`megaray.models.common.peer`).

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
* ``peer``: product-key retrieval over single-neuron experts, :class:`~megaray.models.common.peer.PEER`.

``cfg.moe_heads = h > 1`` (top_k and expert_choice) is MH-MoE (Wu et al. 2024, "Multi-Head
Mixture-of-Experts", arXiv 2404.15045, section 3.1 and Appendix E): a multi-head layer
``X W_head^T`` (eq. 3, ``d x d``) splits every token into ``h`` sub-tokens of ``d/h`` (eq. 4), each
sub-token is routed on its own (router ``d/h -> E``, eq. 5-6) to experts ``d/h -> hidden -> d/h``,
the outputs are put back in token order (eq. 8) and projected by the merge layer ``W_merge``
(``d x d``, eq. 9). The experts' hidden width stays ``cfg.hidden_dim`` (the paper's ``beta = 1``), so
the expert FLOPs per token equal the ``h = 1`` layer's and each expert has ``1/h`` of the parameters.
Capacity, load balance and statistics count sub-tokens (``N = B*T*h``), as the paper's eq. 10.

Experts are :class:`~megaray.models.common.experts.GroupedExperts` (stacked weights, one ``bmm``
per projection for all experts; :func:`~megaray.models.common.experts.run_grouped`), with the MLP
kind of :func:`megaray.models.common.mlp.build_mlp`.

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
(fraction of tokens no expert took; 0 under top-k). ``build_feed_forward(cfg)`` returns the routed
layer when ``cfg.n_experts > 0``, else the dense MLP.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from megaray.models.common.experts import GroupedExperts, SparseFeedForward, run_grouped
from megaray.models.common.mlp import build_mlp

ROUTERS = ("top_k", "expert_choice", "peer")


def expert_capacity(n_tokens: int, n_experts: int, capacity_factor: float) -> int:
    """Tokens each expert takes under expert choice: ``ceil(n_tokens * capacity_factor / n_experts)``
    clamped to ``[1, n_tokens]`` (Zhou et al. 2022: ``k = n * c / e``)."""
    return max(1, min(n_tokens, math.ceil(n_tokens * capacity_factor / n_experts)))


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss ``mean_i (logsumexp_j logits[i, j])^2`` of ``(N, E)`` logits (float32)."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


class MoE(SparseFeedForward):
    """Routed experts: ``(B, T, C) -> (B, T, C)``; sets :attr:`aux_loss` (scalar, coefficients
    applied), :attr:`stats` (detached logging scalars) and :attr:`tokens_per_expert` ``(E,)``
    (sub-tokens under MH-MoE) on every forward.

    Args:
        cfg: a GPTConfig-like object with ``n_embd``, ``n_experts``, ``moe_top_k``,
            ``moe_aux_loss_coef`` and the fields :func:`build_mlp` reads (``mlp``, ``hidden_dim``,
            ``bias``); optionally ``moe_router`` (default ``"top_k"``), ``moe_capacity_factor``
            (1.0), ``moe_z_loss_coef`` (0.0) and ``moe_heads`` (1: no MH-MoE).
    Raises:
        ValueError: unknown or PEER ``moe_router`` (PEER is :class:`~megaray.models.common.peer.PEER`),
            ``n_embd`` not divisible by ``moe_heads``.
    """

    def __init__(self, cfg):
        super().__init__()
        self.n_experts, self.top_k, self.coef = cfg.n_experts, cfg.moe_top_k, cfg.moe_aux_loss_coef
        self.router_kind = getattr(cfg, "moe_router", "top_k")
        if self.router_kind not in ("top_k", "expert_choice"):
            raise ValueError(
                f"MoE routes with top_k or expert_choice, got moe_router {self.router_kind!r}; "
                f"known: {', '.join(ROUTERS)} (peer: build_feed_forward builds PEER)"
            )
        self.heads = int(getattr(cfg, "moe_heads", 1))
        if cfg.n_embd % self.heads:
            raise ValueError(f"n_embd ({cfg.n_embd}) must be divisible by moe_heads ({self.heads})")
        self.capacity_factor = float(getattr(cfg, "moe_capacity_factor", 1.0))
        self.z_coef = float(getattr(cfg, "moe_z_loss_coef", 0.0))
        dim = cfg.n_embd // self.heads  # sub-token width (MH-MoE), the token width otherwise
        if self.heads > 1:  # MH-MoE multi-head and merge layers (Wu et al. 2024, eq. 3 and 9)
            self.head_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
            self.merge_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.router = nn.Linear(dim, cfg.n_experts, bias=False)
        self.experts = GroupedExperts(cfg.n_experts, dim, cfg.hidden_dim, cfg.mlp, cfg.bias)
        self.tokens_per_expert = torch.zeros(cfg.n_experts)

    @property
    def active_experts(self) -> float:
        """Expert applications per token on average: ``moe_top_k`` (or the capacity factor under
        expert choice), times ``moe_heads`` sub-tokens."""
        per_row = self.capacity_factor if self.router_kind == "expert_choice" else float(self.top_k)
        return per_row * self.heads

    def inactive_params(self) -> int:
        return int((self.n_experts - self.active_experts) * self.experts.params_per_expert)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        xf = x.reshape(B * T, C)  # (N, C)
        if self.heads > 1:  # token splitting: (N, C) -> (N*h, C/h)
            xf = self.head_proj(xf).reshape(B * T * self.heads, C // self.heads)
        logits = self.router(xf).float()  # (N, E)
        probs = logits.softmax(dim=-1)  # (N, E)
        route = self._expert_choice if self.router_kind == "expert_choice" else self._top_k
        out, assigned = route(xf, probs)  # (N, D), (N, E) 0/1 row->expert assignments
        if self.heads > 1:  # token merging: (N*h, C/h) -> (B*T, C), then the merge layer
            out = self.merge_proj(out.reshape(B * T, C))
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
        N, D = xf.shape
        weight, chosen = probs.topk(self.top_k, dim=-1)  # (N, k)
        if self.top_k > 1:
            weight = weight / weight.sum(dim=-1, keepdim=True)
        rows = xf[:, None, :].expand(N, self.top_k, D).reshape(N * self.top_k, D)  # row n*k+j: token n, slot j
        y, _ = run_grouped(self.experts, rows, chosen.reshape(-1))  # (N*k, D)
        out = (y.view(N, self.top_k, D) * weight[..., None].to(y.dtype)).sum(dim=1)  # (N, D)
        assigned = torch.zeros_like(probs).scatter_(1, chosen, 1.0)  # (N, E)
        return out, assigned

    def _expert_choice(self, xf: torch.Tensor, probs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        N, D = xf.shape
        k = expert_capacity(N, self.n_experts, self.capacity_factor)
        gate, tok = probs.t().topk(k, dim=-1)  # (E, k) each: expert e's k best tokens
        y = self.experts(xf[tok]) * gate[..., None].to(xf.dtype)  # (E, k, D): every expert exactly k rows
        out = torch.zeros_like(xf).index_add(0, tok.reshape(-1), y.reshape(-1, D))  # (N, D)
        assigned = torch.zeros_like(probs.t()).scatter_(1, tok, 1.0).t()  # (N, E)
        return out, assigned


def build_feed_forward(cfg) -> nn.Module:
    """The feed-forward layer of a block: :class:`~megaray.models.common.peer.PEER` when
    ``cfg.n_experts > 0`` and ``cfg.moe_router == "peer"``, :class:`MoE` for the other routers,
    else the dense ``build_mlp(cfg)``."""
    if not cfg.n_experts:
        return build_mlp(cfg)
    if getattr(cfg, "moe_router", "top_k") == "peer":
        from megaray.models.common.peer import PEER

        return PEER(cfg)
    return MoE(cfg)


def gather_moe_losses(model: nn.Module, device: torch.device) -> Tuple[torch.Tensor, Optional[Dict[str, torch.Tensor]]]:
    """After a forward: the model's routed-layer auxiliary loss (every
    :class:`~megaray.models.common.experts.SparseFeedForward` layer's ``aux_loss`` summed; a zero
    scalar for dense models) and its per-step statistics (``moe_aux`` summed over layers, every other
    key averaged over the layers that report it), or None when there is no routed layer.
    Shared by the GPT and Mamba families."""
    moes = [m for m in model.modules() if isinstance(m, SparseFeedForward)]
    if not moes:
        return torch.zeros((), device=device), None
    stats: Dict[str, torch.Tensor] = {}
    for key in dict.fromkeys(k for m in moes for k in m.stats):
        vals = torch.stack([m.stats[key] for m in moes if key in m.stats])
        stats[key] = vals.sum() if key == "moe_aux" else vals.mean()
    return torch.stack([torch.as_tensor(m.aux_loss, device=device) for m in moes]).sum(), stats
