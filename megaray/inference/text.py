"""A trained text model and its tokenizer, loaded for ``megaray eval`` and ``megaray generate``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Tuple

import torch

from megaray.config import RunConfig
from megaray.errors import CheckpointError

TOKENIZER_FILE = "tokenizer.json"


def load_text_model(checkpoint: str | os.PathLike, device: str) -> Tuple[torch.nn.Module, RunConfig, Path, str]:
    """``(model in eval mode on device, run config, checkpoint dir, tokenizer JSON text)``.

    A text run's checkpoint carries the ``tokenizer.json`` of its shards; a checkpoint without
    one is not a text model's.

    Raises:
        CheckpointError: no complete checkpoint, truncated or corrupt weights, or no
            ``tokenizer.json`` (names the checkpoint and its family).
    """
    from megaray.train.checkpoint import load_for_inference, resolve

    ckpt = resolve(checkpoint)
    tok = ckpt / TOKENIZER_FILE
    if not tok.is_file():
        from megaray.families import load_config

        family = load_config(ckpt / "config.yaml").model.family
        raise CheckpointError(
            f"{ckpt}: no {TOKENIZER_FILE}, so not a text model's checkpoint (its family is "
            f"{family!r}); eval and generate need a text run such as runs/gpt-debug"
        )
    model, cfg, ckpt = load_for_inference(ckpt, device)
    return model, cfg, ckpt, tok.read_text()
