"""Activation checkpointing of one block (``model.activation_checkpointing: true``).

:func:`run_block` is what the families without their own loop code share (recurrent, mamba, ngpt,
vocoder, audio_vae, image_vae); GPT, multimodal and DiT call ``torch.utils.checkpoint`` the same way
inline. The block's forward is recomputed in backward instead of keeping its activations: about one
extra forward of compute for the memory of the block's intermediate tensors. Non-reentrant
(``use_reentrant=False``, PyTorch's recommended mode): works with keyword-free calls that take
non-tensor arguments (tuples of RoPE tables, None), with blocks whose inputs need no gradient, and
under ``torch.autograd.grad``; the RNG state is restored for the recomputation, so dropout masks
repeat and the gradients equal the unchecked ones (tested per family, fp32, atol 1e-6).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.checkpoint import checkpoint


def run_block(block: Callable[..., Any], *args: Any, enabled: bool) -> Any:
    """``block(*args)``, checkpointed when ``enabled`` and autograd records (``torch.is_grad_enabled()``);
    callers pass ``enabled = flag and self.training`` (evaluation and decoding never checkpoint)."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)
