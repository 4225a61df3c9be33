"""Supervised fine-tuning data: chat/completion JSONL -> token shards with a loss mask -> packed windows.

Records, one JSON object per line of a ``.jsonl`` file::

    {"prompt": "Add 2 and 3.", "completion": "5"}
    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}

A prompt/completion record is the chat ``[user: prompt, assistant: completion]``. Each record is
rendered through the **chat template** (:data:`DEFAULT_TEMPLATE`, stored as ``chat_template.json``
next to ``tokenizer.json`` in the shards and in every checkpoint)::

    <|user|>\\n{content}\\n<|assistant|>\\n{content}\\n ... <|endoftext|>

Role markers are ordinary text (any tokenizer encodes them; the vocabulary is unchanged, so a
pre-trained checkpoint fine-tunes without resizing its embeddings); the record ends with EOS.
Loss is taken only on assistant content, its end-of-turn and the final EOS (``loss_mask`` 1);
role markers, system and user turns are masked (``loss_mask`` 0). To generate, feed
:func:`render_prompt` (the turns so far plus the assistant marker) and stop at EOS.

Bad records are counted and named (``file:line``) per :mod:`megaray.data.rejects`: ``invalid_json``,
``not_an_object``, ``missing_keys`` (neither ``prompt``+``completion`` nor ``messages``),
``bad_message`` (a message without string ``role``/``content`` or an unknown role),
``empty_completion`` (no assistant turn with text), ``too_long`` (over ``max_tokens``). An empty
file is a :class:`DataError`.

Packing (:func:`pack`): whole records are laid greedily, in order, into windows of
``block_size + 1`` tokens; a record that does not fit starts the next window, and the rest of the
window is padding (EOS ids, target -1, document id 0). ``doc_ids`` number the records inside a
window, so the model's document mask (``GPT.forward(doc_ids=...)``) keeps attention inside one
record. Targets outside the loss mask are -1 (the GPT's ``ignore_index``).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from megaray import fs
from megaray.data.manifest import new_manifest, read_manifest, write_manifest
from megaray.data.rejects import Rejects, summary_lines
from megaray.data.sources import list_files
from megaray.data.splits import SPLITS, split_key
from megaray.data.tokenizer import EOS, eos_id, load_tokenizer, tokenizer_kind
from megaray.errors import DataError

TEMPLATE_FILE = "chat_template.json"
#: the chat template: text before each role's content, after every turn, and which role is trained
DEFAULT_TEMPLATE: Dict[str, Any] = {
    "format": "megaray-chat-1",
    "roles": {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"},
    "end_of_turn": "\n",
    "train_role": "assistant",
}
SCHEMA = pa.schema([pa.field("tokens", pa.list_(pa.int32())), pa.field("loss_mask", pa.list_(pa.int8()))])
IGNORE = -1  # target of a position without loss (GPT's cross-entropy ignore_index)


# ----------------------------------------------------------------------------- records


def to_messages(record: Any) -> Tuple[Optional[List[Dict[str, str]]], Optional[str], Optional[str]]:
    """``(messages, reject reason, detail)`` of one parsed JSONL value (reason None = usable)."""
    if not isinstance(record, dict):
        return None, "not_an_object", f"a JSON {type(record).__name__}"
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            return None, "bad_message", "'messages' is not a non-empty list"
        for m in msgs:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                return None, "bad_message", f"message {m!r:.60} lacks string 'role'/'content'"
            if m["role"] not in DEFAULT_TEMPLATE["roles"]:
                return None, "bad_message", f"unknown role {m['role']!r} (system, user, assistant)"
        return [{"role": m["role"], "content": m["content"]} for m in msgs], None, None
    missing = [k for k in ("prompt", "completion") if k not in record]
    if missing:
        return None, "missing_keys", f"no {' or '.join(repr(k) for k in missing)} (and no 'messages')"
    if not isinstance(record["prompt"], str) or not isinstance(record["completion"], str):
        return None, "missing_keys", "'prompt' and 'completion' must be strings"
    return (
        [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}],
        None,
        None,
    )


def render(messages: Sequence[Dict[str, str]], template: Dict[str, Any] = DEFAULT_TEMPLATE) -> List[Tuple[str, bool]]:
    """``[(text, trained), ...]`` segments of a chat (the EOS after it is added by :func:`encode_record`)."""
    out: List[Tuple[str, bool]] = []
    for m in messages:
        trained = m["role"] == template["train_role"]
        out.append((template["roles"][m["role"]], False))
        out.append((m["content"] + template["end_of_turn"], trained))
    return out


def render_prompt(messages: Sequence[Dict[str, str]], template: Dict[str, Any] = DEFAULT_TEMPLATE) -> str:
    """The text to feed for generation: the turns so far, then the assistant marker."""
    return "".join(t for t, _ in render(messages, template)) + template["roles"][template["train_role"]]


def encode_record(tok: Any, segments: Sequence[Tuple[str, bool]], eos: int) -> Tuple[List[int], List[int]]:
    """Token ids (ending in EOS) and their loss mask (1 = trained), segment by segment."""
    ids: List[int] = []
    mask: List[int] = []
    for text, trained in segments:
        if text:
            seg = tok.encode(text, add_special_tokens=False).ids
            ids += seg
            mask += [int(trained)] * len(seg)
    ids.append(eos)
    mask.append(int(segments[-1][1]) if segments else 0)
    return ids, mask


def iter_records(source: str, rejects: Rejects) -> Iterator[Tuple[str, str, List[Dict[str, str]]]]:
    """``(record id "relpath:line", where "file:line", messages)`` of every usable record of ``source`` (files,
    folders, globs, URIs of ``.jsonl``); bad records counted in ``rejects``.

    Raises:
        DataError: a missing source, or a file with no lines at all (names it).
    """
    for f in list_files(source).files:
        with f.filesystem.open_input_stream(f.path) as fh:
            data = fh.read().decode("utf-8", errors="replace")
        if not data.strip():
            raise DataError(
                f"{f.display} is empty: expected JSONL records such as "
                '{"prompt": "...", "completion": "..."} or {"messages": [...]}, one per line'
            )
        for n, line in enumerate(data.splitlines(), 1):
            where = f"{f.display}:{n}"
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as e:
                rejects.add("invalid_json", where, detail=str(e))
                continue
            msgs, reason, detail = to_messages(value)
            if reason is not None:
                rejects.add(reason, where, detail=detail)
                continue
            if not any(m["role"] == DEFAULT_TEMPLATE["train_role"] and m["content"].strip() for m in msgs):
                rejects.add("empty_completion", where, detail="no assistant turn / completion with text")
                continue
            yield f"{f.relpath}:{n}", where, msgs


# ----------------------------------------------------------------------------- prepare


def prepare_sft(
    sources: Sequence[str],
    out_dir: str,
    tokenizer: str,
    *,
    max_tokens: int = 1024,
    val_fraction: float = 0.1,
    seed: int = 0,
    overwrite: bool = False,
    verbose: bool = True,
) -> Dict[str, Any]:
    """Tokenize chat/completion JSONL into ``out_dir/{train,val}/part-00000.parquet`` (columns
    ``tokens`` list<int32>, ``loss_mask`` list<int8>, one row per record) + manifest (kind ``sft``).

    Args:
        sources: ``.jsonl`` files, folders, globs or URIs.
        out_dir: output folder (published atomically).
        tokenizer: a ``tokenizer.json``, or a folder holding one (prepared text shards, a
            checkpoint); copied with the chat template (the folder's ``chat_template.json`` when
            it has one, else :data:`DEFAULT_TEMPLATE`).
        max_tokens: records longer than this (incl. EOS) are rejected as ``too_long``; use the
            model's ``block_size + 1`` so every record fits a training window.
        val_fraction: expected share of records in val (by a hash of ``file:line``); a split
            left empty gets one record moved from the other.

    Raises:
        DataError: a missing or empty source file, fewer than 2 usable records (the rejects are
            named), a missing tokenizer, ``max_tokens < 2``.
    """
    sources = [str(sources)] if isinstance(sources, str) else [str(s) for s in sources]
    if max_tokens < 2:
        raise DataError(f"max_tokens must be >= 2, got {max_tokens}")
    tok_path, template = _tokenizer_files(str(tokenizer))
    tok = load_tokenizer(tok_path)
    eos = eos_id(tok)
    rejects = Rejects()
    rows: Dict[str, List[Tuple[List[int], List[int]]]] = {s: [] for s in SPLITS}
    for src in sources:
        for rid, where, msgs in iter_records(src, rejects):
            ids, mask = encode_record(tok, render(msgs, template), eos)
            if len(ids) > max_tokens:
                rejects.add("too_long", where, detail=f"{len(ids)} tokens > max_tokens {max_tokens}")
                continue
            rows["val" if split_key(rid, seed) < val_fraction else "train"].append((ids, mask))
    _fill_empty_split(rows, sources, rejects)
    with fs.staged_dir(str(out_dir), overwrite, local=True) as stage:
        splits = {s: _write_split(stage, s, rows[s]) for s in SPLITS}
        tok.save(fs.join(stage, "tokenizer.json"))
        fs.write_text(fs.join(stage, TEMPLATE_FILE), json.dumps(template, indent=2) + "\n")
        manifest = new_manifest(
            "sft",
            sources=sources,
            vocab_size=tok.get_vocab_size(with_added_tokens=True),
            eos_id=eos,
            tokenizer={
                "path": "tokenizer.json",
                "kind": tokenizer_kind(tok),
                "trained": False,
                "source": tok_path,
                "vocab_size": tok.get_vocab_size(with_added_tokens=True),
                "eos_token": EOS,
                "eos_id": eos,
            },
            chat_template=TEMPLATE_FILE,
            max_tokens=max_tokens,
            val_fraction=val_fraction,
            seed=seed,
            splits=splits,
            rejected=rejects.to_json(),
        )
        write_manifest(stage, manifest)
    if verbose:
        print(summarize(manifest, str(out_dir)))
    return manifest


def _tokenizer_files(tokenizer: str) -> Tuple[str, Dict[str, Any]]:
    """``(tokenizer.json path, chat template)`` from a file or a folder holding one."""
    folder = None
    if not tokenizer.endswith(".json"):
        folder, tokenizer = tokenizer, fs.join(tokenizer, "tokenizer.json")
    else:
        folder = tokenizer.rsplit("/", 1)[0] if "/" in tokenizer else "."
    tpl = fs.join(folder, TEMPLATE_FILE)
    template = json.loads(fs.read_text(tpl)) if fs.exists(tpl) else DEFAULT_TEMPLATE
    return tokenizer, template


def _fill_empty_split(rows: Dict[str, list], sources: List[str], rejects: Rejects) -> None:
    n = sum(len(r) for r in rows.values())
    if n < 2:
        raise DataError(
            f"{n} usable record(s) in {', '.join(sources)}: need at least 2 (one per split); "
            f"rejected: {rejects.describe()}"
        )
    for a, b in (("val", "train"), ("train", "val")):
        if not rows[a]:
            rows[a].append(rows[b].pop())


def _write_split(stage: str, split: str, rows: List[Tuple[List[int], List[int]]]) -> Dict[str, Any]:
    table = pa.Table.from_pydict({"tokens": [r[0] for r in rows], "loss_mask": [r[1] for r in rows]}, schema=SCHEMA)
    rel = f"{split}/part-00000.parquet"
    os.makedirs(os.path.join(stage, split), exist_ok=True)  # the stage is local (staged_dir(local=True))
    pq.write_table(table, fs.join(stage, rel), compression="zstd", write_page_checksum=True)
    tokens = sum(len(r[0]) for r in rows)
    return {
        "documents": len(rows),
        "tokens": tokens,
        "completion_tokens": sum(sum(r[1]) for r in rows),
        "max_record_tokens": max(len(r[0]) for r in rows),
        "shards": [{"path": rel, "documents": len(rows), "tokens": tokens}],
    }


def summarize(manifest: Dict[str, Any], out_dir: str = "") -> str:
    """Human-readable summary of an ``sft`` manifest (what :func:`prepare_sft` prints)."""
    lines = [
        f"prepared sft -> {out_dir or '.'}  (tokenizer {manifest['tokenizer']['kind']}, vocab "
        f"{manifest['vocab_size']}, chat template {manifest['chat_template']})"
    ]
    for s in SPLITS:
        d = manifest["splits"][s]
        lines.append(
            f"  {s + ':':<6}    {d['documents']:,} records, {d['tokens']:,} tokens, "
            f"{d['completion_tokens']:,} with loss, longest {d['max_record_tokens']}"
        )
    return "\n".join(lines + summary_lines(manifest["rejected"]))


# ----------------------------------------------------------------------------- training side


def load_manifest(shards: str) -> Dict[str, Any]:
    """The checked ``sft`` manifest of ``shards`` (DataError naming the folder otherwise)."""
    return read_manifest(
        shards, "sft", command=f"megaray prepare sft --source FILE.jsonl --tokenizer TOKENIZER --out {shards}"
    )


def read_split(shards: str, manifest: Dict[str, Any], split: str) -> List[Tuple[np.ndarray, np.ndarray]]:
    """``[(tokens int64, loss_mask int64), ...]`` of one split, in file order."""
    out = []
    for entry in manifest["splits"][split]["shards"]:
        filesystem, path = fs.resolve(fs.join(shards, entry["path"]))
        with filesystem.open_input_file(path) as fh:
            t = pq.read_table(fh)
        for ids, mask in zip(t.column("tokens").to_pylist(), t.column("loss_mask").to_pylist()):
            out.append((np.asarray(ids, np.int64), np.asarray(mask, np.int64)))
    return out


def pack(
    records: Sequence[Tuple[np.ndarray, np.ndarray]], block_size: int, pad_id: int
) -> Tuple[Dict[str, np.ndarray], int]:
    """Greedy in-order packing of whole records into windows (module docstring).

    Returns ``({"input_ids", "targets", "doc_ids"}: int64 (n, block_size), records dropped
    because they exceed block_size + 1 tokens)``. ``targets[t] = ids[t + 1]`` where that token is
    in the loss mask and in the same record as position ``t``, else -1.
    """
    W = block_size + 1
    windows: List[Tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    ids, mask, doc = np.full(W, pad_id, np.int64), np.zeros(W, np.int64), np.zeros(W, np.int64)
    pos, n_doc, dropped = 0, 0, 0
    for r_ids, r_mask in records:
        n = len(r_ids)
        if n > W:
            dropped += 1
            continue
        if pos + n > W:
            windows.append((ids, mask, doc))
            ids, mask, doc = np.full(W, pad_id, np.int64), np.zeros(W, np.int64), np.zeros(W, np.int64)
            pos, n_doc = 0, 0
        n_doc += 1
        ids[pos : pos + n], mask[pos : pos + n], doc[pos : pos + n] = r_ids, r_mask, n_doc
        pos += n
    if pos:
        windows.append((ids, mask, doc))
    if not windows:
        return {k: np.zeros((0, block_size), np.int64) for k in ("input_ids", "targets", "doc_ids")}, dropped
    ids_, mask_, doc_ = (np.stack(x) for x in zip(*windows))
    keep = (mask_[:, 1:] == 1) & (doc_[:, 1:] == doc_[:, :-1])
    return {
        "input_ids": ids_[:, :-1].copy(),
        "targets": np.where(keep, ids_[:, 1:], IGNORE),
        "doc_ids": doc_[:, :-1].copy(),
    }, dropped
