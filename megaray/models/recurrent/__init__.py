"""Recurrent-depth transformer family: ``from megaray.models.recurrent import RecurrentGPT, RecurrentConfig``.

``RecurrentGPT(RecurrentConfig.from_name("tiny"))`` builds a prelude / recurrent core / coda model
(Geiping et al. 2025, "Huginn"); it trains with :class:`megaray.tasks.recurrent.RecurrentTask`,
which sets the model's step so every rank samples the same depth. Importing this package
registers the ``recurrent`` family and nothing heavier (PEP 562).
"""

from megaray.families import FamilySpec, lazy_exports, register

register(
    FamilySpec(
        family="recurrent",
        config="megaray.models.recurrent.config:RecurrentConfig",
        build="megaray.models.recurrent.model:RecurrentGPT",
        task="megaray.tasks.recurrent:RecurrentTask",
        sections=(
            ("eval", "megaray.tasks.lm_config:EvalConfig"),
            ("generation", "megaray.tasks.lm_config:GenerationConfig"),
        ),
        claims="megaray.models.recurrent.selection:claims",
        describe="megaray.models.recurrent.selection:describe",
        priority=10,
    )
)

_LAZY = {
    "RecurrentGPT": "megaray.models.recurrent.model",
    "RecurrentConfig": "megaray.models.recurrent.config",
    "PRESETS": "megaray.models.recurrent.config",
    "sample_depth": "megaray.models.recurrent.model",
}
__all__ = sorted(_LAZY)

__getattr__ = lazy_exports(__name__, _LAZY)
