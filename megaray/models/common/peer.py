"""PEER: parameter-efficient expert retrieval over a very large pool of single-neuron experts.

He 2024, "Mixture of A Million Experts" (arXiv 2407.04153), section 2 and Algorithm 1; the
product keys are Lample et al. 2019, "Large Memory Layers with Product Keys" (PKM).

A PEER layer ``f: R^d -> R^d`` (``d = n_embd``) has ``N`` experts, ``N`` product keys and ``h`` query
networks (retrieval heads):

* expert ``i`` is a singleton MLP ``e_i(x) = sigma(u_i^T x) v_i`` (eq. 6) with ``u_i, v_i in R^d``,
  stored as two embedding tables (Algorithm 1: ``w_down_embed``, ``w_up_embed``); ``sigma`` is the
  activation of ``cfg.mlp`` (GELU for ``gelu``/``geglu``, SiLU for ``silu``/``swiglu``, ReLU). No
  biases ("we omit bias terms", Algorithm 1).
* product keys (eq. 4): ``K = {[c; c'] | c in C, c' in C'}`` with two sub-key sets ``C, C'`` of
  ``sqrt(N)`` keys of ``d_key/2`` dims each, shared by every head ("different heads share the same
  pool of experts with the same set of product keys", section 2). Expert ``i * sqrt(N) + j`` has
  key ``[C_i; C'_j]``.
* query network ``q: R^d -> R^{d_key}`` per head: one linear layer ``d -> h * d_key`` (bias when
  ``cfg.bias``), followed, when ``cfg.moe_peer_batchnorm``, by BatchNorm over the query features
  (the paper's default "query BatchNorm", from PKM section 3.2, to increase expert usage).

Retrieval (eq. 5): split ``q(x) = [q_1; q_2]``, take the top ``k`` sub-keys of ``q_1^T C`` and of
``q_2^T C'``, form the ``k * k`` candidate sums ``q_1^T c_i + q_2^T c'_j`` and keep their top ``k``:
exactly the top ``k`` of ``q(x)^T K`` over all ``N`` keys, in ``O((sqrt(N) + k^2) d_key)``.
Router scores are ``g = softmax`` of the ``k`` selected scores per head (eq. 2, Algorithm 1 line 15);
the output sums the heads (eq. 7): ``f(x) = sum_heads sum_{i in I^head} g_i sigma(u_i^T x) v_i``.

Parameter count (section 2, "Why a large number of small experts": ``P_expert = 2 d_model`` per
singleton expert without bias):

    P = 2 N d            experts (u_i, v_i)
      + sqrt(N) d_key    sub-keys (2 sets x sqrt(N) keys x d_key/2)
      + h d d_key        query networks (+ h d_key biases when cfg.bias)
      + 2 h d_key        query BatchNorm scale and shift (when enabled; running stats are buffers)

Per token ``h k`` experts are applied (``d_active = h k``, granularity ``G = h k``): the active
expert parameters are ``2 h k d``. The paper's setting is ``N = 1024**2, h = 8, k = 16``.

Caveats: query BatchNorm uses the statistics of the training batch (every token of every sequence
on this rank, unsynchronised across ranks), so in training a token's routing depends a little on the
other tokens of the batch (not strictly causal, as expert-choice routing); eval mode uses the running
statistics. Experts are embedding rows with dense gradients: an optimizer step touches all ``2 N d``
weights (AdamW moments included), as in Algorithm 1's embedding tables.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from megaray.models.common.experts import SparseFeedForward, count_used
from megaray.models.common.mlp import ACTIVATIONS


def product_key_topk(q: torch.Tensor, sub_keys: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` product keys per query (Lample et al. 2019, section 3.2; He 2024, eq. 5).

    Args:
        q: ``(..., 2, d_key/2)`` queries, already split into their two halves.
        sub_keys: ``(2, n, d_key/2)``: the sub-key sets ``C`` and ``C'``; key ``i * n + j`` is
            ``[C_i; C'_j]``.
        k: keys to keep (``k <= n``).
    Returns:
        ``scores (..., k)`` (``q^T key``, descending) and ``indices (..., k)`` int64 in ``[0, n*n)``.
    """
    n = sub_keys.size(1)
    s = torch.einsum("...pd,pnd->...pn", q, sub_keys.to(q.dtype))  # (..., 2, n)
    s1, i1 = s[..., 0, :].topk(k, dim=-1)  # (..., k) best of C for q_1
    s2, i2 = s[..., 1, :].topk(k, dim=-1)  # (..., k) best of C' for q_2
    cand = (s1[..., :, None] + s2[..., None, :]).flatten(-2)  # (..., k*k) candidate scores
    cand_idx = (i1[..., :, None] * n + i2[..., None, :]).flatten(-2)  # (..., k*k) expert ids
    scores, pos = cand.topk(k, dim=-1)  # (..., k)
    return scores, cand_idx.gather(-1, pos)


class PEER(SparseFeedForward):
    """PEER layer ``(B, T, C) -> (B, T, C)`` (see the module docstring for the equations).

    Args:
        cfg: a GPTConfig-like object with ``n_embd``, ``n_experts`` (``N``, a perfect square),
            ``moe_top_k`` (``k`` per head, ``<= sqrt(N)``), ``moe_heads`` (``h``), ``mlp`` (the
            activation), ``bias`` (query bias); optionally ``moe_peer_key_dim`` (``d_key``, even;
            default ``n_embd`` rounded up to even) and ``moe_peer_batchnorm`` (default True).
    Raises:
        ValueError: ``N`` not a perfect square, ``k > sqrt(N)``, odd ``d_key``.

    No auxiliary loss (:attr:`aux_loss` is 0). :attr:`stats` holds ``moe_aux`` (0) and
    ``moe_expert_usage``: the fraction of the ``N`` experts retrieved by some token of the batch
    (the paper's "expert usage", section 3.3). :attr:`last_indices` ``(B*T, h, k)`` holds the last
    forward's retrieved experts.
    """

    def __init__(self, cfg):
        super().__init__()
        N, d = cfg.n_experts, cfg.n_embd
        self.n_keys = math.isqrt(N)
        self.n_experts, self.heads, self.top_k = N, int(getattr(cfg, "moe_heads", 1)), cfg.moe_top_k
        self.key_dim = getattr(cfg, "moe_peer_key_dim", None) or d + d % 2
        if self.n_keys * self.n_keys != N:
            raise ValueError(f"PEER needs a perfect-square number of experts (product keys), got n_experts {N}")
        if self.top_k > self.n_keys:
            raise ValueError(f"PEER moe_top_k ({self.top_k}) exceeds sqrt(n_experts) ({self.n_keys})")
        if self.key_dim % 2:
            raise ValueError(f"PEER moe_peer_key_dim must be even (two halves), got {self.key_dim}")
        self.act = ACTIVATIONS[cfg.mlp]
        self.query = nn.Linear(d, self.heads * self.key_dim, bias=cfg.bias)
        self.query_norm = (
            nn.BatchNorm1d(self.heads * self.key_dim) if getattr(cfg, "moe_peer_batchnorm", True) else None
        )
        # PKM's get_uniform_keys: U(-1/sqrt(dim), 1/sqrt(dim)) per sub-key dimension
        bound = 1.0 / math.sqrt(self.key_dim // 2)
        self.sub_keys = nn.Parameter(torch.empty(2, self.n_keys, self.key_dim // 2).uniform_(-bound, bound))
        self.down = nn.Embedding(N, d)  # u_i
        self.up = nn.Embedding(N, d)  # v_i
        self.last_indices = torch.zeros(0, self.heads, self.top_k, dtype=torch.long)

    def inactive_params(self) -> int:
        return (self.n_experts - self.heads * self.top_k) * 2 * self.down.embedding_dim

    def queries(self, xf: torch.Tensor) -> torch.Tensor:
        """``(M, d) -> (M, h, 2, d_key/2)``: the heads' queries (BatchNorm in float32), split in halves."""
        q = self.query(xf)  # (M, h*d_key)
        bn = self.query_norm
        if bn is not None:
            train = self.training or bn.running_mean is None
            q = F.batch_norm(
                q.float(),
                bn.running_mean,
                bn.running_var,
                bn.weight.float(),
                bn.bias.float(),
                train,
                bn.momentum,
                bn.eps,
            ).to(q.dtype)
        return q.view(q.size(0), self.heads, 2, self.key_dim // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        xf = x.reshape(B * T, C)  # (M, C)
        scores, idx = product_key_topk(self.queries(xf), self.sub_keys, self.top_k)  # (M, h, k) x2
        g = scores.float().softmax(dim=-1).to(x.dtype)  # (M, h, k) router scores per head
        u = self.down(idx)  # (M, h, k, C)
        a = self.act(torch.einsum("mc,mhkc->mhk", xf, u)) * g  # (M, h, k) gated neuron activations
        M, hk = idx.size(0), self.heads * self.top_k
        # sum_{heads, experts} a * v_i without materialising the (M, h, k, C) up vectors
        out = F.embedding_bag(idx.reshape(M, hk), self.up.weight, per_sample_weights=a.reshape(M, hk), mode="sum")
        self.last_indices = idx.detach()
        self.stats = {"moe_aux": torch.zeros((), device=x.device), "moe_expert_usage": count_used(idx, self.n_experts)}
        return out.view(B, T, C)
