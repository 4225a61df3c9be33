"""MultimodalConfig: the typed config of the multimodal family (text, audio and image spans in one
causal transformer), with presets.

The backbone fields are :class:`~megaray.models.gpt.config.GPTConfig`'s (the blocks *are* GPT
blocks). The span fields follow Transfusion (Zhou et al. 2024, arXiv:2408.11039): a continuous
span (log-mel frames, image pixels, or VAE latents of either) is cut into patches, one sequence
position per patch, between boundary tokens; ``continuous_head`` picks a regression or a
diffusion loss on it.

``vocab_size`` is the TEXT vocabulary (the tokenizer's). The model appends four boundary ids after
it (:meth:`MultimodalConfig.special_ids`): ``<|audio|> = vocab_size``, ``<|/audio|> = vocab_size +
1``, ``<|image|> = vocab_size + 2``, ``<|/image|> = vocab_size + 3``; the embedding and the LM head
have :attr:`MultimodalConfig.full_vocab_size` rows.
"""

from __future__ import annotations

from typing import Any, ClassVar, Dict, List, Literal

from pydantic import Field, field_validator, model_validator

from megaray.models.gpt.config import GPTConfig

MODALITIES = ("text", "audio", "image")
#: boundary token names, in id order after the text vocabulary
SPECIAL_TOKENS = ("<|audio|>", "<|/audio|>", "<|image|>", "<|/image|>")
#: text tokens every layout keeps besides one span and its two boundary tokens (see ``_check_mm``)
MIN_TEXT_TOKENS = 2

_MODERN = dict(position="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)

PRESETS: Dict[str, Dict[str, Any]] = {
    # CPU seconds, for tests: 8 audio tokens (32 frames / 4), 16 image tokens (16x16 pixels, patch 4)
    "tiny": dict(
        n_layer=2,
        n_head=4,
        n_embd=64,
        block_size=128,
        vocab_size=512,
        audio_frames=32,
        audio_patch=4,
        image_size=16,
        patch_size=4,
    ),
    # smaller still: 4 audio tokens, 4 image tokens (8x8 pixels)
    "debug": dict(
        n_layer=2,
        n_head=2,
        n_embd=32,
        block_size=64,
        vocab_size=512,
        audio_frames=16,
        audio_patch=4,
        image_size=8,
        patch_size=4,
    ),
    # ~85M backbone (GPT-2 small shape, Llama-style parts) on the default 8192-token tokenizer:
    # 64 audio tokens (512 mel frames / 8: 4.1 s at hop 128 and 16 kHz, a whole espeak sentence, so a
    # transcript matches its span), 256 image tokens (64x64 pixels, patch 4)
    "multimodal_small": dict(
        n_layer=12,
        n_head=12,
        n_kv_heads=4,
        attention="gqa",
        n_embd=768,
        block_size=1024,
        vocab_size=8192,
        audio_frames=512,
        audio_patch=8,
        image_size=64,
        patch_size=4,
        **_MODERN,
    ),
}


class SpanLengths:
    """Span lengths from ``audio_frames``, ``audio_patch``, ``image_size`` and ``patch_size``
    attributes: the one rule, mixed into the model config (:class:`MultimodalConfig`) and the data
    layout (:class:`megaray.data.multimodal.layout.Layout`)."""

    audio_frames: int
    audio_patch: int
    image_size: int
    patch_size: int

    @property
    def audio_tokens(self) -> int:
        """Sequence positions of one audio span: ``audio_frames // audio_patch`` (each a patch of
        ``audio_patch`` mel frames)."""
        return self.audio_frames // self.audio_patch

    @property
    def image_tokens(self) -> int:
        """Sequence positions of one image span: ``(image_size // patch_size) ** 2`` (a square
        grid of ``patch_size`` x ``patch_size`` patches)."""
        return (self.image_size // self.patch_size) ** 2


class MultimodalConfig(GPTConfig, SpanLengths):
    """A GPT backbone with audio and image spans (Transfusion-style early fusion).

    Span geometry: an audio span holds ``audio_frames`` frames of ``n_mels`` channels (normalised
    log-mel ``(log_mel - mel_mean) / mel_std``, or audio-VAE latents with ``n_mels`` = latent
    channels), ``audio_patch`` frames per token; an image span holds an ``image_channels x
    image_size x image_size`` image (pixels in [-1, 1], or image-VAE latents), ``patch_size x
    patch_size`` pixels per token, row-major.

    Raises (through validation, as ConfigError naming the key):
        ConfigError: an unknown modality (the message names it and ``text, audio, image``), a
            repeated or empty ``modalities``; ``audio_frames`` not a multiple of ``audio_patch``;
            ``image_size`` not a multiple of ``patch_size``; images with ``n_embd`` not a multiple
            of 4 (2-D sin-cos positions); ``diffusion_sample_steps > diffusion_timesteps``; the
            diffusion head with ``attn_backend: flash`` (spans need a mask); ``init: admin``; a ``block_size`` too
            short for the longest layout (one span, its two boundary tokens and
            ``MIN_TEXT_TOKENS`` text tokens); and everything :class:`GPTConfig` rejects.
    """

    PRESETS: ClassVar[Dict[str, Dict[str, Any]]] = PRESETS

    family: Literal["multimodal"] = "multimodal"  # type: ignore[assignment]
    modalities: List[Literal["text", "audio", "image"]] = Field(
        default_factory=lambda: list(MODALITIES), description="which adapters and heads to build"
    )
    n_mels: int = Field(80, gt=0, description="channels of an audio frame (mel bands or audio-VAE latent channels)")
    audio_frames: int = Field(64, gt=0, description="frames in one audio span (the data crops / pads to this)")
    audio_patch: int = Field(4, gt=0, description="frames per audio token")
    # measured by DATA on the README's espeak corpus (n_fft 512, hop 128; every frame of 288 clips)
    mel_mean: float = Field(-2.12, description="audio content = (log_mel - mel_mean) / mel_std (natural-log mel)")
    mel_std: float = Field(3.58, gt=0, description="see mel_mean")
    image_size: int = Field(32, gt=0, description="H = W of a span's image (pixels or latent cells)")
    image_channels: int = Field(3, gt=0, description="image channels (3 for RGB, latent channels for a VAE)")
    patch_size: int = Field(4, gt=0, description="pixels per image token along each side")
    continuous_head: Literal["regression", "diffusion"] = Field(
        "regression", description="regression: predict the next patch (MSE/L1); diffusion: Transfusion's DDPM loss"
    )
    regression_loss: Literal["mse", "l1"] = "mse"
    diffusion_timesteps: int = Field(1000, gt=0, description="T of the DDPM process")
    diffusion_schedule: Literal["linear", "cosine"] = Field("linear", description="DDPM's linear or the cosine betas")
    diffusion_prediction: Literal["epsilon", "v"] = Field(
        "v", description="what the diffusion head predicts: the noise (Transfusion) or v (Salimans & Ho 2022)"
    )
    diffusion_sample_steps: int = Field(25, gt=0, description="DDIM steps when generating a span")
    text_loss_weight: float = Field(1.0, ge=0)
    audio_loss_weight: float = Field(1.0, ge=0)
    image_loss_weight: float = Field(1.0, ge=0)

    @field_validator("modalities", mode="before")
    @classmethod
    def _known_modalities(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)):
            for name in value:
                if name not in MODALITIES:
                    raise ValueError(f"unknown modality {name!r}; valid modalities: {', '.join(MODALITIES)}")
            if len(set(value)) != len(value):
                raise ValueError(f"modalities {list(value)} repeat a name; list each of {', '.join(MODALITIES)} once")
            if not value:
                raise ValueError(f"modalities is empty; give some of {', '.join(MODALITIES)}")
        return value

    @model_validator(mode="after")
    def _check_mm(self) -> "MultimodalConfig":
        if self.audio_frames % self.audio_patch:
            raise ValueError(
                f"audio_frames ({self.audio_frames}) must be a multiple of audio_patch ({self.audio_patch})"
            )
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if "image" in self.modalities and self.n_embd % 4:
            raise ValueError(f"image spans use 2-D sin-cos positions: n_embd ({self.n_embd}) must be a multiple of 4")
        if self.diffusion_sample_steps > self.diffusion_timesteps:
            raise ValueError(
                f"diffusion_sample_steps ({self.diffusion_sample_steps}) exceeds "
                f"diffusion_timesteps ({self.diffusion_timesteps})"
            )
        if self.init == "admin":
            raise ValueError(
                "init: 'admin' is not supported by family 'multimodal' (its profiling pass runs on "
                "text alone); use init 'gpt2'"
            )
        if self.continuous_head == "diffusion" and self.attn_backend == "flash":
            raise ValueError(
                "continuous_head 'diffusion' attends bidirectionally inside spans with a mask, which "
                "attn_backend 'flash' cannot take: use 'auto' (flash where no mask is needed) or 'sdpa'"
            )
        spans = {"audio": self.audio_tokens, "image": self.image_tokens}
        longest = max((spans[m] for m in self.modalities if m in spans), default=0)
        need = longest + 2 + MIN_TEXT_TOKENS if longest else MIN_TEXT_TOKENS
        if need > self.block_size:
            raise ValueError(
                f"block_size ({self.block_size}) is too short for the longest layout: a span of {longest} "
                f"tokens + 2 boundary tokens + {MIN_TEXT_TOKENS} text tokens = {need}; raise block_size "
                "or shrink audio_frames / image_size"
            )
        return self

    @property
    def image_grid(self) -> int:
        """Patches along each side of an image span: ``image_size // patch_size``."""
        return self.image_size // self.patch_size

    @property
    def audio_patch_dim(self) -> int:
        """Numbers in one audio token's patch: ``n_mels * audio_patch``."""
        return self.n_mels * self.audio_patch

    @property
    def image_patch_dim(self) -> int:
        """Numbers in one image token's patch: ``image_channels * patch_size ** 2``."""
        return self.image_channels * self.patch_size**2

    @property
    def full_vocab_size(self) -> int:
        """Rows of the embedding and the LM head: the text vocabulary plus the 4 boundary tokens."""
        return self.vocab_size + len(SPECIAL_TOKENS)

    def special_ids(self) -> Dict[str, int]:
        """``{"<|audio|>": vocab_size, "<|/audio|>": vocab_size + 1, "<|image|>": vocab_size + 2,
        "<|/image|>": vocab_size + 3}``."""
        return {name: self.vocab_size + i for i, name in enumerate(SPECIAL_TOKENS)}
