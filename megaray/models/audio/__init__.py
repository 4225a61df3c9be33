"""Audio model families: the Vocos-style ``vocoder`` and the speaker-conditioned ``audio_vae``.

Configs: :class:`VocoderConfig`, :class:`AudioVAEConfig` (presets via ``from_name``).
Networks: :class:`~megaray.models.audio.vocoder.Vocoder`,
:class:`~megaray.models.audio.vae.AudioVAE`,
:class:`~megaray.models.audio.discriminators.AudioDiscriminator`.

Importing this package registers both families (import strings only).
"""

from megaray.families import FamilySpec, lazy_exports, register

register(
    FamilySpec(
        family="vocoder",
        config="megaray.models.audio.config:VocoderConfig",
        build="megaray.models.audio.vocoder:build_vocoder",
        task="megaray.tasks.vocoder:VocoderTask",
    )
)
register(
    FamilySpec(
        family="audio_vae",
        config="megaray.models.audio.config:AudioVAEConfig",
        build="megaray.models.audio.vae:build_audio_vae",
        task="megaray.tasks.audio_vae:AudioVAETask",
    )
)

_LAZY = {"AudioVAEConfig": "megaray.models.audio.config", "VocoderConfig": "megaray.models.audio.config"}
__all__ = sorted(_LAZY)

__getattr__ = lazy_exports(__name__, _LAZY)
