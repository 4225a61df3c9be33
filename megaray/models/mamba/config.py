"""MambaConfig: the typed config of the Mamba-2 family, with presets.

Field names follow ``mamba_ssm`` (``Mamba2(d_model, d_state, d_conv, expand, headdim, ngroups,
chunk_size, ...)`` and ``MambaConfig(d_model, n_layer, d_intermediate, vocab_size, ...)``); ``n_groups``
is spelled as in HF ``Mamba2Config``. The optional feed-forward after each mixer (a dense gated MLP
when ``d_intermediate > 0``, a mixture of experts when ``n_experts > 0``) reuses
:mod:`megaray.models.common.mlp` / :mod:`megaray.models.common.moe`, which read the GPT-style
names ``n_embd``, ``hidden_dim``, ``mlp``, ``bias`` (provided below as aliases).
"""

from __future__ import annotations

from typing import Any, ClassVar, Dict, Literal

from pydantic import Field, model_validator

from megaray.config import ModelConfig

PRESETS: Dict[str, Dict[str, Any]] = {
    # state-spaces/mamba2-130m: 24 layers, d_model 768, d_state 128, headdim 64, expand 2, ngroups 1,
    # GPT-NeoX vocabulary (50277) padded to a multiple of 16, trained at 2048 tokens.
    "mamba2_130m": dict(
        n_layer=24,
        d_model=768,
        d_state=128,
        headdim=64,
        expand=2,
        n_groups=1,
        chunk_size=256,
        vocab_size=50288,
        block_size=2048,
    ),
    # Tiny, for the laptop demo and the CPU training test (8 heads of 16).
    "tiny": dict(
        n_layer=2,
        d_model=64,
        d_state=16,
        headdim=16,
        expand=2,
        n_groups=1,
        chunk_size=16,
        vocab_size=512,
        block_size=64,
    ),
    # Smallest, for unit tests: 2 groups so the group -> head sharing is exercised.
    "debug": dict(
        n_layer=2, d_model=32, d_state=8, headdim=8, expand=2, n_groups=2, chunk_size=8, vocab_size=128, block_size=32
    ),
}


class MambaConfig(ModelConfig):
    """Mamba-2 language model config (Dao & Gu 2024).

    Derived sizes: ``d_inner = expand * d_model``, ``n_heads = d_inner / headdim``; ``in_proj`` maps
    ``d_model -> 2 d_inner + 2 n_groups d_state + n_heads`` (z, x, B, C, dt).

    Raises (through validation):
        ConfigError: ``d_inner`` not divisible by ``headdim``, heads not divisible by ``n_groups``,
            ``dt_min > dt_max``, ``A_init_min > A_init_max``, ``moe_top_k > n_experts``.
    """

    PRESETS: ClassVar[Dict[str, Dict[str, Any]]] = PRESETS

    family: Literal["mamba"] = "mamba"
    vocab_size: int = Field(50288, gt=0)
    block_size: int = Field(2048, gt=0, description="training sequence length T (the model itself has no limit)")
    n_layer: int = Field(24, gt=0)
    d_model: int = Field(768, gt=0, description="residual stream width")
    d_state: int = Field(128, gt=0, description="SSM state size N per head")
    d_conv: int = Field(4, gt=0, description="depthwise causal conv1d kernel width")
    expand: int = Field(2, gt=0, description="d_inner = expand * d_model")
    headdim: int = Field(64, gt=0, description="SSM head dim P")
    n_groups: int = Field(1, gt=0, description="groups sharing B and C (like GQA's key/value heads)")
    chunk_size: int = Field(256, gt=0, description="SSD chunk length Q (any T works; need not divide it)")
    dt_min: float = Field(0.001, gt=0, description="initial dt drawn log-uniform in [dt_min, dt_max]")
    dt_max: float = Field(0.1, gt=0)
    dt_init_floor: float = Field(1e-4, gt=0)
    A_init_min: float = Field(1.0, gt=0, description="-A drawn uniform in [A_init_min, A_init_max]")
    A_init_max: float = Field(16.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0, description="eps of the RMSNorms (pre-norm, gated, final)")
    bias: bool = Field(False, description="biases in in_proj / out_proj (and the feed-forward)")
    conv_bias: bool = True
    tie_embeddings: bool = True
    ssd_backend: Literal["auto", "torch", "mamba_ssm"] = Field(
        "auto", description="auto: mamba_ssm's fused kernel when importable on CUDA, else the PyTorch scan"
    )
    # optional feed-forward after each mixer (mamba_ssm's d_intermediate; MoE as in the GPT family)
    d_intermediate: int = Field(0, ge=0, description="gated-MLP width after each mixer; 0 = none (unless MoE)")
    mlp: Literal["gelu", "relu", "silu", "swiglu", "geglu"] = "swiglu"
    n_experts: int = Field(0, ge=0, description="MoE experts per layer; 0 = dense (or no) feed-forward")
    moe_top_k: int = Field(2, gt=0)
    moe_aux_loss_coef: float = Field(0.01, ge=0, description="weight of the Switch load-balancing loss")
    moe_router: Literal["top_k", "expert_choice"] = Field(
        "top_k", description="token-choice top-k (causal) or expert choice (routes over the batch: not causal)"
    )
    moe_capacity_factor: float = Field(1.0, gt=0, description="expert choice: tokens per expert = ceil(B*T*f/E)")
    moe_z_loss_coef: float = Field(0.0, ge=0, description="weight of the ST-MoE router z-loss")
    activation_checkpointing: bool = Field(
        False, description="recompute each block in backward while training (torch.utils.checkpoint, non-reentrant)"
    )

    @model_validator(mode="after")
    def _check(self) -> "MambaConfig":
        if self.d_inner % self.headdim:
            raise ValueError(f"expand * d_model ({self.d_inner}) must be divisible by headdim ({self.headdim})")
        if self.n_heads % self.n_groups:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_groups ({self.n_groups})")
        if self.dt_min > self.dt_max:
            raise ValueError(f"dt_min ({self.dt_min}) exceeds dt_max ({self.dt_max})")
        if self.A_init_min > self.A_init_max:
            raise ValueError(f"A_init_min ({self.A_init_min}) exceeds A_init_max ({self.A_init_max})")
        if self.n_experts and self.moe_router == "top_k" and self.moe_top_k > self.n_experts:
            raise ValueError(f"moe_top_k ({self.moe_top_k}) exceeds n_experts ({self.n_experts})")
        return self

    @property
    def d_inner(self) -> int:
        """SSM width ``expand * d_model``."""
        return self.expand * self.d_model

    @property
    def n_heads(self) -> int:
        """SSM heads ``d_inner // headdim``."""
        return self.d_inner // self.headdim

    @property
    def has_ffn(self) -> bool:
        """Whether each layer has a feed-forward after its mixer."""
        return self.d_intermediate > 0 or self.n_experts > 0

    # -- the names megaray.models.common.mlp / moe read ----------------------------------------
    @property
    def n_embd(self) -> int:
        """Alias of ``d_model`` for the shared feed-forward builders."""
        return self.d_model

    @property
    def hidden_dim(self) -> int:
        """Feed-forward width: ``d_intermediate``, else 8/3 * d_model rounded up to 64 (MoE experts)."""
        if self.d_intermediate:
            return self.d_intermediate
        return (int(8 * self.d_model / 3) + 63) // 64 * 64
