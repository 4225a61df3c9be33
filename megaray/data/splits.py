"""The one train/validation split rule: a hash of each item's stable id.

An item (a document, an audio clip) is in ``val`` when ``split_key(id, seed) < val_fraction``.
The split of an item never moves when other items are added or removed, and needs no state.
When hashing leaves a split empty, :func:`closest_to_boundary` names the one item to move.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Optional, Tuple

SPLITS = ("train", "val")


def split_key(item_id: str, seed: int = 0) -> float:
    """Uniform [0, 1) number from ``blake2b(f"{seed}:{item_id}")``; stable across runs and machines."""
    h = hashlib.blake2b(f"{seed}:{item_id}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0**64


def split_of(item_id: str, val_fraction: float, seed: int = 0) -> str:
    """``"val"`` if ``split_key(item_id, seed) < val_fraction`` else ``"train"``."""
    return "val" if split_key(item_id, seed) < val_fraction else "train"


def closest_to_boundary(ids: Iterable[str], into: str, seed: int = 0) -> Optional[str]:
    """The id whose key is closest to the split boundary, to move into an empty ``into`` split:
    the smallest key when filling ``val`` (from train), the largest when filling ``train``."""
    keyed: Iterable[Tuple[float, str]] = ((split_key(i, seed), i) for i in ids)
    pick = min(keyed, default=None) if into == "val" else max(keyed, default=None)
    return None if pick is None else pick[1]
