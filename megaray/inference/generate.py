"""``megaray generate``: continue a prompt with a trained text model, in one process."""

from __future__ import annotations

import os
from typing import Optional

import torch


def generate_text(checkpoint: str | os.PathLike, prompt: str, max_new_tokens: int = 64,
                  temperature: float = 0.8, top_k: Optional[int] = 40, top_p: Optional[float] = None,
                  seed: int = 0) -> str:
    """Load a text checkpoint and its tokenizer, sample with a KV cache; returns prompt + continuation.

    Sampling is :func:`megaray.tasks.lm.sample_text` (temperature 0 = greedy; top-k, then nucleus
    top-p after Holtzman et al. 2020), seeded with ``seed``; CUDA when available, else CPU. A
    recurrent-depth checkpoint samples with its exit criterion
    (:func:`megaray.tasks.recurrent.sample_recurrent`; ``top_p`` unused) and the text ends with
    a line ``[mean core iterations per token: X]``.

    Raises:
        CheckpointError: no complete checkpoint, corrupt weights, or not a text model's
            (see :func:`megaray.inference.text.load_text_model`).
    """
    from megaray.inference.text import load_text_model
    from megaray.tasks.lm import sample_text

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, cfg, _, tokenizer_json = load_text_model(checkpoint, device)
    if cfg.model.family == "recurrent":  # each token's depth chosen by the exit criterion
        from tokenizers import Tokenizer

        from megaray.tasks.recurrent import sample_recurrent

        text = sample_recurrent(model, Tokenizer.from_str(tokenizer_json), prompt, max_new_tokens,
                                temperature=temperature, top_k=top_k, seed=seed)
        return f"{text}\n[mean core iterations per token: {model.last_mean_steps:.2f}]"
    return sample_text(model, tokenizer_json, prompt, max_new_tokens, temperature, top_k, top_p, seed)
