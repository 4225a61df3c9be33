"""Typed hyperparameter-search configs: a base run config, a search space over its keys, a search
algorithm, a trial scheduler and per-trial resources.

A tune config is one YAML file::

    name: gpt-lr-search
    base: ../gpt_debug.yaml              # run config, relative to this file
    overrides: {train.max_steps: 40}     # dotted overrides applied to the base (optional)
    space:
      train.lr: {loguniform: [1.0e-4, 3.0e-2]}
      model.attention: {choice: [mha, mqa]}
      model: {choice: [{n_layer: 2, n_embd: 64}, {n_layer: 4, n_embd: 128}]}   # several keys at once
    search: {algorithm: random, num_samples: 4, max_concurrent_trials: 2, metric: val_loss, mode: min, seed: 0}
    scheduler: {type: asha, max_t: 40, grace_period: 10, reduction_factor: 2, time_attr: step}
    trial: {num_workers: 1, resources_per_worker: {CPU: 1}}

This module is Ray-free: it parses, validates and turns a sampled point into a trial's
:class:`~megaray.config.RunConfig`. :mod:`megaray.tune.search` wires it into Ray Tune.

Every space key is checked against the *resolved* base config (presets expanded, defaults
filled) before any trial starts: an unknown key fails with the closest valid key, and every
value a distribution can produce (each choice, both ends of a range and a point inside it) must
give a valid run config.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple

import yaml
from pydantic import BaseModel, Field, model_validator

from megaray.config import (ConfigError, RunConfig, StrictConfig, apply_override, flatten, read_yaml_mapping,
                            set_dotted, validate)
from megaray.families import build_run_config

log = logging.getLogger("megaray.tune")

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
RUN_SECTIONS = ("model", "data", "train", "scaling", "tracking")
# Keys a trial sets itself: a search over them would break resume or tracking.
RESERVED_KEYS = ("name", "scaling.storage_path", "tracking")
PRIMITIVE = (str, int, float, bool, type(None))


# ----------------------------------------------------------------------------- schema


class Distribution(StrictConfig):
    """One search-space entry; exactly one field is set.

    ``uniform``/``loguniform``: ``[low, high]`` floats (loguniform needs ``low > 0``).
    ``randint``: ``[low, high]`` integers, both ends included.
    ``choice``: values sampled uniformly. ``grid``: every value is tried (``num_samples`` times).
    A choice/grid value may be a mapping when the key names a section (``model``): its entries
    are set together, e.g. ``{attention: gqa, n_kv_heads: 2}``.
    """

    uniform: Optional[Tuple[float, float]] = None
    loguniform: Optional[Tuple[float, float]] = None
    randint: Optional[Tuple[int, int]] = None
    choice: Optional[List[Any]] = Field(None, min_length=1)
    grid: Optional[List[Any]] = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one(self) -> "Distribution":
        set_ = [k for k in ("uniform", "loguniform", "randint", "choice", "grid") if getattr(self, k) is not None]
        if len(set_) != 1:
            raise ValueError(
                "give exactly one of uniform, loguniform, randint, choice, grid"
                + (f" (got {', '.join(set_)})" if set_ else "")
            )
        lo_hi = self.uniform or self.loguniform or self.randint
        if lo_hi is not None and not lo_hi[0] < lo_hi[1]:
            raise ValueError(f"{self.kind}: low ({lo_hi[0]}) must be below high ({lo_hi[1]})")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform: low must be > 0, got {self.loguniform[0]}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("uniform", "loguniform", "randint", "choice", "grid") if getattr(self, k) is not None)

    @property
    def values(self) -> Optional[List[Any]]:
        """The discrete values of a choice/grid (None for ranges)."""
        return self.choice if self.choice is not None else self.grid

    def describe(self) -> str:
        """Short text form for MLflow params and tables, e.g. ``loguniform[0.0001, 0.03]``."""
        v = getattr(self, self.kind)
        return f"{self.kind}{json.dumps(list(v), default=str)}"


class SearchSection(StrictConfig):
    """How points are proposed and what is optimised."""

    algorithm: Literal["random", "optuna", "grid"] = Field(
        "random", description="random = Tune's BasicVariantGenerator; optuna = Optuna TPE; grid = every grid point"
    )
    num_samples: int = Field(4, gt=0, description="trials (random/optuna); repeats of the whole grid (grid values)")
    max_concurrent_trials: Optional[int] = Field(None, gt=0, description="trials running at once; None = as resources allow")
    metric: str = Field("val_loss", description="reported metric to optimise (val_loss is reported every train.eval_every)")
    mode: Literal["min", "max"] = "min"
    seed: Optional[int] = Field(0, description="seed of the search algorithm (None = random)")


class SchedulerSection(StrictConfig):
    """Trial scheduler. ``asha`` stops trials whose metric at a rung (grace_period,
    grace_period*rf, ...) is worse than the rung's top 1/reduction_factor."""

    type: Literal["fifo", "asha", "pbt"] = "fifo"
    time_attr: str = Field("step", description="progress measure of max_t/grace_period: a reported metric (step, tokens) or training_iteration")
    max_t: Optional[int] = Field(None, gt=0, description="last rung; None = train.max_steps (time_attr step)")
    grace_period: int = Field(1, gt=0, description="first rung: no trial is stopped before this")
    reduction_factor: float = Field(2.0, gt=1)
    brackets: int = Field(1, gt=0)


class TrialSection(StrictConfig):
    """Resources of one trial. ``None`` keeps the base config's ``scaling`` value; scaling a search
    from a laptop to a GPU cluster changes only this section."""

    num_workers: Optional[int] = Field(None, gt=0, description="Ray Train workers per trial")
    use_gpu: Optional[bool] = None
    resources_per_worker: Optional[Dict[str, float]] = None
    driver_resources: Dict[str, float] = Field(
        default_factory=lambda: {"CPU": 1},
        description="resources of the trial's driver (the Tune function that runs TorchTrainer.fit)",
    )
    max_failures: int = Field(0, ge=0, description="Tune restarts of a failed trial driver (the Train run resumes)")


class TuneSearchConfig(StrictConfig):
    """A whole search (the YAML file). ``base`` is a run-config path relative to this file."""

    name: str = Field(..., pattern=NAME_PATTERN, description="search name; re-running it with --resume continues it")
    base: str = Field(..., description="base run config (YAML path, relative to this file)")
    overrides: Dict[str, Any] = Field(default_factory=dict, description="dotted overrides of the base, e.g. {train.max_steps: 40}")
    space: Dict[str, Distribution] = Field(..., min_length=1)
    search: SearchSection = Field(default_factory=SearchSection)
    scheduler: SchedulerSection = Field(default_factory=SchedulerSection)
    trial: TrialSection = Field(default_factory=TrialSection)
    storage_path: Optional[str] = Field(None, description="where the search lives; None = the base's scaling.storage_path")

    @model_validator(mode="before")
    @classmethod
    def _flatten_overrides(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("overrides"), dict):
            data = dict(data)
            data["overrides"] = flatten(data["overrides"])
        return data


# ----------------------------------------------------------------------------- resolved search


@dataclass
class TuneSearch:
    """A loaded search: the config, its resolved base run config and the decoded space.

    Attributes:
        config: the validated :class:`TuneSearchConfig`.
        source: the YAML file it came from (None for a dict).
        base_path: absolute path of the base run config.
        base_raw: the base YAML as a dict, with ``overrides`` and the ``trial`` section applied.
        base: the resolved base :class:`RunConfig` (None while validation is deferred, see
            :func:`load_tune_config`).
        deferred: why base validation was deferred (None when it ran).
    """

    config: TuneSearchConfig
    source: Optional[str]
    base_path: str
    base_raw: Dict[str, Any]
    base: Optional[RunConfig] = None
    deferred: Optional[str] = None
    labels: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.config.name

    def require_base(self) -> RunConfig:
        """The resolved base config; raises ConfigError when it could not be loaded."""
        if self.base is None:
            raise ConfigError(f"base {self.base_path}: {self.deferred}")
        return self.base

    def storage(self) -> str:
        """Absolute (local) or URI storage root of the search."""
        p = self.config.storage_path or self.require_base().scaling.storage_path
        return p if "://" in p else str(Path(p).expanduser().resolve())

    def experiment_path(self) -> str:
        """``<storage>/<name>``: the Tune experiment (trial dirs, experiment state)."""
        return f"{self.storage().rstrip('/')}/{self.name}"

    def runs_path(self) -> str:
        """``<storage>/<name>/runs``: where each trial's Ray Train run (checkpoints) lives."""
        return f"{self.experiment_path()}/runs"

    def max_steps(self) -> int:
        return self.require_base().train.max_steps

    def tune_space(self) -> Dict[str, Tuple[str, Any]]:
        """``{key: (kind, args)}`` as Tune should sample it; non-primitive choices are replaced
        by string labels (decoded again in :meth:`decode`)."""
        out: Dict[str, Tuple[str, Any]] = {}
        for key, dist in self.config.space.items():
            if dist.values is not None:
                vals = list(self.labels[key]) if key in self.labels else list(dist.values)
                out[key] = (dist.kind, vals)
            elif dist.randint is not None:
                out[key] = ("randint", (dist.randint[0], dist.randint[1]))
            else:
                out[key] = (dist.kind, tuple(getattr(dist, dist.kind)))
        return out

    def decode(self, sampled: Dict[str, Any]) -> Dict[str, Any]:
        """Sampled Tune config -> ``{key: value}`` with labels mapped back to their values."""
        return {k: (self.labels[k][v] if k in self.labels else v) for k, v in sampled.items() if k in self.config.space}

    def trial_raw(self, values: Dict[str, Any], trial_name: str) -> Dict[str, Any]:
        """The raw run-config dict of one trial: base + overrides + trial resources + ``values``."""
        raw = copy.deepcopy(self.base_raw)
        for key, value in values.items():
            _apply_value(raw, key, value)
        raw["name"] = trial_name
        raw.setdefault("scaling", {})["storage_path"] = self.runs_path()
        return raw

    def trial_config(self, sampled: Dict[str, Any], trial_id: str) -> RunConfig:
        """The trial's :class:`RunConfig`: named ``trial_<id>`` under :meth:`runs_path`, so a
        restarted trial resumes its own checkpoints and MLflow run."""
        return build_run_config(self.trial_raw(self.decode(sampled), trial_run_name(trial_id)))

    def spec_hash(self) -> str:
        """Digest of what defines the trials (base, overrides, space, trial section)."""
        blob = json.dumps({"base": self.base_raw, "space": {k: v.model_dump() for k, v in self.config.space.items()}},
                          sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]

    def flat_params(self) -> Dict[str, Any]:
        """The search config as flat MLflow params (space entries as ``kind[args]`` text)."""
        c = self.config
        out: Dict[str, Any] = {"tune.name": c.name, "tune.base": self.base_path}
        for k, v in c.overrides.items():
            out[f"tune.overrides.{k}"] = v
        for k, d in c.space.items():
            out[f"tune.space.{k}"] = d.describe()
        for section in ("search", "scheduler", "trial"):
            for k, v in flatten(getattr(c, section).model_dump(mode="json")).items():
                out[f"tune.{section}.{k}"] = v
        return out


def trial_run_name(trial_id: str) -> str:
    """Ray Train run name (and run dir under ``runs/``) of a Tune trial."""
    return f"trial_{trial_id}"


# ----------------------------------------------------------------------------- loading


def load_tune_config(
    source: str | os.PathLike | Dict[str, Any],
    overrides: Sequence[str] = (),
    *,
    base_dir: Optional[str | os.PathLike] = None,
    strict: bool = False,
) -> TuneSearch:
    """Load and validate a tune config from a YAML path (or a dict).

    ``overrides`` are ``KEY=VALUE`` strings (values parsed as YAML). A key starting with a run
    config section (``model.``, ``data.``, ``train.``, ``scaling.``, ``tracking.``) overrides the
    base run config; ``space.<dotted key>=<YAML mapping>`` sets one space entry; any other key
    (``search.num_samples=8``, ``trial.num_workers=4``, ``name=x``) is a key of the tune config.

    The base config is loaded and resolved, and every space key and value checked against it.
    When the base file does not exist or names a model family that is not registered, that
    check is deferred (``TuneSearch.deferred`` says why) unless ``strict``; :func:`run_search`
    always loads strictly.

    Raises:
        ConfigError: unknown/misspelled key (dotted path, closest valid key), a space key that
            does not exist in the base config, a value that gives an invalid run config, an
            algorithm/scheduler combination that cannot work (e.g. ``pbt``, ``optuna`` + ``grid``).
    """
    if isinstance(source, dict):
        raw = copy.deepcopy(source)
        here = Path(base_dir) if base_dir is not None else Path.cwd()
    else:
        path = Path(source)
        raw = read_yaml_mapping(path, "tune config")
        here = Path(base_dir) if base_dir is not None else path.resolve().parent
    for item in overrides:
        apply_tune_override(raw, item)
    cfg: TuneSearchConfig = validate(TuneSearchConfig, raw)
    _check_combinations(cfg)

    base_path = Path(cfg.base) if Path(cfg.base).is_absolute() else (here / cfg.base)
    base_path = base_path.resolve()
    search = TuneSearch(config=cfg, source=None if isinstance(source, dict) else str(Path(source).resolve()),
                        base_path=str(base_path), base_raw={})
    search.labels = _labels(cfg)
    if not base_path.is_file():
        return _defer(search, f"base run config not found: {base_path}", strict)
    try:
        base_raw = yaml.safe_load(base_path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"base {base_path}: not valid YAML: {e}") from None
    if not isinstance(base_raw, dict):
        raise ConfigError(f"base {base_path}: top level must be a mapping")
    family = (base_raw.get("model") or {}).get("family", "gpt") if isinstance(base_raw.get("model"), dict) else "gpt"
    for key, value in cfg.overrides.items():
        if key == "model.family":
            family = value
    from megaray import families

    if family not in families.registry():
        return _defer(search, f"model family {family!r} is not registered (known: {', '.join(sorted(families.registry()))})", strict)

    for key, value in cfg.overrides.items():
        set_dotted(base_raw, key, copy.deepcopy(value))
    _apply_trial_section(base_raw, cfg.trial)
    try:
        base = build_run_config(base_raw)
    except ConfigError as e:
        raise ConfigError(f"base {base_path} with the tune overrides: {e}") from None
    search.base_raw = base_raw
    search.base = base
    _check_space(search)
    _check_scheduler(search)
    return search


def _defer(search: TuneSearch, why: str, strict: bool) -> TuneSearch:
    if strict:
        raise ConfigError(f"{search.source or '<dict>'}: {why}")
    log.warning("%s: %s; space validation deferred until the search runs", search.source or "<dict>", why)
    search.deferred = why
    return search


def apply_tune_override(raw: Dict[str, Any], item: str) -> None:
    """Apply one ``KEY=VALUE`` override to a raw tune config (see :func:`load_tune_config`)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. search.num_samples=8 or train.max_steps=40")
    key, value = (s.strip() for s in item.split("=", 1))
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value
    head = key.split(".", 1)[0]
    if head in RUN_SECTIONS:
        if not isinstance(raw.get("overrides"), dict):
            raw["overrides"] = {}
        raw["overrides"] = flatten(raw["overrides"])
        raw["overrides"][key] = parsed
    elif head in ("space", "overrides") and "." in key:
        rest = key.split(".", 1)[1]
        section = raw.get(head)
        if not isinstance(section, dict):
            section = raw[head] = {}
        if head == "overrides":
            raw["overrides"] = section = flatten(section)
        section[rest] = parsed
    else:
        apply_override(raw, item)


# ----------------------------------------------------------------------------- checks


def _check_combinations(cfg: TuneSearchConfig) -> None:
    algo, sched = cfg.search.algorithm, cfg.scheduler.type
    if sched == "pbt":
        raise ConfigError(
            "scheduler.type: 'pbt' is not supported. Population Based Training pauses trials and restarts "
            "them from another trial's Tune checkpoint with perturbed hyperparameters. A megaray trial is a "
            "Ray Train V2 driver function: its state lives in its own Train run's checkpoints, which "
            "TuneReportCallback passes to Tune only as a path metric, never as a Tune checkpoint, so PBT "
            "has nothing to clone or restore. Use scheduler.type 'asha' (early stopping) or 'fifo'."
        )
    grid_keys = [k for k, d in cfg.space.items() if d.grid is not None]
    if algo == "optuna" and grid_keys:
        raise ConfigError(
            f"space.{grid_keys[0]}: 'grid' does not work with search.algorithm 'optuna' (Optuna proposes "
            f"points itself); use 'choice', or search.algorithm 'grid'/'random'"
        )
    if algo == "grid":
        bad = [k for k, d in cfg.space.items() if d.values is None]
        if bad:
            raise ConfigError(
                f"space.{bad[0]}: search.algorithm 'grid' needs discrete values (grid or choice), got "
                f"{cfg.space[bad[0]].kind}; use search.algorithm 'random' to mix grids with sampled ranges"
            )
    for key in cfg.space:
        _check_not_reserved(key, "space")


def _check_not_reserved(key: str, where: str) -> None:
    for r in RESERVED_KEYS:
        if key == r or key.startswith(r + "."):
            raise ConfigError(
                f"{where}.{key}: cannot be searched: each trial is named trial_<id> and stored under "
                f"<storage>/<search name>/runs, and every trial logs to the base config's tracking settings "
                f"(set those with overrides, the storage root with storage_path)"
            )


def _check_space(search: TuneSearch) -> None:
    base = search.require_base()
    dump = base.model_dump(mode="json")
    valid = sorted(_all_paths(dump))
    for key, dist in search.config.space.items():
        target, found = _lookup(base, key.split("."))
        if not found:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"space.{key}: no key {key!r} in the base config {search.base_path}{hint} "
                f"(space keys are dotted paths of the resolved run config, e.g. train.lr, model.n_layer)"
            )
        values = dist.values
        if values is not None:
            for v in values:
                if isinstance(v, dict):
                    if not isinstance(target, (BaseModel, dict)):
                        raise ConfigError(f"space.{key}: a mapping value {v!r} needs {key!r} to be a section (e.g. model)")
                    for sub in flatten(v):
                        _, ok = _lookup(target, sub.split("."))
                        if not ok:
                            sub_valid = sorted(_all_paths(_dump(target)))
                            close = difflib.get_close_matches(sub, sub_valid, n=1, cutoff=0.6)
                            hint = f"; did you mean {close[0]!r}?" if close else ""
                            raise ConfigError(f"space.{key}: no key {key}.{sub} in the base config{hint}")
            probes = list(values)
        else:
            lo, hi = getattr(dist, dist.kind)
            probes = [lo, hi]
            if dist.kind == "uniform":
                probes.append(lo + 0.371 * (hi - lo))
            elif dist.kind == "loguniform":
                probes.append(math.exp(math.log(lo) + 0.371 * (math.log(hi) - math.log(lo))))
        for v in probes:
            try:
                build_run_config(search.trial_raw({key: v}, "probe"))
            except ConfigError as e:
                hint = ("; an integer key needs randint (or choice/grid)"
                        if dist.kind in ("uniform", "loguniform") and "valid integer" in str(e) else "")
                raise ConfigError(
                    f"space.{key}: value {v!r} ({dist.describe()}) gives an invalid run config{hint}: {e}"
                ) from None


def _check_scheduler(search: TuneSearch) -> None:
    s = search.config.scheduler
    if s.type != "asha":
        return
    max_steps = search.max_steps()
    if s.time_attr == "step":
        max_t = s.max_t or max_steps
        if max_t > max_steps:
            raise ConfigError(
                f"scheduler.max_t: {max_t} exceeds train.max_steps ({max_steps}); trials end at step "
                f"{max_steps}, so rungs past it are never reached (lower max_t or raise train.max_steps)"
            )
        if s.grace_period >= max_t:
            raise ConfigError(f"scheduler.grace_period ({s.grace_period}) must be below max_t ({max_t})")
    elif s.max_t is None:
        raise ConfigError(f"scheduler.max_t: required when time_attr is {s.time_attr!r} (only 'step' defaults to train.max_steps)")
    metric = search.config.search.metric
    base = search.require_base()
    if metric.startswith("val_") and base.train.eval_every > s.grace_period and s.time_attr == "step":
        log.warning(
            "scheduler.grace_period (%d) < train.eval_every (%d): %s is only reported at evals, so ASHA's first "
            "decision comes at step %d", s.grace_period, base.train.eval_every, metric, base.train.eval_every,
        )


# ----------------------------------------------------------------------------- helpers


def _apply_trial_section(raw: Dict[str, Any], trial: TrialSection) -> None:
    scaling = raw.setdefault("scaling", {})
    if not isinstance(scaling, dict):
        raise ConfigError("scaling: must be a mapping")
    if trial.num_workers is not None:
        scaling["num_workers"] = trial.num_workers
    if trial.use_gpu is not None:
        scaling["use_gpu"] = trial.use_gpu
    if trial.resources_per_worker is not None:
        scaling["resources_per_worker"] = dict(trial.resources_per_worker)


def _apply_value(raw: Dict[str, Any], key: str, value: Any) -> None:
    if isinstance(value, dict):
        for sub, v in flatten(value).items():
            set_dotted(raw, f"{key}.{sub}", copy.deepcopy(v))
    else:
        set_dotted(raw, key, copy.deepcopy(value))


def _lookup(obj: Any, parts: List[str]) -> Tuple[Any, bool]:
    """Walk a resolved config by attribute (pydantic models) or key (plain dict fields, where any
    key is allowed, e.g. ``scaling.resources_per_worker.GPU``)."""
    for i, p in enumerate(parts):
        if isinstance(obj, BaseModel):
            if p not in type(obj).model_fields:
                return None, False
            obj = getattr(obj, p)
        elif isinstance(obj, dict):
            return obj.get(p), True
        else:
            return None, False
    return obj, True


def _dump(obj: Any) -> Dict[str, Any]:
    return obj.model_dump(mode="json") if isinstance(obj, BaseModel) else dict(obj)


def _all_paths(d: Dict[str, Any], prefix: str = "") -> List[str]:
    out = []
    for k, v in d.items():
        out.append(prefix + k)
        if isinstance(v, dict):
            out.extend(_all_paths(v, f"{prefix}{k}."))
    return out


def _labels(cfg: TuneSearchConfig) -> Dict[str, Dict[str, Any]]:
    """String labels for choice/grid values that are not scalars (Optuna and Tune's tables need
    scalars); ``{key: {label: value}}``."""
    out: Dict[str, Dict[str, Any]] = {}
    for key, dist in cfg.space.items():
        vals = dist.values
        if vals is None or all(isinstance(v, PRIMITIVE) for v in vals):
            continue
        table: Dict[str, Any] = {}
        for v in vals:
            if isinstance(v, dict):
                label = ",".join(f"{k}={json.dumps(x) if not isinstance(x, str) else x}" for k, x in flatten(v).items())
            else:
                label = json.dumps(v, default=str)
            base, n = label, 2
            while label in table:
                label, n = f"{base}#{n}", n + 1
            table[label] = v
        out[key] = table
    return out
