"""Image sources -> read units (listed on the driver) -> items ``{name, data, label, caption}`` (read
in Ray tasks).

A source is one of (local, ``s3://``, ``gs://``, listed through :mod:`megaray.data.sources`):

* a folder, searched recursively: image files (:data:`~megaray.data.image.decode.IMAGE_EXTS`),
  WebDataset ``.tar`` shards and ``.parquet`` files; anything else (except sidecars) is counted
  as ``unsupported_file``;
* a single image, ``.tar`` or ``.parquet`` file;
* a ``.jsonl`` / ``.csv`` manifest: rows with ``path`` (or ``file_name``, relative to the
  manifest), optional ``label`` and ``caption``;
* ``"skimage"``: the embedded default (:mod:`megaray.data.image.skimage`);
* ``hf:NAME[:CONFIG][@SPLIT]`` / ``hf:./PATH[@SPLIT]``: a Hugging Face dataset
  (:mod:`megaray.data.hf`), a row an image (:func:`hf_units`: the encoded image travels in the
  unit), its caption and label from columns (given or detected).

Labels (class names) and captions, first match wins:

* image files: a sidecar ``<stem>.json`` (``{"label": ..., "caption"|"text": ...}``), a sidecar
  ``<stem>.txt`` (the caption), else the first folder under the source root (torchvision's
  ``ImageFolder`` rule), else ``"default"``;
* WebDataset tars: members are grouped by key (the member path up to the first dot of its file
  name, as ``webdataset`` does); the sample's ``.cls`` member (class name or index) or ``.json``
  (``label``, ``caption``/``text``) and ``.txt`` / ``.caption`` (caption);
* parquet: the image column is ``image``/``img``/``jpg``/``jpeg``/``png``/``webp``/``bytes``
  (binary, or a struct with a ``bytes`` field as Hugging Face ``datasets`` writes), else the only
  binary column; ``label``/``class`` and ``caption``/``text``/``txt`` columns; ``name``/``key``/
  ``path``/``file_name`` for the image id.

An item's ``name`` is its stable id (the split hashes it; crops are seeded by it): the path
relative to the source root; ``<tar path>/<key>`` for tar samples; ``<parquet path>#<name or row>``
for parquet rows. A unit that cannot be read (missing file, truncated tar, corrupt row group)
yields a reject item for what it could not read, never an exception.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from typing import Any, Dict, Iterator, List, Optional, Tuple

from megaray import fs
from megaray.data.hf import HFColumns, HFTable, Say, cell_name, cell_text, choose_columns, image_bytes, is_hf
from megaray.data.image.decode import IMAGE_EXTS
from megaray.data.image.records import DEFAULT_LABEL, item, unit
from megaray.data.image.skimage import skimage_item, skimage_units
from megaray.data.sources import SourceFile, list_files, read_manifest_rows
from megaray.errors import DataError

SIDECARS = (".txt", ".json")
MANIFEST_EXTS = (".jsonl", ".csv")
IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp", "bytes")
LABEL_COLUMNS = ("label", "class", "cls")
CAPTION_COLUMNS = ("caption", "text", "txt")
NAME_COLUMNS = ("name", "key", "__key__", "path", "file_name", "filename")


def _ext(path: str) -> str:
    base = posixpath.basename(path).lower()
    return "." + base.rsplit(".", 1)[1] if "." in base.strip(".") else ""


def _where(f: SourceFile) -> str:
    """A location Ray workers can open: the URI, or the absolute local path."""
    return f.display if fs.is_uri(f.display) else f.path


def collect_units(
    source: str, columns: Optional[HFColumns] = None, say: Say = None
) -> Tuple[List[Dict[str, Any]], List[Tuple[str, str, str]]]:
    """List one source into read units, plus driver-side rejects ``(code, where, detail)``
    (``hf:`` sources: :func:`hf_units` with ``columns``, the choice said through ``say``).

    Raises:
        DataError: the source does not exist, a folder is empty or holds no image, tar or parquet
            file (the message names it); a manifest row without a path (file and row named).
    """
    if source == "skimage":
        return skimage_units(), []
    if is_hf(source):
        return hf_units(source, columns, say)
    if _ext(source) in MANIFEST_EXTS:
        return _manifest_units(source), []
    listing = list_files(source)
    by_rel = {f.relpath: f for f in listing.files}
    units, rejects = [], []
    for f in listing.files:
        ext, rel = _ext(f.relpath), f.relpath
        parts = rel.split("/")
        label = parts[0] if len(parts) > 1 else DEFAULT_LABEL
        if ext in IMAGE_EXTS:
            stem = rel[: -len(ext)]
            side = next((by_rel[stem + s] for s in (".json", ".txt") if stem + s in by_rel), None)
            units.append(unit("file", _where(f), rel, label, sidecar=_where(side) if side else ""))
        elif ext == ".tar":
            units.append(unit("tar", _where(f), rel, label))
        elif ext == ".parquet":
            pq_units, reject = _parquet_units(f, label)
            units += pq_units
            rejects += [reject] if reject else []
        elif ext in SIDECARS and any(rel[: -len(ext)] + e in by_rel for e in IMAGE_EXTS):
            continue
        else:
            rejects.append(
                ("unsupported_file", f.display, f"extension {ext or '(none)'} is not an image, .tar or .parquet")
            )
    if not units:
        raise DataError(
            f"no images ({', '.join(IMAGE_EXTS)}), .tar or .parquet files in {source} "
            f"({len(listing.files)} other files)"
        )
    return units, rejects


def hf_units(
    source: str, columns: Optional[HFColumns] = None, say: Say = None
) -> Tuple[List[Dict[str, Any]], List[Tuple[str, str, str]]]:
    """Read units (kind ``bytes``, the encoded image inline, :func:`megaray.data.hf.image_bytes`) of
    an ``hf:`` source, one per row, named by the row id ``hf:IDENT/SPLIT/ROW``; plus rejects for
    rows without an image (``empty_file``: a null cell; ``unreadable_file``: a path that cannot be
    read, a value that is no image). ``ClassLabel`` labels become their names.

    Raises:
        DataError: as :class:`megaray.data.hf.HFTable` and :func:`megaray.data.hf.choose_columns`;
            a split without rows.
    """
    table = HFTable(source)
    cols = choose_columns(table, "images", columns, say)
    labels = table.class_names(cols["label"]) if cols["label"] else None
    units, rejects = [], []
    for row, v in table.rows([c for c in cols.values() if c]):
        name = f"{table.prefix}/{row}"
        data, why = image_bytes(v[cols["image"]])
        if data is None:
            rejects.append(("empty_file" if v[cols["image"]] is None else "unreadable_file", name, why))
            continue
        label = cell_name(v[cols["label"]], labels) if cols["label"] else ""
        caption = cell_text(v[cols["caption"]]) if cols["caption"] else ""
        units.append(unit("bytes", table.display, name, label or DEFAULT_LABEL, caption=caption, data=data))
    if not units and not rejects:
        raise DataError(f"{table.display}: the split has no rows")
    return units, rejects


def _manifest_units(uri: str) -> List[Dict[str, Any]]:
    """Units of a ``.jsonl`` / ``.csv`` manifest (``path`` or ``file_name``, ``label``, ``caption``)."""
    rows = read_manifest_rows(uri)
    base, units = fs.dirname(uri), []
    for n, row in enumerate(rows, 1):
        path = row.get("path") or row.get("file_name")
        if not path:
            raise DataError(f"{uri}: row {n} has no 'path' (or 'file_name')")
        label = str(row.get("label") if row.get("label") not in (None, "") else DEFAULT_LABEL)
        units.append(unit("file", fs.join(base, str(path)), str(path), label, caption=str(row.get("caption") or "")))
    if not units:
        raise DataError(f"manifest {uri} lists no images")
    return units


def parquet_columns(names: List[str], types: Dict[str, Any]) -> Dict[str, Optional[str]]:
    """The image / label / caption / name columns of a parquet schema (None when absent)."""
    import pyarrow as pa

    def usable(n: str) -> bool:
        t = types[n]
        return (
            pa.types.is_binary(t)
            or pa.types.is_large_binary(t)
            or (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0)
        )

    lower = {n.lower(): n for n in names}
    image = next((lower[c] for c in IMAGE_COLUMNS if c in lower and usable(lower[c])), None)
    binary = [n for n in names if usable(n)]
    image = image or (binary[0] if len(binary) == 1 else None)
    pick = lambda cands: next((lower[c] for c in cands if c in lower and lower[c] != image), None)  # noqa: E731
    return {"image": image, "label": pick(LABEL_COLUMNS), "caption": pick(CAPTION_COLUMNS), "name": pick(NAME_COLUMNS)}


def _parquet_units(f: SourceFile, label: str) -> Tuple[List[Dict[str, Any]], Optional[Tuple[str, str, str]]]:
    import pyarrow.parquet as pq

    try:
        with f.filesystem.open_input_file(f.path) as fh:
            pf = pq.ParquetFile(fh)
            md, schema = pf.metadata, pf.schema_arrow
    except Exception as e:  # bad magic, truncated footer
        return [], ("unreadable_parquet", f.display, str(e)[:160])
    cols = parquet_columns(schema.names, {n: schema.field(n).type for n in schema.names})
    if cols["image"] is None:
        return [], ("no_image_column", f.display, f"no binary image column among {schema.names}")
    units, offset = [], 0
    for i in range(md.num_row_groups):
        units.append(unit("parquet", _where(f), f.relpath, label, index=i, offset=offset))
        offset += md.row_group(i).num_rows
    return units, None


def read_unit(u: Dict[str, Any]) -> Iterator[Dict[str, Any]]:
    """The items of one read unit (see :func:`megaray.data.image.records.item`); read failures become reject items."""
    kind = u["kind"]
    if kind in ("skimage", "lfw"):
        yield skimage_item(u)
    elif kind == "file":
        yield _file_item(u)
    elif kind == "bytes":
        yield item(u["name"], u["data"], u["label"], u["caption"])
    elif kind == "tar":
        yield from _tar_items(u)
    elif kind == "parquet":
        yield from _parquet_items(u)
    else:  # pragma: no cover - units come from collect_units
        raise ValueError(f"unknown read unit kind {kind!r}")


def _file_item(u: Dict[str, Any]) -> Dict[str, Any]:
    try:
        data = fs.read_bytes(u["uri"])
    except DataError as e:
        return item(u["name"], None, code="unreadable_file", detail=str(e)[:200])
    label, caption = u["label"], u["caption"]
    if u["sidecar"]:
        try:
            label, caption = _apply_meta(fs.read_bytes(u["sidecar"]), _ext(u["sidecar"]), label, caption)
        except (DataError, ValueError) as e:
            return item(u["name"], None, code="bad_sidecar", detail=f"{u['sidecar']}: {e}"[:200])
    return item(u["name"], data, label, caption)


def _apply_meta(data: bytes, ext: str, label: str, caption: str) -> Tuple[str, str]:
    """Label and caption after one metadata blob (``.json``, ``.txt``/``.caption``, ``.cls``).

    Raises:
        ValueError: bad JSON or not UTF-8.
    """
    text = data.decode("utf-8-sig")
    if ext == ".json":
        meta = json.loads(text)
        if isinstance(meta, dict):
            if meta.get("label") not in (None, ""):
                label = str(meta["label"])
            caption = str(meta.get("caption") or meta.get("text") or caption)
    elif ext == ".cls":
        label = text.strip() or label
    else:
        caption = text.strip()
    return label, caption


def _tar_items(u: Dict[str, Any]) -> Iterator[Dict[str, Any]]:
    """Samples of a WebDataset tar, members grouped by key (consecutive members sharing it)."""
    key, sample = None, {}
    try:
        filesystem, path = fs.resolve(u["uri"])
        with filesystem.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|*") as tf:
            for m in tf:
                folder, base = posixpath.split(m.name)
                if not m.isfile() or base.startswith("."):
                    continue
                stem, _, ext = base.partition(".")
                k = posixpath.join(folder, stem)
                data = tf.extractfile(m).read()
                if k != key and key is not None:
                    yield _tar_sample(u, key, sample)
                    sample = {}
                key = k
                sample["." + ext.lower()] = data
    except (tarfile.TarError, OSError, EOFError, DataError) as e:
        where = f"stopped after sample {key!r}" if key is not None else "stopped before the first sample"
        yield item(u["name"], None, code="unreadable_tar", detail=f"{where}: {e}"[:200])
    if key is not None:
        yield _tar_sample(u, key, sample)


def _tar_sample(u: Dict[str, Any], key: str, sample: Dict[str, bytes]) -> Dict[str, Any]:
    name = f"{u['name']}/{key}"
    image = next((ext for ext in sample if "." + ext.rsplit(".", 1)[-1] in IMAGE_EXTS), None)
    if image is None:
        return item(name, None, code="no_image_in_sample", detail=f"members {sorted(sample)}")
    label, caption = u["label"], ""
    try:
        for ext in (".cls", ".json", ".txt", ".caption"):
            if ext in sample:
                label, caption = _apply_meta(sample[ext], ext, label, caption)
    except ValueError as e:
        return item(name, None, code="bad_sidecar", detail=str(e)[:200])
    return item(name, sample[image], label, caption)


def _parquet_items(u: Dict[str, Any]) -> Iterator[Dict[str, Any]]:
    import pyarrow.parquet as pq

    where = f"{u['name']}#rowgroup{u['index']}"
    try:
        filesystem, path = fs.resolve(u["uri"])
        with filesystem.open_input_file(path) as fh:
            pf = pq.ParquetFile(fh)
            schema = pf.schema_arrow
            cols = parquet_columns(schema.names, {n: schema.field(n).type for n in schema.names})
            table = pf.read_row_group(u["index"], columns=[c for c in cols.values() if c])
    except Exception as e:  # corrupt pages, vanished file
        yield item(where, None, code="unreadable_parquet", detail=str(e)[:200])
        return
    seen = set()
    for i, row in enumerate(table.to_pylist()):
        ident = str(row[cols["name"]]) if cols["name"] and row[cols["name"]] not in (None, "") else str(u["offset"] + i)
        name = f"{u['name']}#{ident}" if ident not in seen else f"{u['name']}#{ident}@{u['offset'] + i}"
        seen.add(ident)
        data = row[cols["image"]]
        data = data.get("bytes") if isinstance(data, dict) else data
        label = str(row[cols["label"]]) if cols["label"] and row[cols["label"]] not in (None, "") else u["label"]
        caption = str(row[cols["caption"]] or "") if cols["caption"] else ""
        yield (
            item(name, data, label, caption)
            if data is not None
            else item(name, None, code="empty_file", detail="null image bytes")
        )
