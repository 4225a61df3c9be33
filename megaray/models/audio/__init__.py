"""Audio model families: the Vocos-style ``vocoder`` and the speaker-conditioned ``audio_vae``.

Configs: :class:`VocoderConfig`, :class:`AudioVAEConfig` (presets via ``from_name``).
Networks: :class:`~megaray.models.audio.vocoder.Vocoder`,
:class:`~megaray.models.audio.vae.AudioVAE`,
:class:`~megaray.models.audio.discriminators.AudioDiscriminator`.
"""

from megaray.models.audio.config import AudioVAEConfig, VocoderConfig

__all__ = ["AudioVAEConfig", "VocoderConfig"]
