"""MultimodalTransformer: text, audio and image spans through one causal transformer.

Early fusion as in Chameleon (Chameleon Team 2024, arXiv:2405.09818: one sequence, boundary tokens
around each image) with continuous spans and two losses as in Transfusion (Zhou et al. 2024,
arXiv:2408.11039: next-token cross-entropy on text, a loss on an image's latent patches, causal
attention across the sequence and bidirectional attention inside each image). Read top to bottom::

    x   = wte(tokens)                                        (B, T, C)  text + boundary ids
    x[span] = adapter.embed(patches) [+ 2-D sin-cos] [+ t]   (B, N, C)  audio / image content
    h   = ln_f(blocks(pos(x), mask))                         (B, T, C)  GPT blocks
    text logits = lm_head(h)                                 (B, T, V + 4)
    span output = adapter.predict(h at the span)             (B, N, D)

``continuous_head``:

* ``regression``: causal everywhere; the hidden state at ``p - 1`` predicts content patch ``p``
  (MSE or L1), so a span is generated patch by patch like text;
* ``diffusion`` (Transfusion): the span's patches are noised with the DDPM forward process at a
  random ``t`` per span (:class:`~megaray.models.diffusion.process.GaussianDiffusion`,
  ``diffusion_schedule``), ``t``'s embedding (DiT's ``TimestepEmbedder``) is added to every patch,
  the span attends bidirectionally (:func:`~megaray.models.common.attention.span_mask`) and the
  output at ``p`` predicts patch ``p``'s ``v`` (``diffusion_prediction: v``, the default; Salimans &
  Ho 2022) or its noise (``epsilon``, Transfusion's choice); MSE either way. Generation runs DDIM
  over the whole span.

Which spans carry a loss: with a ``task`` in the batch, an audio span only in text->audio rows
(task 2) and an image span only in text->image rows (task 4); in to-text rows (tasks 1, 3) the span
is the condition: clean (``t = 0`` under diffusion) and without loss, as at inference. Without
``task`` every span carries a loss. Adapters and heads run on every row (masked), and a modality
no row of the batch holds adds 0 x its parameters to the loss, so every parameter has a gradient
on every rank at every step (ZeRO's buckets match; DDP needs no ``find_unused_parameters``).

Deviations from Transfusion: linear patch maps only (no U-Net blocks); v rather than epsilon
prediction by default (a small model's epsilon gives a far-off ``x0`` estimate at high ``t`` and DDIM
does not recover; measured in the overfit test); conditioning spans are clean rather than
noise-limited; audio spans are handled like images (1-D patches of frames).
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megaray.models.common.attention import KVCache, span_mask
from megaray.models.common.conditioning import TimestepEmbedder
from megaray.models.common.moe import gather_moe_losses
from megaray.models.common.norm import build_final_norm
from megaray.models.common.position import build_position, sincos_2d
from megaray.models.diffusion.process import GaussianDiffusion
from megaray.models.gpt.model import GPT, Block
from megaray.models.multimodal import spans as S
from megaray.models.multimodal.config import MultimodalConfig

#: batch ``task`` ids whose span carries the content loss (the from-text layouts)
GENERATE_TASKS = {"audio": 2, "image": 4}
#: span id of each modality in the attention span mask
SPAN_IDS = {"audio": 1, "image": 2}

Span = Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]  # (patches (B, N, D), start (B,), t (B,) | None)


class MultimodalTransformer(nn.Module):
    """A GPT backbone with audio / image span adapters and text, regression or diffusion heads.

    Args:
        config: a :class:`MultimodalConfig` (e.g. ``MultimodalConfig.from_name("tiny")``).

    Attributes:
        BOA, EOA, BOI, EOI: the boundary token ids ``vocab_size + 0..3`` (see
            :meth:`MultimodalConfig.special_ids`).
        aux_loss: the MoE auxiliary loss of the last forward (0 for dense blocks; already in ``loss``).
        diffusion: the :class:`GaussianDiffusion` of the diffusion head, or None.
    """

    def __init__(self, config: MultimodalConfig):
        super().__init__()
        self.config = config
        C = config.n_embd
        self.BOA, self.EOA, self.BOI, self.EOI = (config.vocab_size + i for i in range(4))
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.full_vocab_size, C),
                pos=build_position(config),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=build_final_norm(config),
            )
        )
        self.lm_head = nn.Linear(C, config.full_vocab_size, bias=False)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight
        self.spans = nn.ModuleDict()
        if "audio" in config.modalities:
            self.spans["audio"] = S.SpanAdapter(config.audio_patch_dim, C)
        if "image" in config.modalities:
            grid = config.image_grid
            self.spans["image"] = S.SpanAdapter(config.image_patch_dim, C, sincos_2d(C, grid, grid))
        diffusion = config.continuous_head == "diffusion"
        self.diffusion = (
            GaussianDiffusion(config.diffusion_timesteps, config.diffusion_schedule, config.diffusion_prediction)
            if diffusion
            else None
        )
        self.t_embed = TimestepEmbedder(C) if diffusion else None
        self.activation_checkpointing = config.activation_checkpointing
        self.aux_loss = torch.zeros(())
        self.apply(GPT._init_weights)  # normal(0.02), zero bias: also DiT's init of the timestep MLP
        for name, p in self.named_parameters():  # GPT-2 residual scaling
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    # -- spans -----------------------------------------------------------------------------
    def span_tokens(self, name: str) -> int:
        """Sequence positions of one ``name`` span (``"audio"`` or ``"image"``)."""
        return self.config.audio_tokens if name == "audio" else self.config.image_tokens

    def patchify(self, name: str, content: torch.Tensor) -> torch.Tensor:
        """``audio (B, n_mels, audio_frames)`` / ``image (B, C, H, W)`` -> patches ``(B, N, D)``."""
        if name == "audio":
            return S.patchify_audio(content, self.config.audio_patch)
        return S.patchify_image(content, self.config.patch_size)

    def unpatchify(self, name: str, patches: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`patchify`."""
        cfg = self.config
        if name == "audio":
            return S.unpatchify_audio(patches, cfg.n_mels)
        return S.unpatchify_image(patches, cfg.image_channels, cfg.patch_size, cfg.image_grid)

    def embed_span(
        self, name: str, patches: torch.Tensor, t: Optional[torch.Tensor] = None, offset: int = 0
    ) -> torch.Tensor:
        """``patches (B, n, D)`` (the ``offset``-th onwards of a span) -> embeddings ``(B, n, C)``;
        under the diffusion head the embedding of ``t (B,)`` (None = 0, clean) is added."""
        t_emb = None
        if self.t_embed is not None:
            t = torch.zeros(patches.size(0), dtype=torch.long, device=patches.device) if t is None else t
            t_emb = self.t_embed(t)
        return self.spans[name].embed(patches, t_emb, offset)

    def prepare_spans(
        self,
        tokens: torch.Tensor,
        audio: Optional[torch.Tensor] = None,
        audio_start: Optional[torch.Tensor] = None,
        image: Optional[torch.Tensor] = None,
        image_start: Optional[torch.Tensor] = None,
        audio_t: Optional[torch.Tensor] = None,
        image_t: Optional[torch.Tensor] = None,
    ) -> Dict[str, Span]:
        """Check and patchify the spans of ``tokens (B, T)`` -> ``{name: (patches, start, t)}``
        (arguments as :meth:`hidden`; a modality whose starts are all -1 or None is left out).

        Raises:
            ValueError: a span of a modality the config does not have, a start without content,
                or a span that does not fit the sequence (or starts at 0 under the regression head).
        """
        out: Dict[str, Span] = {}
        given = {"audio": (audio, audio_start, audio_t), "image": (image, image_start, image_t)}
        for name, (content, start, t) in given.items():
            if start is None or not bool((start >= 0).any()):
                continue
            if name not in self.spans:
                raise ValueError(
                    f"the batch has {name} spans but model.modalities is {self.config.modalities}: "
                    f"add {name!r} to model.modalities"
                )
            if content is None:
                raise ValueError(f"{name}_start is given without {name} content")
            first = 1 if self.diffusion is None else 0  # regression: position start - 1 predicts the first patch
            S.check_spans(start, self.span_tokens(name), tokens.size(1), name, first)
            out[name] = (self.patchify(name, content), start, t)
        return out

    # -- backbone --------------------------------------------------------------------------
    def run(
        self, x: torch.Tensor, cache: Optional[List[KVCache]] = None, mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The blocks on embeddings: ``x (B, T, C)`` -> ``ln_f(h) (B, T, C)``.

        Positions continue after ``cache`` (from :meth:`new_cache`); ``mask`` is a boolean
        ``(B, 1, T, cached + T)`` attention mask (None: causal).

        Raises:
            ValueError: cached length + ``T`` exceeds ``block_size``.
        """
        T = x.size(1)
        start = len(cache[0]) if cache else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        tr = self.transformer
        q_pos = torch.arange(start, start + T, device=x.device)
        k_pos = torch.arange(0, start + T, device=x.device)
        x = tr.drop(tr.pos.embed(x, q_pos))
        rope, bias = tr.pos.rope(q_pos), tr.pos.attn_bias(q_pos, k_pos)
        for i, block in enumerate(tr.h):
            if self.activation_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, rope, bias, None, mask, use_reentrant=False)
            else:
                x = block(x, rope, bias, cache[i] if cache is not None else None, mask)
        self.aux_loss, _ = gather_moe_losses(self, x.device)
        return tr.ln_f(x)

    def backbone(
        self, tokens: torch.Tensor, spans: Mapping[str, Span], cache: Optional[List[KVCache]] = None
    ) -> torch.Tensor:
        """``tokens (B, T)`` with ``spans`` (from :meth:`prepare_spans`) placed in -> :meth:`run`'s
        ``(B, T, C)``; under the diffusion head each span attends bidirectionally."""
        x = self.transformer.wte(tokens)  # (B, T, C)
        span_ids = torch.zeros_like(tokens) if self.diffusion is not None and spans else None
        for name, (patches, start, t) in spans.items():
            x = S.place_span(x, self.embed_span(name, patches, t), start)
            if span_ids is not None:
                inside, _ = S.span_index(start, patches.size(1), tokens.size(1))
                span_ids = span_ids.masked_fill(inside, SPAN_IDS[name])
        mask = None if span_ids is None else span_mask(span_ids)
        return self.run(x, cache, mask)

    def hidden(
        self,
        tokens: torch.Tensor,
        audio: Optional[torch.Tensor] = None,
        audio_start: Optional[torch.Tensor] = None,
        image: Optional[torch.Tensor] = None,
        image_start: Optional[torch.Tensor] = None,
        *,
        audio_t: Optional[torch.Tensor] = None,
        image_t: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The backbone: ``tokens (B, T)`` int64 with spans -> final-normed hidden states ``(B, T, C)``.

        ``audio (B, n_mels, audio_frames)`` / ``image (B, C, H, W)`` fill positions
        ``[start, start + N)`` of rows with ``start >= 0``. Under the diffusion head they are the
        (noisy) span content at timesteps ``audio_t`` / ``image_t`` ``(B,)`` int64 (None = 0, clean).

        Raises:
            ValueError: see :meth:`run`; a span of a modality the config lacks or that does not fit.
        """
        spans = self.prepare_spans(tokens, audio, audio_start, image, image_start, audio_t, image_t)
        return self.backbone(tokens, spans)

    # -- training --------------------------------------------------------------------------
    def forward(self, batch: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Training / evaluation losses of a batch (the layout of docs/models.md, "Multimodal transformer").

        Args:
            batch: ``tokens``, ``targets`` ``(B, T)`` int64 (targets -100 = no loss); optional
                ``audio`` ``(B, n_mels, audio_frames)`` float, ``audio_start`` ``(B,)`` int64 (-1 = none),
                ``audio_valid`` ``(B,)`` int64 valid frames, ``image`` ``(B, C, H, W)`` float,
                ``image_start`` ``(B,)``, ``task`` ``(B,)`` int64.

        Returns:
            ``{"loss", "loss/text", "loss/audio", "loss/image", "count/text", "count/audio",
            "count/image"}``: ``loss`` = the weighted sum of the per-modality means (+ the MoE
            auxiliary loss); each ``loss/x`` is a scalar mean over its supervised elements (0 when
            the batch has none); ``count/x`` the number of supervised text tokens or patches (float).

        Raises:
            ValueError: see :meth:`hidden`.
        """
        cfg, tokens, targets = self.config, batch["tokens"], batch["targets"]
        spans = self.prepare_spans(tokens, *(batch.get(k) for k in ("audio", "audio_start", "image", "image_start")))
        weights, targets_of = {}, {}
        for name, (x0, start, _) in list(spans.items()):
            weights[name] = self._span_weights(name, x0, start, batch)  # (B, N, D)
            targets_of[name] = x0
            if self.diffusion is not None:
                x_t, t, targets_of[name] = self._diffuse(x0, weights[name])
                spans[name] = (x_t, start, t)
        h = self.backbone(tokens, spans)
        out = self._text_loss(h, targets)
        shift = 0 if self.diffusion is not None else -1  # regression: h[p - 1] predicts patch p
        zero = h.new_zeros(())
        total = cfg.text_loss_weight * out["loss/text"]
        for name in ("audio", "image"):
            loss, count = zero, zero
            if name in spans:
                _, start, _ = spans[name]
                pred = self.spans[name].predict(S.read_span(h, start, self.span_tokens(name), shift))
                loss, count = self._content_loss(pred, targets_of[name], weights[name])
            out[f"loss/{name}"], out[f"count/{name}"] = loss, count
            total = total + getattr(cfg, f"{name}_loss_weight") * loss
        out["loss"] = total + self.aux_loss + self._untouched(spans)
        return out

    def _untouched(self, spans: Mapping[str, Span]) -> torch.Tensor:
        """0 times the parameters this batch did not use (the adapter and head of a modality no row
        holds; the timestep MLP when no span is noised): every rank then has a gradient, zero or
        not, for every parameter, so ZeRO's gradient buckets and DDP's all-reduce match across
        ranks whose micro-batches hold different modalities."""
        idle = [m for name, m in self.spans.items() if name not in spans]
        if self.t_embed is not None and not spans:
            idle.append(self.t_embed)
        params = [p for m in idle for p in m.parameters()]
        return sum((p.sum() for p in params), torch.zeros((), device=self.lm_head.weight.device)) * 0.0

    def _diffuse(self, x0: torch.Tensor, w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Noise the supervised rows of ``x0 (B, N, D)`` at a random ``t`` each (torch's global RNG)
        -> ``(x_t, t (B,), target)``; rows without loss (conditions) stay clean at ``t = 0``."""
        diffusion, sup = self.diffusion, w.flatten(1).sum(1) > 0  # (B,)
        t = torch.randint(0, diffusion.num_timesteps, sup.shape, device=x0.device) * sup
        noise = torch.randn_like(x0)
        x_t = torch.where(sup[:, None, None], diffusion.q_sample(x0, t, noise), x0)
        return x_t, t, noise if diffusion.prediction == "epsilon" else diffusion.v_target(x0, t, noise)

    def _span_weights(
        self, name: str, x0: torch.Tensor, start: torch.Tensor, batch: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """``(B, N, D)`` float mask of the supervised span elements: rows with a span whose task
        is the from-text one (when ``task`` is given) and, for audio, frames below ``audio_valid``."""
        rows = start >= 0
        if batch.get("task") is not None:
            rows = rows & (batch["task"] == GENERATE_TASKS[name])
        w = rows[:, None, None].to(x0.dtype).expand_as(x0)
        if name == "audio" and batch.get("audio_valid") is not None:
            frames = torch.arange(self.config.audio_frames, device=x0.device)[None, :] < batch["audio_valid"][:, None]
            frames = frames[:, None, :].expand(-1, self.config.n_mels, -1).to(x0.dtype)  # (B, M, F)
            w = w * self.patchify("audio", frames)
        return w

    def _content_loss(
        self, pred: torch.Tensor, target: torch.Tensor, w: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Weighted mean of the per-element loss (MSE under the diffusion head; ``regression_loss``
        otherwise) and the count of patches with any weight."""
        diff = pred.float() - target.float()
        err = diff.abs() if self.diffusion is None and self.config.regression_loss == "l1" else diff.square()
        loss = (err * w).sum() / w.sum().clamp(min=1.0)
        return loss, (w.sum(-1) > 0).sum().float()

    def _text_loss(self, h: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        logits = self.lm_head(h).float()  # (B, T, V + 4)
        ce = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100, reduction="sum")
        count = (targets != -100).sum().float()
        return {"loss/text": ce / count.clamp(min=1.0), "count/text": count}

    # -- generation (megaray.models.multimodal.generate) ----------------------------------
    def new_cache(self) -> List[KVCache]:
        """An empty KV cache, one :class:`KVCache` per layer, for :meth:`run`."""
        return [KVCache() for _ in range(self.config.n_layer)]

    def generate_text(self, tokens: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """``(B, T0)`` -> ``(B, T0 + n)`` int64; see :func:`megaray.models.multimodal.generate.generate_text`."""
        from megaray.models.multimodal.generate import generate_text

        return generate_text(self, tokens, max_new_tokens, **kwargs)

    def generate_audio(self, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
        """``(B, T0)`` ending with ``BOA`` -> ``(B, n_mels, audio_frames)`` float32 (normalised log-mel);
        see :func:`megaray.models.multimodal.generate.generate_span`."""
        from megaray.models.multimodal.generate import generate_span

        return generate_span(self, tokens, "audio", **kwargs)

    def generate_image(self, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
        """``(B, T0)`` ending with ``BOI`` -> ``(B, image_channels, image_size, image_size)`` float32;
        see :func:`megaray.models.multimodal.generate.generate_span`."""
        from megaray.models.multimodal.generate import generate_span

        return generate_span(self, tokens, "image", **kwargs)

    # -- accounting ------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = True, active: bool = False) -> int:
        """Parameter count (tied weights once); ``non_embedding`` and ``active`` as :meth:`GPT.num_params`
        (span adapters and the timestep MLP count as non-embedding: they are matmuls). The same
        ``transformer.wte`` / ``transformer.pos`` layout as GPT, so GPT's count applies as is."""
        return GPT.num_params(self, non_embedding=non_embedding, active=active)

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        """Training FLOPs per token at ``T = seq_len or block_size`` (``6N + 12 LHQT``, as GPT;
        see :func:`megaray.models.gpt.flops.flops_per_token`)."""
        from megaray.models.gpt.flops import flops_per_token

        return flops_per_token(self.config, self.num_params(non_embedding=True, active=True), seq_len)
