"""GPT family: ``from megaray.models.gpt import GPT, GPTConfig``.

``GPT(GPTConfig.from_name("debug"))`` builds a model; ``generate`` samples from it; ``from_hf`` /
``to_hf`` convert Hugging Face GPT-2 and Llama models (needs ``transformers``).

Importing this package registers the ``gpt`` family and nothing heavier: the names below are
loaded on first use (PEP 562), so reading a config does not import torch.
"""

from megaray.families import FamilySpec, lazy_exports, register

register(
    FamilySpec(
        family="gpt",
        config="megaray.models.gpt.config:GPTConfig",
        build="megaray.models.gpt.model:GPT",
        task="megaray.tasks.lm:LMTask",
        tasks=(("sft", "megaray.tasks.finetune:SFTTask"),),
        sections=(
            ("eval", "megaray.tasks.lm_config:EvalConfig"),
            ("generation", "megaray.tasks.lm_config:GenerationConfig"),
        ),
        claims="megaray.families:claims_any",
        priority=-100,
    )
)

_LAZY = {
    "GPT": "megaray.models.gpt.model",
    "GPTConfig": "megaray.models.gpt.config",
    "PRESETS": "megaray.models.gpt.config",
    "generate": "megaray.models.gpt.sampling",
    "from_hf": "megaray.models.gpt.convert",
    "to_hf": "megaray.models.gpt.convert",
    "flops_per_token": "megaray.models.gpt.flops",
    "estimate_mfu": "megaray.models.gpt.flops",
}
__all__ = sorted(_LAZY)

__getattr__ = lazy_exports(__name__, _LAZY)
