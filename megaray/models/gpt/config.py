"""GPTConfig: the typed config of the GPT family, with the seeds' presets.

Names follow nanoGPT / litgpt (``n_layer``, ``n_head``, ``n_embd``, ``n_kv_heads``, ``block_size``).
"""

from __future__ import annotations

from typing import Any, ClassVar, Dict, Literal, Optional

from pydantic import Field, model_validator

from megaray.config import ModelConfig

_MODERN = dict(
    position="rope", norm="rmsnorm", mlp="swiglu", attention="gqa", bias=False, tie_embeddings=False
)

PRESETS: Dict[str, Dict[str, Any]] = {
    # GPT-2 family (Radford et al. 2019); vocab padded to 50304 as in nanoGPT.
    "gpt2_small": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304),
    "gpt2_medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024, vocab_size=50304),
    "gpt2_large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024, vocab_size=50304),
    # Llama-style: RoPE, RMSNorm, SwiGLU, GQA, no bias.
    "modern_small": dict(n_layer=12, n_head=12, n_kv_heads=4, n_embd=768, block_size=2048, vocab_size=32000, **_MODERN),
    "modern_medium": dict(n_layer=24, n_head=16, n_kv_heads=4, n_embd=1024, block_size=2048, vocab_size=32000, **_MODERN),
    # Tiny, for tests and the laptop demo.
    "debug": dict(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=512),
}


class GPTConfig(ModelConfig):
    """Decoder-only transformer config. Components are chosen by short strings.

    Raises (through validation):
        ConfigError: n_embd not divisible by n_head, n_head not divisible by n_kv_heads, an
            attention/position combination that does not exist (e.g. ``mla`` without ``rope``).
    """

    PRESETS: ClassVar[Dict[str, Dict[str, Any]]] = PRESETS

    family: Literal["gpt"] = "gpt"
    vocab_size: int = Field(50304, gt=0)
    block_size: int = Field(1024, gt=0, description="max sequence length T")
    n_layer: int = Field(12, gt=0)
    n_head: int = Field(12, gt=0)
    n_embd: int = Field(768, gt=0)
    n_kv_heads: Optional[int] = Field(None, gt=0, description="key/value heads; None = n_head (mha), 1 = mqa")
    attention: Literal["mha", "mqa", "gqa", "mla"] = "mha"
    # MLA (DeepSeek-V2 section 2.1): low-rank KV compression with decoupled RoPE keys.
    kv_lora_rank: int = Field(64, gt=0, description="MLA compressed KV dim d_c")
    q_lora_rank: Optional[int] = Field(None, gt=0, description="MLA compressed query dim d_c'; None = full-rank q")
    qk_rope_head_dim: int = Field(16, gt=0, description="MLA decoupled RoPE dim per head d_h^R")
    qk_nope_head_dim: Optional[int] = Field(None, gt=0, description="MLA non-rotary q/k dim per head d_h; None = head_dim")
    v_head_dim: Optional[int] = Field(None, gt=0, description="MLA value dim per head; None = head_dim")
    position: Literal["learned", "sinusoidal", "rope", "alibi", "none"] = "learned"
    rope_theta: float = Field(10000.0, gt=0)
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_placement: Literal["pre", "post"] = "pre"
    norm_eps: float = Field(1e-5, gt=0)
    qk_norm: bool = False
    mlp: Literal["gelu", "relu", "silu", "swiglu", "geglu"] = "gelu"
    mlp_hidden: Optional[int] = Field(None, gt=0, description="MLP hidden size; None = 4*n_embd (gated: 8/3*n_embd rounded to 64)")
    n_experts: int = Field(0, ge=0, description="MoE experts per layer; 0 = dense MLP")
    moe_top_k: int = Field(2, gt=0)
    moe_aux_loss_coef: float = Field(0.01, ge=0, description="weight of the Switch load-balancing loss")
    moe_router: Literal["top_k", "expert_choice"] = Field(
        "top_k", description="token-choice top-k (Mixtral) or expert choice (Zhou et al. 2022)")
    moe_capacity_factor: float = Field(
        1.0, gt=0, description="expert choice: each expert takes ceil(B*T*factor/n_experts) tokens")
    moe_z_loss_coef: float = Field(0.0, ge=0, description="weight of the ST-MoE router z-loss (paper: 1e-3)")
    residual: Literal["plain", "rezero"] = Field(
        "plain", description="rezero: x + alpha*f(norm(x)) with alpha=0 at init (Bachlechner et al. 2020)")
    init: Literal["gpt2", "admin"] = Field(
        "gpt2", description="admin: post-norm residual x*omega + f(x), omega profiled at init (Liu et al. 2020)")
    bias: bool = True
    dropout: float = Field(0.0, ge=0, lt=1)
    tie_embeddings: bool = True
    attn_backend: Literal["auto", "sdpa", "flash", "reference"] = "auto"
    activation_checkpointing: bool = False

    @model_validator(mode="after")
    def _check(self) -> "GPTConfig":
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.attention == "mqa":
            if self.n_kv_heads not in (None, 1):
                raise ValueError(f"attention 'mqa' needs n_kv_heads 1, got {self.n_kv_heads}")
        if self.n_kv_heads is not None and self.n_head % self.n_kv_heads:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if self.attention == "mha" and self.n_kv_heads not in (None, self.n_head):
            raise ValueError(f"attention 'mha' has n_kv_heads == n_head; got {self.n_kv_heads} (use 'gqa')")
        if self.attention == "mla" and self.position not in ("rope",):
            raise ValueError("attention 'mla' carries its own decoupled RoPE keys: set position 'rope'")
        if self.position == "rope" and self.attention != "mla" and self.head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got {self.head_dim}")
        if self.residual == "rezero" and self.norm_placement != "pre":
            raise ValueError("residual 'rezero' gates a pre-norm branch (identity at init): set norm_placement 'pre'")
        if self.init == "admin" and self.norm_placement != "post":
            raise ValueError("init 'admin' rescales the post-norm residual (Liu et al. 2020): set norm_placement 'post'")
        if self.n_experts and self.moe_router == "top_k" and self.moe_top_k > self.n_experts:
            raise ValueError(f"moe_top_k ({self.moe_top_k}) exceeds n_experts ({self.n_experts})")
        return self

    @property
    def head_dim(self) -> int:
        """Per-head dimension ``n_embd // n_head``."""
        return self.n_embd // self.n_head

    @property
    def nope_head_dim(self) -> int:
        """MLA non-rotary q/k dim per head: ``qk_nope_head_dim`` or ``head_dim``."""
        return self.qk_nope_head_dim or self.head_dim

    @property
    def value_head_dim(self) -> int:
        """MLA value dim per head: ``v_head_dim`` or ``head_dim``."""
        return self.v_head_dim or self.head_dim

    @property
    def kv_heads(self) -> int:
        """Effective number of key/value heads (1 for mqa, n_head for mha)."""
        if self.attention == "mqa":
            return 1
        return self.n_kv_heads or self.n_head

    @property
    def hidden_dim(self) -> int:
        """MLP hidden width: ``mlp_hidden`` or 4*n_embd (gated MLPs: 8/3*n_embd rounded up to 64)."""
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.mlp in ("swiglu", "geglu"):
            h = int(8 * self.n_embd / 3)
            return (h + 63) // 64 * 64
        return 4 * self.n_embd
