"""DiT family (``dit``): ``from megaray.models.diffusion import DiT, DiTConfig, GaussianDiffusion``.

The network (:mod:`.dit`, Peebles & Xie 2023) is separate from the diffusion process
(:mod:`.process`: schedules, training loss, DDIM, classifier-free guidance), as in DiT's
``models.py`` vs ``diffusion/``. :func:`from_diffusers` converts a diffusers
``DiTTransformer2DModel``. See docs/diffusion.md.

Importing this package registers the ``dit`` family and nothing heavier (PEP 562 lazy names).
"""

from megaray.families import FamilySpec, lazy_exports, register

register(
    FamilySpec(
        family="dit",
        config="megaray.models.diffusion.config:DiTConfig",
        build="megaray.models.diffusion.dit:DiT",
        task="megaray.tasks.dit:dit_task",
        sections=(("diffusion", "megaray.tasks.diffusion_config:DiffusionSection"),),
    )
)

_LAZY = {
    "DiT": "megaray.models.diffusion.dit",
    "DiTConfig": "megaray.models.diffusion.config",
    "PRESETS": "megaray.models.diffusion.config",
    "GaussianDiffusion": "megaray.models.diffusion.process",
    "guided": "megaray.models.diffusion.process",
    "cfg_model_fn": "megaray.models.diffusion.process",
    "from_diffusers": "megaray.models.diffusion.convert",
}
__all__ = sorted(_LAZY)

__getattr__ = lazy_exports(__name__, _LAZY)
