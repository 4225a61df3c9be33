"""How the multimodal family is chosen and named without ``model.family`` (its ``FamilySpec``
``claims`` and ``describe`` hooks; :func:`megaray.families.select_family`)."""

from __future__ import annotations

from typing import Any, Dict

from megaray.config import suggest
from megaray.errors import ConfigError
from megaray.models.multimodal.config import MODALITIES


def claims(model_raw: Dict[str, Any]) -> bool:
    """``modalities`` naming anything besides ``text`` (one backbone over text, speech and images).
    ``modalities: [text]`` is removed from ``model_raw`` (it means the causal GPT).

    Raises:
        ConfigError: ``modalities`` is not a non-empty list of known names (names the bad one
            and the valid ones).
    """
    mods = model_raw.get("modalities")
    if mods is None:
        return False
    if isinstance(mods, str) or not isinstance(mods, (list, tuple)) or not mods:
        raise ConfigError(f"model.modalities: expected a non-empty list such as [text, audio], got {mods!r}")
    for m in mods:
        if m not in MODALITIES:
            raise ConfigError(
                f"model.modalities: unknown modality {m!r}{suggest(str(m), MODALITIES)}; "
                f"valid modalities: {', '.join(MODALITIES)}"
            )
    if set(mods) != {"text"}:
        return True
    model_raw.pop("modalities")
    return False


def describe(config: Any) -> str:
    """``"multimodal (text, audio, image)"``: the family and its modalities."""
    return f"multimodal ({', '.join(config.modalities)})"
