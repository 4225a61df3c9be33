"""NGPTConfig: the typed config of the nGPT family (normalized Transformer), with presets.

Names follow :class:`megaray.models.gpt.config.GPTConfig` (``n_layer``, ``n_head``, ``n_embd``,
``block_size``); the scalers' initial values and the ``base_scale`` reparametrisation follow
NVIDIA's reference ``model.py`` (github.com/NVIDIA/ngpt) and Loshchilov et al. 2024
(arXiv:2410.01131), section 2 and table 1.
"""

from __future__ import annotations

from typing import Any, ClassVar, Dict, Literal, Optional

from pydantic import Field, model_validator

from megaray.config import ModelConfig

PRESETS: Dict[str, Dict[str, Any]] = {
    # GPT-2 small scale (the paper's 0.5B model is 24 x 1024; this is the 124M-sized one)
    "ngpt_small": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304),
    # CPU-sized, for tests and the seconds-long config
    "tiny": dict(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=512),
    "debug": dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=512),
}


class NGPTConfig(ModelConfig):
    """nGPT: every hidden state and every weight row along the embedding dimension on the unit sphere.

    The learnable scalers are stored as ``init_scaling * ones`` and used as
    ``param * (init_value / init_scaling)`` (the reference's trick that lets one Adam lr suit
    both the matrices and the scalers); ``init_scaling`` is ``base_scale`` for ``alpha_*``,
    ``s_qk`` and ``s_z`` and 1 for ``s_u``/``s_v``, whose value is also multiplied by
    ``sqrt(n_embd)``.

    Raises (through validation):
        ConfigError: ``n_embd`` not divisible by ``n_head``, or an odd head dimension (RoPE).
    """

    PRESETS: ClassVar[Dict[str, Dict[str, Any]]] = PRESETS

    family: Literal["ngpt"] = "ngpt"
    vocab_size: int = Field(50304, gt=0)
    block_size: int = Field(1024, gt=0, description="max sequence length T")
    n_layer: int = Field(12, gt=0)
    n_head: int = Field(12, gt=0)
    n_embd: int = Field(768, gt=0)
    mlp_hidden: Optional[int] = Field(None, gt=0, description="SwiGLU hidden size; None = 4*n_embd (as the reference)")
    rope_theta: float = Field(10000.0, gt=0)
    base_scale: Optional[float] = Field(
        None, gt=0, description="init std and scaler storage scale; None = 1/sqrt(n_embd)"
    )
    alpha_attn_init: float = Field(0.05, gt=0, description="alpha_A: eigen learning rate of the attention update")
    alpha_mlp_init: float = Field(0.05, gt=0, description="alpha_M: eigen learning rate of the MLP update")
    s_qk_init: float = Field(1.0, gt=0, description="s_qk: scale of the normalised queries and keys")
    s_uv_init: float = Field(1.0, gt=0, description="s_u, s_v: SwiGLU input scalers (times sqrt(n_embd))")
    s_z_init: float = Field(1.0, gt=0, description="s_z: logit scaler")
    attn_backend: Literal["sdpa", "reference"] = "sdpa"
    activation_checkpointing: bool = Field(
        False, description="recompute each block in backward while training (torch.utils.checkpoint, non-reentrant)"
    )

    @model_validator(mode="after")
    def _check(self) -> "NGPTConfig":
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.head_dim % 2:
            raise ValueError(f"rope needs an even head_dim (n_embd / n_head), got {self.head_dim}")
        return self

    @property
    def head_dim(self) -> int:
        """Per-head dimension ``n_embd // n_head``."""
        return self.n_embd // self.n_head

    @property
    def hidden_dim(self) -> int:
        """SwiGLU hidden width: ``mlp_hidden`` or ``4 * n_embd``."""
        return self.mlp_hidden or 4 * self.n_embd

    @property
    def scale(self) -> float:
        """``base_scale`` or ``1 / sqrt(n_embd)``."""
        return self.base_scale or self.n_embd**-0.5
