"""Resume a DeepSpeed checkpoint at another data-parallel world size (DeepSpeed Universal Checkpointing).

Under ZeRO stages 1-3 DeepSpeed partitions the optimizer state (and, at stage 3, the weights)
over the data-parallel ranks, and a plain ``engine.load_checkpoint`` refuses a checkpoint
written by another number of ranks (``ZeRORuntimeException`` in ``_load_zero_checkpoint``,
``deepspeed/runtime/engine.py``). DeepSpeed's Universal Checkpointing re-cuts it:

1. :func:`convert` runs ``deepspeed.checkpoint.ds_to_universal.main`` (in this process, serial:
   ``num_extract_workers = num_merge_workers = 1``) on ``<ckpt>/<tag>`` and writes
   ``<ckpt>/<tag>_universal``: ``zero/<param name>/{fp32,exp_avg,exp_avg_sq,step}.pt``, one
   unpartitioned tensor per parameter and state, ``zero/optimizer_state.pt`` (param groups) and
   copies of the ``*model_states.pt`` files (LR scheduler, global step, client state).
2. :func:`load_engine_universal` (convert, then load) or :func:`load_engine` (load a tag
   converted before) sets ``checkpoint.load_universal`` on the built engine and calls
   ``engine.load_checkpoint(ckpt, tag="<tag>_universal")``; ZeRO 1/2
   (``DeepSpeedZeroOptimizer._load_universal_checkpoint`` ->
   ``load_hp_checkpoint_state_from_checkpoint_dir`` in ``runtime/base_optimizer.py``) and ZeRO 3
   (``DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3``) slice
   each rank's share out of the full tensors. The flag is read at load time only, so it need not
   be (and is better not: every load would then have to be universal) in the config given to
   ``deepspeed.initialize``; the explicit tag makes DeepSpeed's ``latest_universal`` file
   unnecessary.

ZeRO 0 needs no conversion: the whole optimizer state is in ``mp_rank_00_model_states.pt``, so
a plain load works at any world size. That holds for bf16 too: with megaray's config (no
``data_types.grad_accum_dtype``) bf16 at stage 0 is DeepSpeed's unpartitioned
``FP16_UnfusedOptimizer`` (``FP16_Optimizer`` for a fused Adam) in bf16
(``engine._do_optimizer_sanity_check`` -> ``DDP_BFLOAT16``); the partitioning
``BF16_Optimizer`` only comes with ZeRO 1 plus ``grad_accum_dtype: fp32``, or pipeline
parallelism (checked on CPU: a 2-rank bf16 ZeRO-0 checkpoint resumes on 1 rank).

Two gaps of DeepSpeed 0.19.8's universal load, closed here after the load:

* it never calls ``load_module_state_dict``, so persistent buffers (BatchNorm running
  statistics of a GAN discriminator) would keep their initial values; they are copied from the
  checkpoint's ``module`` state dict.
* ZeRO 3 (``load_hp_checkpoint_state_from_checkpoint_dir_stage3``) copies the hyperparameters
  of the *first* saved param group into every group (the no-decay group would get the decay
  group's ``weight_decay``), and gives every sub-group the same ``step`` tensor, which
  ``torch.optim.AdamW`` increments in place once per sub-group: with decay and no-decay groups
  Adam's bias correction would advance two steps per step (the losses drift from the 2nd step
  after the resume). Each group's own values come back from ``zero/optimizer_state.pt`` and each
  sub-group gets its own ``step``.

Source followed: DeepSpeed 0.19.8, ``deepspeed/checkpoint/ds_to_universal.py`` (``main``),
``deepspeed/runtime/engine.py`` (``load_checkpoint``, ``_load_checkpoint``,
``_load_zero_checkpoint``), ``deepspeed/runtime/zero/stage_1_and_2.py`` and ``stage3.py``
(``_load_universal_checkpoint``); https://www.deepspeed.ai/tutorials/universal-checkpointing/.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from megaray.errors import CheckpointError

log = logging.getLogger("megaray.checkpoint")

#: written last into a converted folder, before it is moved into place: what it came from
MARKER = "megaray_universal.json"


def universal_tag(tag: str) -> str:
    """The DeepSpeed tag of ``tag``'s universal conversion: ``f"{tag}_universal"``."""
    return f"{tag}_universal"


def needs_conversion(saved_world: int, world: int, zero_stage: int) -> bool:
    """Whether resuming a checkpoint of ``saved_world`` ranks on ``world`` ranks needs
    :func:`convert`: only under ZeRO >= 1 (partitioned optimizer state) and another world size.
    ZeRO 0 (fp32 or bf16) keeps the whole optimizer state unpartitioned, loadable as is."""
    return zero_stage >= 1 and int(saved_world) != int(world)


def convert(ckpt_dir: str, tag: str, workers: int = 1) -> str:
    """Convert ``ckpt_dir/tag`` into ``ckpt_dir/<tag>_universal`` once; returns the tag to load.

    Cached: a complete conversion (one holding :data:`MARKER`) is returned as is. The conversion
    writes into a temporary sibling folder (``ckpt_dir/.<tag>_universal.tmp-*``) that is moved
    into place with ``os.replace`` only when done, so a crash mid-way never leaves a folder that
    looks complete; several processes converting at once are safe (the first move wins, the
    others discard theirs). DeepSpeed's output (prints, tqdm bars) is captured and logged at
    DEBUG. ``workers`` > 1 gives DeepSpeed that many extract/merge processes (memory-hungry on
    large models); 1 runs serially in this process.

    Raises:
        CheckpointError: ``ckpt_dir/tag`` is missing or is not a ZeRO (stage >= 1) checkpoint,
            ``ckpt_dir`` is not writable, or DeepSpeed's conversion failed (names the folder and
            DeepSpeed's error).
    """
    out_tag = universal_tag(tag)
    final = Path(ckpt_dir) / out_tag
    if (final / MARKER).is_file():
        return out_tag
    src = Path(ckpt_dir) / tag
    if not src.is_dir():
        raise CheckpointError(f"{src}: no DeepSpeed checkpoint to convert to a universal one")
    if not glob.glob(str(src / "*_optim_states.pt")):
        raise CheckpointError(
            f"{src}: no ZeRO optimizer shards (*_optim_states.pt); only ZeRO stage >= 1 "
            "checkpoints need (and can take) a universal conversion"
        )
    from deepspeed.checkpoint import ds_to_universal

    try:
        tmp_root = tempfile.mkdtemp(prefix=f".{out_tag}.tmp-", dir=ckpt_dir)
    except OSError as e:
        raise CheckpointError(
            f"{ckpt_dir}: cannot write the universal conversion of {tag!r} there ({e}); "
            "resume with the number of workers that wrote it"
        ) from None
    out = os.path.join(tmp_root, out_tag)  # DeepSpeed also writes ``latest_universal`` beside it: into tmp_root
    args = argparse.Namespace(
        input_folder=str(src),
        output_folder=out,
        num_extract_workers=max(1, workers),
        num_merge_workers=max(1, workers),
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    chatter = io.StringIO()
    t0 = time.perf_counter()
    try:
        try:
            with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
                ds_to_universal.main(args)
        except Exception as e:  # DeepSpeed raises AssertionError, ValueError, FileNotFoundError, ...
            tail = chatter.getvalue().strip().splitlines()[-3:]
            raise CheckpointError(
                f"{src}: DeepSpeed's universal checkpoint conversion failed ({type(e).__name__}: "
                f"{e}){' | ' + ' | '.join(tail) if tail else ''}"
            ) from None
        seconds = time.perf_counter() - t0
        Path(out, MARKER).write_text(
            json.dumps({"source_tag": tag, "seconds": round(seconds, 3), "deepspeed": _deepspeed_version()})
        )
        log.debug("ds_to_universal %s:\n%s", src, chatter.getvalue())
        try:
            if final.exists() and not (final / MARKER).is_file():
                shutil.rmtree(final)  # not ours (moves are atomic and carry the marker): a leftover copy
            os.replace(out, final)
        except OSError as e:
            if not (final / MARKER).is_file():  # nobody else won the race either
                raise CheckpointError(f"{final}: could not move the universal conversion into place ({e})") from None
        log.info("converted %s to a universal checkpoint in %.1fs", src, seconds)
        return out_tag
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)


def load_engine_universal(engine: Any, ckpt_dir: str, tag: str, workers: int = 1) -> Tuple[str, Dict[str, Any]]:
    """Load ``ckpt_dir/tag`` (written at any data-parallel world size) into the built ``engine``:
    module weights, optimizer state (fp32 master weights, Adam moments, step), param-group
    hyperparameters, LR scheduler, persistent buffers and ``engine.global_steps``. Returns
    DeepSpeed's ``(load_path, client_state)``; ``client_state`` holds what
    ``save_checkpoint(client_state=...)`` stored (``{"megaray": TrainState}``) plus DeepSpeed's
    own metadata keys.

    ZeRO >= 1: rank 0 converts (:func:`convert`) while the others wait (a failure on rank 0 is
    broadcast, so every rank raises it rather than waiting at the next collective), then every
    rank converts too if it does not see rank 0's result (a node-local copy of the checkpoint;
    cached otherwise), and loads it with :func:`load_engine`. ZeRO 0: a plain
    ``engine.load_checkpoint`` (nothing is partitioned). Collective when ``torch.distributed`` is
    initialized: every rank must call it.

    Raises:
        CheckpointError: the conversion failed (on rank 0: every rank raises it), a file is
            truncated or corrupt, or DeepSpeed found nothing to load.
    """
    if int(engine.zero_optimization_stage()) == 0:
        return _load(engine, ckpt_dir, tag, universal=False)
    return _load(engine, ckpt_dir, _convert_collectively(ckpt_dir, tag, workers), universal=True)


def load_engine(engine: Any, ckpt_dir: str, tag: str) -> str:
    """Load the universal tag ``tag`` (``<name>_universal``, made by :func:`convert`, visible to
    this rank) into the built ``engine``, as :func:`load_engine_universal` does after converting;
    returns DeepSpeed's ``load_path``. ``checkpoint.load_universal`` is switched on on the built
    engine for this load only (DeepSpeed reads it at load time: nothing is needed in the config
    given to ``deepspeed.initialize``). A ZeRO-0 engine gets a plain load of ``tag``. Collective
    (ZeRO 3 gathers): every rank must call it.

    Raises:
        CheckpointError: ``tag`` is not a complete universal conversion, a file is truncated or
            corrupt, or DeepSpeed found nothing to load.
    """
    stage0 = int(engine.zero_optimization_stage()) == 0
    if not stage0 and not (Path(ckpt_dir) / tag / MARKER).is_file():
        raise CheckpointError(
            f"{os.path.join(ckpt_dir, tag)}: not a complete universal checkpoint "
            "(megaray.train.universal.convert makes one)"
        )
    return _load(engine, ckpt_dir, tag, universal=not stage0)[0]


def _load(engine: Any, ckpt_dir: str, tag: str, universal: bool) -> Tuple[str, Dict[str, Any]]:
    from megaray.weights import _UNREADABLE

    where = os.path.join(ckpt_dir, tag)
    config = engine._config  # DeepSpeed reads the flag at load time only (engine.load_universal_checkpoint())
    before, config.load_universal_checkpoint = config.load_universal_checkpoint, universal
    try:
        load_path, client_state = engine.load_checkpoint(ckpt_dir, tag=tag)
    except _UNREADABLE + (AssertionError, KeyError) as e:
        raise CheckpointError(f"{where}: DeepSpeed could not load it ({type(e).__name__}: {e})") from None
    finally:
        config.load_universal_checkpoint = before
    if load_path is None:
        raise CheckpointError(f"{where}: DeepSpeed could not load this checkpoint")
    if universal:
        _restore_buffers(engine, where)
        if int(engine.zero_optimization_stage()) == 3:
            _fix_stage3(engine, where)
    return load_path, client_state or {}


def _convert_collectively(ckpt_dir: str, tag: str, workers: int) -> str:
    """Rank 0 converts first; its error (if any) is broadcast so every rank raises it instead
    of waiting forever at the next collective; then the others use (or make) their own."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return convert(ckpt_dir, tag, workers)
    msg: list = [None]
    if dist.get_rank() == 0:
        try:
            convert(ckpt_dir, tag, workers)
        except Exception as e:  # anything: the other ranks must not wait for rank 0 forever
            msg = [
                str(e)
                if isinstance(e, CheckpointError)
                else f"{ckpt_dir}/{tag}: universal conversion failed on rank 0 ({type(e).__name__}: {e})"
            ]
    dist.broadcast_object_list(msg, src=0)
    if msg[0] is not None:
        raise CheckpointError(msg[0])
    return convert(ckpt_dir, tag, workers)  # cached where rank 0's folder is visible


def _persistent_buffers(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    out = {}
    for prefix, mod in module.named_modules():
        for name, buf in mod._buffers.items():
            if buf is not None and name not in mod._non_persistent_buffers_set:
                out[f"{prefix}.{name}" if prefix else name] = buf
    return out


def _restore_buffers(engine: Any, where: str) -> None:
    """Copy persistent buffers from the checkpoint's ``module`` state dict (the universal load
    restores parameters only)."""
    buffers = _persistent_buffers(engine.module)
    if not buffers:
        return
    files = sorted(glob.glob(os.path.join(where, "*model_states.pt")))
    saved = torch.load(files[0], map_location="cpu", weights_only=False, mmap=True).get("module") or {}
    missing = sorted(set(buffers) - set(saved))
    if missing:
        raise CheckpointError(f"{where}: the checkpoint has no buffers {missing[:5]} of this model")
    with torch.no_grad():
        for name, buf in buffers.items():
            buf.copy_(saved[name].to(buf.device, buf.dtype))


def _fix_stage3(engine: Any, where: str) -> None:
    """ZeRO 3: give each param group its own saved hyperparameters back (DeepSpeed copies group
    0's into all), and each sub-group its own Adam ``step`` tensor (DeepSpeed assigns one tensor
    to all, and ``torch.optim.AdamW`` increments it in place once per sub-group step, so with two
    groups the bias correction would count two steps per step)."""
    path = os.path.join(where, "zero", "optimizer_state.pt")
    saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    groups = (saved.get("optimizer_state_dict") or {}).get("param_groups") or saved.get("param_groups") or []
    inner = engine.optimizer.optimizer
    if len(groups) != len(inner.param_groups):
        raise CheckpointError(
            f"{where}: {len(groups)} optimizer param groups saved, this engine has {len(inner.param_groups)}"
        )
    for group, loaded in zip(inner.param_groups, groups):
        for key, value in loaded.items():
            if key != "params":
                group[key] = value
    for flat in engine.optimizer.fp32_partitioned_groups_flat:
        state = inner.state.get(flat, {})
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def _deepspeed_version() -> Optional[str]:
    try:
        import deepspeed

        return deepspeed.__version__
    except Exception:  # pragma: no cover
        return None
