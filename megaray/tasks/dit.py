"""The ``dit`` family's task: :func:`dit_task` picks the DiT task by the kind of data it trains on.

A dit run trains on image latents (:class:`~megaray.tasks.image_diffusion.ImageDiffusionTask`) or
on log-mels of speech (:class:`~megaray.tasks.mel_diffusion.MelDiffusionTask`); the shards'
manifest says which (its ``kind``), and a checkpoint's ``diffusion.json`` keeps it. This is the one
place that chooses; everything else is the chosen task's.
"""

from __future__ import annotations

from typing import Optional

from megaray.config import RunConfig
from megaray.errors import DataError
from megaray.tasks.base import TaskInfo
from megaray.tasks.diffusion import DiffusionTask
from megaray.tasks.image_diffusion import ImageDiffusionTask
from megaray.tasks.mel_diffusion import MelDiffusionTask

#: manifest ``kind`` -> the task that trains on it
TASKS = {task.kind: task for task in (ImageDiffusionTask, MelDiffusionTask)}


def dit_task(cfg: RunConfig, info: Optional[TaskInfo] = None) -> DiffusionTask:
    """The DiT task of run ``cfg`` (the family's ``task``, called as a task class is).

    The kind comes from ``info`` (what the driver found, on a worker; a checkpoint's
    ``diffusion.json`` in ``megaray sample``), else from the manifest of ``data.shards``. Before
    the shards are prepared (or when they are of another kind, or several), the model decides: a
    1-channel text-conditioned DiT (``model.in_channels: 1``, ``model.context_dim > 0``) is a mel
    DiT, anything else an image-latent one; its :meth:`~megaray.tasks.base.Task.prepare_command`
    names the command that prepares them, and :meth:`~DiffusionTask.datasets` the error.
    """
    kind = getattr(info, "kind", None) or _shards_kind(cfg)
    if kind not in TASKS:
        m = cfg.model
        kind = MelDiffusionTask.kind if m.context_dim and m.in_channels == 1 else ImageDiffusionTask.kind
    return TASKS[kind](cfg, info)


def _shards_kind(cfg: RunConfig) -> Optional[str]:
    """The ``kind`` in the manifest of the run's one shard set; None when there is none to read."""
    from megaray.data.manifest import read_manifest

    sources = cfg.data.resolved_sources()
    if len(sources) != 1:
        return None
    try:
        return read_manifest(sources[0].shards).get("kind")
    except DataError:  # not prepared yet: the model decides
        return None
