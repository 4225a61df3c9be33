"""Branching a run at a chosen checkpoint: ``megaray train CONFIG --resume-from CHECKPOINT``.

A run resumes from its newest checkpoint by default. Resuming from an older one (to go back before
a divergence, or to continue with other settings from a point of the run) makes a *branch*: the
run's checkpoints past that point are moved aside, so the branch point is the newest checkpoint
and every later save and every later plain re-run belong to the new branch::

    runs/NAME/
      step_00000004/                       the branch point (and the run's older checkpoints)
      step_00000008/ ...                   written by the new branch
      branches/20261205-024000-after-step_00000004/
        old-step_00000008/ old-step_00000012/   the abandoned branch, intact (readable with
                                                --checkpoint, train.init_from)

The moved folders are renamed ``old-step_*`` so that nothing that looks for a run's ``step_*``
folders (the workers' :func:`~megaray.train.checkpoint.latest_local`, ``megaray eval --checkpoint
runs/NAME``) finds them again. Ray Train's own record of the run's checkpoints is rewritten to
match (:func:`megaray.train.ray_compat.branch_snapshot`), so on ``s3://``/``gs://`` storage, where
the workers restore what Ray hands over, the branch point is handed over too.

:func:`find_checkpoint` checks the argument on the driver, before anything is moved: a path that is
no checkpoint of this run, or a checkpoint that is incomplete or has a truncated file, is a
:class:`~megaray.errors.CheckpointError` naming it. :func:`branch` then moves the later checkpoints.
"""

from __future__ import annotations

import json
import re
import time
import zipfile
from dataclasses import dataclass, field
from typing import List, Optional

import pyarrow.fs as pafs

from megaray import fs
from megaray.errors import CheckpointError
from megaray.train.checkpoint import STATE_FILE, TrainState, checkpoint_dir_name

#: folder of a run that holds its abandoned branches
BRANCHES = "branches"
#: prefix of a moved checkpoint folder (it no longer matches ``step_*``)
OLD_PREFIX = "old-"
_STEP = re.compile(r"^(?:step_)?(\d+)$")


@dataclass
class Branch:
    """The outcome of :func:`branch`.

    Attributes:
        checkpoint: the branch point (its location: a local path or URI).
        step: its optimizer step.
        state: its :class:`~megaray.train.checkpoint.TrainState`.
        moved: ``[(old location, new location)]`` of the checkpoints moved aside, oldest first.
        aside: the folder they went to (None when the branch point was the newest).
    """

    checkpoint: str
    step: int
    state: TrainState
    moved: List[tuple] = field(default_factory=list)
    aside: Optional[str] = None

    def describe(self) -> str:
        """The driver's console line."""
        line = f"resuming from {self.checkpoint} (step {self.step})"
        if self.moved:
            names = ", ".join(old.rstrip("/").rsplit("/", 1)[-1] for old, _ in self.moved)
            line += f": the later checkpoints ({names}) moved to {self.aside}; a plain re-run continues this branch"
        return line


def _steps(run_dir: str) -> List[tuple]:
    """``[(step, folder name)]`` of the ``step_*`` folders directly in ``run_dir``, by step."""
    filesystem, path = fs.resolve(run_dir)
    try:
        infos = filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError:
        return []
    out = []
    for info in infos:
        m = re.match(r"^step_(\d+)$", info.base_name)
        if info.type == pafs.FileType.Directory and m:
            out.append((int(m.group(1)), info.base_name))
    return sorted(out)


def _same(a: str, b: str) -> bool:
    if fs.is_uri(a) or fs.is_uri(b):
        return a.rstrip("/") == b.rstrip("/")
    return fs.resolve(a)[1] == fs.resolve(b)[1]


def find_checkpoint(arg: str, run_dir: str) -> str:
    """The location of the checkpoint of run ``run_dir`` that ``arg`` names, checked complete.

    ``arg``: the checkpoint folder (``runs/NAME/step_00000004``, as the console's ``resumed from``
    lines and the MLflow ``megaray.checkpoint`` tags show it; relative to the working directory),
    or a step of this run: ``step_00000004``, ``step_4`` or ``4``.

    Raises:
        CheckpointError: no such checkpoint (the run's checkpoints are listed), a folder that is not
            one of this run's checkpoints, or an incomplete or truncated checkpoint (named).
    """
    arg = str(arg).strip()
    have = _steps(run_dir)
    listing = ", ".join(name for _, name in have) or "none yet"
    m = _STEP.match(arg.rstrip("/"))
    if m:
        location = fs.join(run_dir, checkpoint_dir_name(int(m.group(1))))
    else:
        location = arg.rstrip("/") if fs.is_uri(arg) else fs.resolve(arg)[1]
        if not _same(fs.dirname(location), run_dir):
            hint = (
                " (a checkpoint of an abandoned branch: to continue it, move its folder back as step_* "
                "after moving the current ones aside)"
                if f"/{BRANCHES}/" in location.replace("\\", "/")
                else ""
            )
            raise CheckpointError(
                f"--resume-from {arg}: not a checkpoint of run {run_dir}{hint}; its checkpoints: "
                f"{listing}. To start a new run from another run's weights use "
                "--set train.init_from=CHECKPOINT (or megaray finetune --from)"
            )
    if not fs.exists(location):
        raise CheckpointError(
            f"--resume-from {arg}: no checkpoint {location} (the run's checkpoints: {listing}; "
            "scaling.num_to_keep deletes older ones)"
        )
    check_complete(location, arg)
    return location


def check_complete(location: str, arg: Optional[str] = None) -> TrainState:
    """The checkpoint's :class:`TrainState`, after checking that it is whole: ``megaray.json``
    readable, the DeepSpeed state folder ``model/``, one ``rng_rank{r}.pt`` per rank of the world
    that wrote it, and every ``*.pt`` file a complete zip archive (``torch.save``'s format: a
    truncated file has lost the archive's central directory at its end; only that directory is
    read, not the tensors).

    Raises:
        CheckpointError: naming the checkpoint and the missing or truncated file.
    """
    what = f"--resume-from {arg}: " if arg else ""
    filesystem, path = fs.resolve(location)
    state_path = fs.join(location, STATE_FILE)
    if not fs.exists(state_path):
        raise CheckpointError(
            f"{what}{location} is not a complete megaray checkpoint (no {STATE_FILE}: its write "
            "did not finish); pick an earlier step_* checkpoint"
        )
    try:
        state = TrainState.from_json(json.loads(fs.read_text(state_path)))
    except (ValueError, TypeError) as e:
        raise CheckpointError(
            f"{what}{state_path} is truncated or corrupt ({e}); pick an earlier step_* checkpoint"
        ) from None
    infos = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
    names = {i.path[len(path) :].lstrip("/"): i for i in infos}
    missing = [n for n in ["model", *(f"rng_rank{r}.pt" for r in range(state.world_size))] if n not in names]
    if missing:
        raise CheckpointError(
            f"{what}{location} is incomplete: {', '.join(missing)} missing; pick an earlier step_* checkpoint"
        )
    for name, info in sorted(names.items()):
        if info.type != pafs.FileType.File or not name.endswith(".pt") or "_universal/" in name:
            continue
        try:
            with filesystem.open_input_file(info.path) as f:
                zipfile.ZipFile(f).close()
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise CheckpointError(
                f"{what}{location}/{name} is truncated or corrupt ({type(e).__name__}: {e}); pick "
                "an earlier step_* checkpoint"
            ) from None
    return state


def branch(location: str, run_dir: str, now: Optional[float] = None) -> Branch:
    """Make checkpoint ``location`` (from :func:`find_checkpoint`) the newest of run ``run_dir``:
    move every ``step_*`` folder of a later step into ``branches/<UTC time>-after-step_XXXXXXXX/``
    as ``old-step_*`` and rewrite Ray Train's record of the run to match. Returns the :class:`Branch`.

    Local folders are renamed; on object stores each is copied and then deleted.
    """
    from megaray.train.ray_compat import branch_snapshot

    state = TrainState.from_json(json.loads(fs.read_text(fs.join(location, STATE_FILE))))
    name = location.rstrip("/").rsplit("/", 1)[-1]
    later = [(s, n) for s, n in _steps(run_dir) if s > state.step]
    out = Branch(checkpoint=location, step=state.step, state=state)
    if later:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
        out.aside = fs.join(run_dir, BRANCHES, f"{stamp}-after-{name}")
        filesystem, _ = fs.resolve(run_dir)
        # Ray's record first: a crash between the two leaves checkpoints Ray no longer lists (harmless),
        # never a record of checkpoints that are gone (Ray refuses to start on that)
        branch_snapshot(run_dir, name, [n for _, n in later], state.metrics)
        filesystem.create_dir(fs.resolve(out.aside)[1], recursive=True)
        for _, old_name in later:
            old, new = fs.join(run_dir, old_name), fs.join(out.aside, OLD_PREFIX + old_name)
            _move(filesystem, fs.resolve(old)[1], fs.resolve(new)[1], fs.is_uri(run_dir))
            out.moved.append((old, new))
    else:
        branch_snapshot(run_dir, name, [], state.metrics)
    return out


def _move(filesystem: pafs.FileSystem, src: str, dst: str, remote: bool) -> None:
    if not remote:
        filesystem.move(src, dst)
        return
    pafs.copy_files(src, dst, source_filesystem=filesystem, destination_filesystem=filesystem)
    filesystem.delete_dir(src)


def retag_logged_models(uri: str, run_id: str, moved: List[tuple]) -> int:
    """Point the MLflow LoggedModels of the moved checkpoints (tag ``megaray.checkpoint``) at their
    new folders and tag them ``megaray.branch=abandoned``, so ``models:/<id>`` still loads them and
    no model points at a folder the new branch writes again. Returns how many were changed; an
    MLflow failure is a warning (tracking never stops a run)."""
    import logging

    from megaray.train import mlflow as tracking
    from megaray.weights import CHECKPOINT_TAG

    if not moved:
        return 0
    where = {_key(old): new for old, new in moved}
    changed = 0
    try:
        c = tracking.client(uri)
        exp = c.get_run(run_id).info.experiment_id
        token = None
        while True:
            page = c.search_logged_models(
                [exp], filter_string=f"source_run_id = '{run_id}'", max_results=100, page_token=token
            )
            for m in page:
                new = where.get(_key(m.tags.get(CHECKPOINT_TAG, "")))
                if new is not None:
                    c.set_logged_model_tags(m.model_id, {CHECKPOINT_TAG: new, "megaray.branch": "abandoned"})
                    changed += 1
            token = page.token
            if not token:
                break
    except Exception as e:  # noqa: BLE001 - tracking never stops a run
        logging.getLogger("megaray.tracking").warning(
            "MLflow: the LoggedModels of the moved checkpoints were not re-pointed (%s: %s)",
            type(e).__name__,
            str(e)[:300],
        )
    return changed


def _key(location: str) -> str:
    return location.rstrip("/") if fs.is_uri(location) or not location else fs.resolve(location)[1]
