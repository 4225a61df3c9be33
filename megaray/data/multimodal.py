"""Text, speech and image shards mixed by weight into interleaved sequences (the multimodal family).

Every source of ``data.sources`` is a prepared folder whose manifest says its kind: ``text``
(``megaray prepare text``: documents as token lists), ``audio`` (``megaray prepare audio``:
log-mels with transcripts) or ``images`` (``megaray prepare images``: pixels with a label and
maybe a caption). One row of a source becomes one sequence of ``block_size`` positions:

==================  ===========================================================  ================
task (``task``)     sequence                                                     trained on
==================  ===========================================================  ================
0 text LM           ``doc tokens ...`` (its first ``block_size + 1`` tokens)     every next token
1 audio -> text     ``<|audio|> [audio] <|/audio|> transcript <eot>``            transcript, eot
2 text -> audio     ``transcript <|audio|> [audio] <|/audio|>``                  transcript,
                                                                                 ``<|audio|>``, audio
3 image -> text     ``<|image|> [image] <|/image|> caption <eot>``               caption, eot
4 text -> image     ``caption <|image|> [image] <|/image|>``                     caption,
                                                                                 ``<|image|>``, image
==================  ===========================================================  ================

``targets[t]`` is the id at ``t + 1`` where that position is trained on, else -100; content
positions (a span's patches, token id 0) and the position just before a span never carry a text
target, so the closing boundary is never predicted (spans have a fixed length: a generator
appends it). Text that does not fit is truncated; padding is token 0 / target -100. A speech or
image row is a to-text or a from-text example by a seeded coin (:data:`P_GENERATE` for
from-text). Captions are the row's caption, else :data:`CAPTION_TEMPLATE` with its label.

Order (the whole epoch is a pure function of ``(seed, pass)``, so the training loop's replay of
``batch_in_epoch`` batches after a crash reads exactly the batches an uninterrupted run would):

* each source's rows are permuted per pass, row group by row group (groups in a seeded order,
  rows shuffled inside each group: reads stay local), and taken from the start of that order,
  repeated or truncated to the count :func:`megaray.data.mixture.plan` gives it;
* sources are interleaved evenly by :func:`megaray.data.mixture.interleave`;
* the coin and the audio crop of the item at position ``i`` of pass ``p`` come from
  ``np.random.default_rng([seed, split, p, i])`` (split 0 train, 1 val).

An epoch of the train dataset holds ``passes`` such passes, pass-major; the training loop's local
shuffle (seed + epoch) mixes neighbouring rows. The item list is built on the driver and read by
``map_batches`` tasks that cache the row groups they read (:func:`build_rows`).

Audio content is ``(log_mel - mel_mean) / mel_std`` cropped (train: a seeded offset; val: from
the start) or zero-padded to ``audio_frames`` (``audio_valid`` counts the real frames). Image
content is the centred square of the stored image, resized (box halvings, then bicubic) to
``image_size``, as ``x / 127.5 - 1`` in [-1, 1].
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from megaray import fs
from megaray.data import mixture, shards as shard_io
from megaray.data.manifest import prepare_hint, read_manifest
from megaray.errors import DataError

#: probability that a speech / image row is a from-text (generation) example
P_GENERATE = 0.5
#: caption of an image row without one
CAPTION_TEMPLATE = "a photo of {label}"
TEXT_LM, AUDIO_TO_TEXT, TEXT_TO_AUDIO, IMAGE_TO_TEXT, TEXT_TO_IMAGE = range(5)
#: names of the ``task`` ids, for logging
TASKS = ("text_lm", "audio_to_text", "text_to_audio", "image_to_text", "text_to_image")
#: manifest kind -> modality
MODALITY = {"text": "text", "audio": "audio", "images": "image"}
#: columns read per modality
COLUMNS = {"text": ["tokens"], "audio": ["mel", "n_frames", "text"],
           "image": ["pixels", "height", "width", "label", "caption"]}
IGNORE = -100


@dataclass(frozen=True)
class Layout:
    """Geometry of one sequence: from the model config (:meth:`from_model`) and the tokenizer.

    ``vocab_size`` is the text vocabulary; the boundary ids follow it (``<|audio|>`` =
    ``vocab_size``, ``<|/audio|>``, ``<|image|>``, ``<|/image|>``)."""

    block_size: int
    vocab_size: int
    eot_id: int
    n_mels: int = 80
    audio_frames: int = 32
    audio_patch: int = 4
    image_size: int = 16
    image_channels: int = 3
    patch_size: int = 4
    mel_mean: float = 0.0
    mel_std: float = 1.0

    @classmethod
    def from_model(cls, model: Any, eot_id: int) -> "Layout":
        keys = [f for f in cls.__dataclass_fields__ if f not in ("eot_id",)]
        return cls(eot_id=eot_id, **{k: getattr(model, k) for k in keys})

    @property
    def boa(self) -> int:
        return self.vocab_size

    @property
    def eoa(self) -> int:
        return self.vocab_size + 1

    @property
    def boi(self) -> int:
        return self.vocab_size + 2

    @property
    def eoi(self) -> int:
        return self.vocab_size + 3

    @property
    def audio_tokens(self) -> int:
        return self.audio_frames // self.audio_patch

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def sequence(task: int, text: Sequence[int], L: Layout) -> Tuple[np.ndarray, np.ndarray, int]:
    """One row's ``(tokens (T,) int64, targets (T,) int64, span_start)`` for ``task`` (module
    docstring). ``text``: the document (task 0, EOS included) or the transcript / caption ids
    (without eot). ``span_start``: first content position, -1 for text LM."""
    T = L.block_size
    tokens, targets = np.zeros(T, np.int64), np.full(T, IGNORE, np.int64)
    if task == TEXT_LM:
        w = np.asarray(text[:T + 1], np.int64)
        tokens[:min(len(w), T)] = w[:T]
        targets[:max(0, len(w) - 1)] = w[1:]
        return tokens, targets, -1
    audio = task in (AUDIO_TO_TEXT, TEXT_TO_AUDIO)
    n = L.audio_tokens if audio else L.image_tokens
    bo, eo = (L.boa, L.eoa) if audio else (L.boi, L.eoi)
    if task in (AUDIO_TO_TEXT, IMAGE_TO_TEXT):  # span, then the text and eot: loss on text + eot
        words = list(text[:max(0, T - n - 3)]) + [L.eot_id]
        seq = [bo] + [0] * n + [eo] + words
        tokens[:len(seq)] = seq
        first = n + 1  # position of the closing boundary: it predicts the first text token
        targets[first:first + len(words)] = words
        return tokens, targets, 1
    words = list(text[:max(0, T - n - 2)])  # text, then the span: loss on the text and <|open|>
    seq = words + [bo] + [0] * n + [eo]
    tokens[:len(seq)] = seq
    targets[:len(words)] = seq[1:len(words) + 1]
    return tokens, targets, len(words) + 1


@dataclass
class MixSource:
    """One prepared folder of the mixture: its modality, weight and row groups per split."""

    shards: str
    weight: float
    modality: str
    manifest: Dict[str, Any]
    filesystem: Any = None
    groups: Dict[str, List[Dict[str, Any]]] = field(default_factory=dict)

    def rows(self, split: str) -> int:
        return sum(int(g["rows"]) for g in self.groups[split])


def open_sources(sources: Sequence[Any]) -> List[MixSource]:
    """Read each source's manifest and list its row groups (one footer read per shard file).

    ``sources``: objects with ``.shards`` and ``.weight`` (``DataConfig.resolved_sources()``).

    Raises:
        DataError: a folder is not prepared, is of a kind other than text / audio / images, or a
            shard file is missing or has a corrupt footer (each named, with the prepare command).
    """
    out = []
    for s in sources:
        man = read_manifest(str(s.shards))
        kind = man.get("kind")
        if kind not in MODALITY:
            raise DataError(f"data.sources: {s.shards} holds {kind!r} data; a multimodal run mixes text "
                            f"(`megaray prepare text`), audio (`megaray prepare audio`) and images "
                            f"(`megaray prepare images`)")
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
    return np.concatenate([starts[g] + rng.permutation(int(groups[g])) for g in rng.permutation(len(groups))]
                          or [np.zeros(0, np.int64)])


def plan_items(sizes: Sequence[Sequence[int]], weights: Sequence[float], seed: int, split: int = 0,
               passes: int = 1) -> List[Dict[str, int]]:
    """The dataset's items: ``{"source", "row", "pass", "index"}`` per sequence, pass-major.

    ``sizes[i]``: rows per row group of source ``i``. Per pass, source ``i`` contributes
    :func:`megaray.data.mixture.plan`'s count of rows, in :func:`source_order` (cycled), and
    sources are interleaved by :func:`megaray.data.mixture.interleave`. ``index`` is the item's
    position in its pass. Raises DataError (from ``plan``) for an empty source or a bad weight."""
    totals = [int(sum(s)) for s in sizes]
    counts = mixture.plan(totals, weights)
    order = mixture.interleave(counts, seed)
    items = []
    for p in range(passes):
        rows = [source_order(s, seed, split, p, i) for i, s in enumerate(sizes)]
        items += [{"source": i, "row": int(rows[i][k % totals[i]]), "pass": p, "index": j}
                  for j, (i, k) in enumerate(order)]
    return items


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


def crop_mel(mel: np.ndarray, L: Layout, rng: Optional[np.random.Generator]) -> Tuple[np.ndarray, int]:
    """Normalised ``(n_mels, audio_frames)`` crop of a log-mel ``(n_mels, F)`` and its valid
    frames: offset uniform in ``[0, F - audio_frames]`` from ``rng`` (None: from the start);
    shorter clips are zero-padded after normalisation."""
    F = mel.shape[1]
    start = int(rng.integers(0, F - L.audio_frames + 1)) if rng is not None and F > L.audio_frames else 0
    piece = (mel[:, start:start + L.audio_frames] - L.mel_mean) / L.mel_std
    out = np.zeros((L.n_mels, L.audio_frames), np.float32)
    out[:, :piece.shape[1]] = piece
    return out, int(piece.shape[1])


def square_image(pixels: bytes, height: int, width: int, size: int) -> np.ndarray:
    """A stored image's centred square, resized to ``size`` (box halvings, then bicubic, as the
    prepare step), as float32 ``(3, size, size)`` in [-1, 1]."""
    from megaray.data.image.datasets import center_box

    side = min(height, width)
    top, left = center_box(height, width, side)
    hwc = np.frombuffer(pixels, np.uint8).reshape(height, width, 3)[top:top + side, left:left + side]
    if side != size:
        from PIL import Image

        from megaray.data.image.decode import resize_shorter

        hwc = np.asarray(resize_shorter(Image.fromarray(np.ascontiguousarray(hwc)), size))
    return hwc.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0


def _empty(n: int, L: Layout) -> Dict[str, np.ndarray]:
    T = L.block_size
    return {"tokens": np.zeros((n, T), np.int64), "targets": np.full((n, T), IGNORE, np.int64),
            "audio": np.zeros((n, L.n_mels, L.audio_frames), np.float32),
            "audio_start": np.full(n, -1, np.int64), "audio_valid": np.zeros(n, np.int64),
            "image": np.zeros((n, L.image_channels, L.image_size, L.image_size), np.float32),
            "image_start": np.full(n, -1, np.int64), "task": np.zeros(n, np.int64)}


def build_rows(batch: Dict[str, np.ndarray], *, sources: List[Dict[str, Any]], layout: Layout, tokenizer: str,
               seed: int, split: int, train: bool, on_corrupt: str,
               p_generate: float = P_GENERATE) -> Dict[str, np.ndarray]:
    """``map_batches`` function: items (:func:`plan_items`) of sources ``sources``
    (:func:`read_specs`) -> sequences (the model's batch
    columns: ``tokens``, ``targets``, ``audio``, ``audio_start``, ``audio_valid``, ``image``,
    ``image_start``, ``task``). Rows of a corrupt row group are left out under
    ``on_corrupt="skip"`` (else DataError naming it)."""
    L, tok = layout, cached_tokenizer(tokenizer)
    n = len(batch["source"])
    out, keep = _empty(n, L), np.zeros(n, bool)
    for j in range(n):
        src = sources[int(batch["source"][j])]
        g, r = src["locate"](int(batch["row"][j]))
        cols = _group(src, g, on_corrupt)
        if cols is None:
            continue
        keep[j] = True
        rng = np.random.default_rng([seed, split, int(batch["pass"][j]), int(batch["index"][j])])
        generate = bool(rng.random() < p_generate)
        if src["modality"] == "text":
            task, ids = TEXT_LM, cols["tokens"][r]
        elif src["modality"] == "audio":
            task, ids = (TEXT_TO_AUDIO if generate else AUDIO_TO_TEXT), tok.encode(cols["text"][r]).ids
            mel = np.asarray(cols["mel"][r], np.float32).reshape(L.n_mels, int(cols["n_frames"][r]))
            out["audio"][j], out["audio_valid"][j] = crop_mel(mel, L, rng if train else None)
        else:
            caption = cols["caption"][r] or CAPTION_TEMPLATE.format(label=cols["label"][r])
            task, ids = (TEXT_TO_IMAGE if generate else IMAGE_TO_TEXT), tok.encode(caption).ids
            out["image"][j] = square_image(cols["pixels"][r], int(cols["height"][r]), int(cols["width"][r]),
                                           L.image_size)
        out["tokens"][j], out["targets"][j], start = sequence(task, ids, L)
        out["task"][j] = task
        if task in (AUDIO_TO_TEXT, TEXT_TO_AUDIO):
            out["audio_start"][j] = start
        elif task != TEXT_LM:
            out["image_start"][j] = start
    return {k: v[keep] for k, v in out.items()}


class _Locate:
    """Source row index -> (row group, row inside it) (picklable)."""

    def __init__(self, rows: Sequence[int]):
        self.ends = np.cumsum(rows)

    def __call__(self, row: int) -> Tuple[int, int]:
        g = int(np.searchsorted(self.ends, row, side="right"))
        return g, row - (int(self.ends[g - 1]) if g else 0)


def read_specs(sources: List[MixSource], split: str) -> List[Dict[str, Any]]:
    """What :func:`build_rows` needs to read ``split`` of each source (picklable): modality,
    filesystem, row groups, columns, a row locator, the prepare hint for corrupt groups and the
    manifest's creation time (part of the row-group cache key)."""
    return [{"modality": s.modality, "filesystem": s.filesystem, "groups": s.groups[split],
             "columns": COLUMNS[s.modality], "locate": _Locate([int(g["rows"]) for g in s.groups[split]]),
             "hint": prepare_hint(s.manifest["kind"], s.shards) + " with --overwrite",
             "stamp": str(s.manifest.get("created"))} for s in sources]


def mixture_datasets(sources: List[MixSource], layout: Layout, tokenizer: str, *, seed: int = 0, passes: int = 1,
                     rows_per_block: int = 32, on_corrupt: str = "error") -> Dict[str, Any]:
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
        out[split] = ds.map_batches(build_rows, batch_size=rows_per_block, batch_format="numpy", fn_kwargs=dict(
            sources=read_specs(sources, split), layout=layout, tokenizer=tokenizer, seed=seed, split=code, train=split == "train",
            on_corrupt=on_corrupt))
        out[split].context.raise_original_map_exception = True  # a DataError reaches the run as itself
    return out
