"""One file-system layer for local paths and ``s3://`` / ``gs://`` / ``file://`` URIs, and one
atomic publish for a prepared folder.

Every location is a string: a local path or a URI. :func:`resolve` turns it into a
``(pyarrow.fs.FileSystem, path)`` pair (:class:`pyarrow.fs.LocalFileSystem` for local paths,
:func:`pyarrow.fs.FileSystem.from_uri` otherwise; S3 and GCS credentials come from the usual
environment), so readers and writers never care where bytes live.

Publishing (:func:`staged_dir`): everything is written into a temporary sibling first and swapped
into place only when complete, so a crash mid-write never destroys the last good folder and a
reader never sees old and new files mixed:

* local: the temp sibling ``<out>.tmp-XXXX`` is renamed over ``<out>`` (the old folder is first
  renamed to ``<out>.old-XXXX`` and deleted after the swap);
* remote (object stores have no rename): the old manifest is deleted first (so no reader pairs it
  with new shards), then the old contents, then the new files are copied in, manifest last.

Every failure a user can cause is a :class:`~megaray.errors.DataError` naming the location.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from typing import Iterator, Tuple

import pyarrow.fs as pafs

from megaray.errors import DataError

#: file whose presence marks a prepared folder as complete (written last).
MANIFEST = "manifest.json"


def is_uri(location: str) -> bool:
    """True for ``scheme://...`` strings (``s3://``, ``gs://``, ``file://``, ...)."""
    head, sep, _ = str(location).partition("://")
    return bool(sep) and head.isalnum() and len(head) > 1


def resolve(location: str) -> Tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for a local path or a URI (no globbing, no existence check).

    Raises:
        DataError: the URI scheme is unknown to pyarrow or its filesystem cannot be created.
    """
    location = str(location)
    if is_uri(location):
        try:
            return pafs.FileSystem.from_uri(location)
        except (ValueError, OSError) as e:  # pyarrow.ArrowInvalid is a ValueError
            raise DataError(f"cannot open {location}: {e}") from None
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(location))


def join(base: str, *parts: str) -> str:
    """Join a local path or a URI with relative ``/``-separated parts; an absolute part or a
    URI part replaces ``base`` (as :func:`os.path.join` does)."""
    out = str(base)
    for p in parts:
        p = str(p)
        if is_uri(p) or os.path.isabs(p):
            out = p
        elif is_uri(out):
            out = out.rstrip("/") + "/" + p
        else:
            out = os.path.join(out, *p.split("/"))
    return out


def dirname(location: str) -> str:
    """Parent of a local path (absolute) or a URI."""
    location = str(location)
    if is_uri(location):
        return location.rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(os.path.expanduser(location)))


def exists(location: str) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(location: str) -> bytes:
    """All bytes of a local file or object. Raises DataError naming it when it cannot be read."""
    fs, path = resolve(location)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"file not found: {location}") from None
    except OSError as e:
        raise DataError(f"cannot read {location}: {e}") from None


def read_text(location: str) -> str:
    """UTF-8 text of a file (a leading BOM is dropped). Raises DataError naming it."""
    try:
        return read_bytes(location).decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{location} is not UTF-8 text: {e}") from None


def write_text(location: str, text: str) -> None:
    """Write a whole text file atomically: readers see the old file or the new one, never a part.

    Local: written to a hidden temp file in the same folder, then :func:`os.replace`. Object
    stores: one PUT, which is atomic there.
    """
    fs, path = resolve(location)
    data = text.encode("utf-8")
    if is_uri(location):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_target(out_dir: str, overwrite: bool, marker: str = MANIFEST, *, how: str = "pass overwrite=True") -> None:
    """Refuse to write into a prepared or non-empty folder unless ``overwrite``.

    ``how`` is the remedy the message names, in the caller's own terms: the Python API's keyword
    by default, ``"pass --overwrite"`` from the command line (:mod:`megaray.cli.prepare`).

    Raises:
        DataError: ``out_dir`` holds ``marker`` (already prepared) or, locally, is a file or a
            non-empty folder; the message ends with ``how`` ``to replace it``.
    """
    if overwrite:
        return
    fs, path = resolve(out_dir)
    if (
        fs.get_file_info(posixpath.join(path, marker) if is_uri(out_dir) else os.path.join(path, marker)).type
        != pafs.FileType.NotFound
    ):
        raise DataError(f"{out_dir} already holds prepared data ({marker}); {how} to replace it")
    if not is_uri(out_dir) and os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise DataError(f"{out_dir} exists and is not an empty folder; {how} to replace it")


@contextmanager
def staged_dir(out_dir: str, overwrite: bool = False, *, local: bool = False, marker: str = MANIFEST) -> Iterator[str]:
    """Yield a temporary folder to write a prepared folder into; publish it on success.

    Args:
        out_dir: final location (local path or URI).
        overwrite: replace an existing folder (else :func:`check_target` refuses).
        local: for a remote ``out_dir``, stage on this machine's disk (for writers that use
            local paths) instead of a remote sibling ``<out_dir>.tmp-XXXX`` (which Ray workers on
            other nodes can reach).
        marker: the file written last (the manifest).

    Yields:
        The staging location (local absolute path or URI). On an exception it is deleted and
        ``out_dir`` is left untouched.

    Raises:
        DataError: see :func:`check_target`.
    """
    out_dir = str(out_dir)
    check_target(out_dir, overwrite, marker)
    remote = is_uri(out_dir)
    if remote and local:
        stage = tempfile.mkdtemp(prefix="megaray-stage-")
    elif remote:
        stage = f"{out_dir.rstrip('/')}.tmp-{uuid.uuid4().hex[:8]}"
        fs, path = resolve(stage)
        fs.create_dir(path, recursive=True)
    else:
        final = os.path.abspath(os.path.expanduser(out_dir))
        os.makedirs(os.path.dirname(final), exist_ok=True)
        stage = tempfile.mkdtemp(prefix=os.path.basename(final) + ".tmp-", dir=os.path.dirname(final))
        os.chmod(stage, 0o777 & ~_umask())  # mkdtemp makes 0700; the published folder should not be
    try:
        yield stage
        publish(stage, out_dir, marker)
    except BaseException:
        _remove(stage)
        raise


def publish(stage: str, out_dir: str, marker: str = MANIFEST) -> None:
    """Move a finished staging folder to ``out_dir`` (replacing it); see the module docstring."""
    if not is_uri(stage) and not is_uri(out_dir):
        final = os.path.abspath(os.path.expanduser(out_dir))
        old = None
        if os.path.lexists(final):
            old = f"{final}.old-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
        os.rename(stage, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.unlink(old)
        return
    dst_fs, dst = resolve(out_dir)
    src_fs, src = resolve(stage)
    if dst_fs.get_file_info(dst).type == pafs.FileType.Directory:
        try:  # hide the old manifest first so no reader pairs it with new shards
            dst_fs.delete_file(posixpath.join(dst, marker))
        except (FileNotFoundError, OSError):
            pass
        dst_fs.delete_dir_contents(dst, missing_dir_ok=True)
    dst_fs.create_dir(dst, recursive=True)
    infos = [i for i in src_fs.get_file_info(pafs.FileSelector(src, recursive=True)) if i.type == pafs.FileType.File]
    root = src.replace(os.sep, "/").rstrip("/")
    rels = sorted(i.path.replace(os.sep, "/")[len(root) :].lstrip("/") for i in infos)
    for rel in [r for r in rels if r != marker] + [r for r in rels if r == marker]:
        target = posixpath.join(dst, rel)
        dst_fs.create_dir(posixpath.dirname(target), recursive=True)
        pafs.copy_files(
            posixpath.join(src, rel) if is_uri(stage) else os.path.join(src, *rel.split("/")),
            target,
            source_filesystem=src_fs,
            destination_filesystem=dst_fs,
        )
    _remove(stage)


def _remove(location: str) -> None:
    if is_uri(location):
        fs, path = resolve(location)
        try:
            fs.delete_dir(path)
        except (FileNotFoundError, OSError):
            pass
    else:
        shutil.rmtree(location, ignore_errors=True)
