"""Model families: ``model.family`` -> :class:`FamilySpec` (config class, builder, training task).

Each family package registers itself when imported (``megaray/models/gpt/__init__.py`` calls
:func:`register`); :func:`registry` imports every package under ``megaray/models/`` and every
module named by a ``megaray.families`` entry point (a family in another distribution), so **a
new family is one package and its one registration**: its config class, network, task, run
sections (``FamilySpec.sections``), how it is chosen without ``model.family`` and how it is
described all come from its :class:`FamilySpec`; this module names no family. Specs hold import
strings, so loading a config imports a family's config class and nothing heavier. See
``docs/architecture.md`` ("Adding a family").

This module also turns YAML into a typed :class:`~megaray.config.RunConfig`
(:func:`load_config`): the model section needs the family's config class.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import pkgutil
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from megaray.config import RunConfig, key_origins, load_layered, set_section_provider, suggest, validate
from megaray.errors import ConfigError

#: where family packages live (each registers its families on import) and the entry-point group
#: naming family modules of other distributions (``[project.entry-points."megaray.families"]``)
MODELS_PACKAGE = "megaray.models"
ENTRY_POINTS = "megaray.families"


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
        sections: the run-config sections the family (and its tasks) own, ``((key, "module:Class"),
            ...)``: a top-level ``key:`` of a run of this family is validated into ``Class`` (a
            :class:`~megaray.config.StrictConfig`; defaults when absent) and read as
            ``cfg.key.field``; a run of another family refuses the key. Fields typed
            :class:`~megaray.config.RunPath` are made absolute on the driver. Families may share a
            key only with the same class (``eval`` and ``generation`` of the text families).
        claims: ``"module:func"``; ``func(model_raw) -> bool`` says whether a model section that
            names no ``family`` builds this family (it may drop keys that only served the choice
            from ``model_raw``; raise ConfigError on a malformed one). Asked in descending
            ``priority``; the first to claim wins. None = never chosen without ``family``.
        describe: ``"module:func"``; ``func(config) -> str``, the one-line model type printed by
            ``megaray train`` and logged to MLflow. None = the family name.
        priority: order of ``claims`` (higher asked first).
    """

    family: str
    config: str
    build: str
    task: str
    tasks: Tuple[Tuple[str, str], ...] = ()
    sections: Tuple[Tuple[str, str], ...] = ()
    claims: Optional[str] = None
    describe: Optional[str] = None
    priority: int = 0


_REGISTRY: Dict[str, FamilySpec] = {}


def register(spec: FamilySpec) -> FamilySpec:
    """Add ``spec`` (called by a family package's ``__init__``). Raises ValueError on a duplicate
    family or a section key that is a core key of the run config (``train``, ``data``, ...)."""
    old = _REGISTRY.get(spec.family)
    if old is not None and old != spec:
        raise ValueError(f"family {spec.family!r} registered twice ({old} and {spec})")
    for key, _ in spec.sections:
        if key in RunConfig.model_fields:
            raise ValueError(f"family {spec.family!r}: section {key!r} is a core key of the run config; pick another")
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


def packages() -> List[str]:
    """The modules that register families: every package under :data:`MODELS_PACKAGE`, then every
    module an :data:`ENTRY_POINTS` entry point names (sorted, so the order is stable)."""
    models = importlib.import_module(MODELS_PACKAGE)
    found = [f"{MODELS_PACKAGE}.{m.name}" for m in pkgutil.iter_modules(models.__path__) if m.ispkg]
    return sorted(found) + sorted(ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINTS))


_IMPORTED: List[str] = []


def registry() -> Dict[str, FamilySpec]:
    """Every registered family (imports the modules of :func:`packages` once)."""
    if not _IMPORTED:
        _IMPORTED.extend(packages())
    for pkg in _IMPORTED:
        importlib.import_module(pkg)
    return dict(_REGISTRY)


def _load(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def sections() -> Dict[str, Tuple[type, Tuple[str, ...]]]:
    """Every registered family section: ``{key: (class, families contributing it)}``.

    Raises:
        ValueError: two families contribute one key with different classes.
    """
    out: Dict[str, Tuple[type, Tuple[str, ...]]] = {}
    for s in registry().values():
        for key, ref in s.sections:
            cls = _load(ref)
            if key in out and out[key][0] is not cls:
                raise ValueError(f"section {key!r}: families {out[key][1]} and {s.family!r} give different classes")
            out[key] = (cls, out.get(key, (cls, ()))[1] + (s.family,))
    return out


set_section_provider(lambda family: sections())


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


def select_family(model_raw: Dict[str, Any]) -> str:
    """The family of a model section that names no ``family``: the first registered family, in
    descending ``priority``, whose ``claims`` hook claims ``model_raw`` (multimodal: ``modalities``
    beyond text; recurrent: a ``recurrent*`` key or preset; gpt: anything). ``model_raw`` may be
    edited in place by a hook (e.g. a text-only ``modalities`` is removed).

    Raises:
        ConfigError: a hook refuses a malformed key (naming it), or no family claims the section.
    """
    specs = sorted((s for s in registry().values() if s.claims), key=lambda s: -s.priority)
    for s in specs:
        if _load(s.claims)(model_raw):
            return s.family
    raise ConfigError(
        f"model.family: required (no family claims this model section); known: {', '.join(sorted(registry()))}"
    )


def describe_model(config: Any) -> str:
    """One line naming the model type a run builds, printed by ``megaray train`` and logged to
    MLflow (tag ``megaray.model_type``): the family's ``describe`` hook (``"multimodal (text, audio,
    image)"``, ``"recurrent (mean depth 4)"``), else the family name (``"gpt"``)."""
    hook = spec(config.family).describe
    return _load(hook)(config) if hook else config.family


def claims_any(model_raw: Dict[str, Any]) -> bool:
    """A ``claims`` hook that claims every model section (the default family's, at the lowest priority)."""
    return True


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
