"""``megaray eval``: perplexity of a trained text model on a prepared split, in one process."""

from __future__ import annotations

import math
import time
from typing import Any, Dict, Iterator, Optional

import numpy as np
import pyarrow.parquet as pq
import torch


def iter_windows(shards: str, split: str, block_size: int, batch_size: int) -> Iterator[Dict[str, torch.Tensor]]:
    """Packed LM windows of ``split`` in file order, without Ray: batches of
    ``input_ids``/``targets`` int64 ``(batch_size, block_size)`` (the same packing as training).

    Raises:
        DataError: missing manifest or corrupt shard (named).
    """
    from megaray.data import text

    manifest = text.load_manifest(shards)
    text.check_shards(shards, manifest, splits=[split])
    fs, paths = text.shard_paths(shards, manifest, split)
    packer = text.Packer(block_size)
    pending = []
    for path in paths:
        with fs.open_input_file(path) as fh:
            pf = pq.ParquetFile(fh)
            for i in range(pf.num_row_groups):
                col = pf.read_row_group(i, columns=["tokens"]).column("tokens").combine_chunks()
                w = packer.pack(col.flatten().to_numpy(zero_copy_only=False))
                pending.extend(zip(w["input_ids"], w["targets"]))
                while len(pending) >= batch_size:
                    chunk, pending = pending[:batch_size], pending[batch_size:]
                    yield {"input_ids": torch.from_numpy(np.stack([c[0] for c in chunk])),
                           "targets": torch.from_numpy(np.stack([c[1] for c in chunk]))}


@torch.no_grad()
def evaluate_text(checkpoint: str, shards: Optional[str] = None, split: str = "val",
                  max_batches: int = 50, batch_size: int = 8) -> Dict[str, Any]:
    """Mean cross-entropy (nats/token) and perplexity of a checkpoint on a prepared split.

    Args:
        checkpoint: checkpoint directory or run directory (its latest checkpoint).
        shards: prepared shards; default the run's ``data.shards``.
        split: ``val`` or ``train``.
        max_batches: upper bound on batches evaluated (windows of ``model.block_size``).

    Returns:
        ``{"checkpoint", "step", "split", "tokens", "loss", "ppl", "unigram_entropy", "seconds"}``.

    Raises:
        CheckpointError: no complete checkpoint; DataError: no prepared split.
    """
    from megaray.data import text
    from megaray.train.checkpoint import load_for_inference, read_state

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, cfg, ckpt = load_for_inference(checkpoint, device)
    shards = shards or cfg.data.shards
    t0 = time.perf_counter()
    total, tokens = 0.0, 0
    for i, batch in enumerate(iter_windows(shards, split, cfg.model.block_size, batch_size)):
        if i >= max_batches:
            break
        _, loss = model(batch["input_ids"].to(device), batch["targets"].to(device))
        n = batch["targets"].numel()
        total += float(loss) * n
        tokens += n
    if tokens == 0:
        from megaray.data.sources import DataError

        raise DataError(f"{shards}: split {split!r} has fewer than {batch_size} windows of {cfg.model.block_size + 1} tokens")
    loss = total / tokens
    manifest = text.load_manifest(shards)
    return {
        "checkpoint": str(ckpt),
        "step": (read_state(ckpt) or {}).get("step"),
        "split": split,
        "tokens": tokens,
        "loss": round(loss, 5),
        "ppl": round(math.exp(min(loss, 50.0)), 3),
        "unigram_entropy": manifest["splits"][split].get("unigram_entropy_nats"),
        "seconds": round(time.perf_counter() - t0, 2),
    }
