"""The one manifest of a prepared folder: ``<folder>/manifest.json``, written last.

Every prepared folder (text shards, audio shards, audio latents, ...) carries the same header::

    {"format": "megaray", "version": 2, "kind": "text" | "audio" | "audio_latents", ...}

followed by the kind's own fields (documented in ``docs/data.md`` and ``docs/audio.md``). The
manifest is written last by :func:`megaray.fs.staged_dir`'s publish, so its presence marks a
complete folder. :func:`read_manifest` is the only reader: a missing folder or manifest, corrupt
JSON, an unknown format or version, or the wrong kind is a :class:`DataError` that names the
folder and the ``megaray prepare ...`` command that makes the right one.
"""

from __future__ import annotations

import json
import time
from typing import Any, Dict, Optional

from megaray import fs
from megaray.errors import DataError

MANIFEST = fs.MANIFEST
FORMAT = "megaray"
VERSION = 2

#: how to make a folder of each kind (the hint every reader error ends with).
PREPARE_COMMANDS = {
    "text": "megaray prepare text --source SOURCE --out {folder}",
    "audio": "megaray prepare audio --source SOURCE --out {folder}",
    "audio_latents": "megaray prepare audio-latents --vae-checkpoint CHECKPOINT --out {folder}",
    "images": "megaray prepare images --source SOURCE --out {folder}",
    "image_latents": "megaray prepare image-latents --vae-checkpoint CHECKPOINT --source IMAGES --out {folder}",
}


def prepare_hint(kind: str, folder: str) -> str:
    """``run `megaray prepare ...` first`` for ``kind`` (the command that writes such a folder)."""
    cmd = PREPARE_COMMANDS.get(kind, "megaray prepare " + kind + " ... --out {folder}")
    return f"run `{cmd.format(folder=folder)}`"


def new_manifest(kind: str, **fields: Any) -> Dict[str, Any]:
    """A manifest dict with the common header (format, version, kind, created) and ``fields``."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **fields,
    }


def write_manifest(folder: str, manifest: Dict[str, Any]) -> None:
    """Write ``manifest`` (which must carry the header of :func:`new_manifest`) atomically."""
    if manifest.get("format") != FORMAT or "kind" not in manifest:
        raise ValueError("write_manifest: build the manifest with new_manifest(kind, ...)")
    fs.write_text(fs.join(folder, MANIFEST), json.dumps(manifest, indent=2, default=str) + "\n")


def read_manifest(folder: str, kind: Optional[str] = None, command: Optional[str] = None) -> Dict[str, Any]:
    """Read and check ``<folder>/manifest.json``.

    Args:
        folder: prepared folder (local path or URI).
        kind: the kind the caller needs (``"text"``, ``"audio"``, ...); None accepts any.
        command: the exact command that writes this folder for the caller's config (e.g.
            :meth:`megaray.tasks.base.Task.prepare_command`); named instead of the kind's generic one.

    Raises:
        DataError: the folder or manifest is missing (not prepared, or a prepare that did not
            finish), the manifest is not JSON, its format/version is unknown (prepared by another
            megaray version) or its kind differs; the message names the folder and the
            ``megaray prepare`` command to run.
    """
    folder = str(folder)
    hint = prepare_hint(kind or "text", folder) if kind else "re-run the `megaray prepare` command that wrote it"
    hint = f"run `{command}`" if command else hint
    if not fs.exists(folder):
        raise DataError(f"prepared folder not found: {folder}; {hint}")
    path = fs.join(folder, MANIFEST)
    if not fs.exists(path):
        raise DataError(f"{folder} has no {MANIFEST} (not prepared, or a prepare that did not finish); {hint}")
    try:
        manifest = json.loads(fs.read_bytes(path))
    except ValueError as e:
        raise DataError(f"corrupt {path}: {e}; {hint}") from None
    if not isinstance(manifest, dict):
        raise DataError(f"corrupt {path}: a JSON {type(manifest).__name__}, not an object; {hint}")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        got = manifest.get("format"), manifest.get("version")
        raise DataError(
            f"{path}: format {got[0]!r} version {got[1]!r} is not {FORMAT!r} version {VERSION} "
            f"(prepared by another megaray version); {hint}"
        )
    if kind is not None and manifest.get("kind") != kind:
        raise DataError(f"{folder} holds {manifest.get('kind')!r} data, not {kind!r}; {hint}")
    return manifest
