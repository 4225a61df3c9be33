"""Checkpoints: DeepSpeed state per rank + megaray state, reported through Ray Train.

Layout of one checkpoint directory (``<storage_path>/<run>/step_00000100/``)::

    model/            DeepSpeed ``save_checkpoint(tag="model")``: module, optimizer (ZeRO shards
                      from every rank), LR scheduler, global step
    disc/ ...         one tag per extra module of a task (GAN discriminator)
    rng_rank{r}.pt    python / numpy / torch RNG state of rank r
    model.pt          consolidated weights (``engine.save_16bit_model``; fp32 when training fp32)
    config.yaml       the resolved run config
    tokenizer.json    copied from the data shards (text runs)
    megaray.json      step, tokens seen, epoch, batches consumed, the metrics reported with this
                      checkpoint; written LAST by rank 0

Crash safety: every rank writes into a fresh local temporary directory; Ray Train copies the
merged result into storage and only then registers it as the latest checkpoint, so a crash in
the middle of a write leaves the previous checkpoint untouched. ``megaray.json`` is written last
and :func:`resolve` ignores directories without it.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import torch

from megaray.config import RunConfig
from megaray.errors import CheckpointError
from megaray.families import load_config

STATE_FILE = "megaray.json"
WEIGHTS_FILE = "model.pt"




def checkpoint_dir_name(step: int) -> str:
    """Directory name of the checkpoint at optimizer step ``step`` (sorts by step)."""
    return f"step_{step:08d}"


def save(
    out_dir: str,
    engines: Mapping[str, Any],
    state: Dict[str, Any],
    cfg: RunConfig,
    rank: int,
    extra_files: Mapping[str, str] = {},
) -> None:
    """Write this rank's share of a checkpoint into ``out_dir`` (a fresh local directory).

    ``extra_files`` maps file names to text written by rank 0 (the task's tokenizer.json).

    Collective: every rank must call it (DeepSpeed barriers inside ``save_checkpoint`` and, under
    ZeRO-3, the gather in ``save_16bit_model``).
    """
    os.makedirs(out_dir, exist_ok=True)
    for name, engine in engines.items():
        engine.save_checkpoint(out_dir, tag=name, client_state={"megaray": state})
    engines["model"].save_16bit_model(out_dir, WEIGHTS_FILE)
    torch.save(_rng_state(), os.path.join(out_dir, f"rng_rank{rank}.pt"))
    if rank == 0:
        cfg.to_yaml(os.path.join(out_dir, "config.yaml"))
        for name, text in extra_files.items():
            Path(out_dir, name).write_text(text)
        tmp = os.path.join(out_dir, STATE_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(state, f, indent=2)
        os.replace(tmp, os.path.join(out_dir, STATE_FILE))


def load(ckpt_dir: str, engines: Mapping[str, Any], rank: int) -> Dict[str, Any]:
    """Restore every engine (module, optimizer, scheduler) and this rank's RNG from ``ckpt_dir``.

    Returns the megaray state dict (step, tokens, epoch, batch_in_epoch).

    Raises:
        CheckpointError: the directory has no ``megaray.json`` or an engine's tag is missing.
    """
    state_path = Path(ckpt_dir) / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"{ckpt_dir}: not a complete megaray checkpoint (no {STATE_FILE})")
    for name, engine in engines.items():
        if not (Path(ckpt_dir) / name).is_dir():
            raise CheckpointError(f"{ckpt_dir}: no DeepSpeed state for module {name!r}")
        load_path, _ = engine.load_checkpoint(ckpt_dir, tag=name)
        if load_path is None:
            raise CheckpointError(f"{ckpt_dir}/{name}: DeepSpeed could not load this checkpoint")
    rng = Path(ckpt_dir) / f"rng_rank{rank}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    return json.loads(state_path.read_text())


def resolve(path: str | os.PathLike) -> Path:
    """A complete checkpoint directory from ``path``: the directory itself, or the latest
    complete ``step_*`` checkpoint below a run directory.

    Raises:
        CheckpointError: nothing complete there; the message says what was looked for.
    """
    p = Path(path)
    if (p / STATE_FILE).is_file():
        return p
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p} does not exist (pass a run directory such as runs/<name> or one of its step_* folders)")
    found = sorted(d for d in p.glob("**/step_*") if (d / STATE_FILE).is_file())
    if not found:
        raise CheckpointError(f"no complete checkpoint under {p} (looked for step_*/{STATE_FILE}); has the run saved one yet?")
    return max(found, key=lambda d: json.loads((d / STATE_FILE).read_text())["step"])


def latest_complete(run_dir: Optional[str], world_size: int) -> Optional[Path]:
    """Newest checkpoint under a local ``run_dir`` that every one of ``world_size`` ranks finished
    writing (``megaray.json`` plus one ``rng_rank{r}.pt`` per rank), or None. URIs return None
    (there Ray's own registry is the only source)."""
    if not run_dir or "://" in run_dir or not Path(run_dir).is_dir():
        return None
    done = [d for d in Path(run_dir).glob("step_*")
            if (d / STATE_FILE).is_file() and all((d / f"rng_rank{r}.pt").is_file() for r in range(world_size))]
    return max(done, key=lambda d: d.name) if done else None


def load_for_inference(path: str | os.PathLike, device: str = "cpu") -> Tuple[torch.nn.Module, RunConfig, Path]:
    """Rebuild the trained model from a checkpoint for generation, evaluation or vocoding.

    Returns ``(model in eval mode, resolved run config, checkpoint directory)``.

    Raises:
        CheckpointError: no complete checkpoint or no consolidated weights in it.
    """
    from megaray import families

    ckpt = resolve(path)
    cfg = load_config(ckpt / "config.yaml")
    weights = ckpt / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{ckpt}: no {WEIGHTS_FILE} (consolidated weights) in this checkpoint")
    model = families.build_model(cfg.model)
    sd = torch.load(weights, map_location=device, weights_only=True)
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    return model.to(device).eval(), cfg, ckpt


def read_state(path: str | os.PathLike) -> Optional[Dict[str, Any]]:
    """The megaray state of the latest complete checkpoint under ``path``, or None."""
    try:
        return json.loads((resolve(path) / STATE_FILE).read_text())
    except CheckpointError:
        return None


def _rng_state() -> Dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(s: Dict[str, Any]) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
