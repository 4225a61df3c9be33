"""The two record shapes of the image prepare: read units (listed on the driver) and items (read
in Ray tasks). Every unit has the same keys, so a list of them is one Arrow table."""

from __future__ import annotations

from typing import Any, Dict, Optional

#: label of an image with no class (no sub-folder, sidecar, member or column names one).
DEFAULT_LABEL = "default"


def unit(
    kind: str,
    uri: str,
    name: str,
    label: str = DEFAULT_LABEL,
    caption: str = "",
    sidecar: str = "",
    index: int = 0,
    offset: int = 0,
    data: bytes = b"",
) -> Dict[str, Any]:
    """A read unit: ``kind`` is ``file`` (``sidecar``: its ``.json``/``.txt`` or ``""``) | ``tar``
    | ``parquet`` (``index`` = row group, ``offset`` = its first row in the file) | ``skimage``
    (``index`` = crop, -1 = the whole photograph) | ``lfw`` (``index`` = image in ``lfw_subset``)
    | ``bytes`` (``data`` = the encoded image, read on the driver: a row of an ``hf:`` source)."""
    return {
        "kind": kind,
        "uri": uri,
        "name": name,
        "label": label,
        "caption": caption,
        "sidecar": sidecar,
        "index": int(index),
        "offset": int(offset),
        "data": data,
    }


def item(
    name: str, data: Optional[bytes], label: str = DEFAULT_LABEL, caption: str = "", code: str = "", detail: str = ""
) -> Dict[str, Any]:
    """One image to decode (``code`` empty), or a reject of ``name`` for ``code`` / ``detail``."""
    return {"name": name, "data": data, "label": label, "caption": caption, "code": code, "detail": detail}
