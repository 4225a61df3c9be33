"""Typed run configuration: pydantic v2 models, YAML loading, presets and dotted overrides.

A run config is one YAML file::

    name: demo                      # run name; re-running with the same name resumes
    model: {family: gpt, preset: debug, n_layer: 4}
    data:  {shards: data/stdlib, batch_size: 8}
    train: {max_steps: 300, lr: 3.0e-4, zero_stage: 2}
    scaling: {num_workers: 2}
    tracking: {experiment: megaray}

``model`` is resolved through :mod:`megaray.families`: ``family`` picks the config
class, ``preset`` names one of that family's presets, every other key overrides a field.

Every error is a :class:`ConfigError` that names the full dotted key path (``model.n_layr``) and,
for a misspelled key, the closest valid key.
"""

from __future__ import annotations

import copy
import difflib
import os
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, ClassVar, Dict, Iterator, List, Literal, Optional, Sequence, Tuple, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, model_validator

from megaray.errors import ConfigError


class StrictConfig(BaseModel):
    """Base of every megaray config: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class RunPath:
    """Marks a ``str`` field as a path: ``Annotated[Optional[str], RunPath()]``. A local path is made
    absolute once, on the driver, against its working directory
    (:func:`megaray.train.launch.resolve_paths`, through :func:`map_paths`), because Ray Train
    workers and Tune trials run in Ray's own working directory; a URI (``s3://``) is kept. Any
    section may mark fields, a family's sections too: nothing lists them."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class CheckpointPath(RunPath):
    """A :class:`RunPath` naming a checkpoint: a checkpoint or run directory, or a ``models:/`` URI of
    the MLflow Model Registry (resolved to its checkpoint at the run's tracking URI)."""


#: a path field (made absolute on the driver); ``OptionalPath`` may be None
PathStr = Annotated[str, RunPath()]
OptionalPath = Annotated[Optional[str], RunPath()]


def map_paths(config: BaseModel, fn: Callable[[str, RunPath], str]) -> Any:
    """A deep copy of ``config`` with ``fn(value, marker)`` applied to every non-empty field marked
    :class:`RunPath` (or :class:`CheckpointPath`), found by type wherever it is: in sections, lists
    and mappings of sections, and a family's sections (a :class:`RunConfig`'s extras)."""
    out = config.model_copy(deep=True)
    _map_paths(out, fn)
    return out


def _map_paths(obj: Any, fn: Callable[[str, RunPath], str]) -> None:
    if isinstance(obj, BaseModel):
        for name, info in type(obj).model_fields.items():
            marker = next((m for m in info.metadata if isinstance(m, RunPath)), None)
            value = getattr(obj, name)
            if marker is not None:
                if isinstance(value, str) and value:
                    setattr(obj, name, fn(value, marker))
            else:
                _map_paths(value, fn)
        for value in (obj.model_extra or {}).values():
            _map_paths(value, fn)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _map_paths(value, fn)
    elif isinstance(obj, dict):
        for value in obj.values():
            _map_paths(value, fn)


class ModelConfig(StrictConfig):
    """Base of every model family's config.

    Subclasses set ``family`` (a ``Literal``) and fill ``PRESETS`` with named field overrides.
    """

    PRESETS: ClassVar[Dict[str, Dict[str, Any]]] = {}
    family: str
    preset: Optional[str] = Field(default=None, description="preset this config started from")

    @classmethod
    def from_name(cls, name: Optional[str] = None, **overrides: Any) -> "ModelConfig":
        """Build a config from preset ``name`` (or the class defaults when ``None``) with overrides.

        Raises:
            ConfigError: unknown preset (the message lists the valid ones) or invalid fields.
        """
        base: Dict[str, Any] = {}
        if name is not None:
            if name not in cls.PRESETS:
                raise ConfigError(
                    f"model.preset: unknown preset {name!r} for family {cls.model_fields['family'].default!r}"
                    f"{suggest(name, cls.PRESETS)}; valid presets: {', '.join(sorted(cls.PRESETS))}"
                )
            base = dict(cls.PRESETS[name])
        base.update(overrides)
        base["preset"] = name
        return validate(cls, base, prefix="model")


# ----------------------------------------------------------------------------- run sections


class DataSource(StrictConfig):
    """One prepared shard set in a weighted mixture."""

    shards: PathStr = Field(..., description="directory written by `megaray prepare` (local, s3://, gs://)")
    weight: float = Field(1.0, gt=0, description="relative share of training batches drawn from this source")


class DataConfig(StrictConfig):
    """Where training data comes from and how it is batched (per worker).

    Either ``shards`` (one prepared set) or ``sources`` (a weighted mixture; its order is a
    function of (seed, epoch, position), so resume stays exact). Paths are resolved once, on
    the driver.
    """

    shards: PathStr = Field("data/stdlib", description="directory written by `megaray prepare` (local, s3://, gs://)")
    sources: Optional[List[DataSource]] = Field(
        None, min_length=1, description="weighted mixture [{shards, weight}]; replaces `shards` when given"
    )
    batch_size: int = Field(8, gt=0, description="micro-batch size per worker (sequences)")
    shuffle_block: int = Field(
        1 << 16,
        ge=0,
        description="samples permuted together in a positioned stream (a "
        "resume re-reads one block; memory holds one); 0 = stream order, no shuffling",
    )
    num_val_batches: int = Field(8, gt=0, description="validation batches per worker per eval")
    val_shards: OptionalPath = Field(
        None,
        description="a separate prepared folder to validate on (text families): its val split, or its train "
        "split when its val split is empty; must share the train shards' tokenizer. None = the val split of "
        "data.shards / data.sources",
    )
    on_corrupt: Literal["error", "skip"] = Field(
        "error", description="a shard row group that cannot be read: end the run naming it, or skip and count it"
    )

    def resolved_sources(self) -> List[DataSource]:
        """``sources``, or ``shards`` as a one-entry mixture of weight 1."""
        return list(self.sources) if self.sources else [DataSource(shards=self.shards)]


class ModuleOptim(StrictConfig):
    """Optimizer settings of one named module (e.g. a GAN discriminator ``disc``); unset = ``train.*``."""

    lr: Optional[float] = Field(None, gt=0)
    min_lr: Optional[float] = Field(None, ge=0)
    betas: Optional[List[float]] = Field(None, min_length=2, max_length=2)
    weight_decay: Optional[float] = Field(None, ge=0)


class GrokfastConfig(StrictConfig):
    """Grokfast EMA gradient filter (Lee et al. 2024, arXiv:2405.20233): ``g + lamb * EMA_alpha(g)``."""

    alpha: float = Field(0.98, ge=0, lt=1, description="EMA momentum")
    lamb: float = Field(2.0, ge=0, description="amplification of the slow gradient component")


class GuardConfig(StrictConfig):
    """The training guard (``megaray.train.guard``): after each optimizer step, the all-reduced
    loss and the gradient norms are judged; a non-finite value or a spike rolls the run back to
    its last checkpoint and skips that step's samples from then on."""

    enabled: bool = Field(True, description="judge every optimizer step; false = train through anything")
    spike_factor: float = Field(
        10.0, gt=1, description="a loss or gradient norm above this x its running median is a spike"
    )
    window: int = Field(50, ge=1, description="good steps the running median looks back on")
    min_history: int = Field(10, ge=1, description="good steps before spikes are judged (non-finite: always)")
    max_bad_in_a_row: int = Field(
        3, ge=1, description="bad steps with no good one between after which the run stops instead of rolling back"
    )


class StragglerConfig(StrictConfig):
    """Per-rank timing and straggler detection (``megaray.train.stragglers``; runs with more than
    one worker): per-rank step, data-wait, compute, forward and wait times as
    ``system/rank/<r>/...`` metrics at each log step, and a console warning naming a rank whose own
    pace (step time less its wait for the others) or forward time is ``factor`` x the median
    rank's for ``patience`` log windows in a row."""

    enabled: bool = Field(
        True, description="time every rank (one tiny all-reduce per step; runs with more than one worker)"
    )
    factor: float = Field(1.5, gt=1, description="a rank this many times slower than the median rank is slow")
    patience: int = Field(
        2, ge=1, description="log windows (train.log_every steps) in a row before a slow rank is named"
    )


class WatchdogConfig(StrictConfig):
    """The hang watchdog (``megaray.train.watchdog``): a rank stuck in one phase of the loop
    (start-up, step, evaluation, checkpoint) past its timeout dumps every thread's Python stack
    into ``<run_dir>/watchdog/`` and stderr and stops its process, so Ray Train restarts the group
    from the last checkpoint. Step, eval and checkpoint time out after ``factor`` x the median of
    that phase's durations so far, never below the phase's floor."""

    enabled: bool = Field(True, description="watch every rank's phases; false = wait on a hung rank forever")
    factor: float = Field(10.0, gt=1, description="a phase times out after this x its median duration so far")
    startup_timeout_s: float = Field(
        1800.0, gt=0, description="worker start to the end of the first optimizer step (fixed timeout)"
    )
    step_timeout_s: float = Field(600.0, gt=0, description="floor of an optimizer step's timeout (data wait included)")
    eval_timeout_s: float = Field(1800.0, gt=0, description="floor of an evaluation's timeout")
    checkpoint_timeout_s: float = Field(
        1800.0, gt=0, description="floor of a checkpoint save's (or the guard's rollback's) timeout"
    )


class TrainConfig(StrictConfig):
    """Optimisation and loop settings. Steps count optimizer steps (after accumulation)."""

    max_steps: int = Field(300, gt=0)
    lr: float = Field(3e-4, gt=0)
    min_lr: float = Field(3e-5, ge=0, description="floor of the cosine decay")
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: List[float] = Field(default_factory=lambda: [0.9, 0.95], min_length=2, max_length=2)
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 disables")
    grad_accum_steps: int = Field(
        1,
        gt=0,
        description="micro-batches per optimizer step at the largest world size "
        "(derived from global_batch_size at other sizes)",
    )
    global_batch_size: Optional[int] = Field(
        None,
        gt=0,
        description="samples per optimizer step at every world size; None = batch_size x "
        "grad_accum_steps x max workers. Another world size accumulates global / (batch_size x world) micro-batches",
    )
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="auto = bf16 on GPUs that support it, else fp32 (logged); fp16 = DeepSpeed's fp16 with "
        "its dynamic loss scaler (CUDA only: DeepSpeed's CPU accelerator has no fp16, so CPU falls back to fp32, "
        "logged)",
    )
    offload: Literal["none", "optimizer", "all"] = Field(
        "none",
        description="ZeRO-Offload to CPU memory: optimizer = optimizer states (stage 1-3), all = optimizer "
        "states and parameters (ZeRO-Infinity's CPU side; stage 3)",
    )
    deepspeed: Dict[str, Any] = Field(
        default_factory=dict,
        description="any further DeepSpeed config (deepspeed.ai/docs/config-json), deep-merged "
        "into the one megaray generates and validated by DeepSpeed's config model before workers start; keys "
        "megaray sets from its own fields (batch sizes, accumulation, clipping, ZeRO stage, precision, optimizer, "
        "scheduler) are refused with the field to set instead",
    )
    eval_every: int = Field(100, gt=0)
    checkpoint_every: int = Field(100, gt=0)
    log_every: int = Field(10, gt=0)
    seed: int = 1337
    peak_flops: Optional[float] = Field(None, description="device peak FLOP/s for MFU; None = look up")
    ema_decay: Optional[float] = Field(
        None,
        gt=0,
        lt=1,
        description="EMA of the model's weights (e.g. 0.9999), saved in checkpoints and used "
        "for evaluation and sampling; None = off",
    )
    modules: Dict[str, ModuleOptim] = Field(
        default_factory=dict, description="per-module optimizer settings by module name, e.g. {disc: {lr: 1e-4}}"
    )
    guard: GuardConfig = Field(
        default_factory=GuardConfig,
        description="NaN and loss-spike guard: roll back to the last checkpoint and skip the bad step's samples",
    )
    stragglers: StragglerConfig = Field(
        default_factory=StragglerConfig,
        description="per-rank system/rank/<r>/... timings at each log step and a warning naming a persistently "
        "slow rank",
    )
    watchdog: WatchdogConfig = Field(
        default_factory=WatchdogConfig,
        description="per-phase timeouts on every rank: a hung rank dumps its stacks and fails, so the group restarts",
    )
    grokfast: Optional[GrokfastConfig] = Field(
        None,
        description="Grokfast EMA gradient filter before every optimizer step (megaray.train.grokfast); null = off",
    )
    compile: bool = Field(False, description="torch.compile the model through DeepSpeed's engine.compile()")
    init_from: Annotated[Optional[str], CheckpointPath()] = Field(
        None,
        description="checkpoint (or run directory: its latest) whose model weights start this run "
        "(fine-tuning); optimizer and step start fresh; a resumed run keeps its own checkpoint instead",
    )
    task: Optional[str] = Field(
        None,
        description="training task; None = the family's own (gpt: causal LM); 'sft' = supervised "
        "fine-tuning on `megaray prepare sft` shards (the family's `tasks`)",
    )

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.offload == "all" and self.zero_stage != 3:
            raise ValueError(
                f"offload 'all' moves parameters to CPU, which needs zero_stage 3 (got {self.zero_stage}); "
                "set zero_stage 3, or offload 'optimizer'"
            )
        if self.offload != "none" and self.zero_stage == 0:
            raise ValueError(
                "offload needs ZeRO (zero_stage 1-3): stage 0 keeps no partitioned optimizer state to move"
            )
        if self.grokfast is not None and self.zero_stage == 3:
            raise ValueError(
                "grokfast needs zero_stage <= 2: the filter reads every parameter's full gradient each "
                "step, which ZeRO-3's partitioning is meant to avoid (untested path); set zero_stage 2"
            )
        for name in self.modules:
            opt = self.optim_for(name)
            if opt.min_lr > opt.lr:
                raise ValueError(f"modules.{name}: min_lr ({opt.min_lr}) must not exceed lr ({opt.lr})")
        return self

    def optim_for(self, module: str) -> ModuleOptim:
        """Optimizer settings of module ``module`` with every field set: ``modules[module]``, unset
        fields from ``train.*``; an unset ``min_lr`` keeps ``train``'s ratio ``min_lr / lr``."""
        m = self.modules.get(module) or ModuleOptim()
        lr = m.lr if m.lr is not None else self.lr
        min_lr = m.min_lr if m.min_lr is not None else (self.min_lr if m.lr is None else lr * self.min_lr / self.lr)
        return ModuleOptim(
            lr=lr,
            min_lr=min_lr,
            betas=list(m.betas or self.betas),
            weight_decay=m.weight_decay if m.weight_decay is not None else self.weight_decay,
        )


class ScalingSection(StrictConfig):
    """Maps onto Ray Train's ScalingConfig, FailureConfig, CheckpointConfig and RunConfig."""

    num_workers: int | List[int] = Field(
        2,
        description="Ray Train workers: a number, or [min, max] for elastic training (Ray Train V2 starts "
        "with what the cluster offers, at least min, and grows up to max)",
    )
    elastic_resize_s: float = Field(
        60.0,
        gt=0,
        description="an elastic run checks this often whether the "
        "cluster offers more workers (restarting the run at step 0 to use them; from the first "
        "checkpoint on, the run keeps that checkpoint's worker count)",
    )
    use_gpu: Union[bool, Literal["auto"]] = Field(
        "auto",
        description="train on GPUs (one per worker); auto = when the Ray cluster has GPUs at launch (an "
        "autoscaling cluster whose GPU nodes start on demand shows none yet: set true there)",
    )
    resources_per_worker: Dict[str, float] = Field(default_factory=lambda: {"CPU": 1})
    max_failures: int = Field(2, ge=-1, description="worker-group restarts from the last checkpoint; -1 = forever")
    num_to_keep: int = Field(2, gt=0, description="checkpoints kept")
    storage_path: str = Field("runs", description="shared storage for checkpoints (local dir, s3://, gs://)")
    data_label_selector: Dict[str, str] = Field(
        default_factory=dict,
        description="Ray node labels every Ray Data task and actor of the run's datasets "
        "must match (Ray Data ExecutionOptions.label_selector), e.g. {megaray.io/role: data} for the CPU data "
        "nodes of cluster/; {} = any node",
    )

    @model_validator(mode="after")
    def _check_workers(self) -> "ScalingSection":
        n = self.num_workers
        if isinstance(n, list) and not (len(n) == 2 and 0 < n[0] <= n[1]):
            raise ValueError(
                f"num_workers: {n} is not [min, max] with 0 < min <= max; give a number or two, such as [1, 4]"
            )
        if isinstance(n, int) and n < 1:
            raise ValueError(f"num_workers: {n} must be at least 1")
        return self

    @property
    def min_workers(self) -> int:
        """Fewest workers the run starts with (``num_workers`` when fixed)."""
        return self.num_workers[0] if isinstance(self.num_workers, list) else self.num_workers

    @property
    def max_workers(self) -> int:
        """Most workers the run grows to (``num_workers`` when fixed)."""
        return self.num_workers[1] if isinstance(self.num_workers, list) else self.num_workers

    def ray_num_workers(self) -> int | tuple:
        """``num_workers`` as Ray Train's ``ScalingConfig`` takes it: an int, or ``(min, max)``."""
        return tuple(self.num_workers) if isinstance(self.num_workers, list) else self.num_workers


class WandbConfig(StrictConfig):
    """``tracking.wandb``: the run's metrics, samples and config in Weights & Biases too
    (:mod:`megaray.train.trackers`; needs ``pip install wandb``)."""

    project: Optional[str] = Field(None, description="W&B project; None = tracking.experiment")
    entity: Optional[str] = Field(None, description="W&B team or user; None = the logged-in default")
    mode: Literal["online", "offline", "disabled"] = Field(
        "online", description="online: stream to W&B; offline: write the run locally for `wandb sync`; disabled: off"
    )
    dir: Optional[str] = Field(
        None,
        description="folder for W&B's local files (wandb/<run>/); None = the run folder when "
        "scaling.storage_path is local, else W&B's default (./wandb on the rank-0 worker)",
    )


#: keys of ``tracking:`` that moved to the text families' ``eval:`` section, with their old defaults
_MOVED_TRACKING_KEYS: Dict[str, Any] = {"sample_prompt": "The ", "sample_tokens": 48}


class TrackingConfig(StrictConfig):
    """MLflow settings (MLflow is the default tracker; ``enabled`` switches it), and the optional
    TensorBoard and W&B trackers beside it. tracking_uri None = $MLFLOW_TRACKING_URI, else
    sqlite:///mlflow.db."""

    enabled: bool = True
    tracking_uri: Optional[str] = None
    experiment: str = "megaray"
    system_metrics_interval_s: float = Field(
        10.0,
        ge=0,
        description="seconds between system metrics samples (CPU, memory, GPU) on every node's first worker, "
        "as system/<node>/...; 0 = off",
    )
    log_model: bool = Field(
        True,
        description="log the final checkpoint as an MLflow pyfunc model (families that have one; not in Tune trials)",
    )
    register_model: Optional[str] = Field(
        None,
        description="at the end of a run, register its best checkpoint (by register_metric) as a new version "
        "of this Model Registry name (not in Tune trials)",
    )
    register_metric: str = Field(
        "val_loss",
        pattern=r"^((min|max):)?[\w./-]+$",
        description="metric that picks the best checkpoint to register: a name (minimised), min:NAME or max:NAME "
        "(e.g. max:hellaswag_acc); no checkpoint with it: the newest is registered",
    )
    log_checkpoints: bool = Field(
        True,
        description="every checkpoint an MLflow LoggedModel (models:/<model_id>) with the step's metrics; "
        "its weights stay where the checkpoint lies (tag megaray.checkpoint), nothing is uploaded",
    )
    tensorboard: bool = Field(
        False,
        description="also write TensorBoard event files (the same metrics and steps as MLflow, eval "
        "images, audio and texts) to <storage_path>/<name>/tensorboard/; with remote storage they are written on "
        "the rank-0 worker under $TMPDIR/megaray-tensorboard/<name>-<hash>/ and copied there every minute and at the end "
        "(pip install tensorboard)",
    )
    wandb: Optional[WandbConfig] = Field(
        None,
        description="also log to Weights & Biases: {project, entity, mode: online|offline|disabled, dir}; "
        "None = off (pip install wandb)",
    )

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        """``sample_prompt``/``sample_tokens`` moved to the text families' ``eval:`` section: with
        their old defaults (an older megaray's config.yaml of every run) they are dropped, with any
        other value they are an error naming the new key."""
        if not isinstance(data, dict):
            return data
        moved = [k for k, old in _MOVED_TRACKING_KEYS.items() if k in data and data[k] != old]
        if moved:
            raise ValueError(
                "; ".join(
                    f"tracking.{k} has moved to eval.{k} (the eval: section of the text families): set eval.{k} instead"
                    for k in moved
                )
            )
        return {k: v for k, v in data.items() if k not in _MOVED_TRACKING_KEYS}

    def resolved_uri(self) -> str:
        """The MLflow tracking URI this run logs to (absolute for local SQLite)."""
        if self.tracking_uri:
            return self.tracking_uri
        env = os.environ.get("MLFLOW_TRACKING_URI")
        if env:
            return env
        return "sqlite:///" + str(Path("mlflow.db").resolve())


#: ``provider(family) -> {key: (section class, families contributing it)}`` for every registered family
#: section; set by :mod:`megaray.families` (which imports this module, so this module names no family)
SectionProvider = Callable[[str], Dict[str, Tuple[type, Tuple[str, ...]]]]
_SECTION_PROVIDER: List[SectionProvider] = []


def set_section_provider(provider: SectionProvider) -> None:
    """Tell :class:`RunConfig` where family sections come from (called once by :mod:`megaray.families`)."""
    _SECTION_PROVIDER[:] = [provider]


class RunConfig(StrictConfig):
    """A whole run: model, data, optimisation, scaling and tracking, plus the sections its family
    contributes (``FamilySpec.sections``: ``diffusion:`` of a DiT run, ``eval:`` and
    ``generation:`` of a text run). A family section is a pydantic extra holding its typed
    section (``cfg.diffusion.sample_steps``); an absent one gets its defaults; a top-level key
    that is neither a field here nor a section of the run's family is an error. Sections are
    instances of importable classes, so a RunConfig pickles (Ray Train workers, Tune trials)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True, protected_namespaces=())

    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    model: SerializeAsAny[ModelConfig]
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="before")
    @classmethod
    def _family_sections(cls, data: Any) -> Any:
        """Validate each family section into its class, add absent ones with their defaults,
        refuse other unknown keys (ConfigError lines naming the key and the valid ones)."""
        if not isinstance(data, dict):
            return data
        model = data.get("model")
        family = model.get("family") if isinstance(model, dict) else getattr(model, "family", None)
        known = _SECTION_PROVIDER[0](str(family)) if _SECTION_PROVIDER and family else {}
        mine = {k: c for k, (c, fams) in known.items() if family in fams}
        out: Dict[str, Any] = {}
        errors: List[str] = []
        for key, value in data.items():
            section = mine.get(key)
            if key in cls.model_fields:
                out[key] = value
            elif section is not None:
                if isinstance(value, section):
                    out[key] = value
                else:
                    try:
                        out[key] = section.model_validate({} if value is None else value)
                    except ValidationError as e:
                        errors += _error_lines(section, e, key)
            elif key in known and _is_default(known[key][0], value):
                continue  # written by an older megaray into every run's config.yaml: dropped
            else:
                valid = [*cls.model_fields, *mine]
                owners = known.get(key, (None, ()))[1]
                what = f"the section of family {', '.join(owners)}, not of {family!r}" if owners else "unknown key"
                errors.append(
                    f"{key}: {what}{suggest(str(key), valid)}{_origin_note(str(key))}; "
                    f"valid keys of a run of family {family!r}: {', '.join(valid)}"
                )
        if errors:
            raise ConfigError("\n  ".join(errors))
        for key, section in mine.items():
            out.setdefault(key, section())
        return out

    def to_yaml(self, path: Optional[str | os.PathLike] = None) -> str:
        """The fully resolved config as YAML; also written to ``path`` when given."""
        text = yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    def flat(self) -> Dict[str, Any]:
        """Flattened ``{'model.n_layer': 4, ...}`` view, for MLflow params."""
        return flatten(self.model_dump(mode="json"))


# ----------------------------------------------------------------------------- loading


def read_yaml_mapping(path: str | os.PathLike, what: str = "config") -> Dict[str, Any]:
    """The top-level mapping of a YAML file.

    Raises:
        ConfigError: missing file, invalid YAML, or a top level that is not a mapping.
    """
    origin = str(path)
    if not Path(path).is_file():
        raise ConfigError(f"{what} file not found: {origin}")
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{origin}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: top level must be a mapping, got {type(raw).__name__}")
    return raw


#: the key of a run config naming the config it extends (a path relative to the including file)
BASE_KEY = "base"


@dataclass
class LayeredConfig:
    """A run config's raw mapping after its ``base:`` chain and ``--set`` overrides are applied.

    Attributes:
        raw: the merged mapping (no ``base`` key), ready for :func:`megaray.families.build_run_config`.
        files: the chain, the most basic file first and the loaded file last (absolute paths;
            ``<dict>`` for a dict source).
        origins: ``{dotted key: where it was set}`` for every key and section (the last file, or
            ``--set KEY=VALUE``, to set it); :func:`key_origins` puts it into unknown-key errors.
    """

    raw: Dict[str, Any]
    files: List[str] = field(default_factory=list)
    origins: Dict[str, str] = field(default_factory=dict)


def load_layered(
    source: str | os.PathLike | Dict[str, Any],
    overrides: Sequence[str] = (),
    *,
    what: str = "config",
    base_dir: Optional[str | os.PathLike] = None,
) -> LayeredConfig:
    """Read a run config with its ``base:`` chain deep-merged, then ``overrides`` applied last.

    ``base: other.yaml`` (relative to the file that names it; ``~`` and absolute paths allowed)
    loads ``other.yaml`` first, recursively. Merging: a mapping merges key by key into the base's
    mapping at the same key; any other value (a list, a scalar, ``null``) replaces the base's.
    ``overrides`` are ``KEY=VALUE`` strings (:func:`apply_override`). A dict ``source`` may name a
    ``base`` too, relative to ``base_dir`` (default: the working directory). The one loader of run
    configs: ``megaray config|train`` (:func:`megaray.families.load_config`) and the base of a
    tune config (:func:`megaray.tune.config.load_tune_config`).

    Raises:
        ConfigError: a missing file or bad YAML (named), ``base`` not a local path, a base that
            does not exist (names the including file), a cycle (names the chain).
    """
    chain: List[tuple] = []  # (display, mapping), the loaded file first
    seen: List[str] = []
    if isinstance(source, dict):
        raw, here, display = copy.deepcopy(source), Path(base_dir or Path.cwd()), "<dict>"
    else:
        path = Path(source).expanduser().resolve()
        raw, here, display = read_yaml_mapping(source, what), path.parent, str(path)
        seen.append(str(path))
    while True:
        chain.append((display, raw))
        ref = raw.get(BASE_KEY)
        if ref is None:
            break
        if not isinstance(ref, str) or not ref.strip() or "://" in ref:
            raise ConfigError(
                f"{display}: base: expected the path of a local run config (relative to this file), got {ref!r}"
            )
        path = (here / Path(ref).expanduser()).resolve()
        if str(path) in seen:
            loop = " -> ".join([*seen, str(path)])
            raise ConfigError(f"{display}: base: {ref} makes a cycle: {loop}; remove one of these base: keys")
        if not path.is_file():
            raise ConfigError(f"{display}: base: {ref} not found (resolved against {here}: {path})")
        seen.append(str(path))
        raw, here, display = read_yaml_mapping(path, "base config"), path.parent, str(path)
    out = LayeredConfig(raw={}, files=[d for d, _ in reversed(chain)])
    for display, mapping in reversed(chain):  # the most basic first, so later files win
        mapping = {k: v for k, v in mapping.items() if k != BASE_KEY}
        out.raw = deep_merge(out.raw, mapping)
        out.origins.update(dict.fromkeys(_key_paths(mapping), display))
    for item in overrides:
        key, value = parse_override(item)
        apply_override(out.raw, item)
        out.origins.update(dict.fromkeys(_key_paths(value, key + "."), f"--set {item}"))
        out.origins[key] = f"--set {item}"
    return out


def deep_merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    """A new mapping: ``base`` with ``over`` merged in (mappings key by key, recursively; any
    other value of ``over``, lists included, replaces). Neither input is changed."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _key_paths(d: Any, prefix: str = "") -> List[str]:
    """Every dotted key path in ``d``, sections included (``{"a": {"b": 1}}`` -> ``["a", "a.b"]``)."""
    if not isinstance(d, dict):
        return []
    out = []
    for k, v in d.items():
        out += [f"{prefix}{k}", *_key_paths(v, f"{prefix}{k}.")]
    return out


_ORIGINS: ContextVar[Optional[Dict[str, str]]] = ContextVar("megaray_config_origins", default=None)


@contextmanager
def key_origins(origins: Dict[str, str]) -> Iterator[None]:
    """Inside this block, an unknown-key error of :func:`validate` names where the key was set
    (``origins`` from :attr:`LayeredConfig.origins`)."""
    token = _ORIGINS.set(origins)
    try:
        yield
    finally:
        _ORIGINS.reset(token)


def _origin_note(path: str) -> str:
    origins = _ORIGINS.get()
    parts = path.split(".")
    for n in range(len(parts), 0, -1):  # the key itself, else its closest section
        where = (origins or {}).get(".".join(parts[:n]))
        if where:
            return f" (set in {where})" if not where.startswith("--set") else f" (set by {where})"
    return ""


def apply_override(raw: Dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override in place (value parsed as YAML)."""
    key, parsed = parse_override(item)
    set_dotted(raw, key, parsed, where=f"override {item!r}")


def parse_override(item: str) -> tuple[str, Any]:
    """``"a.b=3e-4"`` -> ``("a.b", 0.0003)``: the one ``KEY=VALUE`` parser (value parsed as YAML).

    Raises:
        ConfigError: no ``=`` or an empty key.
    """
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. model.n_layer=4")
    key, value = item.split("=", 1)
    if not [p for p in key.strip().split(".") if p]:
        raise ConfigError(f"override {item!r}: empty key")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def set_dotted(raw: Dict[str, Any], key: str, value: Any, where: Optional[str] = None) -> None:
    """Set ``raw[a][b][c] = value`` for ``key = "a.b.c"`` in place, creating missing sections.

    Raises:
        ConfigError: a prefix of the key names a value that is not a mapping; the message
            starts with ``where`` (default: the key).
    """
    parts = [p for p in key.split(".") if p]
    node = raw
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{where or key}: {p} is not a section")
        node = nxt
    node[parts[-1]] = value


def validate(cls: type[BaseModel], data: Dict[str, Any], prefix: str = "") -> Any:
    """``cls.model_validate(data)`` with pydantic errors turned into one :class:`ConfigError`."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(cls, e, prefix)) from None


def _format_errors(cls: type[BaseModel], err: ValidationError, prefix: str) -> str:
    return "invalid config:\n  " + "\n  ".join(_error_lines(cls, err, prefix))


def _is_default(section: type, value: Any) -> bool:
    """Whether ``value`` validates into ``section``'s defaults (an older config.yaml's untouched section)."""
    try:
        return section.model_validate(value or {}).model_dump() == section().model_dump()
    except ValidationError:
        return False


def _error_lines(cls: type[BaseModel], err: ValidationError, prefix: str) -> List[str]:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        path = ".".join(([prefix] if prefix else []) + loc)
        if isinstance((e.get("ctx") or {}).get("error"), ConfigError) and not loc:
            lines.append(str(e["ctx"]["error"]))  # RunConfig's family sections: lines already formatted
        elif e["type"] == "extra_forbidden":
            valid = _fields_at(cls, loc[:-1])
            lines.append(f"{path}: unknown key{suggest(loc[-1], valid)}{_origin_note(path)}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(
                f"{path or (prefix or cls.__name__)}: {msg}"
                + (
                    f" (got {e['input']!r})"
                    if e["type"] != "value_error" and not isinstance(e.get("input"), dict)
                    else ""
                )
            )
    return lines


def _fields_at(cls: Any, loc: List[str]) -> List[str]:
    for p in loc:
        field = getattr(cls, "model_fields", {}).get(p)
        if field is None:
            return []
        cls = field.annotation
        cls = getattr(cls, "__args__", [cls])[0] if not isinstance(cls, type) else cls
    return list(getattr(cls, "model_fields", {}).keys())


def suggest(word: str, valid: Any) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``valid`` to ``word``, else ``""`` (the one did-you-mean)."""
    close = difflib.get_close_matches(word, list(valid), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (empty mappings stay as leaves)."""
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
