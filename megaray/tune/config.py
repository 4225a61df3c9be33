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

This module is Ray-free: it parses and validates (the base through
:func:`megaray.families.build_run_config`, overrides through :func:`megaray.config.parse_override`,
the space through :mod:`megaray.tune.space`), checks that the data trial 0 reads is prepared, and
turns a sampled point into a trial's :class:`~megaray.config.RunConfig`.
:mod:`megaray.tune.search` wires it into Ray Tune.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence

from pydantic import Field, model_validator

from megaray.config import (
    ConfigError,
    RunConfig,
    StrictConfig,
    flatten,
    key_origins,
    load_layered,
    parse_override,
    read_yaml_mapping,
    set_dotted,
    validate,
)
from megaray.errors import DataError
from megaray.families import build_run_config
from megaray.tune.space import Distribution, check_space, labels

log = logging.getLogger("megaray.tune")

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
RUN_SECTIONS = ("model", "data", "train", "scaling", "tracking", "eval", "generation")
# Keys a trial sets itself: a search over them would break resume or tracking.
RESERVED_KEYS = ("name", "scaling.storage_path", "tracking")


# ----------------------------------------------------------------------------- schema


class SearchSection(StrictConfig):
    """How points are proposed and what is optimised."""

    algorithm: Literal["random", "optuna", "grid"] = Field(
        "random", description="random = Tune's BasicVariantGenerator; optuna = Optuna TPE; grid = every grid point"
    )
    num_samples: int = Field(4, gt=0, description="trials (random/optuna); repeats of the whole grid (grid values)")
    max_concurrent_trials: Optional[int] = Field(
        None, gt=0, description="trials running at once; None = as resources allow"
    )
    metric: str = Field(
        "val_loss", description="reported metric to optimise (val_loss is reported every train.eval_every)"
    )
    mode: Literal["min", "max"] = "min"
    seed: Optional[int] = Field(0, description="seed of the search algorithm (None = random)")


class SchedulerSection(StrictConfig):
    """Trial scheduler. ``asha`` stops trials whose metric at a rung (grace_period,
    grace_period*rf, ...) is worse than the rung's top 1/reduction_factor."""

    type: Literal["fifo", "asha", "pbt"] = "fifo"
    time_attr: str = Field(
        "step",
        description="progress measure of max_t/grace_period: a reported metric (step, tokens) or training_iteration",
    )
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
    base: str = Field(
        ...,
        description="base run config (YAML path, relative to this file; it may itself extend "
        "another through its own base:, see megaray.config.load_layered)",
    )
    overrides: Dict[str, Any] = Field(
        default_factory=dict, description="dotted overrides of the base, e.g. {train.max_steps: 40}"
    )
    space: Dict[str, Distribution] = Field(..., min_length=1)
    search: SearchSection = Field(default_factory=SearchSection)
    scheduler: SchedulerSection = Field(default_factory=SchedulerSection)
    trial: TrialSection = Field(default_factory=TrialSection)
    storage_path: Optional[str] = Field(
        None, description="where the search lives; None = the base's scaling.storage_path"
    )

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
    """A loaded search: the config, its resolved base run config and the space's labels.

    Attributes:
        config: the validated :class:`TuneSearchConfig`.
        source: the YAML file it came from (None for a dict).
        base_path: absolute path of the base run config.
        base_raw: the base YAML as a dict, with ``overrides`` and the ``trial`` section applied.
        base: the resolved base :class:`RunConfig` (None while validation is deferred).
        deferred: why base validation was deferred (None when it ran), see :func:`load_tune_config`.
        labels: ``{key: {label: value}}`` for non-scalar choices (see :func:`megaray.tune.space.labels`).
        cwd: the search driver's working directory: relative data paths of every trial resolve
            against it (a trial's driver runs in Ray's own working directory).
    """

    config: TuneSearchConfig
    source: Optional[str]
    base_path: str
    base_raw: Dict[str, Any]
    base: Optional[RunConfig] = None
    deferred: Optional[str] = None
    labels: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    cwd: str = field(default_factory=os.getcwd)

    @property
    def name(self) -> str:
        return self.config.name

    def require_base(self) -> RunConfig:
        """The resolved base config; raises ConfigError when it could not be loaded."""
        if self.base is None:
            raise ConfigError(f"base {self.base_path}: {self.deferred}")
        return self.base

    def storage(self) -> str:
        """Absolute (local, resolved against :attr:`cwd`) or URI storage root of the search."""
        p = self.config.storage_path or self.require_base().scaling.storage_path
        return p if "://" in p else str(Path(self.cwd).joinpath(Path(p).expanduser()).resolve())

    def experiment_path(self) -> str:
        """``<storage>/<name>``: the Tune experiment (trial dirs, experiment state)."""
        return f"{self.storage().rstrip('/')}/{self.name}"

    def runs_path(self) -> str:
        """``<storage>/<name>/runs``: where each trial's Ray Train run (checkpoints) lives."""
        return f"{self.experiment_path()}/runs"

    def max_steps(self) -> int:
        return self.require_base().train.max_steps

    def decode(self, sampled: Dict[str, Any]) -> Dict[str, Any]:
        """Sampled Tune config -> ``{key: value}`` with labels mapped back to their values."""
        return {k: (self.labels[k][v] if k in self.labels else v) for k, v in sampled.items() if k in self.config.space}

    def trial_raw(self, values: Dict[str, Any], trial_name: str) -> Dict[str, Any]:
        """The raw run-config dict of one trial: base + overrides + trial resources + ``values``."""
        raw = copy.deepcopy(self.base_raw)
        for key, value in values.items():
            pairs = flatten(value, f"{key}.") if isinstance(value, dict) else {key: value}
            for k, v in pairs.items():
                set_dotted(raw, k, copy.deepcopy(v))
        raw["name"] = trial_name
        raw.setdefault("scaling", {})["storage_path"] = self.runs_path()
        return raw

    def trial_config(self, sampled: Dict[str, Any], trial_id: str) -> RunConfig:
        """The trial's :class:`RunConfig`: named ``trial_<id>`` under :meth:`runs_path`, so a
        restarted trial resumes its own checkpoints and MLflow run. Data paths are absolute
        (resolved against :attr:`cwd`)."""
        return self._build(self.decode(sampled), trial_run_name(trial_id))

    def _build(self, values: Dict[str, Any], name: str) -> RunConfig:
        from megaray.train.launch import resolve_paths

        return resolve_paths(build_run_config(self.trial_raw(values, name)), base_dir=self.cwd)

    def check_data(self) -> None:
        """The data a trial reads is prepared: the base config's (with overrides and the trial
        section) and every value a searched ``data.*`` key can take. Manifests only, no Ray.

        Raises:
            DataError: a shard folder is missing or unfinished; names the folder and the
                ``megaray prepare ...`` command that writes it.
        """
        points: List[Dict[str, Any]] = [{}]
        for key, dist in self.config.space.items():
            if key.split(".")[0] == "data":
                points += [{key: v} for v in dist.probes()]
        for point in points:
            # paths as the user wrote them (this runs on the search driver, in cwd)
            check_data(build_run_config(self.trial_raw(point, trial_run_name("check"))), self.base_path)

    def spec_hash(self) -> str:
        """Digest of what defines the trials (base, overrides, space, trial section)."""
        blob = json.dumps(
            {"base": self.base_raw, "space": {k: v.model_dump() for k, v in self.config.space.items()}},
            sort_keys=True,
            default=str,
        )
        return hashlib.sha1(blob.encode()).hexdigest()[:12]

    def flat_params(self) -> Dict[str, Any]:
        """The search config as flat MLflow params (space entries as ``kind[args]`` text)."""
        c = self.config
        out: Dict[str, Any] = {"tune.name": c.name, "tune.base": self.base_path}
        out.update({f"tune.overrides.{k}": v for k, v in c.overrides.items()})
        out.update({f"tune.space.{k}": d.describe() for k, d in c.space.items()})
        for section in ("search", "scheduler", "trial"):
            out.update(
                {f"tune.{section}.{k}": v for k, v in flatten(getattr(c, section).model_dump(mode="json")).items()}
            )
        return out


def trial_run_name(trial_id: str) -> str:
    """Ray Train run name (and run dir under ``runs/``) of a Tune trial."""
    return f"trial_{trial_id}"


def check_data(cfg: RunConfig, base_path: str = "") -> None:
    """Every shard folder ``cfg`` reads has a finished manifest: the cheap part of the training
    task's driver-side check (one small read per folder through
    :func:`megaray.data.manifest.read_manifest`, no Ray).

    Raises:
        DataError: the reader's message (folder missing, unfinished or corrupt) naming the exact
            command that prepares the folder for this config (:meth:`Task.prepare_command`).
    """
    from megaray import families
    from megaray.data.manifest import read_manifest

    task = families.task_class(cfg.model.family, cfg.train.task)(cfg)
    where = f"data.shards of {base_path}" if base_path else "data.shards"
    for source in cfg.data.resolved_sources():
        try:
            read_manifest(source.shards, command=task.prepare_command(source.shards))
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
    if cfg.data.val_shards:
        try:
            read_manifest(cfg.data.val_shards, command=task.prepare_command(cfg.data.val_shards))
        except DataError as e:
            raise DataError(f"data.val_shards{where.removeprefix('data.shards')}: {e}") from None


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
    config section (``model.``, ``data.``, ``train.``, ``scaling.``, ``tracking.``, ``eval.``,
    ``generation.``) overrides the base run config; ``space.<dotted key>=<YAML mapping>`` sets one
    space entry; any other key
    (``search.num_samples=8``, ``trial.num_workers=4``, ``name=x``) is a key of the tune config.

    The base config is loaded and resolved, and every space key and value checked against it.
    When the base file does not exist or names a model family that is not registered, that
    check is deferred (``TuneSearch.deferred`` says why) unless ``strict``; :func:`run_search`
    always loads strictly. The data is checked by :meth:`TuneSearch.check_data`, not here.

    Raises:
        ConfigError: unknown/misspelled key (dotted path, closest valid key), a space key that
            does not exist in the base config, a value that gives an invalid run config, an
            algorithm/scheduler combination that cannot work (e.g. ``pbt``, ``optuna`` + ``grid``).
    """
    if isinstance(source, dict):
        raw = copy.deepcopy(source)
        here = Path(base_dir) if base_dir is not None else Path.cwd()
    else:
        raw = read_yaml_mapping(source, "tune config")
        here = Path(base_dir) if base_dir is not None else Path(source).resolve().parent
    for item in overrides:
        apply_tune_override(raw, item)
    cfg: TuneSearchConfig = validate(TuneSearchConfig, raw)
    _check_combinations(cfg)

    base_path = (here / cfg.base).resolve()  # an absolute base stays itself
    search = TuneSearch(
        config=cfg,
        source=None if isinstance(source, dict) else str(Path(source).resolve()),
        base_path=str(base_path),
        base_raw={},
        labels=labels(cfg.space),
    )
    if not base_path.is_file():
        return _defer(search, f"base run config not found: {base_path}", strict)
    layered = load_layered(base_path, what="base run config")  # its own base: chain merged
    base_raw = layered.raw
    for key, value in cfg.overrides.items():
        set_dotted(base_raw, key, copy.deepcopy(value))
        layered.origins[key] = f"{search.source or '<dict>'} overrides"
    family = (base_raw.get("model") or {}).get("family", "gpt") if isinstance(base_raw.get("model"), dict) else "gpt"
    from megaray import families

    if family not in families.registry():
        return _defer(
            search,
            f"model family {family!r} is not registered (known: {', '.join(sorted(families.registry()))})",
            strict,
        )
    _apply_trial_section(base_raw, cfg.trial)
    try:
        with key_origins(layered.origins):
            search.base = build_run_config(base_raw)
    except ConfigError as e:
        raise ConfigError(f"base {base_path} with the tune overrides: {e}") from None
    if search.base.tracking.enabled:  # every trial logs where this (the search) driver's default points
        set_dotted(base_raw, "tracking.tracking_uri", search.base.tracking.resolved_uri())
        search.base = build_run_config(base_raw)
    search.base_raw = base_raw
    check_space(search)
    _check_scheduler(search)
    return search


def _defer(search: TuneSearch, why: str, strict: bool) -> TuneSearch:
    if strict:
        raise ConfigError(f"{search.source or '<dict>'}: {why}")
    log.warning("%s: %s; space validation deferred until the search runs", search.source or "<dict>", why)
    search.deferred = why
    return search


def apply_tune_override(raw: Dict[str, Any], item: str) -> None:
    """Apply one ``KEY=VALUE`` override to a raw tune config (routing: see :func:`load_tune_config`)."""
    key, value = parse_override(item)
    head, _, rest = key.partition(".")
    if head in RUN_SECTIONS:
        section, key = "overrides", key
    elif head in ("space", "overrides") and rest:
        section, key = head, rest
    else:
        set_dotted(raw, key, value, where=f"override {item!r}")
        return
    if not isinstance(raw.get(section), dict):
        raw[section] = {}
    if section == "overrides":
        raw[section] = flatten(raw[section])
    raw[section][key] = value  # a dotted key is one entry here (flat overrides, space keys)


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
    bad = [k for k, d in cfg.space.items() if d.values is None]
    if algo == "grid" and bad:
        raise ConfigError(
            f"space.{bad[0]}: search.algorithm 'grid' needs discrete values (grid or choice), got "
            f"{cfg.space[bad[0]].kind}; use search.algorithm 'random' to mix grids with sampled ranges"
        )
    for key in cfg.space:
        if any(key == r or key.startswith(r + ".") for r in RESERVED_KEYS):
            raise ConfigError(
                f"space.{key}: cannot be searched: each trial is named trial_<id> and stored under "
                f"<storage>/<search name>/runs, and every trial logs to the base config's tracking settings "
                f"(set those with overrides, the storage root with storage_path)"
            )


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
        raise ConfigError(
            f"scheduler.max_t: required when time_attr is {s.time_attr!r} (only 'step' defaults to train.max_steps)"
        )
    eval_every = search.require_base().train.eval_every
    if search.config.search.metric.startswith("val_") and eval_every > s.grace_period and s.time_attr == "step":
        log.warning(
            "scheduler.grace_period (%d) < train.eval_every (%d): %s is only reported at evals, so ASHA's "
            "first decision comes at step %d",
            s.grace_period,
            eval_every,
            search.config.search.metric,
            eval_every,
        )


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
