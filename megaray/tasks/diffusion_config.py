"""The ``diffusion:`` section of a DiT run (``model.family: dit``), contributed by the ``dit``
family (``FamilySpec.sections`` in ``megaray/models/diffusion/__init__.py``): a run of another
family has no ``diffusion:`` key. Read as ``cfg.diffusion.sample_steps``; imports nothing heavier
than :mod:`megaray.config`, so ``megaray config`` stays torch-free.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import Field

from megaray.config import CheckpointPath, OptionalPath, StrictConfig


class DiffusionSection(StrictConfig):
    """Run-level settings of a diffusion run (``model.family: dit``): the frozen networks that decode
    samples, the text conditioning of a mel DiT, and how evaluation samples (``megaray sample``
    uses the same defaults). Paths (:class:`~megaray.config.RunPath`) are made absolute on the
    driver, like ``data.shards``."""

    vae_checkpoint: Annotated[Optional[str], CheckpointPath()] = Field(
        None,
        description="image VAE checkpoint (its run directory, or an MLflow models:/ URI) whose latents the DiT models: decodes "
        "sample grids; needed for runs on `image_latents` shards (default: the one the shards name)",
    )
    vocoder_checkpoint: Annotated[Optional[str], CheckpointPath()] = Field(
        None,
        description="vocoder checkpoint (its run directory, or an MLflow models:/ URI) that turns sampled log-mels into wav files; "
        "None = mel PNGs only",
    )
    text_encoder: Literal["bytes", "gpt", "t5"] = Field(
        "bytes",
        description="text conditioning of a mel DiT: bytes = UTF-8 byte ids through the DiT's learned "
        "embedding (model.text_vocab_size >= 257); gpt = hidden states of the frozen megaray GPT checkpoint at "
        "text_encoder_path; t5 = a local Hugging Face T5 encoder directory at text_encoder_path",
    )
    text_encoder_path: OptionalPath = Field(
        None, description="checkpoint (gpt) or local Hugging Face directory (t5) of the text encoder"
    )
    text_max_len: int = Field(64, gt=0, description="transcripts are cut to this many bytes / tokens")
    mel_mean: float = Field(-5.0, description="log-mels enter the DiT as (mel - mel_mean) / mel_std")
    mel_std: float = Field(2.5, gt=0, description="see mel_mean")
    cfg_scale: float = Field(4.0, ge=1, description="classifier-free guidance scale of evaluation samples (1 = off)")
    sample_steps: int = Field(50, gt=0, description="DDIM steps of evaluation samples")
    n_samples: int = Field(8, gt=0, description="samples drawn (from the same fixed noise) at every evaluation")
    sample_seed: int = Field(0, description="seed of the fixed evaluation noise and timesteps")
