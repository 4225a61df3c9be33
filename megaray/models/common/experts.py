"""Vectorised expert MLPs for the routed feed-forward layers (:mod:`moe`, :mod:`peer`).

:class:`GroupedExperts` holds ``E`` expert MLPs of one shape as stacked weights
(:class:`StackedLinear`, ``(E, out, in)``, each slice laid out like an ``nn.Linear`` weight) and
runs them all at once: ``(E, M, dim) -> (E, M, dim)`` with one ``torch.bmm`` per projection.
:func:`run_grouped` takes token rows in any order with one expert id per row, sorts them into a
zero-padded ``(E, max_rows_per_expert, dim)`` buffer (the "padded bmm" formulation, as in
MegaBlocks' padded variant / GShard's dispatch without capacity), runs the experts and gathers
each row's output back. The buffer has ``E * max_count`` rows: with balanced routing about the
routed rows, at worst (every row to one expert) ``E`` times them.

``torch._grouped_mm`` (torchtitan's ``GroupedExperts`` path) exists in torch 2.14 but on CPU it
needs 16-byte aligned strides and its float32 backward fails ("Invalid strides/sizes"), so it is
not used here; the bmm path is exact, differentiable and device-independent. It is one kernel per
projection whatever the expert count (what a GPU wants); on a 2-core CPU the former per-expert loop
was 20-30% faster at 8-64 experts, its per-expert intermediates staying in cache
(``benchmarks/moe_experts.py``, BENCHMARKS.md).

:class:`SparseFeedForward` is the base of every routed feed-forward layer: after each forward it
holds :attr:`aux_loss` (to add to the training loss) and :attr:`stats` (detached logging scalars),
and :meth:`inactive_params` says how many of its parameters one token does not use.
"""

from __future__ import annotations

import math
from typing import Dict, Iterator, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from megaray.models.common.mlp import ACTIVATIONS


class SparseFeedForward(nn.Module):
    """Base of :class:`~megaray.models.common.moe.MoE` and :class:`~megaray.models.common.peer.PEER`:
    ``(B, T, C) -> (B, T, C)``; sets :attr:`aux_loss` (scalar, coefficients applied) and
    :attr:`stats` (detached scalars) on every forward."""

    def __init__(self):
        super().__init__()
        self.aux_loss = torch.zeros(())
        self.stats: Dict[str, torch.Tensor] = {}

    def inactive_params(self) -> int:
        """Parameters a token does not use: ``(experts - expert applications per token) * params
        per expert``. Negative when a token applies more experts than exist (e.g. MH-MoE with
        ``heads * top_k > n_experts``): the count is meant for FLOPs (``6 N`` with ``N`` active)."""
        raise NotImplementedError


class StackedLinear(nn.Module):
    """``E`` independent linear maps ``in -> out``: ``(E, M, in) -> (E, M, out)``.

    ``weight`` is ``(E, out, in)`` (slice ``e`` is an ``nn.Linear(in, out).weight``), ``bias``
    ``(E, out)`` or None. Init: each slice as ``nn.Linear``'s default (Kaiming-uniform weight,
    ``U(+-1/sqrt(in))`` bias); a family re-initialises it like its ``nn.Linear`` layers (the GPT
    init: N(0, 0.02), zero bias).
    """

    def __init__(self, n: int, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(n, out_features)) if bias else None
        with torch.no_grad():
            for e in range(n):
                nn.init.kaiming_uniform_(self.weight[e], a=math.sqrt(5))  # nn.Linear.reset_parameters
            if self.bias is not None:
                self.bias.uniform_(-1 / math.sqrt(in_features), 1 / math.sqrt(in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return torch.bmm(x, self.weight.transpose(1, 2))  # (E, M, out)
        return torch.baddbmm(self.bias[:, None, :], x, self.weight.transpose(1, 2))  # bias fused

    def one(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Map ``e`` alone on ``(..., in)`` rows (a reference; the layers use :meth:`forward`)."""
        return F.linear(x, self.weight[e], None if self.bias is None else self.bias[e])


class ExpertView:
    """Expert ``e`` of a :class:`GroupedExperts` as a callable ``(..., dim) -> (..., dim)``;
    :meth:`parameters` yields its slices of the stacked weights (for counting and references)."""

    def __init__(self, experts: "GroupedExperts", e: int):
        self.experts, self.e = experts, e

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts.one(x, self.e)

    def parameters(self) -> Iterator[torch.Tensor]:
        return (p[self.e] for p in self.experts.parameters())


class GroupedExperts(nn.Module):
    """``n`` expert MLPs ``dim -> hidden -> dim`` of kind ``mlp`` (a key of
    :data:`megaray.models.common.mlp.MLPS`), as stacked weights: ``(E, M, dim) -> (E, M, dim)``.

    Same math as :class:`~megaray.models.common.mlp.MLP` (``c_proj(act(c_fc(x)))``) and
    :class:`~megaray.models.common.mlp.GatedMLP` (``c_proj(act(c_gate(x)) * c_fc(x))``) per expert,
    with the same parameter names, so the GPT init scales ``experts.c_proj.weight`` as a residual
    projection. ``experts[e]`` is expert ``e`` alone (:class:`ExpertView`). A state dict from the
    former ``nn.ModuleList`` layout (``experts.<e>.c_fc.weight``) loads: it is stacked on load.

    Raises:
        ValueError: ``mlp`` not one of :data:`KINDS`.
    """

    #: the MLP kinds an expert can be (position-wise two-layer MLPs, plain or gated)
    KINDS = ("gelu", "relu", "silu", "swiglu", "geglu")

    def __init__(self, n: int, dim: int, hidden: int, mlp: str, bias: bool):
        super().__init__()
        if mlp not in self.KINDS:
            raise ValueError(f"MoE experts are {', '.join(self.KINDS)} MLPs, got mlp {mlp!r}")
        self.n_experts, self.act, self.gated = n, ACTIVATIONS[mlp], mlp in ("swiglu", "geglu")
        self.c_fc = StackedLinear(n, dim, hidden, bias)
        self.c_gate = StackedLinear(n, dim, hidden, bias) if self.gated else None
        self.c_proj = StackedLinear(n, hidden, dim, bias)
        self._register_load_state_dict_pre_hook(self._stack_module_list_keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (E, M, hidden)
        h = self.act(self.c_gate(x)) * h if self.gated else self.act(h)
        return self.c_proj(h)  # (E, M, dim)

    def one(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert ``e`` on ``(..., dim)`` rows."""
        h = self.c_fc.one(x, e)
        h = self.act(self.c_gate.one(x, e)) * h if self.gated else self.act(h)
        return self.c_proj.one(h, e)

    def __getitem__(self, e: int) -> ExpertView:
        if not -self.n_experts <= e < self.n_experts:
            raise IndexError(f"expert {e} out of range for {self.n_experts} experts")
        return ExpertView(self, e % self.n_experts)

    def __len__(self) -> int:
        return self.n_experts

    @property
    def params_per_expert(self) -> int:
        return sum(p[0].numel() for p in self.parameters())

    def _stack_module_list_keys(self, state_dict, prefix, *args) -> None:
        for name, _ in self.named_parameters():  # e.g. "c_fc.weight"
            old = [f"{prefix}{e}.{name}" for e in range(self.n_experts)]
            if prefix + name not in state_dict and all(k in state_dict for k in old):
                state_dict[prefix + name] = torch.stack([state_dict.pop(k) for k in old])


def run_grouped(
    experts: GroupedExperts, x: torch.Tensor, expert_idx: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row ``m`` of ``x`` ``(M, dim)`` through expert ``expert_idx[m]``: returns ``(M, dim)`` outputs
    (input order) and the rows per expert ``(E,)`` int64.

    Rows are placed at ``slot = expert * cap + rank within the expert`` of a zero buffer
    ``(E, cap, dim)`` with ``cap`` the largest count; padded slots are computed and discarded (their
    gradient is zero, so an expert that got no row gets an exactly-zero gradient).
    """
    E, M = experts.n_experts, x.size(0)
    counts = torch.bincount(expert_idx, minlength=E)  # (E,)
    cap = int(counts.max()) if M else 0
    order = expert_idx.argsort(stable=True)  # rows grouped by expert
    starts = counts.cumsum(0) - counts  # (E,) first sorted position of each expert
    rank_sorted = torch.arange(M, device=x.device) - starts[expert_idx[order]]
    rank = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)  # (M,) rank of row m in its group
    slot = expert_idx * cap + rank  # (M,)
    buf = x.new_zeros(E * cap, x.size(1)).index_copy(0, slot, x)  # (E*cap, dim)
    y = experts(buf.view(E, cap, -1)).reshape(E * cap, -1)  # (E*cap, dim)
    return y[slot], counts


def count_used(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Fraction of ``n`` experts that appear in ``idx`` (any shape, int64), as a detached float scalar."""
    return (torch.bincount(idx.reshape(-1), minlength=n) > 0).float().mean().detach()
