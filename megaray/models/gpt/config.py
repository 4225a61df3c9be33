"""GPTConfig: the typed config of the GPT family, with the seeds' presets.

Names follow nanoGPT / litgpt (``n_layer``, ``n_head``, ``n_embd``, ``n_kv_heads``, ``block_size``).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Dict, List, Literal, Optional, Tuple, Union

from pydantic import Field, field_validator, model_validator

from megaray.config import ModelConfig, suggest
from megaray.models.common.position_spec import POSITION_NAMES, check_positions, position_names

_MODERN = dict(position="rope", norm="rmsnorm", mlp="swiglu", attention="gqa", bias=False, tie_embeddings=False)

PRESETS: Dict[str, Dict[str, Any]] = {
    # GPT-2 family (Radford et al. 2019); vocab padded to 50304 as in nanoGPT.
    "gpt2_small": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304),
    "gpt2_medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024, vocab_size=50304),
    "gpt2_large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024, vocab_size=50304),
    # Llama-style: RoPE, RMSNorm, SwiGLU, GQA, no bias.
    "modern_small": dict(n_layer=12, n_head=12, n_kv_heads=4, n_embd=768, block_size=2048, vocab_size=32000, **_MODERN),
    "modern_medium": dict(
        n_layer=24, n_head=16, n_kv_heads=4, n_embd=1024, block_size=2048, vocab_size=32000, **_MODERN
    ),
    # GPT-2 XL (1.5B) with the real GPT-2 vocabulary: 1,557,611,200 parameters, HF GPT2LMHeadModel's count.
    "gpt2_xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024, vocab_size=50257),
    # Llama 3.2 1B's shape (meta-llama/Llama-3.2-1B config.json): 1,235,814,400 parameters, HF
    # LlamaForCausalLM's count. block_size = its 8192-token pre-training context; the released weights
    # also use llama3 RoPE frequency scaling, which megaray does not implement (from_hf rejects it).
    "llama_1b": dict(
        n_layer=16,
        n_head=32,
        n_kv_heads=8,
        n_embd=2048,
        mlp_hidden=8192,
        block_size=8192,
        vocab_size=128256,
        rope_theta=500000.0,
        **{**_MODERN, "tie_embeddings": True},
    ),
    # Tiny, for tests and the laptop demo.
    "debug": dict(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=512),
}


PositionName = Literal["learned", "sinusoidal", "rope", "alibi", "none"]


class GPTConfig(ModelConfig):
    """Decoder-only transformer config. Components are chosen by short strings.

    Raises (through validation):
        ConfigError: n_embd not divisible by n_head, n_head not divisible by n_kv_heads, an
            attention/position combination that does not exist (e.g. ``mla`` without ``rope``), MoE
            sizes that do not fit (``moe_top_k > n_experts``; peer: ``n_experts`` not a perfect
            square; ``n_embd`` not divisible by ``moe_heads``), ``moe_expert_parallel > 1``.
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
    qk_nope_head_dim: Optional[int] = Field(
        None, gt=0, description="MLA non-rotary q/k dim per head d_h; None = head_dim"
    )
    v_head_dim: Optional[int] = Field(None, gt=0, description="MLA value dim per head; None = head_dim")
    position: Union[PositionName, List[PositionName]] = Field(
        "learned", description="one scheme, or a list applied together (e.g. [learned, rope], [rope, alibi])"
    )
    rope_theta: float = Field(10000.0, gt=0)
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_placement: Literal["pre", "post", "sandwich"] = Field(
        "pre",
        description="pre: x + f(norm(x)); post: norm(x + f(x)); sandwich: x + norm(f(norm(x))) (CogView, Gemma 2)",
    )
    norm_eps: float = Field(1e-5, gt=0)
    qk_norm: bool = False
    mlp: Literal["gelu", "relu", "silu", "swiglu", "geglu", "convmlp", "shufflemlp"] = Field(
        "gelu",
        description="convmlp: causal depthwise conv between the projections (PVT v2 / Primer); "
        "shufflemlp: grouped projections with a channel shuffle (ShuffleNet)",
    )
    mlp_conv_kernel: int = Field(3, gt=0, description="convmlp: taps of the causal depthwise convolution")
    mlp_groups: int = Field(4, gt=0, description="shufflemlp: groups of the grouped linear layers")
    mlp_hidden: Optional[int] = Field(
        None, gt=0, description="MLP hidden size; None = 4*n_embd (gated: 8/3*n_embd rounded to 64)"
    )
    n_experts: int = Field(0, ge=0, description="MoE experts per layer; 0 = dense MLP")
    moe_top_k: int = Field(2, gt=0)
    moe_aux_loss_coef: float = Field(0.01, ge=0, description="weight of the Switch load-balancing loss")
    moe_router: Literal["top_k", "expert_choice", "peer"] = Field(
        "top_k",
        description="token-choice top-k (Mixtral), expert choice (Zhou et al. 2022) or peer: "
        "product-key retrieval over n_experts single-neuron experts (He 2024)",
    )
    moe_capacity_factor: float = Field(
        1.0, gt=0, description="expert choice: each expert takes ceil(B*T*factor/n_experts) tokens"
    )
    moe_z_loss_coef: float = Field(0.0, ge=0, description="weight of the ST-MoE router z-loss (paper: 1e-3)")
    moe_heads: int = Field(
        1,
        gt=0,
        description="top_k/expert_choice: MH-MoE sub-tokens per token (Wu et al. 2024; 1 = off); "
        "peer: retrieval heads h (paper: 8)",
    )
    moe_peer_key_dim: Optional[int] = Field(
        None, gt=0, description="peer: query / product-key dim d_key (even); None = n_embd (rounded up to even)"
    )
    moe_peer_batchnorm: bool = Field(True, description="peer: BatchNorm on the queries (the paper's default)")
    moe_expert_parallel: int = Field(
        1, ge=1, description="experts sharded over this many ranks; only 1 (no expert parallelism) is supported"
    )
    residual: Literal["plain", "rezero"] = Field(
        "plain", description="rezero: x + alpha*f(norm(x)) with alpha=0 at init (Bachlechner et al. 2020)"
    )
    init: Literal["gpt2", "admin"] = Field(
        "gpt2", description="admin: post-norm residual x*omega + f(x), omega profiled at init (Liu et al. 2020)"
    )
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
        if self.attention == "mla" and "rope" not in self.positions:
            raise ValueError(
                "attention 'mla' carries its own decoupled RoPE keys: set position 'rope' "
                f"(or a list with rope, e.g. [learned, rope]); got {self.position!r}"
            )
        if "rope" in self.positions and self.attention != "mla" and self.head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got {self.head_dim}")
        if self.residual == "rezero" and self.norm_placement not in ("pre", "sandwich"):
            raise ValueError(
                "residual 'rezero' gates a pre-norm branch (identity at init): set norm_placement 'pre' or 'sandwich'"
            )
        if self.init == "admin" and self.norm_placement != "post":
            raise ValueError(
                "init 'admin' rescales the post-norm residual (Liu et al. 2020): set norm_placement 'post'"
            )
        if self.n_experts and self.mlp in ("convmlp", "shufflemlp"):
            raise ValueError(
                f"mlp '{self.mlp}' is a dense feed-forward only: MoE experts (n_experts "
                f"{self.n_experts}) are gelu/relu/silu/swiglu/geglu MLPs; set n_experts 0 or another mlp"
            )
        if self.mlp == "shufflemlp" and (self.n_embd % self.mlp_groups or self.hidden_dim % self.mlp_groups):
            raise ValueError(
                f"mlp 'shufflemlp': n_embd ({self.n_embd}) and the hidden width ({self.hidden_dim}) "
                f"must be divisible by mlp_groups ({self.mlp_groups})"
            )
        if self.n_experts and self.moe_router == "top_k" and self.moe_top_k > self.n_experts:
            raise ValueError(f"moe_top_k ({self.moe_top_k}) exceeds n_experts ({self.n_experts})")
        if self.n_experts and self.moe_router == "peer":
            root = math.isqrt(self.n_experts)
            if root * root != self.n_experts:
                raise ValueError(
                    f"moe_router 'peer' needs a perfect-square n_experts (product keys: sqrt(N) "
                    f"sub-keys per half), got {self.n_experts}; e.g. {root * root} or {(root + 1) ** 2}"
                )
            if self.moe_top_k > root:
                raise ValueError(f"moe_router 'peer': moe_top_k ({self.moe_top_k}) exceeds sqrt(n_experts) ({root})")
            if self.moe_peer_key_dim is not None and self.moe_peer_key_dim % 2:
                raise ValueError(
                    f"moe_peer_key_dim must be even (the query splits in two halves), got {self.moe_peer_key_dim}"
                )
        elif self.n_experts and self.n_embd % self.moe_heads:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by moe_heads ({self.moe_heads}): "
                "MH-MoE splits each token into moe_heads sub-tokens"
            )
        return self

    @field_validator("position", mode="before")
    @classmethod
    def _check_position(cls, v: Any) -> Any:
        if isinstance(v, str) and v not in POSITION_NAMES:
            raise ValueError(
                f"unknown position {v!r}{suggest(v, POSITION_NAMES)}; known: {', '.join(POSITION_NAMES)}, "
                "or a list of them (e.g. [learned, rope])"
            )
        if isinstance(v, (list, tuple)):
            check_positions(v)
            return v[0] if len(v) == 1 else list(v)  # [rope] is rope: one spelling per model
        return v

    @property
    def positions(self) -> Tuple[str, ...]:
        """``position`` as a tuple of scheme names (one name -> a 1-tuple)."""
        return position_names(self.position)

    @field_validator("moe_expert_parallel")
    @classmethod
    def _no_expert_parallel(cls, v: int) -> int:
        if v > 1:
            raise ValueError(
                "needs experts sharded across ranks, and megaray's MoE layers keep every expert on every rank. "
                "DeepSpeed's own layer (deepspeed.moe.layer.MoE, ep_size) does train on CPU/gloo "
                "(ZeRO 2, 2 processes, ep_size 2: checked), but using it needs its GShard gate instead of "
                "megaray's routers (no expert choice, MH-MoE, PEER or z-loss), optimizer groups split by "
                "DeepSpeed's split_params_into_different_moe_groups_for_optimizer, a gather of the experts of "
                "every rank into model.pt and ema.pt, and every rank "
                "in each forward (rank-0-only eval samples would wait forever in its all-to-all); "
                "set moe_expert_parallel 1 (see docs/models.md, 'Expert parallelism')"
            )
        return v

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
