"""GPT family: ``from megaray.models.gpt import GPT, GPTConfig``.

``GPT(GPTConfig.from_name("debug"))`` builds a model; ``generate`` samples from it; ``from_hf`` /
``to_hf`` convert Hugging Face GPT-2 and Llama models (needs ``transformers``).
"""

from megaray.models.gpt.config import PRESETS, GPTConfig
from megaray.models.gpt.flops import estimate_mfu, flops_per_token, peak_flops
from megaray.models.gpt.generate import generate
from megaray.models.gpt.model import GPT


def from_hf(hf_model):
    """Convert a HF ``GPT2LMHeadModel`` / ``LlamaForCausalLM``; see :mod:`megaray.models.gpt.convert`."""
    from megaray.models.gpt.convert import from_hf as _from_hf

    return _from_hf(hf_model)


def to_hf(model):
    """Convert a :class:`GPT` back to HF; see :mod:`megaray.models.gpt.convert`."""
    from megaray.models.gpt.convert import to_hf as _to_hf

    return _to_hf(model)


__all__ = ["GPT", "GPTConfig", "PRESETS", "generate", "from_hf", "to_hf", "flops_per_token", "estimate_mfu", "peak_flops"]
