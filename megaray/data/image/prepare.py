"""``prepare_images``: image sources -> train/val parquet shards + manifest, in stages.

    source -> collect_units: read units on the driver (a file, a tar, a parquet row group, a
              default-set image); DataError naming a missing or empty source before any Ray work
      -> _process: Ray Data map_batches tasks read each unit and decode every image in it on its
              own (megaray.data.image.decode), so one bad file costs one row: ``ok=False`` rows
              carry the reject code and reason (``ray.data.read_images`` would fail the dataset,
              or drop a whole block with an error tolerance); split by a hash of each image name
              (megaray.data.splits)
      -> rejects by reason (megaray.data.rejects), one image moved to val when hashing left it
              empty, label ids (sorted names of kept images' labels)
      -> _write: parquet per split into a staging folder, manifest (kind "images") last,
              published atomically (megaray.fs.staged_dir: a crash mid-write keeps the old set)

Shard layout::

    out_dir/train/*.parquet   out_dir/val/*.parquet   out_dir/manifest.json (written last)

One row per image: ``pixels`` binary (uint8 RGB, ``(height, width, 3)`` row-major, shorter side
= ``size``), ``height``, ``width`` int32, ``label`` string, ``label_id`` int64 (the manifest's
``labels``), ``caption`` string, ``name`` (the image id).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from megaray import fs
from megaray.data.hf import HFColumns
from megaray.data.image.decode import ImagePrepSettings, RejectedImage, process_image
from megaray.data.image.sources import collect_units, read_unit
from megaray.data.manifest import new_manifest, write_manifest
from megaray.data.rejects import Rejects, summary_lines
from megaray.data.splits import SPLITS, closest_to_boundary, split_of
from megaray.errors import DataError

PIXELS = "uint8 RGB, (height, width, 3) row-major; shorter side = size (box halvings, then bicubic)"


def shard_schema():
    """Arrow schema of :func:`decode_units` output (the shards drop ``ok``/``code``/``reason``/``split``)."""
    import pyarrow as pa

    return pa.schema(
        [
            ("name", pa.string()),
            ("ok", pa.bool_()),
            ("code", pa.string()),
            ("reason", pa.string()),
            ("split", pa.string()),
            ("label", pa.string()),
            ("caption", pa.string()),
            ("height", pa.int32()),
            ("width", pa.int32()),
            ("pixels", pa.binary()),
        ]
    )


def decode_units(batch: Dict[str, np.ndarray], *, settings: Dict[str, Any], val_fraction: float, seed: int):
    """``map_batches`` function (a Ray task): read units -> one row per image or reject.

    Every failure of one image (or of one unreadable unit) becomes an ``ok=False`` row with the
    reject ``code`` and ``reason``; nothing raises.
    """
    import pyarrow as pa

    s = ImagePrepSettings(**settings)
    schema = shard_schema()
    cols: Dict[str, list] = {f.name: [] for f in schema}
    units = [
        {k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in batch.items()}
        for i in range(len(batch["kind"]))
    ]
    for u in units:
        for it in read_unit(u):
            pixels, code, reason = None, it["code"], it["detail"]
            if not code:
                try:
                    pixels = process_image(it["data"], s)
                except RejectedImage as e:
                    code, reason = e.code, str(e)
                except Exception as e:  # an unexpected failure rejects one image, not the job
                    code, reason = "error", f"{type(e).__name__}: {e}"[:200]
            ok = pixels is not None
            row = {
                "name": it["name"],
                "ok": ok,
                "code": code,
                "reason": reason,
                "split": split_of(it["name"], val_fraction, seed) if val_fraction > 0 else "train",
                "label": str(it["label"]),
                "caption": str(it["caption"]),
                "height": pixels.shape[0] if ok else 0,
                "width": pixels.shape[1] if ok else 0,
                "pixels": pixels.tobytes() if ok else b"",
            }
            for k, v in row.items():
                cols[k].append(v)
    return pa.Table.from_pydict(cols, schema=schema)


def _process(
    units: List[Dict[str, Any]],
    settings: ImagePrepSettings,
    val_fraction: float,
    seed: int,
    concurrency: int,
    batch_size: int,
):
    """Every unit through :func:`decode_units` (materialized, row order kept) + the table without pixels."""
    import ray

    ds = ray.data.from_items(units, override_num_blocks=max(1, min(len(units), 4 * concurrency)))
    # keep row order (the actor-free tasks finish in any order): the shards' row order, so a
    # training run's batch order, is then the same on every prepare
    ds.context.execution_options.preserve_order = True
    kw = {"settings": asdict(settings), "val_fraction": val_fraction, "seed": seed}
    processed = ds.map_batches(
        decode_units,
        fn_kwargs=kw,
        batch_size=batch_size,
        num_cpus=1,
        compute=ray.data.TaskPoolStrategy(size=concurrency),
        batch_format="numpy",
    ).materialize()
    meta = processed.map_batches(lambda t: t.drop_columns(["pixels"]), batch_format="pyarrow").to_pandas()
    return processed, meta


def _cluster_cpus() -> int:
    """Logical CPUs of the Ray cluster (starting a local one if none is running, as Ray Data would)."""
    import ray

    if not ray.is_initialized():
        ray.init()
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _check_args(size: int, val_fraction: float, concurrency: int, batch_size: int) -> None:
    if size <= 0 or concurrency <= 0 or batch_size <= 0:
        raise DataError(f"size ({size}), concurrency ({concurrency}) and batch_size ({batch_size}) must be positive")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")


def prepare_images(
    source: Union[str, Sequence[str]],
    out_dir: str,
    size: int = 256,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    max_pixels: int = 1 << 28,
    concurrency: Optional[int] = None,
    batch_size: int = 8,
    overwrite: bool = False,
    verbose: bool = True,
    before_ray: Optional[Callable[[], None]] = None,
    columns: Optional[HFColumns] = None,
) -> Dict[str, Any]:
    """Decode, orient, convert to RGB and resize images into train/val parquet shards.

    Decoding runs per image inside Ray Data ``map_batches`` tasks (``concurrency`` at a time).
    Empty, truncated, undecodable or non-image files, images over ``max_pixels``, unreadable tars
    or row groups and unsupported files in a folder are skipped and counted by reason with their
    names (manifest ``rejected``, the summary). Output is published atomically (:mod:`megaray.fs`).

    Args:
        source: folder(s), image / ``.tar`` / ``.parquet`` / ``.jsonl`` / ``.csv`` file(s), local,
            ``s3://`` or ``gs://``, ``"skimage"`` (the embedded default), or ``hf:`` datasets; see
            :mod:`megaray.data.image.sources`.
        out_dir: destination folder; must be empty or absent unless ``overwrite``.
        size: stored shorter side in pixels (training crops are at most this).
        val_fraction: expected share of images in val, by a hash of each image name
            (:func:`megaray.data.splits.split_of` with ``seed``); at least one val image when two
            or more are kept and ``val_fraction > 0``.
        concurrency: decode tasks at a time (1 CPU each); None = the cluster's CPU count.
            batch_size: units per task call.
        before_ray: called once the sources are listed (so errors about them come first), before
            any Ray work; the CLI passes :func:`megaray.train.launch.ensure_ray`.
        columns: image / caption / label columns of ``hf:`` sources (None or a None field:
            detect; :mod:`megaray.data.hf`).

    Returns:
        The manifest dict (also ``out_dir/manifest.json``, kind ``images``) plus ``out_dir``.

    Raises:
        DataError: bad settings; a missing or empty source (named, before any Ray work);
            ``out_dir`` not empty without ``overwrite``; no usable image (the rejects listed).
    """
    _check_args(size, val_fraction, concurrency or 1, batch_size)
    sources = [str(source)] if isinstance(source, (str, os.PathLike)) else [str(s) for s in source]
    settings = ImagePrepSettings(size=size, max_pixels=max_pixels)
    t0 = time.time()
    fs.check_target(out_dir, overwrite)
    units, rejects = [], Rejects(max_examples=20)
    for src in sources:
        found, early = collect_units(src, columns, print if verbose else None)
        units += found
        for code, where, detail in early:
            rejects.add(code, where, detail=detail)
    if before_ray is not None:
        before_ray()
    concurrency = concurrency or _cluster_cpus()
    if verbose:
        print(
            f"[prepare_images] {len(units)} read units from {', '.join(sources)} -> {out_dir} "
            f"(shorter side {size} px, {concurrency} tasks)"
        )
    processed, meta = _process(units, settings, val_fraction, seed, concurrency, batch_size)
    bad = meta[~meta["ok"]]
    for name, code, reason in zip(bad["name"], bad["code"], bad["reason"]):
        rejects.add(code, name, detail=reason)
    good = meta[meta["ok"]].copy()
    if good.empty:
        raise DataError(f"no usable images in {', '.join(sources)}; rejected: {rejects.describe()}")
    dup = good["name"][good["name"].duplicated()]
    if len(dup):
        raise DataError(
            f"image names are not unique in {', '.join(sources)}: {sorted(set(dup))[:5]}; "
            "rename the files (names seed the split and the crops)"
        )
    moved = _fill_val(good, val_fraction, seed)
    manifest = _write(processed, good, moved, rejects, sources, settings, out_dir, overwrite, seed, val_fraction)
    manifest["seconds"] = round(time.time() - t0, 2)
    manifest["out_dir"] = out_dir if fs.is_uri(out_dir) else os.path.abspath(out_dir)
    if verbose:
        print(summary(manifest))
    return manifest


def _fill_val(good, val_fraction: float, seed: int) -> str:
    """With two or more kept images and ``val_fraction > 0``, make sure val is not empty by moving
    the train image whose hash is closest to the boundary; returns its name (``""`` if none)."""
    if val_fraction > 0 and len(good) >= 2 and not (good["split"] == "val").any():
        name = closest_to_boundary(good["name"], "val", seed)
        good.loc[good["name"] == name, "split"] = "val"
        return name
    return ""


def _select(split: str, moved: str, label_ids: Dict[str, int]):
    """pyarrow UDF: kept rows of ``split`` (``moved`` counts as val), with ``label_id``, without
    the bookkeeping columns."""

    def fn(t):
        import pyarrow as pa
        import pyarrow.compute as pc

        splits = t["split"]
        if moved:
            splits = pc.if_else(pc.equal(t["name"], moved), pa.scalar("val"), splits)
        t = t.filter(pc.and_(pc.equal(t["ok"], True), pc.equal(splits, split)))
        ids = pa.array([label_ids[x] for x in t["label"].to_pylist()], pa.int64())
        t = t.drop_columns(["ok", "code", "reason", "split"])
        return t.append_column("label_id", ids)

    return fn


def _write(
    processed,
    good,
    moved: str,
    rejects: Rejects,
    sources: List[str],
    settings: ImagePrepSettings,
    out_dir: str,
    overwrite: bool,
    seed: int,
    val_fraction: float,
) -> Dict[str, Any]:
    """Per-split parquet (kept images) and the manifest, published atomically."""
    labels = {name: i for i, name in enumerate(sorted(set(good["label"])))}
    with fs.staged_dir(out_dir, overwrite) as stage:
        for split in SPLITS:
            target = fs.join(stage, split)
            if (good["split"] == split).any():
                processed.map_batches(_select(split, moved, labels), batch_format="pyarrow").write_parquet(target)
            elif not fs.is_uri(target):
                os.makedirs(target, exist_ok=True)
        counts = {s: good.loc[good["split"] == s, "label"].value_counts() for s in SPLITS}
        manifest = new_manifest(
            "images",
            sources=sources,
            **asdict(settings),
            pixels=PIXELS,
            seed=seed,
            val_fraction=val_fraction,
            images=int(len(good)),
            labels=labels,
            captions=int((good["caption"] != "").sum()),
            splits={
                s: {
                    "dir": s,
                    "images": int(counts[s].sum()),
                    "per_label": {k: int(v) for k, v in sorted(counts[s].items())},
                }
                for s in SPLITS
            },
            rejected=rejects.to_json(),
        )
        write_manifest(stage, manifest)
    return manifest


def summary(manifest: Dict[str, Any]) -> str:
    """Human summary of an images manifest: kept images per split, labels, rejects by reason."""
    s = manifest["splits"]
    head = (
        f"[prepare_images] kept {manifest['images']} images at shorter side {manifest['size']} px: "
        f"train {s['train']['images']}, val {s['val']['images']}; {len(manifest['labels'])} labels, "
        f"{manifest['captions']} captions; {manifest.get('seconds', 0):.1f} s"
    )
    return "\n".join([head] + summary_lines(manifest["rejected"]))
