"""Model families: ``model.family`` -> :class:`FamilySpec` (config class, builder, training task).

Each family package registers itself when imported (``megaray/models/gpt/__init__.py`` calls
:func:`register`); :data:`PACKAGES` lists the packages, so **a new family is one package plus
one line here**. Specs hold import strings, so loading a config imports a family's config class
and nothing heavier. See ``docs/architecture.md`` ("Adding a family").

This module also turns YAML into a typed :class:`~megaray.config.RunConfig`
(:func:`load_config`): the model section needs the family's config class.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

from megaray.config import RunConfig, key_origins, load_layered, suggest, validate
from megaray.errors import ConfigError

#: family packages; each registers its families on import
PACKAGES = (
    "megaray.models.gpt",
    "megaray.models.audio",
    "megaray.models.mamba",
    "megaray.models.ngpt",
    "megaray.models.image",
    "megaray.models.diffusion",
    "megaray.models.recurrent",
    "megaray.models.multimodal",
)


@dataclass(frozen=True)
class FamilySpec:
    """How megaray finds a family's pieces.

    Attributes:
        family: the name used in YAML (``model.family``).
        config: ``"module:Class"`` of the family's :class:`megaray.config.ModelConfig` subclass.
        build: ``"module:callable"``; ``callable(config) -> torch.nn.Module``.
        task: ``"module:Class"``; a :class:`megaray.tasks.base.Task` subclass that supplies the
            loss, datasets and evaluation for the one training loop.
        tasks: other tasks the family trains with, ``((name, "module:Class"), ...)``, picked by
            ``train.task: name`` (e.g. ``("sft", "megaray.tasks.finetune:SFTTask")``).
    """

    family: str
    config: str
    build: str
    task: str
    tasks: Tuple[Tuple[str, str], ...] = ()


_REGISTRY: Dict[str, FamilySpec] = {}


def register(spec: FamilySpec) -> FamilySpec:
    """Add ``spec`` (called by a family package's ``__init__``). Raises ValueError on a duplicate."""
    old = _REGISTRY.get(spec.family)
    if old is not None and old != spec:
        raise ValueError(f"family {spec.family!r} registered twice ({old} and {spec})")
    _REGISTRY[spec.family] = spec
    return spec


def lazy_exports(package: str, names: Dict[str, str]) -> Any:
    """A PEP 562 module ``__getattr__`` for a family package: ``names`` maps each public name to
    the module defining it, imported on first use, so registering a family (importing its
    package) imports nothing heavier than this module. Usage in ``__init__.py``:
    ``__getattr__ = lazy_exports(__name__, _LAZY)``. Unknown names raise AttributeError."""

    def __getattr__(name: str) -> Any:
        if name in names:
            return getattr(importlib.import_module(names[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


def registry() -> Dict[str, FamilySpec]:
    """Every registered family (imports the packages in :data:`PACKAGES` once)."""
    for pkg in PACKAGES:
        importlib.import_module(pkg)
    return dict(_REGISTRY)


def _load(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def spec(family: str) -> FamilySpec:
    """The :class:`FamilySpec` of ``family``. Raises ConfigError naming the valid families."""
    known = registry()
    if family not in known:
        raise ConfigError(
            f"model.family: unknown family {family!r}{suggest(str(family), known)}; known: {', '.join(sorted(known))}"
        )
    return known[family]


def config_class(family: str) -> Any:
    """The config class of ``family``."""
    return _load(spec(family).config)


def build_model(config: Any) -> Any:
    """Instantiate the ``torch.nn.Module`` for a family config."""
    return _load(spec(config.family).build)(config)


def task_class(family: str, task: Optional[str] = None) -> Any:
    """The training :class:`~megaray.tasks.base.Task` class of ``family`` (``task``: one of its
    ``tasks`` by name, from ``train.task``; None = its own). Raises ConfigError naming the valid ones."""
    s = spec(family)
    if task is None:
        return _load(s.task)
    named = dict(s.tasks)
    if task not in named:
        raise ConfigError(
            f"train.task: family {family!r} has no task {task!r}{suggest(task, named)}; "
            f"its tasks: {', '.join(sorted(named)) or 'none besides its default (unset train.task)'}"
        )
    return _load(named[task])


# ----------------------------------------------------------------------------- loading


def load_config(source: str | os.PathLike | Dict[str, Any], overrides: Sequence[str] = ()) -> RunConfig:
    """Load a run config from a YAML path (or a dict), apply ``key.path=value`` overrides.

    A ``base: other.yaml`` key extends another run config (:func:`megaray.config.load_layered`:
    relative to the including file, chains allowed, mappings deep-merged, lists and scalars
    replaced); the overrides apply after the merge. Override values are parsed as YAML scalars
    (``3e-4`` -> float, ``true`` -> bool).

    Raises:
        ConfigError: missing file, bad YAML, a missing or cyclic ``base``, unknown/misspelled key
            (named with the file or ``--set`` that set it), wrong type, impossible combination.
            The message names the dotted key path.
    """
    layered = load_layered(source, overrides)
    with key_origins(layered.origins):
        return build_run_config(layered.raw)


#: the modalities a model section may name (``model.modalities``)
MODALITIES = ("text", "audio", "image")


def select_family(model_raw: Dict[str, Any]) -> str:
    """The model type of a model section that names no ``family`` (the seeds' automatic choice).

    * ``modalities`` naming anything besides ``text`` -> ``multimodal`` (one backbone over text,
      speech and images); ``modalities: [text]`` is dropped and means the causal GPT;
    * ``recurrent: true``, a ``recurrent_*`` key (e.g. ``recurrent_mean_thinking_steps``) or a ``recurrent*`` preset ->
      ``recurrent`` (the recurrent-depth transformer);
    * otherwise ``gpt``.

    ``model_raw`` is edited in place (a text-only ``modalities`` is removed).

    Raises:
        ConfigError: ``modalities`` is not a list of known names (the message names the bad one
            and the valid ones).
    """
    mods = model_raw.get("modalities")
    if mods is not None:
        if isinstance(mods, str) or not isinstance(mods, (list, tuple)) or not mods:
            raise ConfigError(f"model.modalities: expected a non-empty list such as [text, audio], got {mods!r}")
        for m in mods:
            if m not in MODALITIES:
                raise ConfigError(
                    f"model.modalities: unknown modality {m!r}{suggest(str(m), MODALITIES)}; "
                    f"valid modalities: {', '.join(MODALITIES)}"
                )
        if set(mods) != {"text"}:
            return "multimodal"
        model_raw.pop("modalities")
    flag = model_raw.pop("recurrent", None)  # `recurrent: true` names the type outright
    if flag is not None and not isinstance(flag, bool):
        raise ConfigError(f"model.recurrent: expected true or false, got {flag!r}")
    if (
        flag
        or any(str(k).startswith("recurrent") for k in model_raw)
        or str(model_raw.get("preset") or "").startswith("recurrent")
    ):
        return "recurrent"
    return "gpt"


def describe_model(config: Any) -> str:
    """One line naming the model type a run builds, printed by ``megaray train`` and logged to
    MLflow (tag ``megaray.model_type``): ``"multimodal (text, audio, image)"``, ``"recurrent
    (mean depth 4)"``, ``"gpt"``."""
    family = config.family
    if family == "multimodal":
        return f"multimodal ({', '.join(config.modalities)})"
    if family == "recurrent":
        return f"recurrent (mean depth {config.recurrent_mean_thinking_steps:g})"
    return family


def build_run_config(raw: Dict[str, Any]) -> RunConfig:
    """Validate a raw nested dict into a :class:`RunConfig` (the model section via its family)."""
    raw = dict(raw)
    model_raw = raw.get("model")
    if not isinstance(model_raw, dict):
        raise ConfigError("model: required mapping with at least 'family' (e.g. {family: gpt, preset: debug})")
    model_raw = dict(model_raw)
    family = model_raw.pop("family", None) or select_family(model_raw)
    preset = model_raw.pop("preset", None)
    raw["model"] = config_class(family).from_name(preset, **model_raw)
    return validate(RunConfig, raw)
