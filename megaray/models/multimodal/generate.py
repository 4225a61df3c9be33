"""Generation with a :class:`~megaray.models.multimodal.model.MultimodalTransformer`.

* :func:`generate_text`: autoregressive text after a prompt that may hold an audio or image span
  (transcription, captioning); KV cache: the prompt runs once (span bidirectional under the
  diffusion head, clean content at ``t = 0``), then one token per step. Only text ids are sampled
  (the boundary ids are masked out).
* :func:`generate_span`: an audio or image span after a prompt ending with ``<|audio|>`` /
  ``<|image|>``. Regression head: patch by patch, each predicted patch fed back through the span
  adapter (KV cache). Diffusion head: DDIM (Song et al. 2021) from Gaussian noise over the whole
  span in ``diffusion_sample_steps`` steps, each a forward of the span's positions (bidirectional
  among themselves) on the prompt's cached keys and values (Transfusion, Zhou et al. 2024,
  section 3: the prompt is fixed while the image is denoised).

All functions run the model in eval mode under ``torch.no_grad()`` and restore its mode.
Outputs are in content units: normalised log-mel (``x * mel_std + mel_mean`` gives natural-log mel)
and pixels in about [-1, 1] (not clipped) or latents.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from megaray.models.common.attention import span_mask
from megaray.models.gpt.sampling import sample_next


@contextlib.contextmanager
def _eval(model) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


@torch.no_grad()
def generate_text(
    model,
    tokens: torch.Tensor,
    max_new_tokens: int,
    *,
    audio: Optional[torch.Tensor] = None,
    audio_start: Optional[torch.Tensor] = None,
    image: Optional[torch.Tensor] = None,
    image_start: Optional[torch.Tensor] = None,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    stop_id: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Continue ``tokens (B, T0)`` int64 by up to ``max_new_tokens`` text ids -> ``(B, T0 + n)`` int64.

    Spans as in :meth:`MultimodalTransformer.hidden` (``audio_start`` / ``image_start`` ``(B,)``).
    Generation stops at ``block_size`` (``n`` shrinks) and, with ``stop_id``, once every row has
    produced it (finished rows repeat it). ``temperature`` 0 is greedy; see
    :func:`megaray.models.gpt.sampling.sample_next` for ``top_k``, ``top_p``, ``generator``.

    Raises:
        ValueError: the prompt exceeds ``block_size``; span errors of :meth:`hidden`.
    """
    with _eval(model):
        V = model.config.vocab_size
        n = min(max_new_tokens, model.config.block_size - tokens.size(1))
        spans = model.prepare_spans(tokens, audio, audio_start, image, image_start)
        cache = model.new_cache()
        h = model.backbone(tokens, spans, cache)[:, -1]  # (B, C)
        out, done = tokens, torch.zeros(tokens.size(0), dtype=torch.bool, device=tokens.device)
        for i in range(max(n, 0)):
            nxt = sample_next(model.lm_head(h)[:, :V], temperature, top_k, top_p, generator)  # (B, 1)
            if stop_id is not None:
                nxt = nxt.masked_fill(done[:, None], stop_id)
                done = done | (nxt[:, 0] == stop_id)
            out = torch.cat([out, nxt], dim=1)
            if (stop_id is not None and bool(done.all())) or i + 1 == n:
                break
            h = model.run(model.transformer.wte(nxt), cache)[:, -1]
        return out


@torch.no_grad()
def generate_span(
    model,
    tokens: torch.Tensor,
    name: str,
    *,
    generator: Optional[torch.Generator] = None,
    steps: Optional[int] = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """Generate the ``name`` (``"audio"`` / ``"image"``) span that follows ``tokens (B, T0)``.

    Args:
        tokens: a text prompt ending with ``<|audio|>`` (``model.BOA``) or ``<|image|>`` (``model.BOI``).
        generator: for the diffusion head's initial noise (and DDIM's ``eta > 0`` noise).
        steps: DDIM steps (default ``diffusion_sample_steps``). eta: DDIM's eta (0 = deterministic).

    Returns:
        ``(B, n_mels, audio_frames)`` or ``(B, image_channels, image_size, image_size)`` float32.

    Raises:
        ValueError: a modality the config lacks, a prompt not ending with the span's opening
            token, or ``T0`` + the span's tokens beyond ``block_size``.
    """
    if name not in model.spans:
        raise ValueError(f"cannot generate {name}: model.modalities is {model.config.modalities}")
    opener = model.BOA if name == "audio" else model.BOI
    if not bool((tokens[:, -1] == opener).all()):
        raise ValueError(
            f"generate_{name}: the prompt must end with the {name} opening token (id {opener}); "
            f"got last ids {tokens[:, -1].tolist()}"
        )
    N, T0 = model.span_tokens(name), tokens.size(1)
    if T0 + N > model.config.block_size:
        raise ValueError(f"prompt of {T0} tokens + {N} {name} tokens exceeds block_size {model.config.block_size}")
    with _eval(model):
        cache = model.new_cache()
        h = model.backbone(tokens, {}, cache)[:, -1:]  # (B, 1, C): the prompt, cached
        if model.diffusion is None:
            patches = _regress(model, name, h, cache, N)
        else:
            patches = _denoise(model, name, tokens, cache, N, generator, steps, eta)
        return model.unpatchify(name, patches.float())


def _regress(model, name: str, h: torch.Tensor, cache, N: int) -> torch.Tensor:
    """Patch by patch: ``h[p - 1]`` predicts patch ``p``, which is embedded and fed back -> ``(B, N, D)``."""
    adapter, out = model.spans[name], []
    for i in range(N):
        patch = adapter.predict(h)  # (B, 1, D)
        out.append(patch)
        if i + 1 < N:
            h = model.run(model.embed_span(name, patch, offset=i), cache)
    return torch.cat(out, dim=1)


def _denoise(model, name: str, tokens: torch.Tensor, cache, N: int, generator, steps, eta) -> torch.Tensor:
    """DDIM over the whole span on the cached prompt -> ``(B, N, D)``."""
    B, T0, adapter = tokens.size(0), tokens.size(1), model.spans[name]
    prompt = [c.data for c in cache]
    ids = torch.cat([torch.zeros(B, T0, dtype=torch.long), torch.ones(B, N, dtype=torch.long)], dim=1)
    mask = span_mask(ids.to(tokens.device), N)  # (B, 1, N, T0 + N): the prompt, and the span both ways

    def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        for c, data in zip(cache, prompt):  # every step sees the prompt alone
            c.data = data
        return adapter.predict(model.run(model.embed_span(name, x_t, t), cache, mask))

    D = adapter.proj_out.out_features
    noise = torch.randn((B, N, D), generator=generator, device=tokens.device if generator is None else generator.device)
    steps = steps or model.config.diffusion_sample_steps
    return model.diffusion.ddim_sample(model_fn, noise.to(tokens.device), steps=steps, eta=eta, generator=generator)
