"""Trained weights on disk, the read side: find a complete checkpoint, rebuild its network.

The layout is written by :mod:`megaray.train.checkpoint` (which re-exports these names); this
module sits below ``tasks`` so that a task can load a frozen network from another run (a VAE
that decodes latents, a vocoder, a text encoder) and ``inference`` can load a trained one,
without importing the training layer. A checkpoint directory holds ``config.yaml`` (the resolved
run config), ``model.pt`` (consolidated weights), ``ema.pt`` (EMA weights, when kept) and
``megaray.json`` (written last: its presence marks the directory complete).
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from megaray.config import RunConfig
from megaray.errors import CheckpointError
from megaray.families import load_config

STATE_FILE = "megaray.json"
WEIGHTS_FILE = "model.pt"
EMA_FILE = "ema.pt"
#: what ``torch.load`` raises on a truncated or overwritten file
_UNREADABLE = (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError)


def torch_load(path: Path, **kwargs: Any) -> Any:
    """``torch.load(path)``; a truncated or corrupt file raises CheckpointError naming it."""
    try:
        return torch.load(path, **kwargs)
    except _UNREADABLE as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({type(e).__name__}: {e}); "
                              "resume from an earlier step_* checkpoint or retrain") from None


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


def load_for_inference(path: str | os.PathLike, device: str = "cpu") -> Tuple[torch.nn.Module, RunConfig, Path]:
    """Rebuild the trained model from a checkpoint for generation, evaluation or vocoding.

    The EMA weights (``ema.pt``) when the run kept them (``train.ema_decay``), else the
    consolidated weights (``model.pt``). Returns ``(model in eval mode, resolved run config,
    checkpoint directory)``.

    Raises:
        CheckpointError: no complete checkpoint, no weights in it, or a truncated/corrupt weights
            file (``<checkpoint>/model.pt is truncated or corrupt (...)``).
    """
    from megaray import families

    ckpt = resolve(path)
    cfg = load_config(ckpt / "config.yaml")
    weights = ckpt / (EMA_FILE if (ckpt / EMA_FILE).is_file() else WEIGHTS_FILE)
    if not weights.is_file():
        raise CheckpointError(f"{ckpt}: no {WEIGHTS_FILE} (consolidated weights) in this checkpoint")
    model = families.build_model(cfg.model)
    sd = torch_load(weights, map_location=device, weights_only=True)
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    return model.to(device).eval(), cfg, ckpt


def read_state(path: str | os.PathLike) -> Optional[Dict[str, Any]]:
    """The megaray state of the latest complete checkpoint under ``path``, or None."""
    try:
        return json.loads((resolve(path) / STATE_FILE).read_text())
    except CheckpointError:
        return None
