"""Mixture-of-experts feed-forward layer with a top-k token router.

Routing follows Mixtral (Jiang et al. 2024) / HF ``MixtralSparseMoeBlock``: softmax over the
expert logits, keep the top ``k`` experts per token and renormalise their weights to sum to 1
(for ``k == 1`` the raw probability is kept, as in Switch, so the router still gets a gradient
from the task loss). Each expert is a dense MLP from :func:`megaray.models.common.mlp.build_mlp`.

Load balancing: the Switch Transformer auxiliary loss (Fedus et al. 2022, eq. 4)
``aux = coef * E * sum_i f_i * P_i`` with ``f_i`` the fraction of the ``N*k`` token->expert
assignments that go to expert ``i`` (not differentiable) and ``P_i`` the mean router probability
of expert ``i`` (differentiable). It is 1*coef when routing is perfectly uniform and up to
``E*coef`` when collapsed. (HF's ``load_balancing_loss_func`` counts fractions per top-k slot
and is ``k`` times this value.) ``build_feed_forward(cfg)`` returns this layer when
``cfg.n_experts > 0``, else the dense MLP.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megaray.models.common.mlp import build_mlp


class MoE(nn.Module):
    """Top-k routed experts: ``(B, T, C) -> (B, T, C)``; sets :attr:`aux_loss` (scalar, already
    multiplied by ``moe_aux_loss_coef``) on every forward.

    Args:
        cfg: a GPTConfig-like object with ``n_embd``, ``n_experts``, ``moe_top_k``,
            ``moe_aux_loss_coef`` and the fields :func:`build_mlp` reads.
    """

    def __init__(self, cfg):
        super().__init__()
        self.n_experts, self.top_k, self.coef = cfg.n_experts, cfg.moe_top_k, cfg.moe_aux_loss_coef
        self.router = nn.Linear(cfg.n_embd, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList([build_mlp(cfg) for _ in range(cfg.n_experts)])
        self.aux_loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        xf = x.reshape(B * T, C)  # (N, C)
        probs = self.router(xf).float().softmax(dim=-1)  # (N, E)
        weight, chosen = probs.topk(self.top_k, dim=-1)  # (N, k)
        if self.top_k > 1:
            weight = weight / weight.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(xf)
        for e, expert in enumerate(self.experts):
            # every expert runs (possibly on 0 rows) so all parameters take part in autograd
            tok, slot = (chosen == e).nonzero(as_tuple=True)  # (n_e,), (n_e,)
            y = expert(xf[tok]) * weight[tok, slot, None].to(xf.dtype)  # (n_e, C)
            out = out.index_add(0, tok, y)
        frac = F.one_hot(chosen, self.n_experts).float().mean(dim=(0, 1))  # (E,) f_i, sums to 1
        self.aux_loss = self.coef * self.n_experts * (frac * probs.mean(dim=0)).sum()
        return out.view(B, T, C)


def build_feed_forward(cfg) -> nn.Module:
    """:class:`MoE` when ``cfg.n_experts > 0``, else the dense ``build_mlp(cfg)``."""
    return MoE(cfg) if cfg.n_experts else build_mlp(cfg)
