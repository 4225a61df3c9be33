"""Hugging Face ``datasets`` as a source of every prepare: ``--source hf:...``.

Grammar (the one parser, :func:`parse_hf`)::

    hf:NAME[:CONFIG][@SPLIT]   a dataset on the Hugging Face Hub, streamed:
                               load_dataset(NAME, CONFIG, split=SPLIT, streaming=True)
                               NAME = [OWNER/]DATASET   e.g. hf:wikitext:wikitext-2-raw-v1@train
    hf:PATH[@SPLIT]            a dataset built locally; PATH starts with / ./ ../ or ~, is a glob or
                               ends in .parquet, or exists (as load_dataset treats a name that exists):
                               - a folder written by Dataset.save_to_disk or
                                 DatasetDict.save_to_disk      -> load_from_disk(PATH)
                               - a folder of .parquet files     -> load_dataset("parquet", data_dir=PATH,
                                 (split from file names:           streaming=True)
                                 train-*.parquet, test-*.parquet)
                               - a .parquet file, or a glob     -> load_dataset("parquet", data_files=PATH,
                                 (hf:'./data/*.parquet')           streaming=True); split "train"
    SPLIT                      [A-Za-z0-9_.-]+ (train, validation, test.clean); default: "train" when
                               the dataset has it, else its only split (several, none of them train:
                               an error naming them)

Rows are read in order on the driver (``Dataset.iter`` / ``IterableDataset.iter`` in batches,
only the chosen columns); ``Audio`` and ``Image`` columns are read undecoded
(``decode=False``: the stored file bytes, which megaray's own decoders take; decoding in
``datasets`` would need torchcodec). A row's id is ``hf:IDENT/SPLIT/ROW`` (IDENT = NAME[:CONFIG]
for the hub, the folder or file name for a local dataset; ROW = the row's index in the split):
it names rejects and seeds the train/val hash, and stays put when the folder moves.

Columns (:class:`HFColumns`: a flag per role, else detection, :func:`choose_columns`):

* text (``prepare text``): a string column named ``text``/``content``/``document``, else the
  only string column;
* audio: an ``Audio`` column (or a struct of ``array`` + ``sampling_rate``), else a column of
  ``{bytes, path}`` structs or binary named audio/speech/wav/flac, else the only such column;
  transcript: a string column named text/sentence/transcript/transcription/normalized_text;
  speaker: speaker_id/speaker/speaker_name/client_id (string, integer or ``ClassLabel``);
* image: an ``Image`` column, else ``{bytes, path}`` structs or binary named
  image/img/jpg/jpeg/png/webp/bytes, else the only such column; caption:
  caption/captions/text/txt/sentence/description (a string, or a list of strings: the first);
  label: label/labels/class/cls/category (``ClassLabel`` names are used).

What was chosen is said once per source (``hf:./speech@train : audio from column 'audio'
(detected), ...``); nothing that fits is a :class:`DataError` listing the columns and their types.

Each prepare turns rows into its own records where it reads its other sources:
:class:`HFTextSource` (``prepare_text``: ``(doc_id, cell)``, checked by
:func:`megaray.data.text.documents.iter_cells`), :func:`megaray.data.audio.sources.hf_records`
(clip records carrying the file bytes), :func:`megaray.data.image.sources.hf_units` (read units
carrying the encoded image). ``datasets`` is imported only when an ``hf:`` source is used
(``pip install 'megaray[hf]'``).
"""

from __future__ import annotations

import glob as _glob
import io
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from megaray.errors import DataError

PREFIX = "hf:"
_NAME = r"[A-Za-z0-9][\w.-]*(?:/[\w.-]+)?"
_SPLIT = r"[A-Za-z0-9_][\w.-]*"
_HUB = re.compile(rf"^(?P<name>{_NAME})(?::(?P<config>[^@:/\s]+))?(?:@(?P<split>{_SPLIT}))?$")
_GRAMMAR = (
    "hf:NAME[:CONFIG][@SPLIT] (a Hub dataset, streamed) or hf:PATH[@SPLIT] (a local save_to_disk "
    "folder, a folder or glob of .parquet files; PATH starting with / ./ ../ or ~)"
)
_BATCH = 256

#: where the column choice is said (``print``), or None for silence.
Say = Optional[Callable[[str], None]]


def is_hf(source: str) -> bool:
    """True for ``hf:...`` source strings."""
    return str(source).startswith(PREFIX)


@dataclass(frozen=True)
class HFSpec:
    """A parsed ``hf:`` source.

    Attributes:
        source: the string as written (``hf:./speech@train``).
        name: the Hub name (``owner/dataset``) or the local path as written (``./speech``).
        config: the Hub configuration (None for local datasets).
        split: the split asked for (None: the default rule).
        local: PATH form (a folder or file on this machine) rather than a Hub name.
    """

    source: str
    name: str
    config: Optional[str]
    split: Optional[str]
    local: bool

    @property
    def path(self) -> str:
        """The local path, ``~`` expanded (local sources only)."""
        return os.path.expanduser(self.name)

    @property
    def ident(self) -> str:
        """The stable dataset part of row ids: ``NAME[:CONFIG]``, or the local folder/file name
        (a glob: the folder holding its first wildcard)."""
        if not self.local:
            return self.name + (f":{self.config}" if self.config else "")
        p = self.path.rstrip("/\\")
        if _is_glob(p):
            p = os.path.dirname(p[: min(p.find(c) for c in "*?[" if c in p)])
        return os.path.basename(os.path.abspath(p)) or p


def _is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", ".\\", "..\\")) or name in (".", "..")


def parse_hf(source: str) -> HFSpec:
    """Parse ``hf:NAME[:CONFIG][@SPLIT]`` or ``hf:PATH[@SPLIT]`` (grammar in the module docstring).

    A string that exists as a path as a whole (a file named ``a@b.parquet``) is a path without a
    split. No file is opened and ``datasets`` is not imported.

    Raises:
        DataError: not an ``hf:`` source; an empty name; a Hub name that does not fit the grammar
            (the message shows it).
    """
    source = str(source)
    if not is_hf(source):
        raise DataError(f"not a Hugging Face source (expected {_GRAMMAR}): {source!r}")
    body = source[len(PREFIX) :]
    if not body:
        raise DataError(f"empty Hugging Face source {source!r}: expected {_GRAMMAR}")
    if os.path.exists(os.path.expanduser(body)):
        return HFSpec(source, body, None, None, True)
    head, at, tail = body.rpartition("@")
    split = None
    if at and re.fullmatch(_SPLIT, tail) and "/" not in tail and head:
        body, split = head, tail
    local = (
        _looks_local(body)
        or _is_glob(body)
        or os.path.exists(os.path.expanduser(body))
        or body.lower().endswith(".parquet")
    )
    if local:
        return HFSpec(source, body, None, split, True)
    m = _HUB.match(body + (f"@{split}" if split else ""))
    if m is None:
        raise DataError(f"cannot parse {source!r}: expected {_GRAMMAR}")
    return HFSpec(source, m.group("name"), m.group("config"), m.group("split"), False)


def check_hf_source(source: str) -> None:
    """Cheap up-front check (the CLI runs it before Ray starts): the grammar, and that a local
    PATH exists (a glob: matches a file).

    Raises:
        DataError: a parse error, or the local dataset is missing (named).
    """
    spec = parse_hf(source)
    if spec.local:
        found = _glob.glob(spec.path, recursive=True) if _is_glob(spec.path) else os.path.exists(spec.path)
        if not found:
            raise DataError(
                f"local Hugging Face dataset not found: {spec.name} (in {source}); "
                "expected a save_to_disk folder, a folder of .parquet files, a .parquet file or a glob"
            )


# ----------------------------------------------------------------------------- opening


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("hf: sources need the Hugging Face `datasets` library: pip install 'megaray[hf]'") from None
    return datasets


def _open(spec: HFSpec) -> Tuple[Any, str]:
    """The dataset object and how it was loaded (for messages)."""
    ds = _datasets()
    if not spec.local:
        try:
            return ds.load_dataset(spec.name, spec.config, split=spec.split, streaming=True), "hub, streamed"
        except Exception as e:  # network, unknown name/config/split: datasets raises many kinds
            raise DataError(
                f"cannot load {spec.source} from the Hugging Face Hub: {type(e).__name__}: {e} "
                "(no network here? build it locally with save_to_disk and pass hf:./FOLDER)"
            ) from None
    check_hf_source(spec.source)
    path = spec.path
    try:
        if os.path.isdir(path) and any(
            os.path.exists(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json")
        ):
            return ds.load_from_disk(path), "save_to_disk folder"
        if os.path.isdir(path):
            if not _glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True):
                raise DataError(
                    f"{spec.source}: {spec.name} is neither a save_to_disk folder (no dataset_dict.json "
                    "or state.json) nor a folder of .parquet files"
                )
            return ds.load_dataset("parquet", data_dir=path, streaming=True), "parquet folder, streamed"
        return ds.load_dataset("parquet", data_files=path, streaming=True), "parquet files, streamed"
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot load {spec.source}: {type(e).__name__}: {e}") from None


def _pick_split(spec: HFSpec, obj: Any) -> Tuple[str, Any]:
    """``(split name, one-split dataset)`` of what :func:`_open` returned."""
    if isinstance(obj, dict):  # DatasetDict / IterableDatasetDict
        names = list(obj.keys())
        if spec.split is not None:
            if spec.split not in names:
                raise DataError(f"{spec.source}: no split {spec.split!r}; splits: {', '.join(names)}")
            return spec.split, obj[spec.split]
        if "train" in names:
            return "train", obj["train"]
        if len(names) == 1:
            return names[0], obj[names[0]]
        raise DataError(f"{spec.source}: several splits and none is 'train'; add @SPLIT, one of: {', '.join(names)}")
    own = str(getattr(obj, "split", None) or "train")  # a single Dataset: the split it records, else train
    if spec.split is not None and spec.split != own:
        raise DataError(
            f"{spec.source}: this dataset has one split ({own!r}), not {spec.split!r}; "
            f"drop @{spec.split} or write @{own}"
        )
    return own, obj


# ----------------------------------------------------------------------------- column kinds


def _feature_kind(f: Any) -> str:
    """``string | strings | binary | int | float | bool | classlabel | audio | image | media | other``
    of one ``datasets`` feature (``media``: a ``{bytes, path}`` struct, audio or image alike)."""
    ds = _datasets()
    if isinstance(f, ds.Audio):
        return "audio"
    if isinstance(f, ds.Image):
        return "image"
    if isinstance(f, ds.ClassLabel):
        return "classlabel"
    if isinstance(f, dict):
        if "array" in f and "sampling_rate" in f:
            return "audio"
        return "media" if "bytes" in f else "other"
    if isinstance(f, ds.Value):
        t = str(f.dtype)
        if t in ("string", "large_string", "string_view"):
            return "string"
        if t in ("binary", "large_binary", "binary_view"):
            return "binary"
        if t.startswith(("int", "uint")):
            return "int"
        if t.startswith("float"):
            return "float"
        return "bool" if t == "bool" else "other"
    inner = getattr(f, "feature", None)
    if inner is not None and isinstance(inner, ds.Value) and str(inner.dtype) in ("string", "large_string"):
        return "strings"
    return "other"


def _value_kind(v: Any) -> str:
    """The kind of a Python value (datasets without feature metadata: the first row decides)."""
    if isinstance(v, str):
        return "string"
    if isinstance(v, (bytes, bytearray)):
        return "binary"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float"
    if isinstance(v, dict):
        if "array" in v and "sampling_rate" in v:
            return "audio"
        return "media" if "bytes" in v else "other"
    if isinstance(v, list) and v and all(isinstance(x, str) for x in v):
        return "strings"
    return "image" if type(v).__module__.startswith("PIL.") else "other"


def _kind_text(f: Any, kind: str) -> str:
    """A column's type as shown in messages: ``string``, ``Audio``, ``ClassLabel(cat, dog)``."""
    if kind == "classlabel":
        names = list(f.names)
        return f"ClassLabel({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})"
    if kind in ("audio", "image") and not isinstance(f, dict) and f is not None:
        return type(f).__name__
    if isinstance(f, dict):
        return "{" + ", ".join(f) + "}"
    dtype = getattr(f, "dtype", None)
    return str(dtype) if dtype is not None else kind


class HFTable:
    """One split of an opened ``hf:`` source: its columns and kinds, rows in order.

    Args:
        source: the ``hf:`` string (parsed with :func:`parse_hf`).

    Raises:
        DataError: see :func:`parse_hf`, :func:`check_hf_source`; ``datasets`` missing; the
            dataset cannot be loaded; an unknown split.
    """

    def __init__(self, source: str):
        self.spec = parse_hf(source)
        obj, self.how = _open(self.spec)
        self.split, self.dataset = _pick_split(self.spec, obj)
        features = getattr(self.dataset, "features", None)
        self.features: Dict[str, Any] = dict(features) if features else {}
        if self.features:
            self.kinds = {c: _feature_kind(f) for c, f in self.features.items()}
        else:  # streamed without metadata: the first row decides
            first = next(iter(self.dataset.take(1)), None)
            if first is None:
                raise DataError(f"{self.display}: the split is empty")
            self.kinds = {c: _value_kind(v) for c, v in first.items()}

    @property
    def display(self) -> str:
        """The source with its split, as read: ``hf:./speech@train``."""
        return self.spec.source if self.spec.split else f"{self.spec.source}@{self.split}"

    @property
    def prefix(self) -> str:
        """Row ids are ``<prefix>/<row>``: ``hf:IDENT/SPLIT``."""
        return f"{PREFIX}{self.spec.ident}/{self.split}"

    @property
    def columns(self) -> List[str]:
        return list(self.kinds)

    def describe_columns(self) -> str:
        """``text (string), id (int64), audio (Audio)``."""
        return ", ".join(f"{c} ({_kind_text(self.features.get(c), k)})" for c, k in self.kinds.items())

    def class_names(self, column: str) -> Optional[List[str]]:
        """``ClassLabel`` names of ``column`` (None for other columns)."""
        f = self.features.get(column)
        return list(f.names) if self.kinds.get(column) == "classlabel" and f is not None else None

    def rows(self, columns: Sequence[str]) -> Iterator[Tuple[int, Dict[str, Any]]]:
        """``(row index, {column: value})`` in split order; audio/image columns undecoded.

        Raises:
            DataError: reading fails part way (a corrupt file, a dropped connection), naming the
                source and the row reached. Rows already yielded stay yielded.
        """
        ds = _datasets()
        data = self.dataset.select_columns(list(columns))
        for c in columns:
            f = self.features.get(c)
            if isinstance(f, ds.Audio) and f.decode:
                data = data.cast_column(c, ds.Audio(decode=False))
            elif isinstance(f, ds.Image) and f.decode:
                data = data.cast_column(c, ds.Image(decode=False))
        row = 0
        it = iter(data.iter(batch_size=_BATCH))
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except Exception as e:  # pyarrow / fsspec / network errors: a structural problem, stop
                raise DataError(f"{self.display}: reading failed after row {row}: {type(e).__name__}: {e}") from None
            n = len(batch[columns[0]]) if columns else 0
            for i in range(n):
                yield row, {c: batch[c][i] for c in columns}
                row += 1


# ----------------------------------------------------------------------------- choosing columns


@dataclass(frozen=True)
class HFColumns:
    """Column names given on the command line (None: detect). Each prepare reads the roles it has:
    text: ``text``; audio: ``audio``, ``text`` (the transcript), ``speaker``; images: ``image``,
    ``caption``, ``label``."""

    text: Optional[str] = None
    audio: Optional[str] = None
    speaker: Optional[str] = None
    image: Optional[str] = None
    caption: Optional[str] = None
    label: Optional[str] = None


@dataclass(frozen=True)
class _Role:
    what: str  # as printed: "text", "transcript"
    flag: str  # the CLI option naming it
    kinds: Tuple[str, ...]  # preferred column kinds
    names: Tuple[str, ...]  # preferred column names, in order (case-insensitive)
    fallback: Tuple[str, ...] = ()  # kinds taken when no preferred kind exists
    only_one: bool = True  # the only column of the kind(s) counts as detected
    required: bool = True


ROLES: Dict[str, _Role] = {
    "text": _Role("text", "--text-column", ("string",), ("text", "content", "document")),
    "audio": _Role(
        "audio", "--audio-column", ("audio",), ("audio", "speech", "wav", "flac"), fallback=("media", "binary")
    ),
    "transcript": _Role(
        "transcript",
        "--text-column",
        ("string",),
        ("text", "sentence", "transcript", "transcription", "normalized_text"),
        only_one=False,
        required=False,
    ),
    "speaker": _Role(
        "speaker",
        "--speaker-column",
        ("string", "int", "classlabel"),
        ("speaker_id", "speaker", "speaker_name", "client_id"),
        only_one=False,
        required=False,
    ),
    "image": _Role(
        "image",
        "--image-column",
        ("image",),
        ("image", "img", "jpg", "jpeg", "png", "webp", "bytes"),
        fallback=("media", "binary"),
    ),
    "caption": _Role(
        "caption",
        "--caption-column",
        ("string", "strings"),
        ("caption", "captions", "text", "txt", "sentence", "description"),
        only_one=False,
        required=False,
    ),
    "label": _Role(
        "label",
        "--label-column",
        ("classlabel", "string", "int"),
        ("label", "labels", "class", "cls", "category"),
        only_one=False,
        required=False,
    ),
}

#: the roles each prepare reads, and which HFColumns field names each
PREPARE_ROLES: Dict[str, Tuple[Tuple[str, str], ...]] = {
    "text": (("text", "text"),),
    "audio": (("audio", "audio"), ("transcript", "text"), ("speaker", "speaker")),
    "images": (("image", "image"), ("caption", "caption"), ("label", "label")),
}


def _detect(table: HFTable, role: _Role, taken: Sequence[str]) -> Optional[str]:
    free = [c for c in table.columns if c not in taken]
    for kinds in (role.kinds, role.fallback):
        cands = [c for c in free if table.kinds[c] in kinds]
        if not cands:
            continue
        lower = {c.lower(): c for c in cands}
        named = next((lower[n] for n in role.names if n in lower), None)
        if named is not None:
            return named
        if role.only_one and len(cands) == 1:
            return cands[0]
        if role.only_one:
            raise DataError(
                f"{table.display}: several columns could hold the {role.what} "
                f"({', '.join(cands)}); pass {role.flag} NAME (columns: {table.describe_columns()})"
            )
    return None


def choose_columns(
    table: HFTable, command: str, given: Optional[HFColumns] = None, say: Say = None
) -> Dict[str, Optional[str]]:
    """The column of each role ``command`` (``text`` | ``audio`` | ``images``) reads, by flag or
    detection (rules in the module docstring); says the choice through ``say``.

    Returns:
        ``{role: column or None}`` (None: an optional role with no column).

    Raises:
        DataError: a given column does not exist or has the wrong type; a required role has no
            column, or several equally likely ones. The message lists the columns and types.
    """
    given = given or HFColumns()
    out: Dict[str, Optional[str]] = {}
    parts = []
    for role_name, field in PREPARE_ROLES[command]:
        role = ROLES[role_name]
        name = getattr(given, field)
        if name is not None:
            if name not in table.kinds:
                raise DataError(
                    f"{table.display}: {role.flag} {name!r}: no such column (columns: {table.describe_columns()})"
                )
            if table.kinds[name] not in role.kinds + role.fallback:
                raise DataError(
                    f"{table.display}: {role.flag} {name!r} is "
                    f"{_kind_text(table.features.get(name), table.kinds[name])}, which cannot hold the "
                    f"{role.what} (columns: {table.describe_columns()})"
                )
            how = "given"
        else:
            name = _detect(table, role, [c for c in out.values() if c])
            how = "detected"
            if name is None and role.required:
                raise DataError(
                    f"{table.display}: no column holds the {role.what}; pass {role.flag} NAME "
                    f"(columns: {table.describe_columns()})"
                )
        out[role_name] = name
        if name is None:
            parts.append(f"no {role.what} column")
        else:
            parts.append((f"{role.what} from column " if not parts else f"{role.what} from ") + f"'{name}' ({how})")
    if say is not None:
        say(f"{table.display} : {', '.join(parts)}")
    return out


# ----------------------------------------------------------------------------- values


def cell_text(v: Any) -> str:
    """A transcript, caption or speaker value as text (first string of a list; None -> "")."""
    if v is None:
        return ""
    if isinstance(v, (list, tuple)):
        return next((str(x).strip() for x in v if isinstance(x, str) and x.strip()), "")
    return str(v).strip()


def cell_name(v: Any, names: Optional[List[str]]) -> str:
    """A label or speaker value: ``ClassLabel`` index -> its name; None -> ""."""
    if names is not None and isinstance(v, int) and 0 <= v < len(names):
        return names[v]
    return cell_text(v)


def audio_bytes(v: Any) -> Tuple[bytes, str]:
    """An audio cell -> ``(file bytes, path to read instead)``: stored bytes as they are; a decoded
    ``{array, sampling_rate}`` written as a float32 WAV (lossless) in memory; a ``{path}`` without
    bytes -> ``(b"", path)``; None -> ``(b"", "")`` (the clip decoder rejects it as empty)."""
    if v is None:
        return b"", ""
    if isinstance(v, (bytes, bytearray)):
        return bytes(v), ""
    if isinstance(v, dict):
        if v.get("bytes") is not None:
            return bytes(v["bytes"]), ""
        if v.get("array") is not None and v.get("sampling_rate"):
            import numpy as np
            import soundfile as sf

            arr = np.asarray(v["array"], np.float32)
            arr = arr.T if arr.ndim == 2 and arr.shape[0] < arr.shape[1] else arr  # (C, L) -> (L, C)
            buf = io.BytesIO()
            sf.write(buf, arr, int(v["sampling_rate"]), format="WAV", subtype="FLOAT")
            return buf.getvalue(), ""
        if v.get("path"):
            return b"", str(v["path"])
    return b"", ""


def image_bytes(v: Any) -> Tuple[Optional[bytes], str]:
    """An image cell -> ``(encoded bytes or None, why None)``: stored bytes as they are; a PIL image
    or a ``uint8`` array encoded as PNG; a ``{path}`` without bytes read from that file."""
    if v is None:
        return None, "null image"
    if isinstance(v, (bytes, bytearray)):
        return bytes(v), ""
    if isinstance(v, dict):
        if v.get("bytes") is not None:
            return bytes(v["bytes"]), ""
        if v.get("path"):
            from megaray import fs

            try:
                return fs.read_bytes(str(v["path"])), ""
            except DataError as e:
                return None, str(e)
        return None, "struct with neither bytes nor path"
    try:
        import numpy as np
        from PIL import Image

        img = v if type(v).__module__.startswith("PIL.") else Image.fromarray(np.asarray(v, np.uint8))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue(), ""
    except Exception as e:  # not an image-shaped value
        return None, f"cannot encode {type(v).__name__} as an image: {e}"[:200]


# ----------------------------------------------------------------------------- per prepare


class HFTextSource:
    """An ``hf:`` text source where ``prepare_text`` lists files: ``display``, ``relpath`` (the row-id
    prefix ``hf:IDENT/SPLIT``), ``extension`` ``"hf"``; :meth:`records` gives ``(doc_id, value)``.

    Raises (at construction):
        DataError: as :class:`HFTable` and :func:`choose_columns`.
    """

    extension = "hf"

    def __init__(self, source: str, column: Optional[str] = None, say: Say = None):
        self.table = HFTable(source)
        self.column = choose_columns(self.table, "text", HFColumns(text=column), say)["text"]
        self.display = self.relpath = self.table.prefix
        self.size = 1

    def records(self) -> Iterator[Tuple[str, Any]]:
        """``(hf:IDENT/SPLIT/ROW, cell)`` for every row (cells unchecked: the text rules apply after)."""
        for row, values in self.table.rows([self.column]):
            yield f"{self.table.prefix}/{row}", values[self.column]
