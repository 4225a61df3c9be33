"""The SSD scan of Mamba-2 (Dao & Gu 2024, "Transformers are SSMs", sections 6-7), three ways.

All three compute, per batch row ``b`` and head ``h``, the selective state-space recurrence

    state_t = exp(dt_t * A) * state_{t-1} + dt_t * x_t B_t^T       # (P, N)
    y_t     = state_t C_t + D * x_t                                 # (P,)

with shapes (the reference's letters): ``x (B, T, H, P)``, ``dt (B, T, H)`` (already the positive
step size, i.e. ``softplus(dt_raw + dt_bias)``), ``A (H,)`` negative, ``B, C (B, T, G, N)`` shared
by the ``H / G`` heads of a group (head ``h`` uses group ``h // (H / G)``), ``D (H,)``, and a state
``(B, H, P, N)``. Each returns ``(y (B, T, H, P), final_state (B, H, P, N))``.

* :func:`ssd_recurrent`: the recurrence above, one step at a time. The reference in tests, and
  the decoding step (``T == 1``) of generation with a state cache.
* :func:`ssd_chunked`: the chunked "state space dual" algorithm in pure PyTorch, as
  ``ssd_minimal_discrete`` of ``mamba_ssm/modules/ssd_minimal.py`` (Listing 1 of the paper) and
  HF ``modeling_mamba2.torch_forward``: quadratic attention-like products inside chunks of
  ``chunk_size`` tokens, a linear recurrence over chunk states between them. Any ``T`` (the last
  chunk is zero-padded, which leaves the state unchanged), an optional initial state. Runs on CPU.
* :func:`ssd_mamba_ssm`: ``mamba_ssm``'s fused Triton kernel ``mamba_chunk_scan_combined`` (CUDA
  only; the optional extra ``megaray[mamba]``). :func:`kernel_available` says whether it can run.

Computation is in float32 (float64 stays float64); ``y`` is returned in ``x``'s dtype, the state
in the compute dtype.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

try:  # the fused kernel is optional: never required, used when importable and on CUDA
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
except ImportError:  # pragma: no cover - depends on the environment
    mamba_chunk_scan_combined = None

Tensor = torch.Tensor


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _heads(M: Tensor, n_heads: int) -> Tensor:
    """``(B, T, G, N) -> (B, T, H, N)``: each group's B or C repeated for its ``H / G`` heads."""
    return M.repeat_interleave(n_heads // M.size(2), dim=2)


def _check(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> None:
    b, t, h, _ = x.shape
    if dt.shape != (b, t, h) or A.shape != (h,) or B.shape != C.shape or B.shape[:2] != (b, t):
        raise ValueError(
            f"ssd: shapes x {tuple(x.shape)}, dt {tuple(dt.shape)}, A {tuple(A.shape)}, "
            f"B {tuple(B.shape)}, C {tuple(C.shape)} do not match (see megaray.models.mamba.ssd)"
        )
    if h % B.size(2):
        raise ValueError(f"ssd: {h} heads are not divisible into {B.size(2)} groups")


def ssd_recurrent(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    initial_state: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """The SSM recurrence token by token (``T`` Python steps): ``O(T H P N)`` work, exact."""
    _check(x, dt, A, B, C)
    b, t, h, p = x.shape
    dtype = _compute_dtype(x)
    xs, dts, As = x.to(dtype), dt.to(dtype), A.to(dtype)
    Bh, Ch = _heads(B, h).to(dtype), _heads(C, h).to(dtype)  # (B, T, H, N)
    state = (
        torch.zeros(b, h, p, B.size(-1), dtype=dtype, device=x.device)
        if initial_state is None
        else initial_state.to(dtype)
    )
    ys = []
    for i in range(t):
        decay = torch.exp(dts[:, i] * As)  # (B, H)
        inp = (dts[:, i, :, None] * xs[:, i])[..., None] * Bh[:, i, :, None, :]  # (B, H, P, N)
        state = decay[..., None, None] * state + inp
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, i]))  # (B, H, P)
    y = torch.stack(ys, dim=1)  # (B, T, H, P)
    if D is not None:
        y = y + D.to(dtype)[:, None] * xs
    return y.to(x.dtype), state


def segsum(a: Tensor) -> Tensor:
    """``(..., L) -> (..., L, L)``: ``out[..., i, j] = sum(a[..., j+1 : i+1])`` for ``i >= j``, else
    ``-inf`` (the log of the decay from token ``j`` to token ``i``). Cumulative sum of masked copies,
    the stable form of ``ssd_minimal.segsum``."""
    L = a.size(-1)
    a = a[..., None].expand(*a.shape, L)  # (..., L, L): a[..., i, j] = a_i
    strict = torch.tril(torch.ones(L, L, dtype=torch.bool, device=a.device), diagonal=-1)
    out = torch.cumsum(a.masked_fill(~strict, 0), dim=-2)
    causal = torch.tril(torch.ones(L, L, dtype=torch.bool, device=a.device))
    return out.masked_fill(~causal, float("-inf"))


def ssd_chunked(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Optional[Tensor] = None,
    initial_state: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """The chunked SSD algorithm (``ssd_minimal_discrete``) in plain PyTorch; see the module doc.

    Cost ``O(T Q (G N + H P) + T H P N)`` for chunk length ``Q = chunk_size``.

    Raises:
        ValueError: inconsistent shapes, heads not divisible by groups, ``chunk_size < 1``.
    """
    _check(x, dt, A, B, C)
    if chunk_size < 1:
        raise ValueError(f"ssd: chunk_size must be >= 1, got {chunk_size}")
    b, t, h, p = x.shape
    dtype, Q = _compute_dtype(x), chunk_size
    pad = (-t) % Q  # zero dt on padded tokens: decay exp(0) = 1 and no input, so the state is unchanged
    xd = F.pad(x.to(dtype) * dt.to(dtype)[..., None], (0, 0, 0, 0, 0, pad))  # (B, T', H, P): dt * x
    a = F.pad(dt.to(dtype) * A.to(dtype), (0, 0, 0, pad))  # (B, T', H): log decay per token
    Bh = F.pad(_heads(B, h).to(dtype), (0, 0, 0, 0, 0, pad))  # (B, T', H, N)
    Ch = F.pad(_heads(C, h).to(dtype), (0, 0, 0, 0, 0, pad))
    c = (t + pad) // Q
    xd, Bh, Ch = (z.reshape(b, c, Q, h, -1) for z in (xd, Bh, Ch))  # (B, c, l, H, P|N)
    a = a.reshape(b, c, Q, h).permute(0, 3, 1, 2)  # (B, H, c, l)
    a_cum = torch.cumsum(a, dim=-1)  # (B, H, c, l)

    # 1. inside each chunk: y_l = sum_{s<=l} (C_l . B_s) exp(a_{s+1..l}) dt_s x_s
    decay = torch.exp(segsum(a))  # (B, H, c, l, s)
    scores = torch.einsum("bclhn,bcshn->bhcls", Ch, Bh) * decay  # (B, H, c, l, s)
    y_diag = torch.einsum("bhcls,bcshp->bclhp", scores, xd)  # (B, c, l, H, P)

    # 2. each chunk's own contribution to the state at its end
    to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (B, H, c, l)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bh, to_end, xd)  # (B, c, H, P, N)

    # 3. the recurrence over chunks: the state entering each chunk (and the final one)
    init = (
        torch.zeros_like(states[:, :1]) if initial_state is None else initial_state.to(dtype)[:, None]
    )  # (B, 1, H, P, N)
    states = torch.cat([init, states], dim=1)  # (B, c+1, H, P, N)
    chunk_decay = torch.exp(segsum(F.pad(a_cum[..., -1], (1, 0))))  # (B, H, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)  # (B, c+1, H, P, N)
    states, final = states[:, :-1], states[:, -1]

    # 4. the entering state read out at every token of the chunk
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", Ch, states, torch.exp(a_cum))  # (B, c, l, H, P)

    y = (y_diag + y_off).reshape(b, c * Q, h, p)[:, :t]  # (B, T, H, P)
    if D is not None:
        y = y + D.to(dtype)[:, None] * x.to(dtype)
    return y.to(x.dtype), final


def kernel_available(device: torch.device) -> bool:
    """True when ``mamba_ssm`` is importable and ``device`` is CUDA."""
    return mamba_chunk_scan_combined is not None and torch.device(device).type == "cuda"


def ssd_mamba_ssm(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Optional[Tensor] = None,
    initial_state: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """``mamba_ssm``'s fused ``mamba_chunk_scan_combined`` (same contract as :func:`ssd_chunked`).

    Raises:
        RuntimeError: ``mamba_ssm`` is not installed (``pip install 'megaray[mamba]'``).
    """
    if mamba_chunk_scan_combined is None:
        raise RuntimeError(
            "mamba_ssm is not installed: pip install 'megaray[mamba]' (needs CUDA), or set model.ssd_backend: torch"
        )
    y, final = mamba_chunk_scan_combined(
        x,
        dt,
        A.float(),
        B,
        C,
        chunk_size,
        D=D,
        initial_states=initial_state,
        dt_softplus=False,
        return_final_states=True,
    )
    return y, final
