"""Driver side of a run: connect to Ray, build datasets, start MLflow, fit a ``TorchTrainer``.

``fit(cfg)`` is what ``megaray train`` calls and what every Tune trial calls. Re-running with
the same ``name`` and ``scaling.storage_path`` resumes from the latest checkpoint (Ray Train V2
restores the run state from ``<storage_path>/<name>``), and continues the same MLflow run;
``resume_from`` branches the run at an older checkpoint (:mod:`megaray.train.branch`), and
``profile`` runs a short ``torch.profiler`` run of the config instead (:mod:`megaray.train.profiler`).

Everything a user can get wrong is checked here, before any worker starts: paths are made
absolute once (a worker's working directory is Ray's, not the user's), the manifest is read
once, ``train.modules`` must name modules of the family, EMA needs ZeRO <= 2. A
:class:`~megaray.errors.MegarayError` raised later inside a worker ends the run at once (no
retry) and ``fit`` raises it again on the driver; only crashes are retried.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, Optional, Sequence

from megaray.config import CheckpointPath, ConfigError, RunConfig, RunPath, map_paths, suggest
from megaray.tasks.base import Task, TaskInfo
from megaray.train.spec import DebugHooks, WorkerSpec

if TYPE_CHECKING:
    from megaray.train.branch import Branch

log = logging.getLogger("megaray.train")


@dataclass
class FitResult:
    """What a finished run leaves behind.

    Attributes:
        metrics: the last metrics rank 0 reported (loss, val_loss, val_ppl, ...).
        checkpoint: path of the latest checkpoint in storage (None if none was written).
        run_dir: ``<storage_path>/<name>``.
        mlflow_run_id: the MLflow run (None when tracking is off).
        tracking_uri: where that run lives.
        info: what the task found on the driver (a :class:`~megaray.tasks.base.TaskInfo`; the
            LM's has ``unigram_entropy`` of the val split).
    """

    metrics: Dict[str, Any]
    checkpoint: Optional[str]
    run_dir: str
    mlflow_run_id: Optional[str]
    tracking_uri: Optional[str]
    info: TaskInfo


def ensure_ray(num_cpus: Optional[int] = None) -> None:
    """Connect to the cluster in ``RAY_ADDRESS`` (as under ``ray job submit``) or start a local one.

    A local cluster gets at least 8 logical CPUs (more than a laptop's cores) so that a Tune
    trial's driver, its Train workers and Ray Data's tasks can all be scheduled at once.
    """
    import ray

    if ray.is_initialized():
        return
    env_vars = {
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "TOKENIZERS_PARALLELISM": "false",
        # Ray Train's print patch tees worker prints into its logger *and* stdout: every
        # progress line would reach the driver twice.
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }
    # Workers' output (Ray's per-report dicts and controller chatter, library warnings) stays in
    # Ray's session logs unless --verbose: rank 0 sends megaray's own lines through the console
    # channel (megaray.train.console).
    from megaray.train.console import quiet_driver, verbose

    quiet_driver()
    logs = verbose()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(
            address=os.environ["RAY_ADDRESS"],
            runtime_env={"env_vars": env_vars},
            log_to_driver=logs,
            logging_level=logging.INFO if logs else logging.WARNING,
        )
    else:
        n = num_cpus or max(8, os.cpu_count() or 1)
        # as many Python workers may start at once as there are logical CPUs (Ray's default is the
        # core count, and the raylet prints a warning on the console each time more start)
        os.environ.setdefault("RAY_worker_maximum_startup_concurrency", str(n))
        # A local cluster's processes inherit this process's environment, so the variables go
        # there while Ray starts, not into a job runtime_env (with one, every Ray worker the job
        # starts goes through Ray's runtime-env set-up, ``setup_worker.py``: a second Python start
        # per process; Ray Train's own actors still do, under its controller's runtime env).
        # Two Ray settings for a one-machine cluster, unless set already: no preemption watcher
        # (Ray Train's ``PreemptionWatcher`` actor, a Python process per worker-group start polling
        # for nodes being drained: this machine has no other node), and no Python workers
        # prestarted for the first driver (one per logical CPU, started with no runtime env while
        # the driver sets up, where Ray Train's actors and tasks, which inherit the controller's
        # runtime env, can use none of them). Measured with benchmarks/goodput.py (BENCHMARKS.md).
        local = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_prestart_worker_first_driver": "0"}
        # address="local": always start a fresh cluster, even if /tmp/ray names a stale one.
        with _environ({**env_vars, **{k: v for k, v in local.items() if k not in os.environ}}):
            ray.init(
                address="local",
                num_cpus=n,
                include_dashboard=False,
                log_to_driver=logs,
                logging_level=logging.INFO if logs else logging.WARNING,
            )
    quiet_driver()  # ray.init resets its loggers' levels
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = os.environ.get("MEGARAY_DATA_PROGRESS", "0") == "1"


@contextmanager
def _environ(values: Dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set inside the block, as it was after it."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _absolute(p: str, base_dir: Optional[str] = None) -> str:
    return p if "://" in p else str(Path(base_dir or ".").joinpath(Path(p).expanduser()).resolve())


def storage_dir(cfg: RunConfig) -> str:
    """``scaling.storage_path`` made absolute when local (Ray needs absolute local paths)."""
    return _absolute(cfg.scaling.storage_path)


def resolve_paths(cfg: RunConfig, base_dir: Optional[str] = None) -> RunConfig:
    """A copy of ``cfg`` whose path fields are absolute (URIs unchanged): every field typed
    :class:`~megaray.config.RunPath` wherever it is (``data.shards``, ``data.sources[*].shards``,
    ``data.val_shards``, a family section's paths such as ``diffusion.vae_checkpoint``), resolved
    once, on the driver, against its working directory (or ``base_dir``: a Tune trial resolves
    against the search driver's), because Ray Train workers and Tune trials run in Ray's own
    working directory. A :class:`~megaray.config.CheckpointPath` (``train.init_from``) that is a
    ``models:/`` URI becomes its checkpoint here, at the run's tracking URI."""

    def resolve(value: str, marker: RunPath) -> str:
        if isinstance(marker, CheckpointPath):
            from megaray.weights import is_model_uri, model_checkpoint

            if is_model_uri(value):
                return model_checkpoint(value, cfg.tracking.resolved_uri())
        return _absolute(value, base_dir)

    return map_paths(cfg, resolve)


def check_run(cfg: RunConfig, task: Task) -> None:
    """Driver-side checks of what only the task knows: ``train.modules`` names modules of the
    family, ``data.val_shards`` is one the task reads, and EMA is possible under the ZeRO stage.
    Raises ConfigError."""
    from megaray.train.ema import check_supported

    if cfg.data.val_shards and not task.supports_val_shards:
        raise ConfigError(
            f"data.val_shards: the {type(task).__name__} of family {cfg.model.family!r} validates on "
            f"the val split of its own data.shards; a separate validation folder works with the text "
            f"language-model families (gpt, ngpt, mamba, recurrent; not train.task sft): remove "
            f"data.val_shards"
        )
    names = task.module_names()
    for name in cfg.train.modules:
        if name not in names:
            raise ConfigError(
                f"train.modules.{name}: family {cfg.model.family!r} has no module {name!r}"
                f"{suggest(name, names)}; its modules: {', '.join(names)}"
            )
    check_supported(cfg)
    t = cfg.train
    if t.deepspeed or t.offload != "none" or t.precision == "fp16":
        from megaray.train.engines import validate_deepspeed

        validate_deepspeed(cfg)  # ConfigError naming the key, before any worker starts
    if cfg.train.init_from:
        from megaray.train.checkpoint import resolve

        resolve(cfg.train.init_from)  # CheckpointError before any worker starts


def fit(
    cfg: RunConfig,
    *,
    callbacks: Sequence[Any] = (),
    parent_run_id: Optional[str] = None,
    mlflow_run_name: Optional[str] = None,
    extra_tags: Optional[Dict[str, str]] = None,
    console: bool = True,
    resume_from: Optional[str] = None,
    profile: Optional[int] = None,
) -> FitResult:
    """Train ``cfg`` with Ray Train + DeepSpeed; returns a :class:`FitResult`.

    Args:
        cfg: resolved run config.
        callbacks: Ray Train ``UserCallback``s (Tune passes ``TuneReportCallback``).
        parent_run_id: MLflow parent run (Tune search); the run is logged as its child.
        mlflow_run_name: display name in MLflow (default ``cfg.name``).
        console: draw the run's progress bar and lines on this process's stdout
            (:mod:`megaray.train.console`); Tune trials pass False. Ignored under ``--verbose``,
            where the workers print their own lines.
        resume_from: resume from this checkpoint of the run instead of its newest (a folder, or
            ``step_N``): the later checkpoints are moved aside (:mod:`megaray.train.branch`) and
            the same MLflow run continues, tagged ``megaray.resumed_from`` / ``megaray.branch_step``.
        profile: instead of training ``cfg``, run the short diagnostic run
            :func:`megaray.train.profiler.profile_config` makes of it: ``profile`` steps under
            ``torch.profiler`` on rank 0 after a warm-up, no checkpoints, no evaluation
            (:mod:`megaray.train.profiler`).

    Raises:
        DataError / ConfigError / CheckpointError (any MegarayError): bad data, config or
            checkpoint, found on the driver before any worker starts, or raised inside a worker
            (the run ends at once, without retries, and the worker's error is raised here).
        ray.train.TrainingFailedError: training crashed more than ``scaling.max_failures`` times.

    With ``console``, everything this process prints meanwhile is also appended to
    ``<run folder>/log.txt`` (:func:`megaray.train.console.keep_console`).
    """
    from megaray.train.console import keep_console

    if profile:
        from megaray.train.profiler import profile_config, profile_tags

        if resume_from:
            raise ConfigError(
                "--profile makes a separate short run (<name>-profile) from scratch: it cannot resume "
                "from a checkpoint; drop --resume-from or --profile"
            )
        cfg = profile_config(cfg, profile)
        extra_tags = {**(extra_tags or {}), **profile_tags(profile)}
    with keep_console(run_folder(cfg) if console else None):
        return _fit(
            cfg,
            callbacks=callbacks,
            parent_run_id=parent_run_id,
            mlflow_run_name=mlflow_run_name,
            extra_tags=extra_tags,
            console=console,
            resume_from=resume_from,
            profile=profile,
        )


def run_folder(cfg: RunConfig) -> str:
    """``<storage_path>/<name>``: the run's checkpoints, ``log.txt``, ``tensorboard/``."""
    return f"{storage_dir(cfg).rstrip('/')}/{cfg.name}"


def _fit(
    cfg: RunConfig,
    *,
    callbacks: Sequence[Any],
    parent_run_id: Optional[str],
    mlflow_run_name: Optional[str],
    extra_tags: Optional[Dict[str, str]],
    console: bool,
    resume_from: Optional[str] = None,
    profile: Optional[int] = None,
) -> FitResult:
    """:func:`fit`'s work."""
    from megaray import families
    from megaray.train import mlflow as tracking
    from megaray.train.console import Channel, run_with_console, verbose
    from megaray.train.ray_compat import keep_user_errors_in_ray_data, user_error
    from megaray.train.trackers import prepare as prepare_trackers

    t0 = time.time()  # the run's wall clock starts here (goodput, system/time_startup_s)
    cfg = resolve_paths(cfg)
    task = families.task_class(cfg.model.family, cfg.train.task)(cfg)
    check_run(cfg, task)
    storage = storage_dir(cfg)
    run_dir = f"{storage.rstrip('/')}/{cfg.name}"
    trackers = prepare_trackers(cfg, run_dir)  # ConfigError before Ray starts when one is not installed
    debug = DebugHooks.from_env()  # the test hooks (MEGARAY_TRACE, ...): None in a normal run
    fork = _branch(resume_from, run_dir, console) if resume_from else None  # CheckpointError before Ray starts
    marks = {"fit": t0, "checks": time.time()}  # start-up phases (megaray.train.startup)
    warm = _warm_tracking(cfg.tracking.resolved_uri()) if cfg.tracking.enabled else None
    try:  # MLflow's imports and store open in a thread while Ray starts
        ensure_ray()
        _resolve_use_gpu(cfg, console)
    finally:
        if warm is not None:
            warm.join()
    marks["ray"] = time.time()
    keep_user_errors_in_ray_data()
    datasets = task.datasets()
    worlds = _check_worlds(cfg, task.info, run_dir)
    marks["datasets"] = time.time()
    # rank 0 of each worker group builds the train stream at the cursor of the checkpoint it
    # restores (megaray.train.loop._positioned_shard): constant-time resume at any world size
    datasets.pop("train", None)
    uri = run_id = None
    if cfg.tracking.enabled:
        uri = cfg.tracking.resolved_uri()
        run_id = _start_mlflow(cfg, task, uri, run_dir, mlflow_run_name, extra_tags, parent_run_id)
        if fork is not None:
            _tag_branch(uri, run_id, fork)
    marks["mlflow"] = time.time()
    channel = Channel() if console and not verbose() else None
    spec = WorkerSpec(  # what every worker gets (megaray.train.spec)
        run=cfg.model_dump(mode="json"),
        info=task.info,
        run_dir=run_dir,
        tracking_uri=uri,
        mlflow_run_id=run_id,
        trackers=trackers,
        t0=t0,
        console=channel,
        profile=profile,
        debug=debug,
    )
    trainer = _trainer(cfg, spec, datasets, storage, callbacks, worlds)
    marks["trainer"] = time.time()
    if debug is not None and debug.trace:  # the driver's start-up phases, for benchmarks/goodput.py
        from megaray.train.startup import process_start, write_line

        write_line(f"{debug.trace}.driver", {"pid": os.getpid(), "process": process_start(), **marks})
    try:
        if channel is not None:
            result = run_with_console(trainer.fit, channel, cfg.train.max_steps, task.unit)
        else:
            result = trainer.fit()
    except BaseException as e:
        if run_id:
            tracking.end_run(uri, run_id, "FAILED")
        cause = user_error(e)
        if cause is not None:
            raise cause from None
        raise
    ckpt = result.checkpoint.path if result.checkpoint else None
    if run_id:
        rl = tracking.RunLogger(uri, run_id)
        if ckpt:
            rl.tag("megaray.final_checkpoint", ckpt)
            rl.text(ckpt + "\n", "final_checkpoint.txt")
            if cfg.tracking.log_model and parent_run_id is None:  # a Tune trial logs no model
                from megaray.train.mlflow_model import log_model

                log_model(uri, run_id, task, ckpt)
            if cfg.tracking.register_model and parent_run_id is None:  # the best checkpoint's LoggedModel
                from megaray.train.logged_models import register_best

                register_best(uri, run_id, cfg.tracking.register_model, cfg.tracking.register_metric)
        tracking.end_run(uri, run_id, "FINISHED")
    return FitResult(
        metrics=dict(result.metrics or {}),
        checkpoint=ckpt,
        run_dir=run_dir,
        mlflow_run_id=run_id,
        tracking_uri=uri,
        info=task.info,
    )


def _branch(resume_from: str, run_dir: str, console: bool) -> "Branch":
    """``--resume-from``: check the checkpoint (CheckpointError naming it), then move the run's later
    checkpoints aside (:func:`megaray.train.branch.branch`); the choice is printed (console) and logged."""
    from megaray.train.branch import branch, find_checkpoint

    fork = branch(find_checkpoint(resume_from, run_dir), run_dir)
    if console:
        print(fork.describe(), flush=True)
    else:
        log.info(fork.describe())
    return fork


def _warm_tracking(uri: str) -> threading.Thread:
    """Import MLflow and open the run's tracking store (a new SQLite store creates its tables) in a
    thread, started before Ray: about 2 s of a 2-core machine's start-up run beside Ray's, which
    the driver spends mostly waiting for Ray's processes (benchmarks/goodput.py). Join it before
    anything else touches MLflow. Ray is imported first, so the two threads import nothing in
    common at once. An error here is left to the run's own MLflow calls, which raise it."""
    import ray  # noqa: F401 - before the thread: see above

    def warm() -> None:
        try:
            from megaray.train import mlflow as tracking

            tracking.client(uri).search_experiments(max_results=1)
        except Exception as e:  # noqa: BLE001 - the run's MLflow calls raise it where it belongs
            log.debug("MLflow warm-up of %s failed: %s", uri, e)

    thread = threading.Thread(target=warm, name="megaray-mlflow-warm-up", daemon=True)
    thread.start()
    return thread


def _tag_branch(uri: str, run_id: str, fork: "Branch") -> None:
    """The branch point on the MLflow run (tags ``megaray.resumed_from``, ``megaray.branch_step``,
    ``megaray.branch_time`` (ms since the epoch: the run's metric points after it are the new
    branch's) and ``megaray.abandoned_branch``), and the moved checkpoints' LoggedModels re-pointed."""
    from megaray.train import mlflow as tracking
    from megaray.train.branch import retag_logged_models

    rl = tracking.RunLogger(uri, run_id)
    rl.tag("megaray.resumed_from", fork.checkpoint)
    rl.tag("megaray.branch_step", str(fork.step))
    rl.tag("megaray.branch_time", str(int(time.time() * 1000)))
    rl.tag("megaray.abandoned_branch", fork.aside or "")
    retag_logged_models(uri, run_id, fork.moved)


def _resolve_use_gpu(cfg: RunConfig, console: bool) -> None:
    """``scaling.use_gpu: auto`` becomes true when the connected Ray cluster has GPUs now
    (``ray.cluster_resources()``), else false; the choice and its reason are printed (console)
    and logged."""
    import ray

    from megaray.train.device import choose_gpu

    use, why = choose_gpu(cfg.scaling.use_gpu, ray.cluster_resources())
    cfg.scaling.use_gpu = use
    line = f"device: {'GPU' if use else 'CPU'} workers ({why})"
    if console:
        print(line, flush=True)
    else:
        log.info(line)


def _check_worlds(cfg: RunConfig, info: TaskInfo, run_dir: str) -> list:
    """Before any worker starts: the world sizes in ``scaling.num_workers`` that divide the run's
    global batch (a resumed run keeps its checkpoint's, :func:`megaray.train.checkpoint.resume_state`).

    Raises:
        ConfigError: no size in ``[min, max]`` divides it (names the sizes that would).
    """
    from dataclasses import replace

    from megaray.train.checkpoint import resume_state

    plan = info.plan
    if plan is None:
        return list(range(cfg.scaling.min_workers, cfg.scaling.max_workers + 1))
    saved = resume_state(run_dir)
    if saved is not None and saved.global_batch and saved.global_batch != plan.global_batch:
        log.info(
            "resuming %s with its global batch %d (the config gives %d)", run_dir, saved.global_batch, plan.global_batch
        )
        plan = replace(plan, global_batch=saved.global_batch)
        info.plan = plan
    worlds = plan.worlds(cfg.scaling.min_workers, cfg.scaling.max_workers)
    if not worlds:
        raise ConfigError(
            f"scaling.num_workers {cfg.scaling.num_workers}: no world size in it divides the global batch "
            f"{plan.global_batch} into micro-batches of {plan.micro_batch} (sizes that do: "
            f"{plan.worlds(1, max(8, cfg.scaling.max_workers)) or 'none'}); set train.global_batch_size to a multiple "
            "of data.batch_size x each size the run may have"
        )
    return worlds


def _start_mlflow(
    cfg: RunConfig,
    task: Task,
    uri: str,
    run_dir: str,
    run_name: Optional[str],
    extra_tags: Optional[Dict[str, str]],
    parent_run_id: Optional[str],
) -> str:
    """Create or find the run's MLflow run; log the resolved config and the task's files."""
    from megaray import families
    from megaray.train import mlflow as tracking

    tags = {
        "megaray.family": cfg.model.family,
        "megaray.model_type": families.describe_model(cfg.model),
        tracking.NOTE_TAG: tracking.command_line(),
        **(extra_tags or {}),
    }
    run_id = tracking.start_run(
        uri,
        cfg.tracking.experiment,
        run_key=run_dir,
        run_name=run_name or cfg.name,
        params=cfg.flat(),
        tags=tags,
        parent_run_id=parent_run_id,
    )
    tracking.log_datasets(uri, run_id, _manifests(cfg, task))
    rl = tracking.RunLogger(uri, run_id)
    rl.text(cfg.to_yaml(), "config/resolved.yaml")
    for name, text in task.checkpoint_files().items():
        rl.text(text, f"config/{name}")
    return run_id


def _manifests(cfg: RunConfig, task: Task) -> Dict[str, Any]:
    """``{prepared folder: manifest}`` of the run's data (the task's, already read, for one folder)."""
    from megaray.data.manifest import read_manifest

    sources = [s.shards for s in cfg.data.resolved_sources()]
    if len(sources) == 1 and task.info.manifest:
        return {sources[0]: task.info.manifest}
    return {s: read_manifest(s) for s in sources}


def _trainer(
    cfg: RunConfig,
    spec: WorkerSpec,
    datasets: Dict[str, Any],
    storage: str,
    callbacks: Sequence[Any],
    worlds: Optional[Sequence[int]] = None,
) -> Any:
    """The ``TorchTrainer`` (:mod:`megaray.train.ray_compat`'s, which ends a run on a user's
    error) running :func:`megaray.train.loop.train_loop_per_worker` on ``cfg``; every worker gets
    ``spec`` (Ray Train's ``train_loop_config`` is ``{"spec": spec}``)."""
    import ray.train
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, ScalingConfig

    from megaray.train.loop import train_loop_per_worker
    from megaray.train.ray_compat import TorchTrainer

    options = DataConfig.default_ingest_options()
    options.preserve_order = True  # deterministic order per epoch: exact resume of data position
    options.label_selector = dict(cfg.scaling.data_label_selector) or None  # e.g. CPU data nodes (cluster/)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=spec.loop_config(),
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.ray_num_workers(),  # (min, max): Ray Train V2's elastic scaling policy
            elastic_resize_monitor_interval_s=cfg.scaling.elastic_resize_s,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=dict(cfg.scaling.resources_per_worker),
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.scaling.num_to_keep),
            callbacks=list(callbacks),
        ),
        datasets=datasets,
        dataset_config=DataConfig(execution_options=options),
        run_dir=spec.run_dir,
        worlds=worlds,  # an elastic run's sizes and growth (ray_compat.GlobalBatchElasticPolicy)
    )
