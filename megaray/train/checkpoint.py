"""Checkpoints: DeepSpeed state per rank + megaray state, reported through Ray Train.

Layout of one checkpoint directory (``<storage_path>/<run>/step_00000100/``)::

    model/            DeepSpeed ``save_checkpoint(tag="model")``: module, optimizer (ZeRO shards
                      from every rank), LR scheduler, global step
    disc/ ...         one tag per extra module of a task (GAN discriminator)
    rng_rank{r}.pt    python / numpy / torch RNG state of rank r
    model.pt          consolidated weights (``engine.save_16bit_model``; fp32 when training fp32)
    ema.pt            the EMA of the model's weights (fp32), when ``train.ema_decay`` is on
    config.yaml       the resolved run config
    tokenizer.json    copied from the data shards (text runs)
    megaray.json      step, tokens seen, epoch, samples of the epoch consumed (the global cursor),
                      the global batch, the world size, the metrics reported with this
                      checkpoint; written LAST by rank 0
    model_universal/  DeepSpeed's universal form of ``model/`` (and of every other tag), made once
                      when a ZeRO 1-3 checkpoint is resumed at another world size

Crash safety: every rank writes into a fresh local temporary directory; Ray Train copies the
merged result into storage and only then registers it as the latest checkpoint, so a crash in
the middle of a write leaves the previous checkpoint untouched. ``megaray.json`` is written last
and :func:`megaray.weights.resolve` ignores directories without it.

:class:`Checkpointer` is the loop's part: it decides when a checkpoint is due, restores the
latest one at start and writes + reports one through Ray Train.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import numpy as np
import torch

from megaray.config import RunConfig
from megaray.errors import CheckpointError

# the read side of the layout (one home: megaray/weights.py), re-exported for the train layer
from megaray.weights import (  # noqa: F401
    _UNREADABLE,
    EMA_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    load_for_inference,
    read_state,
    resolve,
    torch_load,
)

log = logging.getLogger("megaray.checkpoint")


@dataclass
class TrainState:
    """Where a run stands; saved as ``megaray.json`` in every checkpoint.

    Attributes:
        step: optimizer steps taken.
        tokens: units (tokens, samples) trained on, all ranks together.
        epoch: current epoch (0-based).
        samples_in_epoch: samples of this epoch trained on, all ranks together (the global
            cursor: a multiple of ``global_batch`` at every checkpoint; any world size resumes
            from it, :mod:`megaray.data.order`).
        global_batch: samples per optimizer step (kept across world sizes; 0 = not yet fixed).
        world_size: ranks of the run that wrote it.
        metrics: the report made with this checkpoint (a re-run with nothing left to train
            hands it to Ray Train again).
    """

    step: int = 0
    tokens: int = 0
    epoch: int = 0
    samples_in_epoch: int = 0
    global_batch: int = 0
    world_size: int = 1
    metrics: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: Dict[str, Any]) -> "TrainState":
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})


def checkpoint_dir_name(step: int) -> str:
    """Directory name of the checkpoint at optimizer step ``step`` (sorts by step)."""
    return f"step_{step:08d}"


def save(
    out_dir: str,
    engines: Mapping[str, Any],
    state: TrainState,
    cfg: RunConfig,
    rank: int,
    extra_files: Mapping[str, str] = {},
    ema: Optional[Any] = None,
) -> None:
    """Write this rank's share of a checkpoint into ``out_dir`` (a fresh local directory).

    ``extra_files`` maps file names to text written by rank 0 (the task's tokenizer.json);
    ``ema`` (a :class:`megaray.train.ema.EMA`) is written by rank 0 as ``ema.pt``.

    Collective: every rank must call it (DeepSpeed barriers inside ``save_checkpoint`` and, under
    ZeRO-3, the gather in ``save_16bit_model``).
    """
    os.makedirs(out_dir, exist_ok=True)
    raw = asdict(state)
    for name, engine in engines.items():
        engine.save_checkpoint(out_dir, tag=name, client_state={"megaray": raw})
    engines["model"].save_16bit_model(out_dir, WEIGHTS_FILE)
    torch.save(_rng_state(), os.path.join(out_dir, f"rng_rank{rank}.pt"))
    if rank == 0:
        cfg.to_yaml(os.path.join(out_dir, "config.yaml"))
        for name, text in extra_files.items():
            Path(out_dir, name).write_text(text)
        if ema is not None:
            torch.save(ema.state_dict(), os.path.join(out_dir, EMA_FILE))
        tmp = os.path.join(out_dir, STATE_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(raw, f, indent=2)
        os.replace(tmp, os.path.join(out_dir, STATE_FILE))


def load(
    ckpt_dir: str,
    engines: Mapping[str, Any],
    rank: int,
    ema: Optional[Any] = None,
    tags: Optional[Mapping[str, str]] = None,
    rng: bool = True,
) -> TrainState:
    """Restore every engine (module, optimizer, scheduler), the EMA and this rank's RNG from ``ckpt_dir``.

    ``tags`` maps an engine to a universal tag it was already loaded from
    (:mod:`megaray.train.universal`: skipped here); ``rng=False`` leaves the RNG alone.

    Raises:
        CheckpointError: the directory has no ``megaray.json``, an engine's tag or the EMA is
            missing, or a file is truncated or corrupt (the message names it).
    """
    state_path = Path(ckpt_dir) / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"{ckpt_dir}: not a complete megaray checkpoint (no {STATE_FILE})")
    for name, engine in engines.items():
        tag = (tags or {}).get(name, name)
        if not (Path(ckpt_dir) / tag).is_dir():
            raise CheckpointError(f"{ckpt_dir}: no DeepSpeed state for module {name!r}")
        if tag != name:
            continue  # loaded already by megaray.train.universal (at another world size)
        try:
            load_path, _ = engine.load_checkpoint(ckpt_dir, tag=tag)
        except _UNREADABLE as e:
            raise CheckpointError(
                f"{ckpt_dir}/{name} is truncated or corrupt ({type(e).__name__}: {e}); "
                "resume from an earlier step_* checkpoint or retrain"
            ) from None
        if load_path is None:
            raise CheckpointError(f"{ckpt_dir}/{name}: DeepSpeed could not load this checkpoint")
    if ema is not None:
        path = Path(ckpt_dir) / EMA_FILE
        if not path.is_file():
            raise CheckpointError(
                f"{ckpt_dir}: no {EMA_FILE}, but train.ema_decay is set (the run that wrote it had "
                "no EMA); unset train.ema_decay or start a new run name"
            )
        ema.load_state_dict(torch_load(path, map_location="cpu", weights_only=True))
    rng_file = Path(ckpt_dir) / f"rng_rank{rank}.pt"
    if rng and rng_file.is_file():
        _set_rng_state(torch_load(rng_file, weights_only=False))
    return TrainState.from_json(json.loads(state_path.read_text()))


def latest_local(run_dir: Optional[str]) -> Optional[Tuple[Path, TrainState]]:
    """Newest checkpoint under a local ``run_dir`` that every rank of the world that wrote it
    finished (``megaray.json`` plus one ``rng_rank{r}.pt`` per rank) and its state, or None.
    URIs return None (there Ray's own registry is the only source)."""
    if not run_dir or "://" in run_dir or not Path(run_dir).is_dir():
        return None
    for d in sorted(Path(run_dir).glob("step_*"), key=lambda d: d.name, reverse=True):
        if (d / STATE_FILE).is_file():
            state = TrainState.from_json(json.loads((d / STATE_FILE).read_text()))
            if all((d / f"rng_rank{r}.pt").is_file() for r in range(state.world_size)):
                return d, state
    return None


def resume_state(run_dir: str) -> Optional[TrainState]:
    """The :class:`TrainState` of the checkpoint a resumed run starts from, read from storage: on
    local storage :func:`latest_local`'s; on ``s3://``/``gs://`` the newest ``step_*`` with a state
    file (through :mod:`megaray.fs`). None when there is none yet. Used by the driver's early checks
    and the elastic policy; workers restore through :meth:`Checkpointer.locate`."""
    import pyarrow.fs as pafs

    from megaray import fs

    if not fs.is_uri(run_dir):
        local = latest_local(run_dir)
        return None if local is None else local[1]
    filesystem, path = fs.resolve(run_dir)
    try:
        infos = filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError:
        return None
    steps = sorted(
        (i.base_name for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("step_")),
        reverse=True,
    )
    for name in steps:
        where = fs.join(run_dir, name, STATE_FILE)
        if fs.exists(where):
            return TrainState.from_json(json.loads(fs.read_text(where)))
    return None


def reseed_rng(seed: int, step: int, rank: int) -> None:
    """Seed python, numpy and torch from ``(seed, step, rank)``: a checkpoint resumed at another
    world size has no RNG state for the new ranks (dropout, noise draws), so every rank starts a
    fresh stream that is still a function of the run (documented as approximate in docs/training.md)."""
    mixed = int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])
    random.seed(mixed)
    np.random.seed(mixed)
    torch.manual_seed(mixed)


def init_weights(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Load the weights of checkpoint ``path`` (as :func:`load_for_inference` picks them: EMA
    when kept) into ``model`` (``train.init_from``); returns the checkpoint directory.

    Raises:
        CheckpointError: no complete checkpoint, or its weights do not fit ``model`` (another
            architecture or vocabulary size; the first mismatching names are given).
    """
    src, _, ckpt = load_for_inference(path)
    try:
        model.load_state_dict(src.state_dict())
    except RuntimeError as e:
        raise CheckpointError(
            f"train.init_from {ckpt}: its weights do not fit this model "
            f"(same family, sizes and vocab_size needed): {str(e)[:400]}"
        ) from None
    return ckpt


def _rng_state() -> Dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(s: Dict[str, Any]) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])


class Checkpointer:
    """The loop's checkpoint part: restore at start, decide when a save is due, save + report.

    Args:
        cfg: the run config (``train.checkpoint_every``).
        run_dir: ``<storage_path>/<name>`` (local directories are searched directly, see
            :meth:`restore`).
        rank, world: this worker's rank and the world size.
        extra_files: ``{file name: text}`` rank 0 writes into every checkpoint.
    """

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Optional[str],
        rank: int,
        world: int,
        extra_files: Optional[Mapping[str, str]] = None,
    ):
        self.cfg, self.run_dir, self.rank, self.world = cfg, run_dir, rank, world
        self.extra_files = dict(extra_files or {})

    def due(self, step: int) -> bool:
        """Every ``train.checkpoint_every`` steps and at ``train.max_steps``."""
        return step % self.cfg.train.checkpoint_every == 0 or step >= self.cfg.train.max_steps

    def locate(self) -> Tuple[Optional[Any], Optional[TrainState]]:
        """The checkpoint this worker group resumes from and its :class:`TrainState`, read before
        any engine is built (the train stream starts at its cursor); ``(None, None)`` for a new run.

        Local storage: the newest checkpoint every rank of its world finished (Ray registers reports
        asynchronously, and a worker killed right after a report can restart before it has).
        Remote storage (s3://, gs://): the one Ray Train hands over (``ray.train.get_checkpoint()``);
        only its ``megaray.json`` is read here. Every rank of a group gets the same answer.
        """
        import ray.train

        local = latest_local(self.run_dir)
        if local is not None:
            return local
        restored = ray.train.get_checkpoint()
        if restored is None:
            return None, None
        with restored.filesystem.open_input_stream(f"{restored.path.rstrip('/')}/{STATE_FILE}") as f:
            state = TrainState.from_json(json.loads(f.read().decode()))
        return restored, state

    def restore(
        self, engines: Mapping[str, Any], source: Optional[Any], ema: Optional[Any] = None
    ) -> Tuple[TrainState, Optional[str]]:
        """Load ``source`` (from :meth:`locate`) into ``engines`` (and ``ema``); returns
        ``(state, where)``, a fresh state and None when there is nothing to restore.

        At another world size than the checkpoint's, ZeRO 1-3 optimizer state goes through
        DeepSpeed's universal checkpoint (:mod:`megaray.train.universal`: converted once, cached
        beside the checkpoint) and the RNG is re-seeded from ``(seed, step, rank)``.
        """
        if source is None:
            return TrainState(world_size=self.world), None
        if isinstance(source, Path):
            return self._load(str(source), engines, ema), str(source)
        with source.as_directory() as d:
            return self._load(d, engines, ema), source.path

    def _load(self, ckpt_dir: str, engines: Mapping[str, Any], ema: Optional[Any]) -> TrainState:
        saved = (
            TrainState.from_json(json.loads((Path(ckpt_dir) / STATE_FILE).read_text()))
            if (Path(ckpt_dir) / STATE_FILE).is_file()
            else None
        )
        if saved is None or saved.world_size == self.world:
            return load(ckpt_dir, engines, self.rank, ema)
        from megaray.train import universal

        tags = {}
        if universal.needs_conversion(saved.world_size, self.world, self.cfg.train.zero_stage):
            t0 = time.perf_counter()
            for name, engine in engines.items():  # collective: rank 0 converts (cached), every rank loads
                universal.load_engine_universal(engine, ckpt_dir, name)
                tags[name] = universal.universal_tag(name)
            self.conversion_s = time.perf_counter() - t0
        state = load(ckpt_dir, engines, self.rank, ema, tags=tags, rng=False)
        reseed_rng(self.cfg.train.seed, state.step, self.rank)
        log.info(
            "resumed a %d-rank checkpoint on %d ranks (%s)",
            saved.world_size,
            self.world,
            "universal ZeRO state" if tags else "ZeRO 0: no conversion",
        )
        return state

    #: seconds spent converting a checkpoint to DeepSpeed's universal form at this start (0: none)
    conversion_s: float = 0.0

    def save_and_report(
        self, report: Dict[str, Any], engines: Mapping[str, Any], state: TrainState, ema: Optional[Any] = None
    ) -> float:
        """Every rank writes its share into a fresh local directory, then all report it (with
        ``report``) to Ray Train, which copies it into storage. Collective.

        Remote storage (``s3://``, ``gs://``): the upload runs in Ray Train's background thread
        (``CheckpointUploadMode.ASYNC``), so training goes on while it copies; each attempt is
        retried on transient storage errors (:func:`upload_with_retry`) and Ray deletes the local
        copy once uploaded. Local storage: a synchronous copy (a local copy is fast, and an
        asynchronous one would only race the next save for disk).

        Returns:
            Seconds the training loop was held up by this checkpoint (write + report; the
            background upload's own duration is in :attr:`last_upload_s` once it finished).
        """
        import ray.train
        from ray.train import CheckpointUploadMode

        t0 = time.perf_counter()
        remote = bool(self.run_dir) and "://" in self.run_dir
        d = tempfile.mkdtemp(prefix="megaray-ckpt-")
        try:
            # the report goes into megaray.json too: a resumed run with nothing left to train re-reports it
            state.world_size = self.world
            state.metrics = dict(report)
            save(d, engines, state, self.cfg, self.rank, self.extra_files, ema)
            torch.distributed.barrier()
            checkpoint = ray.train.Checkpoint.from_directory(d)
            if remote:
                step, reported = state.step, dict(report)
                ray.train.report(
                    report,
                    checkpoint=checkpoint,
                    checkpoint_dir_name=checkpoint_dir_name(state.step),
                    checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
                    delete_local_checkpoint_after_upload=True,
                    checkpoint_upload_fn=lambda c, name: self._upload(c, name, step, reported),
                )
                d = None  # Ray's upload thread owns it now and deletes it when uploaded
            else:
                ray.train.report(report, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name(state.step))
                self._stored(state.step, report)
        finally:
            if d is not None:
                shutil.rmtree(d, ignore_errors=True)
        return time.perf_counter() - t0

    #: seconds the last finished background upload took (remote storage), None before the first
    last_upload_s: Optional[float] = None

    #: rank 0 calls ``on_saved(step, location, report)`` once its copy of a checkpoint is on storage
    #: (the loop registers it as an MLflow LoggedModel: :mod:`megaray.train.logged_models`); it must not raise
    on_saved: Optional[Callable[[int, str, Dict[str, Any]], Any]] = None

    def _stored(self, step: int, report: Dict[str, Any]) -> None:
        if self.rank == 0 and self.on_saved is not None and self.run_dir:
            self.on_saved(step, f"{self.run_dir.rstrip('/')}/{checkpoint_dir_name(step)}", report)

    def _upload(
        self, checkpoint: Any, dir_name: str, step: Optional[int] = None, report: Optional[Dict[str, Any]] = None
    ) -> Any:
        """Ray Train's ``checkpoint_upload_fn``: copy into the run's storage, with retries."""
        import ray.train

        storage = ray.train.get_context().get_storage()
        t0 = time.perf_counter()
        out = upload_with_retry(lambda: storage.persist_current_checkpoint(checkpoint, dir_name), dir_name)
        self.last_upload_s = time.perf_counter() - t0
        if step is not None:
            self._stored(step, report or {})
        return out


#: attempts of one checkpoint upload, and the first back-off (doubled after each failure)
UPLOAD_ATTEMPTS, UPLOAD_BACKOFF_S = 4, 1.0


def upload_with_retry(
    upload: Callable[[], Any], what: str, attempts: int = UPLOAD_ATTEMPTS, backoff_s: float = UPLOAD_BACKOFF_S
) -> Any:
    """``upload()``, retried with exponential back-off on transient storage errors.

    Object stores fail transiently (throttling, a dropped connection, a 5xx); pyarrow raises these
    as ``OSError`` (``ConnectionError``, ``TimeoutError`` are ``OSError`` too). A missing local
    source (``FileNotFoundError``) or a permission error is not transient and is raised at once.

    Raises:
        OSError: the last attempt's error, after ``attempts`` tries.
    """
    for attempt in range(1, attempts + 1):
        try:
            return upload()
        except (FileNotFoundError, PermissionError):
            raise
        except OSError as e:
            if attempt == attempts:
                raise
            wait = backoff_s * 2 ** (attempt - 1)
            log.warning(
                "checkpoint %s: upload attempt %d/%d failed (%s); retrying in %.1fs", what, attempt, attempts, e, wait
            )
            time.sleep(wait)
