"""Model registry: family name -> :class:`ModelSpec` (config class, builder, training task).

Entries are import strings so that loading a config does not import every family's code.
A new family plugs into the one generic training loop by adding an entry here; it does not
write a second loop.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Dict

from megaray.config import ConfigError


@dataclass(frozen=True)
class ModelSpec:
    """How megaray finds a family's pieces.

    Attributes:
        family: the name used in YAML (``model.family``).
        config: ``"module:Class"`` of the family's :class:`megaray.config.ModelConfig` subclass.
        build: ``"module:function"``; ``function(config) -> torch.nn.Module``.
        task: ``"module:Class"``; a :class:`megaray.trainers.task.Task` subclass that supplies the
            loss, datasets and evaluation for the generic loop.
    """

    family: str
    config: str
    build: str
    task: str


REGISTRY: Dict[str, ModelSpec] = {
    "gpt": ModelSpec(
        family="gpt",
        config="megaray.models.gpt.config:GPTConfig",
        build="megaray.models.gpt.model:GPT",
        task="megaray.trainers.text_task:TextTask",
    ),
    "vocoder": ModelSpec(
        family="vocoder",
        config="megaray.models.audio.config:VocoderConfig",
        build="megaray.models.audio.vocoder:build_vocoder",
        task="megaray.trainers.audio_task:VocoderTask",
    ),
    "audio_vae": ModelSpec(
        family="audio_vae",
        config="megaray.models.audio.config:AudioVAEConfig",
        build="megaray.models.audio.vae:build_audio_vae",
        task="megaray.trainers.audio_task:AudioVAETask",
    ),
}


def _load(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def spec(family: str) -> ModelSpec:
    """The :class:`ModelSpec` of ``family``. Raises ConfigError naming the valid families."""
    if family not in REGISTRY:
        import difflib

        close = difflib.get_close_matches(str(family), list(REGISTRY), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"model.family: unknown family {family!r}{hint}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[family]


def config_class(family: str) -> Any:
    """The config class of ``family``."""
    return _load(spec(family).config)


def build_model(config: Any) -> Any:
    """Instantiate the ``torch.nn.Module`` for a family config."""
    return _load(spec(config.family).build)(config)


def task_class(family: str) -> Any:
    """The training :class:`~megaray.trainers.task.Task` class of ``family``."""
    return _load(spec(family).task)
