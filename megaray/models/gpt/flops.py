"""Training FLOPs per token and model FLOPs utilisation (MFU).

MFU (PaLM, Chowdhery et al. 2022, appendix B) = achieved model FLOP/s / peak FLOP/s, where the
model FLOPs per token are ``6 N + 12 L H Q T`` (forward + backward, no recomputation counted):
``N`` non-embedding parameters, ``L`` layers, ``H`` heads, ``Q`` head dim, ``T`` sequence length.
This is nanoGPT's ``estimate_mfu``. For MLA (q/k head dim ``Q + Q_rope``, v head dim ``Q``) the
attention term is ``6 L H T (Q_qk + Q_v)``, which equals ``12 L H Q T`` for standard attention.
A device's peak FLOP/s live in :mod:`megaray.train.device` (a device fact, not a model fact).
"""

from __future__ import annotations

from typing import Optional


def flops_per_token(cfg, n_params_non_embedding: int, seq_len: Optional[int] = None) -> float:
    """Training FLOPs per token: ``6 * N + 6 * L * H * T * (Q_qk + Q_v)`` (= ``6N + 12 LHQT``).

    Args:
        cfg: a :class:`~megaray.models.gpt.config.GPTConfig`.
        n_params_non_embedding: ``N`` (``GPT.num_params(non_embedding=True)``; MoE: active ones).
        seq_len: ``T``; default ``cfg.block_size``.
    Returns:
        FLOPs (multiply-adds count 2) per trained token.
    """
    T = seq_len or cfg.block_size
    mla = cfg.attention == "mla"
    q_qk = cfg.nope_head_dim + cfg.qk_rope_head_dim if mla else cfg.head_dim
    q_v = cfg.value_head_dim if mla else cfg.head_dim
    return 6.0 * n_params_non_embedding + 6.0 * cfg.n_layer * cfg.n_head * T * (q_qk + q_v)


def estimate_mfu(flops_per_token: float, tokens_per_sec: float, peak_flops: Optional[float]) -> Optional[float]:
    """``flops_per_token * tokens_per_sec / peak_flops`` as a fraction (0..1); None if no peak."""
    if not peak_flops:
        return None
    return flops_per_token * tokens_per_sec / peak_flops
