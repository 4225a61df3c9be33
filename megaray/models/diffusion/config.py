"""DiTConfig: the typed config of the ``dit`` family (network and diffusion process), with presets.

Names follow the DiT reference (Peebles & Xie 2023, arXiv:2212.09748; github.com/facebookresearch/DiT
``models.py``): ``input_size``, ``patch_size``, ``in_channels``, ``hidden_size``, ``depth``,
``num_heads``, ``mlp_ratio``, ``class_dropout_prob``, ``num_classes``, ``learn_sigma``. The process
settings (``num_timesteps``, ``schedule``, ``prediction``) live here too, so one config describes a
trained model completely; :class:`megaray.models.diffusion.process.GaussianDiffusion` reads them.

Parameter counts of the reference presets at 256x256 images (32x32x4 latents, learned sigma, 1000
classes; the fixed sin-cos ``pos_embed`` included, as in the reference where it is a frozen
``nn.Parameter``): DiT-S/2 32,963,360; DiT-B/2 130,512,416; DiT-L/2 458,102,816; DiT-XL/2
675,129,632 (``tests/test_diffusion_model.py`` checks them).
"""

from __future__ import annotations

from typing import Any, ClassVar, Dict, List, Literal, Tuple, Union

from pydantic import Field, model_validator

from megaray.config import ModelConfig

# 256x256 images through an f8 VAE: 32x32x4 latents; learned sigma; ImageNet's 1000 classes.
_IMAGENET_256 = dict(
    input_size=32, in_channels=4, patch_size=2, learn_sigma=True, num_classes=1000, class_dropout_prob=0.1
)

PRESETS: Dict[str, Dict[str, Any]] = {
    # DiT's model zoo (models.py DiT_models), patch 2.
    "DiT-S/2": dict(_IMAGENET_256, hidden_size=384, depth=12, num_heads=6),
    "DiT-B/2": dict(_IMAGENET_256, hidden_size=768, depth=12, num_heads=12),
    "DiT-L/2": dict(_IMAGENET_256, hidden_size=1024, depth=24, num_heads=16),
    "DiT-XL/2": dict(_IMAGENET_256, hidden_size=1152, depth=28, num_heads=16),
    # The MegaTransformer seeds' `--diffusion_type small_dit / medium_dit`, sized between S and B
    # (58.3M and 105.6M parameters with 1000 classes).
    "small_dit": dict(_IMAGENET_256, hidden_size=512, depth=12, num_heads=8),
    "medium_dit": dict(_IMAGENET_256, hidden_size=640, depth=14, num_heads=10),
    # Tiny, for tests and CPU demos: 8x8x4 latents, 10 classes.
    "tiny": dict(
        input_size=8,
        in_channels=4,
        patch_size=2,
        hidden_size=64,
        depth=2,
        num_heads=4,
        num_classes=10,
        class_dropout_prob=0.1,
        learn_sigma=True,
        num_timesteps=1000,
    ),
}


class DiTConfig(ModelConfig):
    """Diffusion transformer over ``(C, H, W)`` inputs (image latents, or mels as 1-channel images).

    Conditioning: timestep (always), class ids (``num_classes > 0``; id ``num_classes`` is the null
    class of classifier-free guidance), text through cross-attention (``context_dim > 0``; with
    ``text_vocab_size > 0`` the context is token ids embedded by the model).

    Raises (through validation, as ConfigError naming the key):
        input_size not divisible by patch_size, hidden_size not divisible by num_heads (or not a
        multiple of 4, which the 2-D sin-cos table needs), text_vocab_size without context_dim,
        an odd context_dim with text_vocab_size (its sin-cos positions need an even width).
    """

    PRESETS: ClassVar[Dict[str, Dict[str, Any]]] = PRESETS

    family: Literal["dit"] = "dit"
    # input
    input_size: Union[int, List[int]] = Field(
        32,
        description="latent side H=W, or [H, W] (e.g. [n_mels, frames]); the model accepts any size "
        "divisible by patch_size, this one sets the pos-embed table it is built with",
    )
    in_channels: int = Field(4, gt=0, description="C of the input (4 for SD latents, 1 for mels)")
    patch_size: int = Field(2, gt=0, description="p: each p x p patch of the input is one token")
    # transformer
    hidden_size: int = Field(1152, gt=0, description="token width D")
    depth: int = Field(28, gt=0, description="number of DiT blocks")
    num_heads: int = Field(16, gt=0)
    mlp_ratio: float = Field(4.0, gt=0, description="MLP hidden = mlp_ratio * hidden_size")
    norm_eps: float = Field(
        1e-6,
        gt=0,
        description="eps of the LayerNorm before each MLP (DiT: 1e-6; diffusers' DiTTransformer2DModel: its norm_eps)",
    )
    freq_shift: float = Field(
        0.0,
        ge=0,
        description="timestep-feature frequency shift (DiT: 0; diffusers' "
        "DiTTransformer2DModel: 1); set by from_diffusers",
    )
    attn_backend: Literal["auto", "sdpa", "flash", "reference"] = "auto"
    activation_checkpointing: bool = False
    # conditioning
    num_classes: int = Field(1000, ge=0, description="class labels; 0 = no class conditioning")
    class_dropout_prob: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="training: probability that a sample's class (and text context) is dropped "
        "to the null condition, for classifier-free guidance (Ho & Salimans 2022)",
    )
    context_dim: int = Field(0, ge=0, description="width of the text context for cross-attention; 0 = none")
    text_vocab_size: int = Field(
        0,
        ge=0,
        description="learned token embedding (context given as ids); 0 = context given as (B, L, context_dim) features",
    )
    # output / process
    learn_sigma: bool = Field(
        True, description="also predict the variance interpolation (Nichol & Dhariwal 2021): C_out = 2 * in_channels"
    )
    num_timesteps: int = Field(1000, gt=0, description="T of the diffusion process")
    schedule: Literal["linear", "cosine"] = Field(
        "linear", description="beta schedule: DDPM linear or Nichol & Dhariwal cosine"
    )
    prediction: Literal["epsilon", "v"] = Field("epsilon", description="what the network predicts")

    @model_validator(mode="after")
    def _check(self) -> "DiTConfig":
        size = self.input_size
        if isinstance(size, list) and (len(size) != 2 or min(size) <= 0):
            raise ValueError(f"input_size: give one int or [H, W] of positive ints, got {size}")
        if isinstance(size, int) and size <= 0:
            raise ValueError(f"input_size: must be positive, got {size}")
        if any(s % self.patch_size for s in self.grid_input):
            raise ValueError(f"input_size {size} must be divisible by patch_size ({self.patch_size})")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of 4 (2-D sin-cos positions)")
        if self.text_vocab_size and not self.context_dim:
            raise ValueError("text_vocab_size needs context_dim > 0 (the width of the token embedding)")
        if self.text_vocab_size and self.context_dim % 2:
            raise ValueError(f"context_dim ({self.context_dim}) must be even with text_vocab_size (sin-cos positions)")
        return self

    @property
    def grid_input(self) -> Tuple[int, int]:
        """``(H, W)`` of the input the model is built for."""
        s = self.input_size
        return (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))

    @property
    def out_channels(self) -> int:
        """``C_out``: ``2 * in_channels`` with learned sigma, else ``in_channels``."""
        return self.in_channels * (2 if self.learn_sigma else 1)

    @property
    def head_dim(self) -> int:
        """Per-head width ``hidden_size // num_heads``."""
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        """MLP hidden width ``int(hidden_size * mlp_ratio)`` (DiT)."""
        return int(self.hidden_size * self.mlp_ratio)
