"""The multimodal mixture: weighted text, speech and image sources -> Ray Datasets of sequences.

Sources and their kinds are read from each folder's manifest (:func:`open_sources`); each row
becomes one sequence laid out by :mod:`megaray.data.multimodal.layout`.

Order (the whole epoch is a pure function of ``(seed, pass)``, so the training loop's replay of
``batch_in_epoch`` batches after a crash reads exactly the batches an uninterrupted run would):

* each source's rows are permuted per pass, row group by row group (groups in a seeded order,
  rows shuffled inside each group: reads stay local), and taken from the start of that order,
  repeated or truncated to the count :func:`megaray.data.mixture.plan` gives it;
* sources are interleaved evenly by :func:`megaray.data.mixture.interleave`;
* the coin and the audio crop of the item at position ``i`` of pass ``p`` come from
  ``np.random.default_rng([seed, split, p, i])`` (split 0 train, 1 val).

:func:`mixture_datasets` (the val split; the train split of runs without a positioned stream):
an epoch holds ``passes`` such passes, pass-major; the item list is built on the driver and read
by ``map_batches`` tasks that cache the row groups they read (:func:`build_rows`).

:func:`mixture_stream` (training): epoch ``e`` is passes ``e * passes .. (e + 1) * passes - 1``
(:func:`pass_plan`), its positions permuted inside shuffle blocks (:mod:`megaray.data.rows`), one
positioned stream from a cursor on: the same order at every world size, a constant-time start.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from megaray import fs
from megaray.data import mixture, shards as shard_io
from megaray.data.manifest import prepare_hint, read_manifest
from megaray.data.multimodal.layout import (
    AUDIO_TO_TEXT,
    CAPTION_TEMPLATE,
    COLUMNS,
    IGNORE,
    IMAGE_TO_TEXT,
    MODALITY,
    P_GENERATE,
    TEXT_LM,
    TEXT_TO_AUDIO,
    TEXT_TO_IMAGE,
    Layout,
    audio_latent_frames,
    crop_frames,
    crop_mel,
    sequence,
    square_image,
)
from megaray.errors import DataError


@dataclass
class MixSource:
    """One prepared folder of the mixture: its modality, weight and row groups per split
    (``kind``: the manifest's)."""

    shards: str
    weight: float
    modality: str
    manifest: Dict[str, Any]
    filesystem: Any = None
    groups: Dict[str, List[Dict[str, Any]]] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return str(self.manifest["kind"])

    def rows(self, split: str) -> int:
        return sum(int(g["rows"]) for g in self.groups[split])


def open_sources(sources: Sequence[Any]) -> List[MixSource]:
    """Read each source's manifest and list its row groups (one footer read per shard file).

    ``sources``: objects with ``.shards`` and ``.weight`` (``DataConfig.resolved_sources()``).

    Raises:
        DataError: a folder is not prepared, is of a kind other than text / audio / audio_latents /
            images / image_latents, or a shard file is missing or has a corrupt footer (each
            named, with the prepare command).
    """
    out = []
    for s in sources:
        man = read_manifest(str(s.shards))
        kind = man.get("kind")
        if kind not in MODALITY:
            raise DataError(
                f"data.sources: {s.shards} holds {kind!r} data; a multimodal run mixes text "
                f"(`megaray prepare text`), audio (`megaray prepare audio` or `audio-latents`) and "
                f"images (`megaray prepare images` or `image-latents`)"
            )
        src = MixSource(str(s.shards), float(s.weight), MODALITY[kind], man)
        hint = prepare_hint(kind, src.shards) + " with --overwrite"
        for split in ("train", "val"):
            if kind == "text":
                filesystem, _ = fs.resolve(src.shards)
                entries = man["splits"][split]["shards"]
                paths = [fs.resolve(fs.join(src.shards, e["path"]))[1] for e in entries]
                displays = [fs.join(src.shards, e["path"]) for e in entries]
            else:
                filesystem, paths, displays = shard_io.split_files(src.shards, man, split)
            src.filesystem = filesystem
            src.groups[split] = shard_io.row_groups(filesystem, paths, displays, hint) if paths else []
        out.append(src)
    return out


def source_order(groups: Sequence[int], seed: int, split: int, pass_index: int, source: int) -> np.ndarray:
    """Row indices (into the source's rows in file order) of one pass: row groups in a seeded
    order, rows shuffled inside each, from ``np.random.default_rng([seed, split, pass, source, 7])``
    (the trailing 7 keeps this stream apart from the coin and crop stream of the item whose
    ``index`` equals ``source``). ``groups``: rows per row group."""
    rng = np.random.default_rng([seed, split, pass_index, source, 7])
    starts = np.concatenate([[0], np.cumsum(groups)[:-1]]).astype(np.int64)
    return np.concatenate(
        [starts[g] + rng.permutation(int(groups[g])) for g in rng.permutation(len(groups))] or [np.zeros(0, np.int64)]
    )


def plan_items(
    sizes: Sequence[Sequence[int]], weights: Sequence[float], seed: int, split: int = 0, passes: int = 1
) -> List[Dict[str, int]]:
    """The dataset's items: ``{"source", "row", "pass", "index"}`` per sequence, pass-major.

    ``sizes[i]``: rows per row group of source ``i``. Per pass, source ``i`` contributes
    :func:`megaray.data.mixture.plan`'s count of rows, in :func:`source_order` (cycled), and
    sources are interleaved by :func:`megaray.data.mixture.interleave` (:func:`pass_plan`).
    ``index`` is the item's position in its pass. Raises DataError (from ``plan``) for an empty
    source or a bad weight."""
    items = []
    for p in range(passes):
        source, row = pass_plan(sizes, weights, seed, split, p)
        items += [{"source": int(i), "row": int(r), "pass": p, "index": j} for j, (i, r) in enumerate(zip(source, row))]
    return items


@lru_cache(maxsize=8)
def _interleaved(counts: Tuple[int, ...], seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """:func:`megaray.data.mixture.interleave` as ``(source, k)`` int64 arrays (cached per process)."""
    pairs = np.asarray(mixture.interleave(list(counts), seed), np.int64).reshape(-1, 2)
    return pairs[:, 0], pairs[:, 1]


def pass_plan(
    sizes: Sequence[Sequence[int]], weights: Sequence[float], seed: int, split: int, pass_index: int
) -> Tuple[np.ndarray, np.ndarray]:
    """Pass ``pass_index`` of the mixture as ``(source, row)`` int64 arrays (position ``j`` of the
    pass is row ``row[j]`` of source ``source[j]``; :func:`plan_items` has the rule)."""
    totals = [int(sum(s)) for s in sizes]
    src, k = _interleaved(tuple(mixture.plan(totals, weights)), int(seed))
    row = np.zeros(len(src), np.int64)
    for i, s in enumerate(sizes):
        at = src == i
        row[at] = source_order(s, seed, split, pass_index, i)[k[at] % totals[i]]
    return src, row


# -- reading (inside Ray Data map tasks) ------------------------------------------------------
_GROUPS: "OrderedDict[Tuple[str, str, int], Any]" = OrderedDict()
#: row groups kept per process (a map task reads each group once while its rows are nearby)
CACHE_GROUPS = 32


def _group(src: Dict[str, Any], g: int, on_corrupt: str) -> Optional[Dict[str, list]]:
    """Columns of row group ``g`` of a source as Python lists (cached per process); None when
    the group is corrupt and ``on_corrupt == "skip"``."""
    item = src["groups"][g]
    key = (src["stamp"], item["display"], int(item["row_group"]))  # stamp: a folder prepared again is re-read
    if key not in _GROUPS:
        table = shard_io.read_row_group(src["filesystem"], item, src["columns"], on_corrupt, src["hint"])
        _GROUPS[key] = None if table is None else {c: table.column(c).to_pylist() for c in src["columns"]}
        while len(_GROUPS) > CACHE_GROUPS:
            _GROUPS.popitem(last=False)
    _GROUPS.move_to_end(key)
    return _GROUPS[key]


@lru_cache(maxsize=4)
def cached_tokenizer(path: str) -> Any:
    """The ``tokenizers.Tokenizer`` at ``path``, loaded once per process (DataError naming a bad file)."""
    from megaray.data.tokenizer import load_tokenizer

    return load_tokenizer(path)


def _empty(n: int, L: Layout) -> Dict[str, np.ndarray]:
    T = L.block_size
    return {
        "tokens": np.zeros((n, T), np.int64),
        "targets": np.full((n, T), IGNORE, np.int64),
        "audio": np.zeros((n, L.n_mels, L.audio_frames), np.float32),
        "audio_start": np.full(n, -1, np.int64),
        "audio_valid": np.zeros(n, np.int64),
        "image": np.zeros((n, L.image_channels, L.image_size, L.image_size), np.float32),
        "image_start": np.full(n, -1, np.int64),
        "task": np.zeros(n, np.int64),
    }


def build_rows(
    batch: Dict[str, np.ndarray],
    *,
    sources: List[Dict[str, Any]],
    layout: Layout,
    tokenizer: str,
    seed: int,
    split: int,
    train: bool,
    on_corrupt: str,
    p_generate: float = P_GENERATE,
    groups: Optional[Mapping[Tuple[int, int], Optional[Dict[str, list]]]] = None,
) -> Dict[str, np.ndarray]:
    """``map_batches`` function: items (:func:`plan_items`) of sources ``sources``
    (:func:`read_specs`) -> sequences (the model's batch
    columns: ``tokens``, ``targets``, ``audio``, ``audio_start``, ``audio_valid``, ``image``,
    ``image_start``, ``task``; span content from :func:`audio_content` / :func:`image_content`).
    Rows of a corrupt row group are left out under ``on_corrupt="skip"`` (else DataError naming it).
    ``groups``: the columns of row groups already read, ``{(source, group): columns or None}``
    (:func:`mixture_stream`), instead of the per-process cache."""
    L, tok = layout, cached_tokenizer(tokenizer)
    n = len(batch["source"])
    out, keep = _empty(n, L), np.zeros(n, bool)
    for j in range(n):
        i = int(batch["source"][j])
        src = sources[i]
        g, r = src["locate"](int(batch["row"][j]))
        cols = groups[(i, g)] if groups is not None else _group(src, g, on_corrupt)
        if cols is None:
            continue
        keep[j] = True
        rng = np.random.default_rng([seed, split, int(batch["pass"][j]), int(batch["index"][j])])
        generate = bool(rng.random() < p_generate)
        if src["modality"] == "text":
            task, ids = TEXT_LM, cols["tokens"][r]
        elif src["modality"] == "audio":
            task, ids = (TEXT_TO_AUDIO if generate else AUDIO_TO_TEXT), tok.encode(cols["text"][r]).ids
            out["audio"][j], out["audio_valid"][j] = audio_content(src["kind"], cols, r, L, rng if train else None)
        else:
            caption, out["image"][j] = image_content(src, cols, r, L)
            task, ids = (TEXT_TO_IMAGE if generate else IMAGE_TO_TEXT), tok.encode(caption).ids
        out["tokens"][j], out["targets"][j], start = sequence(task, ids, L)
        out["task"][j] = task
        if task in (AUDIO_TO_TEXT, TEXT_TO_AUDIO):
            out["audio_start"][j] = start
        elif task != TEXT_LM:
            out["image_start"][j] = start
    return {k: v[keep] for k, v in out.items()}


def audio_content(
    kind: str, cols: Dict[str, list], r: int, L: Layout, rng: Optional[np.random.Generator]
) -> Tuple[np.ndarray, int]:
    """Row ``r`` of an ``audio`` (normalised log-mel, :func:`crop_mel`) or ``audio_latents``
    (latent frames as stored, :func:`audio_latent_frames`, :func:`crop_frames`) group: the
    ``(n_mels, audio_frames)`` span and its valid frames."""
    if kind == "audio":
        return crop_mel(np.asarray(cols["mel"][r], np.float32).reshape(L.n_mels, int(cols["n_frames"][r])), L, rng)
    return crop_frames(audio_latent_frames(cols["latent"][r], cols["latent_shape"][r]), L.audio_frames, rng)


def image_content(src: Dict[str, Any], cols: Dict[str, list], r: int, L: Layout) -> Tuple[str, np.ndarray]:
    """Row ``r`` of an ``images`` (pixels in [-1, 1], :func:`square_image`; the row's caption,
    else :data:`CAPTION_TEMPLATE`) or ``image_latents`` group (the stored ``scaling_factor * z``
    reshaped to ``src["latent_shape"]``; :data:`CAPTION_TEMPLATE` with ``src["labels"][label]``):
    ``(caption, (image_channels, image_size, image_size) float32)``."""
    if src["kind"] == "images":
        caption = cols["caption"][r] or CAPTION_TEMPLATE.format(label=cols["label"][r])
        return caption, square_image(cols["pixels"][r], int(cols["height"][r]), int(cols["width"][r]), L.image_size)
    caption = CAPTION_TEMPLATE.format(label=src["labels"][int(cols["label"][r])])
    return caption, np.asarray(cols["latent"][r], np.float32).reshape(src["latent_shape"])


def label_names(manifest: Dict[str, Any]) -> List[str]:
    """An image manifest's label names by id (its ``labels`` map ``{name: id}``)."""
    return [name for name, _ in sorted(manifest.get("labels", {}).items(), key=lambda kv: kv[1])]


class _Locate:
    """Source row index -> (row group, row inside it) (picklable)."""

    def __init__(self, rows: Sequence[int]):
        self.ends = np.cumsum(rows)

    def __call__(self, row: int) -> Tuple[int, int]:
        g = int(np.searchsorted(self.ends, row, side="right"))
        return g, row - (int(self.ends[g - 1]) if g else 0)


def read_specs(sources: List[MixSource], split: str) -> List[Dict[str, Any]]:
    """What :func:`build_rows` needs to read ``split`` of each source (picklable): modality,
    kind, filesystem, row groups, columns, a row locator, the prepare hint for corrupt groups,
    the manifest's creation time (part of the row-group cache key) and, for image latents, the
    label names and the latent shape ``(C, h, w)``."""
    out = []
    for s in sources:
        spec = {
            "modality": s.modality,
            "kind": s.kind,
            "filesystem": s.filesystem,
            "groups": s.groups[split],
            "columns": COLUMNS[s.kind],
            "locate": _Locate([int(g["rows"]) for g in s.groups[split]]),
            "hint": prepare_hint(s.kind, s.shards) + " with --overwrite",
            "stamp": str(s.manifest.get("created")),
        }
        if s.kind == "image_latents":
            m = s.manifest
            spec.update(labels=label_names(m), latent_shape=(int(m["latent_channels"]),) + (int(m["latent_size"]),) * 2)
        out.append(spec)
    return out


def mixture_datasets(
    sources: List[MixSource],
    layout: Layout,
    tokenizer: str,
    *,
    seed: int = 0,
    passes: int = 1,
    rows_per_block: int = 32,
    on_corrupt: str = "error",
) -> Dict[str, Any]:
    """Ray Datasets ``{"train", "val"}`` of interleaved sequences (module docstring), one row per
    planned item (:func:`plan_items`; train: ``passes`` passes), blocks of ``rows_per_block``.

    Args:
        sources: :func:`open_sources` of the mixture. layout: the sequence geometry.
        tokenizer: path of the text sources' ``tokenizer.json`` (transcripts, captions).
        seed: orders the mixture and seeds coins and crops. on_corrupt: ``"error"`` / ``"skip"``.

    Raises:
        DataError: a split of a source is empty; ``on_corrupt`` unknown.
    """
    import ray

    if on_corrupt not in shard_io.ON_CORRUPT:
        raise DataError(f"data.on_corrupt must be one of {', '.join(shard_io.ON_CORRUPT)}, got {on_corrupt!r}")
    out = {}
    for split, code, k in (("train", 0, passes), ("val", 1, 1)):
        for s in sources:
            if s.rows(split) == 0:
                hint = prepare_hint(s.manifest["kind"], s.shards)
                raise DataError(f"{s.shards}: the {split} split holds no rows; {hint} (with a val fraction > 0)")
        sizes = [[int(g["rows"]) for g in s.groups[split]] for s in sources]
        items = plan_items(sizes, [s.weight for s in sources], seed, code, k)
        ds = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // rows_per_block)))
        out[split] = ds.map_batches(
            build_rows,
            batch_size=rows_per_block,
            batch_format="numpy",
            fn_kwargs=dict(
                sources=read_specs(sources, split),
                layout=layout,
                tokenizer=tokenizer,
                seed=seed,
                split=code,
                train=split == "train",
                on_corrupt=on_corrupt,
            ),
        )
        out[split].context.raise_original_map_exception = True  # a DataError reaches the run as itself
    return out


# -- the positioned train stream ----------------------------------------------------------------
def mixture_stream(
    sources: List[MixSource],
    layout: Layout,
    tokenizer: str,
    *,
    seed: int,
    shuffle_block: int,
    plan: Any,
    epoch: int,
    cursor: int,
    last_epoch: int,
    passes: int = 1,
    on_corrupt: str = "error",
    rows_per_output: int = 64,
) -> Any:
    """The train split as one positioned stream (:mod:`megaray.data.rows`) over epochs ``epoch ..
    last_epoch``, from served position ``cursor`` of ``epoch`` (a multiple of ``plan.global_batch``).

    Epoch ``e`` is the mixture's passes ``e * passes .. (e + 1) * passes - 1`` (:func:`pass_plan`:
    the mixture counts, the interleaving, the per-pass row orders, the coin and crop of position
    ``j`` of pass ``p`` seeded by ``(seed, 0, p, j)``), concatenated: a pure function of ``(seed,
    e)``, so every epoch draws new rows orders, coins and crops. Its positions are cut into shuffle
    blocks of ``order.block_size(shuffle_block, G)`` (without shuffling: ``G``) and permuted inside
    each (:func:`megaray.data.rows.block_permutation`); the epoch serves ``plan.served`` of them.
    One ``from_items`` row per block; a ``map_batches`` task computes the block's items, reads the
    row groups they need once (memory: one block's rows) and lays them out (:func:`build_rows`).

    Rows: :func:`build_rows`'s columns plus ``epoch`` and ``index`` (served position), in blocks
    of ``plan.micro_batch`` rows (``streaming_split(world, equal=True)`` deals them round robin).
    With ``on_corrupt="skip"`` an item of a corrupt row group is replaced by a readable item of
    the same block (cycled), so every position keeps a row.

    Raises:
        DataError: an empty train split; a bad ``on_corrupt`` (at build time); a block none of
            whose row groups can be read (when read). ValueError: ``cursor`` not a multiple of ``G``.
    """
    import ray

    from megaray.data import rows as rows_lib

    if on_corrupt not in shard_io.ON_CORRUPT:
        raise DataError(f"data.on_corrupt must be one of {', '.join(shard_io.ON_CORRUPT)}, got {on_corrupt!r}")
    for s in sources:
        if s.rows("train") == 0:
            raise DataError(f"{s.shards}: the train split holds no rows; {prepare_hint(s.manifest['kind'], s.shards)}")
    sizes = tuple(tuple(int(g["rows"]) for g in s.groups["train"]) for s in sources)
    weights = tuple(float(s.weight) for s in sources)
    per_pass = sum(mixture.plan([sum(x) for x in sizes], weights))
    o = rows_lib.EpochOrder.of(plan, seed, shuffle_block, passes)
    if passes * per_pass < o.served:
        raise DataError(
            f"the mixture holds {passes * per_pass} sequences in {passes} pass(es), fewer than the "
            f"{o.served} an epoch serves"
        )
    if cursor < 0 or cursor % o.global_batch:
        raise ValueError(f"cursor {cursor} is not a multiple of the global batch {o.global_batch}")
    if cursor >= o.served:
        epoch, cursor = epoch + 1, 0
    target = o.block or o.global_batch
    blocks = []
    for e in range(epoch, max(epoch, last_epoch) + 1):
        for k, start in enumerate(range(0, o.served, target)):
            stop = min(start + target, o.served)
            if e == epoch and stop <= cursor:
                continue
            blocks.append(
                {
                    "epoch": e,
                    "block": k,
                    "start": start,
                    "rows": min(target, passes * per_pass - start),
                    "first": max(start, cursor) if e == epoch else start,
                    "stop": stop,
                }
            )
    kw = dict(
        sources=read_specs(sources, "train"),
        sizes=sizes,
        weights=weights,
        per_pass=per_pass,
        order=o,
        layout=layout,
        tokenizer=tokenizer,
        seed=seed,
        on_corrupt=on_corrupt,
        rows_per_output=rows_per_output,
    )
    ds = ray.data.from_items(blocks, override_num_blocks=len(blocks))
    out = ds.map_batches(_mix_block, batch_size=1, batch_format="pyarrow", fn_kwargs=kw)
    out.context.raise_original_map_exception = True  # a DataError reaches the run as itself
    return out.repartition(target_num_rows_per_block=plan.micro_batch, strict=True)


def block_items(
    b: Mapping[str, int],
    *,
    sizes: Tuple[Tuple[int, ...], ...],
    weights: Tuple[float, ...],
    per_pass: int,
    order: Any,
    seed: int,
) -> Dict[str, np.ndarray]:
    """The items (``source``, ``row``, ``pass``, ``index`` in the pass: :func:`build_rows`'s input)
    of the kept served positions ``b["first"] .. b["stop"] - 1`` of one block of
    :func:`mixture_stream`, in served order."""
    from megaray.data.rows import block_permutation

    passes = order.passes
    perm = block_permutation(order, b["epoch"], b["block"], b["rows"])
    pos = b["start"] + perm[b["first"] - b["start"] : b["stop"] - b["start"]]  # stream positions of the epoch
    local, index = pos // per_pass, pos % per_pass
    out = {
        "source": np.zeros(len(pos), np.int64),
        "row": np.zeros(len(pos), np.int64),
        "pass": b["epoch"] * passes + local,
        "index": index,
    }
    for p in np.unique(local):
        at = local == p
        source, row = _pass_cached(sizes, weights, seed, int(b["epoch"] * passes + p))
        out["source"][at], out["row"][at] = source[index[at]], row[index[at]]
    return out


@lru_cache(maxsize=4)
def _pass_cached(
    sizes: Tuple[Tuple[int, ...], ...], weights: Tuple[float, ...], seed: int, pass_index: int
) -> Tuple[np.ndarray, np.ndarray]:
    return pass_plan(sizes, weights, seed, 0, pass_index)


def _mix_block(
    batch: Any,
    *,
    sources: List[Dict[str, Any]],
    sizes: Tuple[Tuple[int, ...], ...],
    weights: Tuple[float, ...],
    per_pass: int,
    order: Any,
    layout: Layout,
    tokenizer: str,
    seed: int,
    on_corrupt: str,
    rows_per_output: int,
) -> Iterator[Dict[str, np.ndarray]]:
    """``map_batches`` function: one block of :func:`mixture_stream` -> its sequences with
    ``epoch`` and ``index``, ``rows_per_output`` at a time."""
    b = batch.to_pylist()[0]
    items = block_items(b, sizes=sizes, weights=weights, per_pass=per_pass, order=order, seed=seed)
    where = [sources[int(i)]["locate"](int(r)) for i, r in zip(items["source"], items["row"])]
    groups = {}
    for i, (g, _) in zip(items["source"].tolist(), where):
        if (i, g) not in groups:
            groups[(i, g)] = _group(sources[i], g, on_corrupt)  # read once per block (the cache may evict it)
    bad = np.array([groups[(int(i), g)] is None for i, (g, _) in zip(items["source"], where)], bool)
    if bad.any():  # on_corrupt="skip": fill from the block's readable items, so every position keeps a row
        good = np.flatnonzero(~bad)
        names = sorted(
            {
                f"{sources[i]['groups'][g]['display']} row group {sources[i]['groups'][g]['row_group']}"
                for (i, g), cols in groups.items()
                if cols is None
            }
        )
        if not len(good):
            raise DataError(
                f"epoch {b['epoch']} shuffle block {b['block']}: no row group could be read "
                f"({', '.join(names)}); re-prepare the data"
            )
        fill = good[np.arange(int(bad.sum())) % len(good)]
        for k in ("source", "row"):
            items[k][bad] = items[k][fill]
    index = np.arange(b["first"], b["stop"], dtype=np.int64)
    for s in range(0, len(index), rows_per_output):
        part = {k: v[s : s + rows_per_output] for k, v in items.items()}
        out = build_rows(
            part,
            sources=sources,
            layout=layout,
            tokenizer=tokenizer,
            seed=seed,
            split=0,
            train=True,
            on_corrupt=on_corrupt,
            groups=groups,
        )
        out["epoch"] = np.full(len(part["row"]), b["epoch"], np.int64)
        out["index"] = index[s : s + rows_per_output]
        yield out
