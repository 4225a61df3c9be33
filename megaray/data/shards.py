"""Training reads of parquet shards, one row group at a time, naming any corrupt one.

A shard whose footer parses but whose data pages are corrupt passes the up-front footer check
(:func:`row_groups`) and fails only when a page is decoded. ``ray.data.read_parquet`` would then
kill the run with an error naming no file. Here the read is a Ray Dataset of
``(path, row_group)`` items (:func:`read_dataset`), each read with pyarrow in a map task
(:func:`read_row_group`, page checksums verified when the writer stored them), so a bad row
group is either a :class:`DataError` ``"<shard>: row group <i> is corrupt (...); re-run ...
or set data.on_corrupt=skip"`` or, with ``on_corrupt="skip"``, skipped with a warning line on the
console naming it (``megaray.data.shards: skipped corrupt row group ...``).

The row-group order is the manifest's shard order, then row-group order inside each file; with
``preserve_order`` (set by :mod:`megaray.train.launch`) every epoch reads the same rows in the
same order.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from megaray.errors import DataError

log = logging.getLogger(__name__)

ON_CORRUPT = ("error", "skip")


def row_groups(fs: pafs.FileSystem, paths: Sequence[str], displays: Sequence[str], hint: str) -> List[Dict[str, Any]]:
    """Open every shard's footer (one small read each) and list its row groups.

    Returns:
        Items ``{"path", "display", "row_group", "rows", "values", "bytes"}`` (``bytes``: the row
        group's uncompressed size) in file then row-group
        order; ``values`` counts the first column's leaf values (tokens of a ``tokens`` list).

    Raises:
        DataError: a shard is missing or its footer is unreadable; names the shard and ends
            with ``hint`` (the prepare command to re-run).
    """
    items: List[Dict[str, Any]] = []
    for path, display in zip(paths, displays):
        try:
            with fs.open_input_file(path) as fh:
                md = pq.ParquetFile(fh).metadata
        except FileNotFoundError:
            raise DataError(f"shard missing: {display} (listed in the manifest); {hint}") from None
        except Exception as e:  # ArrowInvalid / OSError: bad magic, truncated footer
            raise DataError(f"corrupt shard {display}: {e}; {hint}") from None
        for i in range(md.num_row_groups):
            rg = md.row_group(i)
            values = rg.column(0).num_values if rg.num_columns else 0
            items.append(
                {
                    "path": path,
                    "display": display,
                    "row_group": i,
                    "rows": rg.num_rows,
                    "values": values,
                    "bytes": rg.total_byte_size,
                }
            )
    return items


def read_row_group(
    fs: pafs.FileSystem, item: Dict[str, Any], columns: Sequence[str], on_corrupt: str, hint: str
) -> Optional[pa.Table]:
    """Read one row group (``columns`` only). Returns None when it is corrupt and
    ``on_corrupt == "skip"`` (after logging a warning that names it).

    Raises:
        DataError: the row group cannot be read or decoded and ``on_corrupt == "error"``.
    """
    try:
        with fs.open_input_file(item["path"]) as fh:
            table = pq.ParquetFile(fh, page_checksum_verification=True).read_row_group(
                int(item["row_group"]), columns=list(columns)
            )
        if table.num_rows != int(item["rows"]):
            raise OSError(f"decoded {table.num_rows} rows, footer says {item['rows']}")
        return table
    except (OSError, pa.ArrowException) as e:
        what = f"{item['display']}: row group {item['row_group']} is corrupt ({str(e)[:200]})"
        if on_corrupt == "skip":
            log.warning("skipped corrupt row group: %s [data.on_corrupt=skip]", what)
            return None
        raise DataError(f"{what}; {hint} or set data.on_corrupt=skip") from None


def _read_batch(
    batch: Dict[str, np.ndarray],
    *,
    fs: pafs.FileSystem,
    columns: Sequence[str],
    schema: pa.Schema,
    on_corrupt: str,
    hint: str,
) -> pa.Table:
    """``map_batches`` function (Ray task): a batch of items -> the rows of their row groups."""
    tables = []
    for i in range(len(batch["path"])):
        item = {k: batch[k][i] for k in ("path", "display", "row_group", "rows")}
        t = read_row_group(fs, item, columns, on_corrupt, hint)
        if t is not None:
            t = t.cast(schema) if t.schema != schema else t
            if "pass" in batch:  # read_dataset(passes=k): the pass this read of the row group belongs to
                t = t.append_column("pass", pa.array(np.full(t.num_rows, int(batch["pass"][i]), np.int64)))
            tables.append(t)
    if tables:
        return pa.concat_tables(tables)
    return schema.append(pa.field("pass", pa.int64())).empty_table() if "pass" in batch else schema.empty_table()


def read_dataset(
    fs: pafs.FileSystem,
    items: List[Dict[str, Any]],
    columns: Sequence[str],
    schema: pa.Schema,
    on_corrupt: str = "error",
    hint: str = "re-run `megaray prepare`",
    passes: Optional[int] = None,
) -> Any:
    """A Ray Dataset of the rows of ``items`` (from :func:`row_groups`), one block per row group.

    ``passes=k`` reads every row group ``k`` times, pass-major (all of pass 0, then pass 1, ...),
    and adds an int64 column ``pass``. The passes are one list of read items, not a ``union`` of
    datasets: Ray Data's union interleaves its inputs in whatever order their blocks finish, so
    its row order differs between executions, while one ``from_items`` keeps item order under
    ``preserve_order`` (what exact resume needs).

    Args:
        fs: filesystem of the item paths (pickled to the read tasks).
        columns: columns to read; ``schema``: their arrow schema (for empty results).
        on_corrupt: ``"error"`` (raise :class:`DataError` naming shard and row group) or
            ``"skip"`` (skip it, log a warning naming it).
        hint: what to do, appended to the error (``re-run `megaray prepare text ...```).

    Raises:
        DataError: ``on_corrupt`` not one of :data:`ON_CORRUPT`; no items.
    """
    import ray

    if on_corrupt not in ON_CORRUPT:
        raise DataError(f"data.on_corrupt must be one of {', '.join(ON_CORRUPT)}, got {on_corrupt!r}")
    if not items:
        raise DataError("no row groups to read (the shards hold no rows)")
    if passes is not None:
        items = [dict(it, **{"pass": p}) for p in range(passes) for it in items]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    kw = dict(fs=fs, columns=list(columns), schema=schema, on_corrupt=on_corrupt, hint=hint)
    out = ds.map_batches(_read_batch, fn_kwargs=kw, batch_size=1, batch_format="numpy")
    # a DataError from a read task reaches the consumer as itself (an instance of DataError), not
    # wrapped in Ray Data's UserCodeException, so a training run can end with its message
    out.context.raise_original_map_exception = True
    return out


def split_files(shards: str, man: Dict[str, Any], split: str) -> Tuple[pafs.FileSystem, List[str], List[str]]:
    """``(filesystem, paths, display names)`` of a prepared folder's split (``man["splits"][split]["dir"]``),
    its ``*.parquet`` files sorted by name.

    Raises:
        DataError: the split folder is missing; names it and the prepare command.
    """
    from megaray import fs as mfs
    from megaray.data.manifest import prepare_hint

    folder = mfs.join(shards, man["splits"][split]["dir"])
    filesystem, base = mfs.resolve(folder)
    try:
        infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=False))
    except (FileNotFoundError, OSError):
        raise DataError(f"{folder} is missing; {prepare_hint(man.get('kind', 'text'), shards)}") from None
    paths = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
    return filesystem, paths, [mfs.join(folder, p.replace("\\", "/").rsplit("/", 1)[-1]) for p in paths]


def read_split(
    shards: str,
    man: Dict[str, Any],
    split: str,
    columns: Sequence[str],
    on_corrupt: str = "error",
    passes: Optional[int] = None,
) -> Any:
    """Ray Dataset of ``columns`` of one split of a prepared folder, one block per row group
    (:func:`read_dataset`: corrupt row groups named or skipped; ``passes=k`` reads it ``k`` times,
    pass-major, with a ``pass`` column).

    Raises:
        DataError: the split holds no parquet file, or a shard is missing or has a corrupt footer;
            the message names it and the prepare command (with ``--overwrite``).
    """
    from megaray import fs as mfs
    from megaray.data.manifest import prepare_hint

    filesystem, paths, displays = split_files(shards, man, split)
    hint = prepare_hint(man.get("kind", "text"), shards) + " with --overwrite"
    if not paths:
        raise DataError(f"{mfs.join(shards, man['splits'][split]['dir'])} holds no parquet files; {hint}")
    items = row_groups(filesystem, paths, displays, hint)
    with filesystem.open_input_file(paths[0]) as fh:
        full = pq.ParquetFile(fh).schema_arrow
    schema = pa.schema([full.field(c) for c in columns])
    return read_dataset(filesystem, items, columns, schema, on_corrupt, hint, passes=passes)
