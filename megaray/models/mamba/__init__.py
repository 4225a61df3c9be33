"""Mamba-2 family: ``from megaray.models.mamba import Mamba, MambaConfig``.

``Mamba(MambaConfig.from_name("tiny"))`` builds a model (Dao & Gu 2024, the SSD formulation); its
``generate`` decodes with a recurrent state cache; ``from_hf`` converts a Hugging Face
``Mamba2ForCausalLM`` (needs ``transformers``). The SSD scan is in :mod:`megaray.models.mamba.ssd`.

Importing this package registers the ``mamba`` family and nothing heavier: the names below are
loaded on first use (PEP 562), so reading a config does not import torch.
"""

from megaray.families import FamilySpec, lazy_exports, register

register(
    FamilySpec(
        family="mamba",
        config="megaray.models.mamba.config:MambaConfig",
        build="megaray.models.mamba.model:Mamba",
        task="megaray.tasks.lm:LMTask",
        sections=(
            ("eval", "megaray.tasks.lm_config:EvalConfig"),
            ("generation", "megaray.tasks.lm_config:GenerationConfig"),
        ),
    )
)

_LAZY = {
    "Mamba": "megaray.models.mamba.model",
    "MambaCache": "megaray.models.mamba.model",
    "MambaConfig": "megaray.models.mamba.config",
    "PRESETS": "megaray.models.mamba.config",
    "ssd_chunked": "megaray.models.mamba.ssd",
    "ssd_recurrent": "megaray.models.mamba.ssd",
    "from_hf": "megaray.models.mamba.convert",
}
__all__ = sorted(_LAZY)

__getattr__ = lazy_exports(__name__, _LAZY)
