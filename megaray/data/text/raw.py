"""Raw text straight into packed windows, tokenized inside Ray Data (no prepare step).

For benchmarks and quick looks; :func:`megaray.data.text.prepare_text` gives validated, counted,
reusable shards.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Sequence

import numpy as np
import pyarrow as pa

from megaray.data.sources import list_files
from megaray.data.text.datasets import PACKER_ACTOR_OPTIONS, Packer
from megaray.data.text.documents import SUPPORTED_EXTENSIONS
from megaray.data.text.writer import encode
from megaray.data.tokenizer import eos_id, load_tokenizer
from megaray.errors import DataError

log = logging.getLogger(__name__)


class _TokenizePack:
    """Ray Data callable class: raw ``text`` column -> tokenized, EOS-joined, packed windows."""

    def __init__(self, tokenizer_path: str, block_size: int):
        self.tok = load_tokenizer(tokenizer_path)
        self.eos = eos_id(self.tok)
        self.packer = Packer(block_size)
        self.skipped = 0

    def __call__(self, batch: pa.Table) -> Dict[str, np.ndarray]:
        texts = []
        for t in batch.column("text").to_pylist():
            t = t.strip() if isinstance(t, str) and "\x00" not in t else ""
            if t:
                texts.append(t)
            else:
                self.skipped += 1
        _, flat, _ = encode(self.tok, texts, self.eos) if texts else (None, np.empty(0, np.int32), 0)
        return self.packer.pack(flat)


def _as_text_table(batch: pa.Table) -> pa.Table:
    col = batch.column("text")
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return pa.table({"text": col.cast(pa.large_string())})
    out = []
    for t in col.to_pylist():
        if isinstance(t, bytes):
            try:
                t = t.decode("utf-8-sig")
            except UnicodeDecodeError:
                t = None
        out.append(t if isinstance(t, str) else None)
    return pa.table({"text": pa.array(out, pa.large_string())})


def raw_text_dataset(
    paths: Sequence[str],
    tokenizer_path: str,
    block_size: int,
    *,
    concurrency: int = 1,
    batch_size: int = 256,
    num_cpus: float = 1.0,
) -> Any:
    """Ray Dataset of packed windows straight from raw text, tokenized inside Ray Data.

    ``.jsonl`` via ``read_json(lines=True)`` (field ``text``), ``.parquet`` via ``read_parquet``
    (column ``text``), ``.txt``/``.md`` via ``read_binary_files`` (one document per file), then one
    ``map_batches`` stage of ``concurrency`` actors that each hold the tokenizer, encode with
    ``encode_batch``, append EOS and pack (same rows as :func:`text_datasets`). Undecodable/empty
    texts are skipped (not counted on the driver). Row count is unknown until consumed; each actor
    drops its own final tail. Use :func:`prepare_text` for validated, counted, reusable shards.

    Raises:
        DataError: missing source, no supported files.
    """
    import ray
    from ray.data import ActorPoolStrategy

    parts = []
    ignored = []
    for src in [paths] if isinstance(paths, str) else paths:
        # Ray resolves URIs itself; read_json(lines=True) accepts no filesystem argument.
        by_ext: Dict[str, List[str]] = {}
        for f in list_files(src).files:
            by_ext.setdefault(f.extension, []).append(f.display)
        ignored += [p for e, ps in by_ext.items() if e not in SUPPORTED_EXTENSIONS for p in ps]
        if by_ext.get("jsonl"):
            parts.append(ray.data.read_json(by_ext["jsonl"], lines=True).select_columns(["text"]))
        if by_ext.get("parquet"):
            parts.append(ray.data.read_parquet(by_ext["parquet"], columns=["text"]))
        txt = by_ext.get("txt", []) + by_ext.get("md", [])
        if txt:
            parts.append(ray.data.read_binary_files(txt).rename_columns({"bytes": "text"}))
    # one block type and schema for the union: arrow, text as large_string (bytes decoded)
    parts = [p.map_batches(_as_text_table, batch_format="pyarrow", batch_size=None) for p in parts]
    if ignored:
        log.warning(
            "raw_text_dataset: ignoring %d files with unsupported extensions (e.g. %s)", len(ignored), ignored[0]
        )
    if not parts:
        raise DataError(f"no .txt/.md/.jsonl/.parquet files in {paths}")
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    return ds.map_batches(
        _TokenizePack,
        fn_constructor_kwargs={"tokenizer_path": str(tokenizer_path), "block_size": block_size},
        batch_format="pyarrow",
        batch_size=batch_size,
        compute=ActorPoolStrategy(size=concurrency),
        num_cpus=num_cpus,
        **PACKER_ACTOR_OPTIONS,
    )
