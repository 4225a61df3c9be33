"""How the recurrent-depth family is chosen and named without ``model.family`` (its
``FamilySpec`` ``claims`` and ``describe`` hooks; :func:`megaray.families.select_family`)."""

from __future__ import annotations

from typing import Any, Dict

from megaray.errors import ConfigError


def claims(model_raw: Dict[str, Any]) -> bool:
    """``recurrent: true`` (removed from ``model_raw``, as is ``recurrent: false``), a
    ``recurrent_*`` key (e.g. ``recurrent_mean_thinking_steps``) or a ``recurrent*`` preset.

    Raises:
        ConfigError: ``recurrent`` is not a boolean.
    """
    flag = model_raw.pop("recurrent", None)  # `recurrent: true` names the type outright
    if flag is not None and not isinstance(flag, bool):
        raise ConfigError(f"model.recurrent: expected true or false, got {flag!r}")
    return bool(
        flag
        or any(str(k).startswith("recurrent") for k in model_raw)
        or str(model_raw.get("preset") or "").startswith("recurrent")
    )


def describe(config: Any) -> str:
    """``"recurrent (mean depth 4)"``: the family and its mean recurrence."""
    return f"recurrent (mean depth {config.recurrent_mean_thinking_steps:g})"
