"""``megaray eval``: perplexity of a trained text model on a prepared split, in one process."""

from __future__ import annotations

import math
import time
from typing import Any, Dict, Iterator, Optional

import numpy as np
import torch


def iter_windows(
    shards: str, split: str, block_size: int, batch_size: int, on_corrupt: str = "error"
) -> Iterator[Dict[str, torch.Tensor]]:
    """Packed LM windows of ``split`` in file order, without Ray: batches of
    ``input_ids``/``targets`` int64 ``(batch_size, block_size)`` (the same packing as training).

    Row groups are read one at a time through :func:`megaray.data.shards.read_row_group`, so a
    corrupt data page is named (shard and row group), or skipped when ``on_corrupt="skip"``.

    Raises:
        DataError: missing manifest, missing or corrupt shard (named).
    """
    from megaray import fs
    from megaray.data import text
    from megaray.data.manifest import prepare_hint
    from megaray.data.shards import read_row_group, row_groups

    manifest = text.load_manifest(shards)
    text.check_shards(shards, manifest, splits=[split])
    filesystem, paths = text.shard_paths(shards, manifest, split)
    displays = [fs.join(shards, e["path"]) for e in manifest["splits"][split]["shards"]]
    hint = prepare_hint("text", shards)
    packer = text.Packer(block_size)
    pending = []
    for item in row_groups(filesystem, paths, displays, hint):
        table = read_row_group(filesystem, item, ["tokens"], on_corrupt, hint)
        if table is None:  # skipped (on_corrupt="skip"), logged by read_row_group
            continue
        col = table.column("tokens").combine_chunks()
        w = packer.pack(col.flatten().to_numpy(zero_copy_only=False))
        pending.extend(zip(w["input_ids"], w["targets"]))
        while len(pending) >= batch_size:
            chunk, pending = pending[:batch_size], pending[batch_size:]
            yield {
                "input_ids": torch.from_numpy(np.stack([c[0] for c in chunk])),
                "targets": torch.from_numpy(np.stack([c[1] for c in chunk])),
            }


@torch.no_grad()
def evaluate_text(
    checkpoint: str, shards: Optional[str] = None, split: str = "val", max_batches: int = 50, batch_size: int = 8
) -> Dict[str, Any]:
    """Mean cross-entropy (nats/token) and perplexity of a checkpoint on a prepared split.

    Args:
        checkpoint: checkpoint directory or run directory (its latest checkpoint).
        shards: prepared shards; default the run's ``data.shards``, or for ``split="val"`` its
            ``data.val_shards`` when it has one (that folder's split per
            :func:`megaray.data.text.datasets.val_split_of`).
        split: ``val`` or ``train``.
        max_batches: upper bound on batches evaluated (windows of ``model.block_size``).

    Returns:
        ``{"checkpoint", "shards", "step", "split", "tokens", "loss", "ppl", "unigram_entropy", "seconds"}``.

    Raises:
        CheckpointError: no complete checkpoint, corrupt weights, not a text model's.
        DataError: no prepared split, a missing or corrupt shard (named), too few windows.
    """
    from megaray.data import text
    from megaray.inference.text import load_text_model
    from megaray.train.checkpoint import read_state

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, cfg, ckpt, _ = load_text_model(checkpoint, device)
    if shards is None and split == "val" and cfg.data.val_shards:  # the run validated on another folder
        from megaray.data.text.datasets import val_split_of

        shards = cfg.data.val_shards
        split = val_split_of(text.load_manifest(shards))
    shards = shards or cfg.data.shards
    t0 = time.perf_counter()
    total, tokens = 0.0, 0
    for i, batch in enumerate(iter_windows(shards, split, cfg.model.block_size, batch_size, cfg.data.on_corrupt)):
        if i >= max_batches:
            break
        _, loss = model(batch["input_ids"].to(device), batch["targets"].to(device))
        n = batch["targets"].numel()
        total += float(loss) * n
        tokens += n
    if tokens == 0:
        from megaray.errors import DataError

        raise DataError(
            f"{shards}: split {split!r} has fewer than {batch_size} windows of "
            f"{cfg.model.block_size + 1} tokens; lower --batch-size"
        )
    loss = total / tokens
    manifest = text.load_manifest(shards)
    return {
        "checkpoint": str(ckpt),
        "shards": shards,
        "step": (read_state(ckpt) or {}).get("step"),
        "split": split,
        "tokens": tokens,
        "loss": round(loss, 5),
        "ppl": round(math.exp(min(loss, 50.0)), 3),
        "unigram_entropy": manifest["splits"][split].get("unigram_entropy_nats"),
        "seconds": round(time.perf_counter() - t0, 2),
    }
