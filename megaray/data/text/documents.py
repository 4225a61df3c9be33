"""Reading text sources into documents: ``.txt``/``.md`` (a file is a document), ``.jsonl``
(a line with a string ``text`` is a document; optional string ``id``) and ``.parquet`` (a row of
column ``text`` is a document). Text is stripped of leading and trailing whitespace.

Bad records are skipped and counted by reason (:class:`megaray.data.rejects.Rejects`):
``empty_file``, ``empty`` (blank after strip, or null), ``undecodable_utf8``, ``binary``
(contains NUL), ``invalid_unicode`` (lone surrogates from JSON escapes), ``invalid_json``,
``no_text_field``, ``non_text`` (``text`` not a string), ``unsupported_extension`` (one per
file). Structural problems are errors instead (:class:`DataError` naming the file): a corrupt or
truncated parquet file, a parquet file without a string ``text`` column. Silently training on
part of a dataset because an upload was truncated is worse than stopping.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Iterator, Optional, Tuple

import pyarrow as pa
import pyarrow.parquet as pq

from megaray.data.rejects import Rejects
from megaray.data.sources import SourceFile
from megaray.errors import DataError

#: extensions read as documents; anything else is counted as ``unsupported_extension``.
SUPPORTED_EXTENSIONS = ("txt", "md", "jsonl", "parquet")
_BATCH = 1024


def _clean(text: str, rejects: Rejects, where: str) -> Optional[str]:
    if "\x00" in text:
        rejects.add("binary", where)
        return None
    text = text.strip()
    if not text:
        rejects.add("empty", where)
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        rejects.add("invalid_unicode", where)
        return None
    return text


def iter_documents(f: SourceFile, rejects: Rejects) -> Iterator[Tuple[str, str]]:
    """``(doc_id, text)`` for every usable document of one file; rejects counted."""
    ext = f.extension
    if ext not in SUPPORTED_EXTENSIONS:
        rejects.add("unsupported_extension", f.display)
        return
    if f.size == 0:
        rejects.add("empty_file", f.display)
        return
    if ext in ("txt", "md"):
        try:
            text = f.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError:
            rejects.add("undecodable_utf8", f.display)
            return
        text = _clean(text, rejects, f.display)
        if text is not None:
            yield f.relpath, text
    elif ext == "jsonl":
        for lineno, line in enumerate(f.iter_lines(), 1):
            if not line.strip():
                continue  # blank separator lines are not records
            where = f"{f.display}:{lineno}"
            try:
                obj = json.loads(line.decode("utf-8-sig" if lineno == 1 else "utf-8"))
            except UnicodeDecodeError:
                rejects.add("undecodable_utf8", where)
                continue
            except ValueError:
                rejects.add("invalid_json", where)
                continue
            if not isinstance(obj, dict) or "text" not in obj:
                rejects.add("no_text_field", where)
                continue
            if obj["text"] is None:
                rejects.add("empty", where)
                continue
            if not isinstance(obj["text"], str):
                rejects.add("non_text", where)
                continue
            text = _clean(obj["text"], rejects, where)
            if text is None:
                continue
            rid = obj.get("id")
            doc_id = rid if isinstance(rid, str) and rid else f"{f.relpath}:{lineno}"
            yield doc_id, text
    else:  # parquet
        yield from _iter_parquet(f, rejects)


def iter_cells(records: Iterable[Tuple[str, Any]], rejects: Rejects) -> Iterator[Tuple[str, str]]:
    """``(doc_id, text)`` of table rows given as ``(doc_id, cell)`` (an ``hf:`` source,
    :class:`megaray.data.hf.HFTextSource`): a null cell is ``empty``, a non-string ``non_text``,
    then the rules every text follows (``binary``, ``empty``, ``invalid_unicode``); ``doc_id``
    names the rejects."""
    for doc_id, value in records:
        if value is None:
            rejects.add("empty", doc_id)
        elif not isinstance(value, str):
            rejects.add("non_text", doc_id)
        else:
            text = _clean(value, rejects, doc_id)
            if text is not None:
                yield doc_id, text


def _iter_parquet(f: SourceFile, rejects: Rejects) -> Iterator[Tuple[str, str]]:
    try:
        fh = f.filesystem.open_input_file(f.path)
        pf = pq.ParquetFile(fh)
    except Exception as e:  # ArrowInvalid / OSError: bad magic, truncated footer
        raise DataError(f"corrupt or unreadable parquet file {f.display}: {e}") from None
    with fh:
        schema = pf.schema_arrow
        if "text" not in schema.names:
            raise DataError(f"parquet file {f.display} has no 'text' column (columns: {', '.join(schema.names)})")
        t = schema.field("text").type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or str(t) == "string_view"):
            raise DataError(f"parquet file {f.display}: column 'text' has type {t}, expected string")
        row = 0
        try:
            for batch in pf.iter_batches(columns=["text"], batch_size=_BATCH):
                for value in batch.column(0).to_pylist():
                    where = f"{f.display}#{row}"
                    if value is None:
                        rejects.add("empty", where)
                    else:
                        text = _clean(value, rejects, where)
                        if text is not None:
                            yield f"{f.relpath}#{row}", text
                    row += 1
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"corrupt parquet file {f.display} (failed at row {row}): {e}") from None
