"""Image shards -> fixed-size crops through Ray Data, reproducible for exact resume.

Every random choice is a function of (seed, image id, pass), with no process state, as for
audio crops (:func:`megaray.data.audio.crop_start`):

* the train split is read row group by row group (:mod:`megaray.data.shards`, corrupt row groups
  named or skipped) ``passes`` times; pass ``p`` adds a column ``pass = p`` to its rows;
* a train crop's top-left corner and horizontal flip are drawn, in that order, from
  ``np.random.default_rng([seed, crc32(image name), pass])`` (:func:`crop_box`): the same on every
  execution, so re-reading a block after a crash gives the same crops, and different between
  passes. Training reads these rows through the positioned stream (:mod:`megaray.data.rows`: one
  order per (seed, epoch), the same at any world size).

Val crops are centred, never flipped. Crops are ``size x size`` windows of the stored image
(shorter side = the manifest's ``size``, so ``size`` may not exceed it); pixels are normalised
to [-1, 1] as ``x / 127.5 - 1``.
"""

from __future__ import annotations

import zlib
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from megaray.data import shards as shard_io
from megaray.data.manifest import read_manifest as _read
from megaray.errors import DataError

CROPS = ("random", "center")


def read_manifest(shards: str) -> Dict[str, Any]:
    """The checked manifest of an image shard folder (kind ``images``; local, ``s3://``, ``gs://``).

    Raises:
        DataError: missing folder or manifest, other version or kind; says which
            ``megaray prepare`` command makes it.
    """
    return _read(shards, "images")


def crop_box(seed: int, name: str, pass_index: int, height: int, width: int, size: int) -> Tuple[int, int, bool]:
    """``(top, left, flip)`` of a random ``size x size`` train crop of a ``height x width`` image:
    top uniform in ``[0, height - size]``, then left in ``[0, width - size]``, then flip with
    probability 1/2, from ``np.random.default_rng([seed, crc32(name), pass_index])``."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8")), pass_index])
    top = int(rng.integers(0, height - size + 1))
    left = int(rng.integers(0, width - size + 1))
    return top, left, bool(rng.random() < 0.5)


def center_box(height: int, width: int, size: int) -> Tuple[int, int]:
    """``(top, left)`` of the centred ``size x size`` window (rounded down, as torchvision's CenterCrop)."""
    return (height - size) // 2, (width - size) // 2


def to_chw(pixels: bytes, height: int, width: int, top: int, left: int, size: int, flip: bool) -> np.ndarray:
    """A stored row's crop as float32 ``(3, size, size)`` in [-1, 1] (``x / 127.5 - 1``)."""
    hwc = np.frombuffer(pixels, np.uint8).reshape(height, width, 3)[top : top + size, left : left + size]
    if flip:
        hwc = hwc[:, ::-1]
    return hwc.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0


def _crop_batch(
    batch: Dict[str, np.ndarray], *, size: int, seed: int, random: bool, flip: bool
) -> Dict[str, np.ndarray]:
    """Rows of whole images -> ``image`` float32 ``(n, 3, size, size)``, ``label`` int64 ``(n,)``."""
    n = len(batch["name"])
    passes = batch["pass"] if "pass" in batch else np.zeros(n, np.int64)
    images = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        h, w = int(batch["height"][i]), int(batch["width"][i])
        if random:
            top, left, flipped = crop_box(seed, str(batch["name"][i]), int(passes[i]), h, w, size)
            flipped = flipped and flip
        else:
            (top, left), flipped = center_box(h, w, size), False
        images[i] = to_chw(batch["pixels"][i], h, w, top, left, size, flipped)
    out = {"image": images, "label": np.asarray(batch["label_id"], np.int64)}
    if "caption" in batch:  # image_datasets(captions=True): the text of a text-to-image model
        out["caption"] = np.asarray([str(c) for c in batch["caption"]], dtype=object)
    return out


def image_datasets(
    shards: str,
    size: int,
    *,
    seed: int = 0,
    crop: str = "random",
    flip: bool = True,
    passes: int = 1,
    on_corrupt: str = "error",
    batch_size: int = 32,
    captions: bool = False,
) -> Dict[str, Any]:
    """Ray datasets of ``size x size`` crops from :func:`megaray.data.image.prepare_images` shards.

    Columns (ready for ``iter_torch_batches``): ``image`` float32 ``(3, size, size)`` in [-1, 1]
    and ``label`` int64 (the manifest's ``labels``); with ``captions``, also ``caption`` str. Train: ``passes * train images`` rows, crops
    per the module docstring (identical on every execution); val: one centred crop per image.

    Args:
        shards: folder written by ``prepare_images`` (local, ``s3://``, ``gs://``).
        size: crop side in pixels, at most the manifest's ``size``.
        seed: crop seed. crop: ``"random"`` (train crops by :func:`crop_box`) or ``"center"``.
        flip: random horizontal flips of train crops (with ``crop="random"``).
        passes: crops per train image per epoch (pass ``p`` seeds its crops).
        on_corrupt: ``"error"`` or ``"skip"`` for a row group that cannot be decoded.
        batch_size: rows per ``map_batches`` call (not the training batch size).

    Raises:
        DataError: no manifest (or not kind ``images``); ``size`` larger than the stored size;
            a bad ``crop`` or ``passes``; an empty split; a missing or corrupt shard (named).
    """
    man = read_manifest(shards)
    stored = int(man["size"])
    if not 0 < size <= stored:
        raise DataError(
            f"crop size {size} must be in [1, {stored}]: {shards} stores images with shorter side "
            f"{stored} px; re-run `megaray prepare images --size {size}` for larger crops"
        )
    if crop not in CROPS:
        raise DataError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}")
    if passes < 1:
        raise DataError(f"passes must be >= 1, got {passes}")
    empty = [s for s in ("train", "val") if not man["splits"][s]["images"]]
    if empty:
        raise DataError(
            f"{shards} holds no {' or '.join(empty)} images (prepared with val_fraction="
            f"{man.get('val_fraction')}); re-run `megaray prepare images` with --val-fraction 0.1"
        )
    cols = ["name", "pixels", "height", "width", "label_id"] + (["caption"] if captions else [])
    out = {}
    for split, random, k in (("train", crop == "random", passes), ("val", False, 1)):
        rows = shard_io.read_split(shards, man, split, cols, on_corrupt, passes=k)
        out[split] = rows.map_batches(
            _crop_batch,
            batch_size=batch_size,
            batch_format="numpy",
            fn_kwargs=dict(size=size, seed=seed, random=random, flip=flip),
        )
    return out


def load_examples(shards: str, split: str = "val", n: int = 4, size: Optional[int] = None) -> List[Dict[str, Any]]:
    """The first ``n`` images of a split, read with pyarrow (no Ray), each centre-cropped to
    ``size`` (default: the stored size), exactly as the val split of :func:`image_datasets`:
    dicts ``{"image": float32 (3, size, size) in [-1, 1], "label": int, "name": str}``.

    Raises:
        DataError: no manifest; the split's folder is missing; ``size`` larger than the stored size.
    """
    import pyarrow.dataset as pads

    man = read_manifest(shards)
    stored = int(man["size"])
    size = size or stored
    if not 0 < size <= stored:
        raise DataError(f"crop size {size} must be in [1, {stored}] for {shards}")
    filesystem, paths, _ = shard_io.split_files(shards, man, split)
    if not paths:
        return []
    table = pads.dataset(paths, filesystem=filesystem, format="parquet").head(
        n, columns=["name", "pixels", "height", "width", "label_id"]
    )
    rows = []
    for r in table.to_pylist():
        top, left = center_box(r["height"], r["width"], size)
        rows.append(
            {
                "image": to_chw(r["pixels"], r["height"], r["width"], top, left, size, False),
                "label": int(r["label_id"]),
                "name": r["name"],
            }
        )
    return rows
