"""Autoregressive sampling from a :class:`~megaray.models.gpt.model.GPT`, with a KV cache.

``generate`` follows nanoGPT's ``GPT.generate`` (temperature, top-k) and adds nucleus (top-p)
sampling (Holtzman et al. 2020), a stop token and a KV cache. With the cache each step feeds
only the newest token; without it each step re-runs the whole (cropped) context. Both give the
same tokens under greedy decoding (``temperature=0``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """``(B, V)`` logits -> ``(B, 1)`` int64 next tokens.

    ``temperature == 0`` is greedy (argmax); else logits are divided by ``temperature``, cut to
    the ``top_k`` largest and/or to the smallest set whose probability reaches ``top_p`` (the
    most likely token always survives), and sampled with ``torch.multinomial(generator=)``.

    Raises:
        ValueError: negative temperature, ``top_k < 1`` or ``top_p`` outside (0, 1].
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        p_sorted = sorted_logits.softmax(dim=-1)
        drop = p_sorted.cumsum(dim=-1) - p_sorted >= top_p  # mass before this token already >= p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def append_until_stop(
    idx: torch.Tensor, nxt: torch.Tensor, done: torch.Tensor, stop_token: Optional[int]
) -> Tuple[torch.Tensor, bool]:
    """Append the sampled ``nxt (B, 1)`` int64 to ``idx (B, T)`` -> ``(idx (B, T + 1), finished)``.

    With ``stop_token``, a row already marked in ``done (B,)`` bool emits ``stop_token`` again,
    and ``done`` is updated in place with the rows that produced it; ``finished`` is True once
    every row is done (always False without ``stop_token``). The one stop-token rule of every
    ``generate`` (:func:`generate`, the recurrent model's).
    """
    if stop_token is None:
        return torch.cat([idx, nxt], dim=1), False
    nxt = nxt.masked_fill(done[:, None], stop_token)
    done |= nxt[:, 0] == stop_token
    return torch.cat([idx, nxt], dim=1), bool(done.all())


@torch.no_grad()
def generate(
    model,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    stop_token: Optional[int] = None,
    use_cache: bool = True,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Extend ``idx (B, T)`` int64 by up to ``max_new_tokens`` tokens -> ``(B, T + n)`` int64.

    The model runs in eval mode (its previous mode is restored). Contexts longer than
    ``block_size`` are cropped to the last ``block_size`` tokens; with ``use_cache`` the cache is
    then rebuilt from the cropped context, so cached and uncached decoding see the same inputs.
    With ``stop_token``, a row that has produced it keeps emitting it, and generation ends early
    (``n < max_new_tokens``) once every row has.

    Args:
        model: a :class:`~megaray.models.gpt.model.GPT` (anything with ``config.block_size``,
            ``new_cache()`` and ``forward(idx, cache=)``), or a wrapper with ``.module`` (DeepSpeed
            engine, DDP), which is unwrapped.
        temperature, top_k, top_p, generator: see :func:`sample_next`.
    """
    model = getattr(model, "module", model)  # a DeepSpeed engine / DDP wrapper -> the GPT
    was_training = model.training
    model.eval()
    try:
        block = model.config.block_size
        cache, c0 = None, 0  # the cache holds idx[:, c0 : c0 + len(cache[0])] at positions 0..
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            if use_cache:
                if cache is None or idx.size(1) - c0 > block:  # start, or window full: re-prefill
                    cache, c0 = model.new_cache(), max(0, idx.size(1) - block)
                logits = model(idx[:, c0 + len(cache[0]) :], cache=cache)  # (B, T_new, V)
            else:
                logits = model(idx[:, -block:])  # (B, min(T, block), V)
            nxt = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B, 1)
            idx, finished = append_until_stop(idx, nxt, done, stop_token)
            if finished:
                break
        return idx
    finally:
        model.train(was_training)
