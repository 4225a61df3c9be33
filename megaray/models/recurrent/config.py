"""RecurrentConfig: the typed config of the recurrent-depth transformer family, with presets.

The block fields are :class:`~megaray.models.gpt.config.GPTConfig`'s (the blocks *are* GPT
blocks); the depth fields follow Geiping et al. 2025, "Scaling up Test-Time Compute with Latent
Reasoning: A Recurrent Depth Approach" (arXiv:2502.05171, "Huginn"; reference code
github.com/seal-rg/recurrent-pretraining): ``n_prelude`` / ``n_core`` / ``n_coda`` blocks,
``recurrent_mean_thinking_steps`` (the paper's mean recurrence r-bar), ``backprop_depth`` (k).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Dict, Literal, Optional

from pydantic import Field, model_validator

from megaray.models.gpt.config import GPTConfig

_MODERN = dict(position="rope", norm="rmsnorm", mlp="swiglu", bias=False)

PRESETS: Dict[str, Dict[str, Any]] = {
    # ~100M parameters (8 distinct blocks of 768 + 50304-token tied embedding); at the mean depth
    # 8 it computes like a 2 + 4*8 + 2 = 36-layer model
    "recurrent_small": dict(
        n_prelude=2,
        n_core=4,
        n_coda=2,
        n_head=12,
        n_embd=768,
        block_size=1024,
        vocab_size=50304,
        recurrent_mean_thinking_steps=8,
        backprop_depth=4,
        max_inference_steps=32,
        **_MODERN,
    ),
    # CPU-sized, for tests and the seconds-long config
    "tiny": dict(
        n_prelude=1,
        n_core=2,
        n_coda=1,
        n_head=4,
        n_embd=64,
        block_size=64,
        vocab_size=512,
        recurrent_mean_thinking_steps=4,
        backprop_depth=2,
        max_inference_steps=8,
        **_MODERN,
    ),
    "debug": dict(
        n_prelude=1,
        n_core=1,
        n_coda=1,
        n_head=2,
        n_embd=32,
        block_size=32,
        vocab_size=512,
        recurrent_mean_thinking_steps=3,
        backprop_depth=2,
        max_inference_steps=6,
    ),
}


class RecurrentConfig(GPTConfig):
    """Prelude, a shared core iterated ``r`` times, coda; every block a GPT :class:`Block`.

    ``n_layer`` is derived (``n_prelude + n_core + n_coda``, the distinct blocks; it scales the
    GPT-2 residual init): leave it unset.

    Raises (through validation; the message names the key):
        ConfigError: ``n_layer`` set to another value; ``recurrent_mean_thinking_steps`` above
            ``max_inference_steps``;
            MoE (``n_experts > 0``, or any ``moe_*`` setting off its default: it would be ignored) or
            ``init: admin`` (not supported by this family), and
            everything :class:`GPTConfig` rejects.
    """

    PRESETS: ClassVar[Dict[str, Dict[str, Any]]] = PRESETS

    family: Literal["recurrent"] = "recurrent"  # type: ignore[assignment]
    n_prelude: int = Field(1, ge=0, description="blocks before the recurrence (embed the input into e)")
    n_core: int = Field(2, gt=0, description="blocks of the shared recurrent core R, applied each iteration")
    n_coda: int = Field(1, ge=0, description="blocks after the recurrence (before the final norm and LM head)")
    recurrent_mean_thinking_steps: float = Field(
        4.0, ge=1, description="mean number of core iterations r sampled per training step (r-bar)"
    )
    recurrent_sampling: Literal["poisson_lognormal", "fixed"] = Field(
        "poisson_lognormal",
        description="poisson_lognormal: r = 1 + Poisson(lambda), lambda log-normal (Huginn); "
        "fixed: r = round(recurrent_mean_thinking_steps)",
    )
    recurrent_sigma: float = Field(0.5, gt=0, description="std of log(lambda) in poisson_lognormal sampling")
    depth_seed: int = Field(0, ge=0, description="seed of the per-step depth sampler (same on every rank)")
    backprop_depth: Optional[int] = Field(
        4, gt=0, description="gradients flow through the last k iterations only; None = all (full backprop)"
    )
    state_init_std: Optional[float] = Field(
        None, gt=0, description="std of the initial state s0 ~ N(0, std^2); None = sqrt(2 / (5 n_embd))"
    )
    recurrent_exit_criteria: Literal["kl", "state_delta", "fixed"] = Field(
        "kl",
        description="when generation stops iterating for a token: KL between successive output "
        "distributions, relative state change, or always max_inference_steps",
    )
    exit_threshold: float = Field(5e-4, gt=0, description="exit when the criterion's value falls below this")
    max_inference_steps: int = Field(32, gt=0, description="iteration cap at generation")
    n_layer: int = Field(0, ge=0, description="derived: n_prelude + n_core + n_coda (leave unset)")

    @model_validator(mode="before")
    @classmethod
    def _derive_n_layer(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        fields = cls.model_fields
        total = sum(int(data.get(k, fields[k].default)) for k in ("n_prelude", "n_core", "n_coda"))
        given = data.get("n_layer")
        if given not in (None, 0, total):
            raise ValueError(
                f"n_layer is derived for family 'recurrent' (n_prelude + n_core + n_coda = {total}); "
                f"got n_layer {given}: remove it and set n_prelude / n_core / n_coda"
            )
        data["n_layer"] = total
        return data

    @model_validator(mode="after")
    def _check_recurrent(self) -> "RecurrentConfig":
        if self.n_experts:
            raise ValueError("n_experts: MoE blocks are not supported by family 'recurrent'; set n_experts 0")
        fields = type(self).model_fields
        moe = [k for k in fields if k.startswith("moe_") and getattr(self, k) != fields[k].default]
        if moe:  # accepted but ignored otherwise: the blocks are dense
            raise ValueError(
                f"{', '.join(moe)}: MoE settings have no effect in family 'recurrent' (its blocks are "
                f"dense; MoE is not supported): remove {'them' if len(moe) > 1 else 'it'}"
            )
        if self.init == "admin":
            raise ValueError("init: 'admin' profiles a fixed stack of blocks; family 'recurrent' supports init 'gpt2'")
        if self.recurrent_mean_thinking_steps > self.max_inference_steps:
            raise ValueError(
                f"recurrent_mean_thinking_steps ({self.recurrent_mean_thinking_steps}) exceeds "
                f"max_inference_steps ({self.max_inference_steps}): raise max_inference_steps"
            )
        return self

    @property
    def state_std(self) -> float:
        """``state_init_std`` or ``sqrt(2 / (5 n_embd))`` (the small init Huginn uses)."""
        return self.state_init_std or math.sqrt(2.0 / (5.0 * self.n_embd))

    @property
    def mean_steps(self) -> int:
        """``recurrent_mean_thinking_steps`` rounded: the depth of evaluation forwards."""
        return max(1, round(self.recurrent_mean_thinking_steps))
