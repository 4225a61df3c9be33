"""Device facts the loop needs: peak FLOP/s for model FLOPs utilisation (MFU).

MFU (PaLM, Chowdhery et al. 2022, appendix B) = achieved model FLOP/s / the device's peak FLOP/s.
A model supplies its FLOPs per unit (:meth:`megaray.tasks.base.Task.flops_per_unit`); the peak is
a fact about the accelerator, so it lives here, beside the loop that divides by it.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

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


def choose_gpu(setting: "bool | str", resources: Dict[str, float]) -> Tuple[bool, str]:
    """Resolve ``scaling.use_gpu`` against a Ray cluster's resources (``ray.cluster_resources()``):
    ``(use_gpu, why)``. ``auto`` uses GPUs when the cluster has at least one now; ``true`` and
    ``false`` are kept as given. ``why`` is a short reason for the console."""
    gpus = int(resources.get("GPU", 0))
    if setting is True:
        return True, f"scaling.use_gpu true; the cluster has {gpus} GPU(s) now"
    if setting is False:
        return False, "scaling.use_gpu false" + (f" although the cluster has {gpus} GPU(s)" if gpus else "")
    if gpus:
        return True, f"scaling.use_gpu auto: the cluster has {gpus} GPU(s); precision auto picks bf16 where supported"
    return False, "scaling.use_gpu auto: the cluster has no GPUs"
