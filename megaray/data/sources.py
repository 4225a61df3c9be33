"""Resolve data sources: local paths, globs and ``s3://`` / ``gs://`` / ``file://`` URIs.

Every source string becomes a sorted list of :class:`SourceFile` (a pyarrow filesystem plus a
path on it), so readers never care where bytes live; locations are resolved by
:mod:`megaray.fs` (the one file-system layer).

Hidden files and folders (name starting with ``.``) are not listed; callers see how many were
skipped through :attr:`Listing.hidden`.

Every failure is a :class:`DataError` that names the path.
"""

from __future__ import annotations

import csv
import fnmatch
import glob as _glob
import io
import json
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List

import pyarrow.fs as pafs

from megaray.errors import DataError
from megaray.fs import is_uri, join, read_text, resolve

__all__ = ["DataError", "Listing", "SourceFile", "list_files", "read_manifest_rows", "is_uri", "join", "resolve"]

_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class SourceFile:
    """One file of a source.

    Attributes:
        filesystem: pyarrow filesystem holding the file.
        path: path on ``filesystem`` (``bucket/key`` for object stores, absolute for local).
        display: how to name the file in messages (the URI or local path).
        relpath: path relative to the source root (folder, or the fixed prefix of a glob), with
            ``/`` separators; stable under moving the root, so usable in document ids.
        size: bytes.
    """

    filesystem: pafs.FileSystem
    path: str
    display: str
    relpath: str
    size: int

    @property
    def extension(self) -> str:
        """Lower-cased extension without the dot (``"jsonl"``; ``""`` when there is none)."""
        name = posixpath.basename(self.relpath)
        return name.rsplit(".", 1)[1].lower() if "." in name.strip(".") else ""

    def read_bytes(self) -> bytes:
        """The whole file. Raises DataError naming the file when it cannot be read."""
        try:
            with self.filesystem.open_input_stream(self.path) as f:
                return f.read()
        except OSError as e:
            raise DataError(f"cannot read {self.display}: {e}") from None

    def iter_lines(self, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
        """Lines (without the trailing ``\\n``/``\\r\\n``), streamed in ``chunk_bytes`` reads."""
        try:
            with self.filesystem.open_input_stream(self.path) as f:
                rest = b""
                while True:
                    chunk = f.read(chunk_bytes)
                    if not chunk:
                        break
                    lines = (rest + chunk).split(b"\n")
                    rest = lines.pop()
                    for line in lines:
                        yield line[:-1] if line.endswith(b"\r") else line
                if rest:
                    yield rest[:-1] if rest.endswith(b"\r") else rest
        except OSError as e:
            raise DataError(f"cannot read {self.display}: {e}") from None


@dataclass
class Listing:
    """Result of :func:`list_files`: the files (sorted by display path) and skipped hidden entries."""

    files: List[SourceFile] = field(default_factory=list)
    hidden: int = 0


def _hidden(rel: str) -> bool:
    return any(p.startswith(".") for p in rel.split("/") if p not in ("", ".", ".."))


def list_files(source: str) -> Listing:
    """All regular files of one source, sorted, hidden files/folders excluded.

    ``source`` is a file, a folder (listed recursively), or a glob (``data/**/*.jsonl``,
    ``s3://bucket/corpus/*.parquet``), local or URI. In URIs only ``*`` and ``[...]`` are glob
    characters (``?`` starts a query string); ``*`` stays within one folder level, ``**`` spans
    levels.

    Raises:
        DataError: the path does not exist; a folder holds no files; a glob matches nothing.
            The message names the source.
    """
    glob_chars = "*[" if is_uri(source) else _GLOB_CHARS
    if any(c in source for c in glob_chars):
        return _list_glob(source, glob_chars)
    fs, path = resolve(source)
    try:
        info = fs.get_file_info(path)
    except OSError as e:
        raise DataError(f"cannot access {source}: {e}") from None
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"source not found: {source}")
    if info.type == pafs.FileType.File:
        name = posixpath.basename(path.replace(os.sep, "/"))
        return Listing([SourceFile(fs, path, source, name, info.size)])
    listing = _walk(fs, path, source)
    if not listing.files:
        extra = f" ({listing.hidden} hidden files ignored)" if listing.hidden else ""
        raise DataError(f"source folder is empty: {source}{extra}")
    return listing


def _walk(fs: pafs.FileSystem, root: str, display_root: str) -> Listing:
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    except OSError as e:
        raise DataError(f"cannot list {display_root}: {e}") from None
    out = Listing()
    root_n = root.replace(os.sep, "/").rstrip("/")
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = info.path.replace(os.sep, "/")[len(root_n) :].lstrip("/")
        if _hidden(rel):
            out.hidden += 1
            continue
        display = join(display_root, *rel.split("/"))
        out.files.append(SourceFile(fs, info.path, display, rel, info.size))
    out.files.sort(key=lambda f: f.relpath)
    return out


def _list_glob(source: str, glob_chars: str) -> Listing:
    first = min(source.find(c) for c in glob_chars if c in source)
    if not is_uri(source):
        pattern = os.path.abspath(os.path.expanduser(source))
        first = min(pattern.find(c) for c in glob_chars if c in pattern)
        base = pattern[:first]
        base = base if base.endswith(os.sep) else os.path.dirname(base)
        out = Listing()
        for p in sorted(_glob.glob(pattern, recursive=True)):
            if not os.path.isfile(p):
                continue
            rel = os.path.relpath(p, base).replace(os.sep, "/")
            if _hidden(rel):
                out.hidden += 1
                continue
            out.files.append(SourceFile(pafs.LocalFileSystem(), p, p, rel, os.path.getsize(p)))
    else:
        # Object stores have no glob: list the fixed prefix recursively and match relative paths.
        base_uri = source[:first].rsplit("/", 1)[0]
        rel_pat = source[len(base_uri) :].lstrip("/")
        fs, base = resolve(base_uri)
        try:
            listing = _walk(fs, base, base_uri)
        except DataError:
            raise DataError(f"no files match {source}") from None
        out = Listing(hidden=listing.hidden, files=[f for f in listing.files if _match(f.relpath, rel_pat)])
    if not out.files:
        raise DataError(f"no files match {source}")
    return out


def _match(rel: str, pattern: str) -> bool:
    """Glob match of a ``/``-separated path: ``*`` within one level, ``**`` across levels."""
    if "**" in pattern:
        return fnmatch.fnmatchcase(rel, pattern)
    parts, pats = rel.split("/"), pattern.split("/")
    return len(parts) == len(pats) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(parts, pats))


def read_manifest_rows(uri: str) -> List[Dict[str, Any]]:
    """The rows of a source manifest: a ``.csv`` (header row, one dict of strings per row) or JSON
    lines (any other name; one JSON object per non-blank line). Row values are returned as read;
    callers check and resolve their own columns.

    Raises:
        DataError: a JSON line that does not parse, naming ``uri:line``.
    """
    text = read_text(uri)
    if uri.lower().endswith(".csv"):
        return list(csv.DictReader(io.StringIO(text)))
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{uri}:{n}: not valid JSON ({e})") from None
    return rows
