"""RecurrentGPT: a depth-recurrent transformer (Geiping et al. 2025, "Scaling up Test-Time Compute
with Latent Reasoning: A Recurrent Depth Approach", arXiv:2502.05171, "Huginn").

Read top to bottom::

    e   = prelude(embed(idx))                        (B, T, C)  n_prelude GPT blocks
    s_0 ~ N(0, state_std^2)                          (B, T, C)  fresh noise every forward
    s_i = core(adapter([s_{i-1}; e]))  i = 1..r      (B, T, C)  n_core GPT blocks, shared weights
    p   = lm_head(ln_f(coda(s_r)))                   (B, T, V)  n_coda GPT blocks

The input embedding ``e`` is re-injected every iteration through the adapter (a ``2C -> C``
linear map). Training samples the depth ``r`` once per optimizer step (:meth:`sample_num_steps`,
seeded by the step so every rank draws the same ``r``) and back-propagates through the last
``backprop_depth`` iterations only: the first ``r - k`` run under ``torch.no_grad()`` (truncated
backprop; the prelude still gets gradients through ``e`` in the last ``k``). Evaluation forwards
use ``round(recurrent_mean_thinking_steps)`` iterations; :meth:`generate` iterates until the exit
criterion holds. Every block is :class:`megaray.models.gpt.model.Block` (attention, MLP, norm and
position from :mod:`megaray.models.common`).

Deviations from the reference: the GPT block as configured (Huginn's sandwich norm is
``norm_placement: sandwich``; no embedding scale);
the initial state is plain (not truncated) normal noise; ``r = 1 + Poisson(lambda)`` with
``E[lambda] = r_bar - 1`` so the mean depth is exactly ``r_bar``; generation recomputes the whole
context for each token (no KV cache). ``activation_checkpointing`` recomputes every block
(prelude, each core iteration that keeps gradients, coda) in backward
(:func:`megaray.models.common.checkpointing.run_block`).
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from megaray.models.common.checkpointing import run_block
from megaray.models.common.norm import build_final_norm
from megaray.models.common.position import build_position
from megaray.models.gpt.model import GPT, Block
from megaray.models.recurrent.config import RecurrentConfig

Tables = Tuple[Optional[tuple], Optional[torch.Tensor]]  # (rope tables, attention bias)


def sample_depth(cfg: RecurrentConfig, step: int) -> int:
    """The number of core iterations ``r >= 1`` of training step ``step`` (a pure function of
    ``(cfg.depth_seed, step)``, so every rank draws the same ``r``).

    ``poisson_lognormal`` (Huginn, section 3.3): ``tau ~ N(log(r_bar - 1) - sigma^2 / 2, sigma)``,
    ``r = 1 + Poisson(exp(tau))``, so ``E[r] = r_bar`` with a heavy right tail; ``fixed``:
    ``r = round(r_bar)``."""
    r_bar = cfg.recurrent_mean_thinking_steps
    if cfg.recurrent_sampling == "fixed" or r_bar <= 1:
        return cfg.mean_steps
    g = torch.Generator().manual_seed(1_000_003 * cfg.depth_seed + int(step))
    sigma = cfg.recurrent_sigma
    tau = torch.normal(math.log(r_bar - 1) - sigma**2 / 2, sigma, (1,), generator=g)
    return 1 + int(torch.poisson(tau.exp(), generator=g).item())


class RecurrentGPT(nn.Module):
    """Prelude -> recurrent core (``r`` iterations) -> coda -> LM head.

    Args:
        config: a :class:`RecurrentConfig` (e.g. ``RecurrentConfig.from_name("tiny")``).

    ``model(idx)`` maps ``(B, T)`` int64 ids to ``(B, T, V)`` logits; ``model(idx, targets)``
    returns ``(logits, loss)`` (mean cross-entropy over targets not ``-1``), as :class:`GPT`.
    ``num_steps`` fixes ``r``; else training draws it from :meth:`sample_num_steps` at the step
    set by :meth:`set_step`, and evaluation uses ``config.mean_steps``. :attr:`last_num_steps`
    holds the ``r`` of the last forward; :attr:`aux_loss` is a zero scalar (no MoE), for
    :class:`~megaray.tasks.lm.LMTask`.
    """

    def __init__(self, config: RecurrentConfig):
        super().__init__()
        self.config = config
        C = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, C)
        self.pos = build_position(config)
        self.drop = nn.Dropout(config.dropout)
        self.prelude = nn.ModuleList([Block(config) for _ in range(config.n_prelude)])
        self.adapter = nn.Linear(2 * C, C, bias=config.bias)
        self.core = nn.ModuleList([Block(config) for _ in range(config.n_core)])
        self.coda = nn.ModuleList([Block(config) for _ in range(config.n_coda)])
        self.ln_f = build_final_norm(config)
        self.lm_head = nn.Linear(C, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.wte.weight = self.lm_head.weight
        self.aux_loss = torch.zeros(())
        self.activation_checkpointing = config.activation_checkpointing
        self.step = 0
        self.last_num_steps = 0
        #: mean core iterations per generated token of the last :meth:`generate` call
        self.last_mean_steps: Optional[float] = None
        self.apply(GPT._init_weights)
        for name, p in self.named_parameters():  # GPT-2 residual scaling over the distinct blocks
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    # -- depth -----------------------------------------------------------------------------
    def set_step(self, step: int) -> "RecurrentGPT":
        """Set the optimizer step whose depth the next training forwards use (the task calls it
        before each micro-batch; every rank passes the same ``step``)."""
        self.step = int(step)
        return self

    def sample_num_steps(self, step: Optional[int] = None) -> int:
        """``r`` for ``step`` (default: the one set by :meth:`set_step`); see :func:`sample_depth`."""
        return sample_depth(self.config, self.step if step is None else step)

    def set_activation_checkpointing(self, flag: bool) -> "RecurrentGPT":
        """Recompute each block in backward when training with ``flag`` True (as :class:`GPT`)."""
        self.activation_checkpointing = bool(flag)
        return self

    # -- pieces ----------------------------------------------------------------------------
    def _blocks(self, blocks: nn.ModuleList, x: torch.Tensor, tables: Tables) -> torch.Tensor:
        """``x`` through ``blocks`` in order, each checkpointed when configured and training."""
        on = self.activation_checkpointing and self.training
        for block in blocks:
            x = run_block(block, x, *tables, enabled=on)
        return x

    def _embed(self, idx: torch.Tensor) -> Tuple[torch.Tensor, Tables]:
        """``(B, T)`` ids -> ``e (B, T, C)`` (after the prelude) and the position tables."""
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.pos.embed(self.wte(idx), pos))
        tables = (self.pos.rope(pos), self.pos.attn_bias(pos, pos))
        return self._blocks(self.prelude, x, tables), tables

    def init_state(self, e: torch.Tensor) -> torch.Tensor:
        """``s_0 ~ N(0, state_std^2)`` shaped like ``e``; in eval mode drawn from a generator
        seeded 0, so evaluation and generation are deterministic."""
        if self.training:
            return torch.randn_like(e) * self.config.state_std
        g = torch.Generator(device=e.device).manual_seed(0)
        return torch.randn(e.shape, generator=g, device=e.device, dtype=e.dtype) * self.config.state_std

    def core_step(self, s: torch.Tensor, e: torch.Tensor, tables: Tables) -> torch.Tensor:
        """One iteration ``s -> core(adapter([s; e]))``, ``(B, T, C) -> (B, T, C)``."""
        return self._blocks(self.core, self.adapter(torch.cat([s, e], dim=-1)), tables)

    def head(self, s: torch.Tensor, tables: Tables) -> torch.Tensor:
        """Coda, final norm and LM head: ``(B, T, C) -> (B, T, V)`` logits."""
        return self.lm_head(self.ln_f(self._blocks(self.coda, s, tables)))

    def iterate(self, e: torch.Tensor, tables: Tables, num_steps: int) -> torch.Tensor:
        """``num_steps`` core iterations from fresh noise; with gradients enabled, all but the last
        ``backprop_depth`` run under ``torch.no_grad()`` and the state entering the rest is
        detached (truncated backprop through depth)."""
        s = self.init_state(e)
        k = self.config.backprop_depth
        n_free = max(num_steps - k, 0) if (k is not None and torch.is_grad_enabled()) else 0
        with torch.no_grad():
            for _ in range(n_free):
                s = self.core_step(s, e, tables)
        for _ in range(num_steps - n_free):
            s = self.core_step(s, e, tables)
        return s

    # -- forward ---------------------------------------------------------------------------
    def forward(
        self,
        idx: torch.Tensor,
        targets: Optional[torch.Tensor] = None,
        num_steps: Optional[int] = None,
        cache: Optional[List["RecomputeCache"]] = None,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """``(B, T)`` int64 ids [, ``(B, T)`` targets] -> ``(B, T, V)`` logits [, loss].

        ``cache`` (from :meth:`new_cache`) makes the call continue after the cached tokens, by
        recomputing them (there is no KV cache), so :func:`megaray.models.gpt.sampling.generate`
        and ``megaray generate`` work at the fixed evaluation depth.

        Raises:
            ValueError: ``T`` (plus the cached tokens) ``> block_size`` or ``num_steps < 1``.
        """
        if cache is not None:
            cache[0].ids = idx if cache[0].ids is None else torch.cat([cache[0].ids, idx], dim=1)
            return self(cache[0].ids, num_steps=num_steps)[:, -idx.size(1) :]
        if num_steps is None:
            num_steps = self.sample_num_steps() if self.training else self.config.mean_steps
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        e, tables = self._embed(idx)
        logits = self.head(self.iterate(e, tables, num_steps), tables)
        self.last_num_steps = int(num_steps)
        self.aux_loss = torch.zeros((), device=idx.device)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    # -- inference -------------------------------------------------------------------------
    def new_cache(self) -> List["RecomputeCache"]:
        """An empty :class:`RecomputeCache` (in a one-element list, the GPT cache protocol)."""
        return [RecomputeCache()]

    @torch.no_grad()
    def iterate_until_exit(
        self,
        idx: torch.Tensor,
        criterion: Optional[str] = None,
        threshold: Optional[float] = None,
        max_steps: Optional[int] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Adaptive depth for the **last** position of each row: ``(B, T)`` ids ->
        ``(logits (B, V) at the last position, steps (B,) int64)``.

        Each row iterates until its criterion (default ``config.recurrent_exit_criteria``) falls
        below ``threshold`` (default ``config.exit_threshold``) at its last position, or
        ``max_steps`` (default ``config.max_inference_steps``); a row that has exited keeps its
        state while the others continue. Criteria: ``kl``: ``KL(p_{i-1} || p_i)`` of the output
        distributions of successive iterations (nats); ``state_delta``:
        ``||s_i - s_{i-1}|| / ||s_i||``; ``fixed``: never (always ``max_steps``).

        Raises:
            ValueError: unknown criterion.
        """
        cfg = self.config
        criterion = criterion or cfg.recurrent_exit_criteria
        threshold = cfg.exit_threshold if threshold is None else threshold
        max_steps = max_steps or cfg.max_inference_steps
        measure = _criteria(self).get(criterion)
        if measure is None:
            raise ValueError(f"unknown exit criterion {criterion!r}; known: kl, state_delta, fixed")
        e, tables = self._embed(idx)
        s = self.init_state(e)
        B = idx.size(0)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        steps = torch.zeros(B, dtype=torch.long, device=idx.device)
        prev_logp = None
        for _ in range(max_steps):
            s_new = self.core_step(s, e, tables)
            value, logp = measure(s, s_new, tables, prev_logp)
            s = torch.where(done[:, None, None], s, s_new)
            steps += (~done).long()
            done |= value < threshold
            prev_logp = logp
            if bool(done.all()):
                break
        return self.head(s, tables)[:, -1, :], steps

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        *,
        criterion: Optional[str] = None,
        threshold: Optional[float] = None,
        max_steps: Optional[int] = None,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        stop_token: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """Extend ``idx (B, T)`` by up to ``max_new_tokens`` -> ``(B, T + n)`` int64, choosing each
        token's depth with :meth:`iterate_until_exit`; :attr:`last_mean_steps` = mean iterations
        per generated token (over rows and tokens). No KV cache: each token recomputes the
        (last ``block_size`` tokens of the) context. Sampling options as
        :func:`megaray.models.gpt.sampling.sample_next`; ``stop_token`` as
        :func:`megaray.models.gpt.sampling.generate`."""
        from megaray.models.gpt.sampling import append_until_stop, sample_next

        was_training = self.training
        self.eval()
        used = []
        try:
            done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
            for _ in range(max_new_tokens):
                logits, steps = self.iterate_until_exit(
                    idx[:, -self.config.block_size :], criterion, threshold, max_steps
                )
                used.append(steps.float())
                nxt = sample_next(logits, temperature, top_k, top_p, generator)
                idx, finished = append_until_stop(idx, nxt, done, stop_token)
                if finished:
                    break
        finally:
            self.train(was_training)
        self.last_mean_steps = float(torch.stack(used).mean()) if used else None
        return idx

    # -- accounting ------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = True) -> int:
        """Distinct parameters (tied weights once; the core counted once). ``non_embedding``
        drops the position table and, when untied, the token embedding, as :meth:`GPT.num_params`."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(p.numel() for p in self.pos.parameters())
            if not self.config.tie_embeddings:
                n -= self.wte.weight.numel()
        return n

    def flops_per_token(self, num_steps: Optional[int] = None, seq_len: Optional[int] = None) -> float:
        """Training FLOPs per token at depth ``r = num_steps`` (default ``config.mean_steps``) and
        ``T = seq_len or block_size``, by the PaLM/nanoGPT count (:mod:`megaray.models.gpt.flops`):
        a forward costs ``2 N + 2 H T (Q_qk + Q_v)`` per block (``N`` its parameters) and a
        backward twice that. The prelude, coda, head and the last ``min(r, backprop_depth)``
        iterations pay forward + backward (x3); the first ``r - backprop_depth`` iterations pay
        the forward only. With ``r = 1`` this equals :func:`megaray.models.gpt.flops.flops_per_token`
        of the same blocks."""
        cfg = self.config
        r = num_steps or cfg.mean_steps
        k = r if cfg.backprop_depth is None else min(r, cfg.backprop_depth)
        T = seq_len or cfg.block_size
        q_qk = cfg.nope_head_dim + cfg.qk_rope_head_dim if cfg.attention == "mla" else cfg.head_dim
        q_v = cfg.value_head_dim if cfg.attention == "mla" else cfg.head_dim
        attn = 2.0 * cfg.n_head * T * (q_qk + q_v)  # forward attention FLOPs per block and token
        n_core = sum(p.numel() for p in self.core.parameters()) + sum(p.numel() for p in self.adapter.parameters())
        n_once = self.num_params(non_embedding=True) - n_core  # prelude, coda, norms, LM head
        fwd_once = 2.0 * n_once + (cfg.n_prelude + cfg.n_coda) * attn
        fwd_iter = 2.0 * n_core + cfg.n_core * attn
        return 3.0 * fwd_once + 3.0 * k * fwd_iter + (r - k) * fwd_iter


class RecomputeCache:
    """The tokens seen so far (``ids (B, T)`` or None); ``len()`` is ``T``. Stands in for a KV
    cache: :meth:`RecurrentGPT.forward` recomputes the whole context from it."""

    def __init__(self) -> None:
        self.ids: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return 0 if self.ids is None else int(self.ids.size(1))


def _criteria(model: RecurrentGPT) -> dict:
    """Exit criteria: ``name -> (s_prev, s_new, tables, prev_logp) -> (value (B,), logp or None)``."""

    def kl(s_prev, s_new, tables, prev_logp):
        logp = F.log_softmax(model.head(s_new, tables)[:, -1, :].float(), dim=-1)  # (B, V)
        if prev_logp is None:
            return torch.full(logp.shape[:1], float("inf"), device=logp.device), logp
        return F.kl_div(logp, prev_logp, log_target=True, reduction="none").sum(-1), logp  # KL(prev || new)

    def state_delta(s_prev, s_new, tables, prev_logp):
        a, b = s_new[:, -1].float(), s_prev[:, -1].float()
        return (a - b).norm(dim=-1) / a.norm(dim=-1).clamp_min(1e-12), None

    def fixed(s_prev, s_new, tables, prev_logp):
        return torch.full(s_new.shape[:1], float("inf"), device=s_new.device), None

    table: dict[str, Callable] = {"kl": kl, "state_delta": state_delta, "fixed": fixed}
    return table
