"""Multimodal family: ``from megaray.models.multimodal import MultimodalTransformer, MultimodalConfig``.

``MultimodalTransformer(MultimodalConfig.from_name("tiny"))`` builds one causal transformer over
text tokens and audio / image spans (Transfusion-style; regression or diffusion head for the
spans); it trains with :class:`megaray.tasks.multimodal.MultimodalTask`. Importing this package
registers the ``multimodal`` family and nothing heavier (PEP 562).
"""

from megaray.families import FamilySpec, lazy_exports, register

register(
    FamilySpec(
        family="multimodal",
        config="megaray.models.multimodal.config:MultimodalConfig",
        build="megaray.models.multimodal.model:MultimodalTransformer",
        task="megaray.tasks.multimodal:MultimodalTask",
        sections=(("generation", "megaray.tasks.lm_config:GenerationConfig"),),
        claims="megaray.models.multimodal.selection:claims",
        describe="megaray.models.multimodal.selection:describe",
        priority=20,
    )
)

_LAZY = {
    "MultimodalTransformer": "megaray.models.multimodal.model",
    "MultimodalConfig": "megaray.models.multimodal.config",
    "PRESETS": "megaray.models.multimodal.config",
    "MODALITIES": "megaray.models.multimodal.config",
    "SPECIAL_TOKENS": "megaray.models.multimodal.config",
    "generate_text": "megaray.models.multimodal.generate",
    "generate_span": "megaray.models.multimodal.generate",
}
__all__ = sorted(_LAZY)

__getattr__ = lazy_exports(__name__, _LAZY)
