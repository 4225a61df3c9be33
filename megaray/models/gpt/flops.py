"""Training FLOPs per token and model FLOPs utilisation (MFU).

MFU (PaLM, Chowdhery et al. 2022, appendix B) = achieved model FLOP/s / peak FLOP/s, where the
model FLOPs per token are ``6 N + 12 L H Q T`` (forward + backward, no recomputation counted):
``N`` non-embedding parameters, ``L`` layers, ``H`` heads, ``Q`` head dim, ``T`` sequence length.
This is nanoGPT's ``estimate_mfu``. For MLA (q/k head dim ``Q + Q_rope``, v head dim ``Q``) the
attention term is ``6 L H T (Q_qk + Q_v)``, which equals ``12 L H Q T`` for standard attention.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

#: dense bf16/fp16 tensor-core peak FLOP/s per GPU (vendor datasheets, no sparsity), matched as
#: substrings of ``torch.cuda.get_device_name``; first match wins, so specific names come first.
PEAK_FLOPS = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM (HBM3)
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("V100", 125e12),  # fp16 (no bf16)
    ("T4", 65e12),  # fp16 (no bf16)
]


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
    q_qk = cfg.head_dim + (cfg.qk_rope_head_dim if cfg.attention == "mla" else 0)
    q_v = cfg.head_dim
    return 6.0 * n_params_non_embedding + 6.0 * cfg.n_layer * cfg.n_head * T * (q_qk + q_v)


def estimate_mfu(flops_per_token: float, tokens_per_sec: float, peak_flops: Optional[float]) -> Optional[float]:
    """``flops_per_token * tokens_per_sec / peak_flops`` as a fraction (0..1); None if no peak."""
    if not peak_flops:
        return None
    return flops_per_token * tokens_per_sec / peak_flops


def peak_flops(device: Union[None, str, torch.device] = None) -> Optional[float]:
    """Peak dense bf16 FLOP/s of ``device`` (a torch device, ``"cuda:0"``, or a GPU name such
    as ``"NVIDIA H100 80GB HBM3"``); None for CPU, an unknown GPU, or no CUDA.

    ``None`` means the current CUDA device when there is one.
    """
    if isinstance(device, str) and not device.startswith(("cuda", "cpu", "meta", "mps")):
        name = device
    else:
        dev = torch.device(device) if device is not None else None
        if dev is None:
            if not torch.cuda.is_available():
                return None
            dev = torch.device("cuda")
        if dev.type != "cuda" or not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name(dev)
    for key, flops in PEAK_FLOPS:
        if key.lower() in name.lower():
            return flops
    return None
