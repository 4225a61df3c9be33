"""Where rank 0 logs a run: MLflow (the default), TensorBoard and Weights & Biases behind one fan-out.

A :class:`Tracker` takes scalars at an optimizer step, eval images / audio / texts at a step, and
the run's params. :class:`Trackers` hands each call to every tracker of the run, so the
:class:`~megaray.train.reporter.Reporter` and the :class:`~megaray.train.evaluator.Evaluator`
call one thing. Only rank 0 holds trackers; the other ranks hold an empty :class:`Trackers`.

* :class:`MLflowTracker` wraps the run's :class:`~megaray.train.mlflow.RunLogger` (``tracking.enabled``);
  the driver creates, resumes and ends the MLflow run and logs its params (:mod:`megaray.train.mlflow`).
* :class:`TensorBoardTracker` (``tracking.tensorboard: true``): ``torch.utils.tensorboard.SummaryWriter``
  event files in ``<run folder>/tensorboard/``; with remote storage (``s3://``, ``gs://``) written on the
  rank-0 worker under ``$TMPDIR/megaray-tensorboard/<name>-<hash of the run folder>/`` and copied into
  the run folder every :attr:`TensorBoardTracker.MIRROR_EVERY_S` seconds and at the end.
* :class:`WandbTracker` (``tracking.wandb: {project, entity, mode}``): one W&B run per megaray run,
  named after it, whose id is kept in ``<run folder>/wandb-run-id`` so a restart resumes it.

The driver resolves the folders and the W&B id once (:func:`prepare`, before any worker starts) and
rank 0 opens the trackers from that (:func:`open_trackers`). Scalars are the same everywhere: the
same names and steps; non-finite values are left out of all of them (MLflow refuses them).
TensorBoard and W&B are imported lazily, so neither is needed unless a run asks for it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import os
import posixpath
import tempfile
import time
import uuid
from html import escape
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Protocol, Sequence

from megaray.errors import ConfigError

log = logging.getLogger("megaray.tracking")

#: eval artifact files shown as images / audio by the trackers that can (the rest go to MLflow only)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
AUDIO_SUFFIXES = (".wav", ".flac")
#: the file in the run folder that keeps the W&B run id across restarts
WANDB_ID_FILE = "wandb-run-id"


class Tracker(Protocol):
    """One destination of a run's logs. ``step`` is the optimizer step; ``key`` a ``/``-separated
    name (``loss``, ``system/time_step_s``, ``eval/samples``); ``path`` a local file."""

    def log_metrics(self, step: int, values: Mapping[str, float]) -> None: ...

    def log_image(self, key: str, path: str, step: int) -> None: ...

    def log_audio(self, key: str, path: str, step: int) -> None: ...

    def log_text(self, key: str, text: str, step: int) -> None: ...

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class Trackers:
    """Every :class:`Tracker` of a run, called in turn (an empty one does nothing)."""

    def __init__(self, trackers: Sequence[Tracker] = ()):
        self.trackers: List[Tracker] = list(trackers)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log_metrics(self, step: int, values: Mapping[str, float]) -> None:
        """Scalars at ``step``; None and non-finite values are left out (MLflow refuses them)."""
        clean = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}
        if clean:
            for t in self.trackers:
                t.log_metrics(step, clean)

    def log_image(self, key: str, path: str, step: int) -> None:
        for t in self.trackers:
            t.log_image(key, path, step)

    def log_audio(self, key: str, path: str, step: int) -> None:
        for t in self.trackers:
            t.log_audio(key, path, step)

    def log_text(self, key: str, text: str, step: int) -> None:
        for t in self.trackers:
            t.log_text(key, text, step)

    def log_params(self, params: Mapping[str, Any]) -> None:
        for t in self.trackers:
            t.log_params(params)

    def log_folder(self, folder: str, step: int, prefix: str = "eval") -> List[str]:
        """The images and audio files under ``folder`` as ``<prefix>/<relative path without suffix>``
        (``eval/samples`` for ``samples.png``); returns the other files, which only MLflow can keep."""
        rest = []
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            key = posixpath.join(prefix, path.relative_to(folder).with_suffix("").as_posix())
            suffix = path.suffix.lower()
            if suffix in IMAGE_SUFFIXES:
                self.log_image(key, str(path), step)
            elif suffix in AUDIO_SUFFIXES:
                self.log_audio(key, str(path), step)
            else:
                rest.append(str(path))
        return rest

    def close(self) -> None:
        """Close every tracker (the first error is raised after all were tried)."""
        error = None
        for t in self.trackers:
            try:
                t.close()
            except Exception as e:  # close the others first
                error = error or e
        self.trackers = []
        if error is not None:
            raise error


class MLflowTracker:
    """The MLflow run (:class:`~megaray.train.mlflow.RunLogger`): scalars, and eval files as artifacts
    ``<prefix>/step_<step>/<file>`` and texts as ``<key>/step_<step>.txt`` (where they always were).
    ``log_params`` does nothing: the driver logs them when it creates the run
    (:func:`megaray.train.mlflow.start_run`, ``resume.<key>`` tags for changed values); ``close``
    neither: the driver ends the run."""

    def __init__(self, logger: Any):
        self.logger = logger

    def log_metrics(self, step: int, values: Mapping[str, float]) -> None:
        self.logger.metrics(values, step)

    def log_image(self, key: str, path: str, step: int) -> None:
        self.logger.artifact(path, self.artifact_dir(key, step))

    log_audio = log_image

    def log_text(self, key: str, text: str, step: int) -> None:
        self.logger.text(text, f"{key}/step_{step:08d}.txt")

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass

    @staticmethod
    def artifact_dir(key: str, step: int) -> str:
        """``eval/samples`` at step 10 -> ``eval/step_00000010``; ``eval/a/b`` -> ``eval/step_00000010/a``."""
        prefix, _, rest = key.partition("/")
        return posixpath.join(f"{prefix}/step_{step:08d}", posixpath.dirname(rest)).rstrip("/")


class TensorBoardTracker:
    """TensorBoard event files in ``logdir`` (``torch.utils.tensorboard.SummaryWriter``).

    Scalars as ``add_scalar`` (float32 in the event file), images as ``add_image`` (HWC uint8),
    audio as ``add_audio`` (mixed to mono, float in [-1, 1], the file's sample rate), texts and
    params as ``add_text`` (Markdown code blocks). ``purge_step``: the step a resumed attempt
    starts after; TensorBoard hides what an earlier attempt logged from there on, so a curve
    shows each step once. ``mirror``: a remote folder (``s3://...``) that gets a copy of
    ``logdir`` every :attr:`MIRROR_EVERY_S` seconds and at :meth:`close`.

    Raises:
        ConfigError: tensorboard is not installed.
    """

    MIRROR_EVERY_S = 60.0

    def __init__(self, logdir: str, purge_step: Optional[int] = None, mirror: Optional[str] = None):
        require("tensorboard", "tracking.tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        os.makedirs(logdir, exist_ok=True)
        self.logdir, self.mirror = logdir, mirror
        self.writer = SummaryWriter(log_dir=logdir, purge_step=purge_step or None)
        self._mirrored = time.monotonic()

    def log_metrics(self, step: int, values: Mapping[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()  # a crashed worker loses nothing logged
        if self.mirror and time.monotonic() - self._mirrored >= self.MIRROR_EVERY_S:
            self._copy_to_mirror()

    def log_image(self, key: str, path: str, step: int) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            im = im if im.mode in ("RGB", "RGBA", "L") else im.convert("RGB")
            arr = np.asarray(im)
        self.writer.add_image(key, arr, step, dataformats="HW" if arr.ndim == 2 else "HWC")

    def log_audio(self, key: str, path: str, step: int) -> None:
        import soundfile as sf
        import torch

        wave, rate = sf.read(path, dtype="float32", always_2d=True)  # (L, channels)
        mono = torch.from_numpy(wave.mean(axis=1)).clamp(-1, 1)[None]  # (1, L)
        self.writer.add_audio(key, mono, step, sample_rate=rate)

    def log_text(self, key: str, text: str, step: int) -> None:
        self.writer.add_text(key, _code_block(text), step)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.writer.add_text("config", _code_block("\n".join(f"{k}: {v}" for k, v in params.items())), 0)

    def close(self) -> None:
        self.writer.close()
        if self.mirror:
            self._copy_to_mirror()

    def _copy_to_mirror(self) -> None:
        import pyarrow.fs as pafs

        from megaray.fs import resolve

        _make_local_dir(self.mirror)
        dst_fs, dst = resolve(self.mirror)
        pafs.copy_files(self.logdir, dst, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=dst_fs)
        self._mirrored = time.monotonic()


class WandbTracker:
    """One Weights & Biases run: ``wandb.init(project, entity, name, id, resume="allow", mode, dir)``.

    Scalars with ``step=`` (the optimizer step: W&B's ``_step``), images as ``wandb.Image``, audio
    as ``wandb.Audio``, texts as ``wandb.Html`` (``<pre>``), params as the run config. W&B keeps
    steps increasing within a run: a resumed attempt's first steps up to the last one logged
    before the restart are dropped by W&B (with a warning), the later ones continue the run.
    W&B's own console capture is off (the worker's output is Ray's).

    Raises:
        ConfigError: wandb is not installed, or W&B refuses the run (no API key, bad credentials).
    """

    def __init__(
        self,
        project: str,
        run_id: str,
        name: str,
        mode: str = "online",
        entity: Optional[str] = None,
        dir: Optional[str] = None,
    ):
        require("wandb", "tracking.wandb", "wandb")
        import wandb

        if dir:
            os.makedirs(dir, exist_ok=True)
        self.wandb = wandb
        try:
            self.run = wandb.init(
                project=project,
                entity=entity,
                name=name,
                id=run_id,
                resume="allow",
                mode=mode,
                dir=dir,
                settings=wandb.Settings(console="off", silent=True),
            )
        except (wandb.errors.UsageError, wandb.errors.AuthenticationError) as e:  # not retried: the user's to fix
            raise ConfigError(
                f"tracking.wandb: W&B refused the run ({e}); log in on the rank-0 node (`wandb login` "
                "or WANDB_API_KEY), or set tracking.wandb.mode=offline"
            ) from None

    def log_metrics(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def log_image(self, key: str, path: str, step: int) -> None:
        self.run.log({key: self.wandb.Image(path)}, step=step)

    def log_audio(self, key: str, path: str, step: int) -> None:
        self.run.log({key: self.wandb.Audio(path)}, step=step)

    def log_text(self, key: str, text: str, step: int) -> None:
        self.run.log({key: self.wandb.Html(f"<pre>{escape(text)}</pre>")}, step=step)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.run.config.update(dict(params), allow_val_change=True)

    def close(self) -> None:
        self.run.finish()


def require(module: str, key: str, package: str) -> None:
    """Raise ConfigError naming ``key`` and the ``pip install`` when ``module`` is missing."""
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"{key}: the {package} package is not installed here: pip install {package} "
            f"(or pip install 'megaray[trackers]'), or turn {key} off"
        )


def prepare(cfg: Any, run_dir: str) -> Dict[str, Any]:
    """Driver side, before any worker starts: what rank 0 opens (:func:`open_trackers`).

    ``{"tensorboard": {"logdir", "mirror"}, "wandb": {WandbTracker's arguments}}``, each only when
    on. TensorBoard writes into ``<run_dir>/tensorboard`` (local storage) or a local folder copied
    there (remote). The W&B run id is read from ``<run_dir>/wandb-run-id``, or made and written
    there: a re-run of the same run continues the same W&B run.

    Raises:
        ConfigError: a tracker that is on is not installed (on the driver).
    """
    from megaray import fs

    t, out = cfg.tracking, {}
    if t.tensorboard:
        require("tensorboard", "tracking.tensorboard", "tensorboard")
        target = fs.join(run_dir, "tensorboard")
        if fs.is_uri(run_dir):  # one local folder per run folder: another run's files never go along
            key = hashlib.sha1(run_dir.encode()).hexdigest()[:8]
            local = os.path.join(tempfile.gettempdir(), "megaray-tensorboard", f"{cfg.name}-{key}")
            out["tensorboard"] = {"logdir": local, "mirror": target}
        else:
            out["tensorboard"] = {"logdir": target, "mirror": None}
    w = t.wandb
    if w is not None and w.mode != "disabled":
        require("wandb", "tracking.wandb", "wandb")
        out["wandb"] = {
            "project": w.project or t.experiment,
            "entity": w.entity,
            "mode": w.mode,
            "run_id": wandb_run_id(run_dir),
            "name": cfg.name,
            "dir": os.path.abspath(w.dir) if w.dir else (None if fs.is_uri(run_dir) else run_dir),
        }
    return out


def wandb_run_id(run_dir: str) -> str:
    """The W&B run id kept in ``<run_dir>/wandb-run-id``, made (8 hex digits) on first use."""
    from megaray import fs

    path = fs.join(run_dir, WANDB_ID_FILE)
    if fs.exists(path):
        return fs.read_text(path).strip()
    run_id = uuid.uuid4().hex[:8]
    _make_local_dir(run_dir)
    fs.write_text(path, run_id + "\n")
    return run_id


def open_trackers(
    spec: Mapping[str, Any], logger: Any, rank: int, params: Mapping[str, Any], start_step: int = 0
) -> Trackers:
    """Rank 0: MLflow (when ``logger`` is enabled) and the trackers :func:`prepare` asked for, with
    ``params`` logged; other ranks: an empty :class:`Trackers`. ``start_step``: the step this
    attempt resumes at (TensorBoard hides what an earlier attempt logged after it)."""
    if rank != 0:
        return Trackers()
    out: List[Tracker] = [MLflowTracker(logger)] if logger is not None and logger.enabled else []
    if spec.get("tensorboard"):
        out.append(TensorBoardTracker(purge_step=start_step + 1 if start_step else None, **spec["tensorboard"]))
    if spec.get("wandb"):
        out.append(WandbTracker(**spec["wandb"]))
    trackers = Trackers(out)
    trackers.log_params(params)
    return trackers


def _make_local_dir(location: str) -> None:
    """Create a local folder (a path or ``file://``) that Ray Train has not made yet; object stores need none."""
    import pyarrow.fs as pafs

    from megaray import fs

    filesystem, path = fs.resolve(location)
    if isinstance(filesystem, pafs.LocalFileSystem):
        filesystem.create_dir(path, recursive=True)


def _code_block(text: str) -> str:
    """Markdown code block (TensorBoard renders texts as Markdown)."""
    return "\n".join("    " + line for line in text.splitlines())
