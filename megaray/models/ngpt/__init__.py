"""nGPT family: ``from megaray.models.ngpt import NGPT, NGPTConfig``.

``NGPT(NGPTConfig.from_name("tiny"))`` builds a normalized Transformer (Loshchilov et al. 2024);
it trains with :class:`megaray.tasks.ngpt.NGPTTask`, which re-normalises the weights after every
optimizer step. Importing this package registers the ``ngpt`` family and nothing heavier (PEP 562).
"""

from megaray.families import FamilySpec, lazy_exports, register

register(
    FamilySpec(
        family="ngpt",
        config="megaray.models.ngpt.config:NGPTConfig",
        build="megaray.models.ngpt.model:NGPT",
        task="megaray.tasks.ngpt:NGPTTask",
        sections=(
            ("eval", "megaray.tasks.lm_config:EvalConfig"),
            ("generation", "megaray.tasks.lm_config:GenerationConfig"),
        ),
    )
)

_LAZY = {
    "NGPT": "megaray.models.ngpt.model",
    "NGPTConfig": "megaray.models.ngpt.config",
    "PRESETS": "megaray.models.ngpt.config",
    "unit_norm": "megaray.models.ngpt.model",
}
__all__ = sorted(_LAZY)

__getattr__ = lazy_exports(__name__, _LAZY)
