"""HellaSwag multiple-choice scoring, completion style, as nanoGPT's and llm.c's ``hellaswag.py``
(Zellers et al. 2019; karpathy/llm.c ``dev/data/hellaswag.py``).

Each example is one line of HellaSwag's own JSONL: ``{"ctx": str, "endings": [4 str], "label":
0..3, ...}`` (other keys ignored). Each of the 4 candidates is the row ``ctx tokens + tokens of
" " + ending``; the model's per-token cross-entropy (nats) over the ending tokens gives a sum and a
mean per candidate. ``acc`` counts examples whose correct ending has the lowest *sum*, ``acc_norm``
those whose correct ending has the lowest *mean* (length-normalised). A row longer than the
model's context (``block_size + 1`` tokens) keeps its ending whole and drops context tokens from the
left (counted as ``truncated``); llm.c never needs to, GPT-2's context being 1024.

This module is the scoring core, shared by training (:class:`megaray.tasks.lm.LMTask` scores a
file at every evaluation, each rank a share) and ``megaray eval --task hellaswag``
(:mod:`megaray.inference.hellaswag`, in process or over Ray Data).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from megaray.errors import DataError

log = logging.getLogger("megaray.hellaswag")

N_ENDINGS = 4


@dataclass
class Example:
    """One tokenized example. ``line``: its 1-based line in the file; ``ctx``: context token ids
    (left-truncated to fit when ``truncated``); ``endings``: 4 lists of ending token ids; ``label``: 0..3."""

    line: int
    ctx: List[int]
    endings: List[List[int]]
    label: int
    truncated: bool = False


@dataclass
class HellaSwagFile:
    """What :func:`read_hellaswag` found. ``bad``: reason -> 1-based line numbers (skipped);
    ``truncated``: examples whose context was cut from the left to fit the model."""

    path: str
    examples: List[Example]
    bad: Dict[str, List[int]] = field(default_factory=dict)
    truncated: int = 0

    @property
    def n_bad(self) -> int:
        return sum(len(v) for v in self.bad.values())

    def describe_bad(self, most: int = 5) -> str:
        """``"2 bad line(s): not JSON (line 3); label not in 0..3 (line 7)"`` or ``""``."""
        if not self.bad:
            return ""
        parts = [
            f"{why} (line{'s' if len(ls) > 1 else ''} {', '.join(map(str, ls[:most]))}"
            f"{', ...' if len(ls) > most else ''})"
            for why, ls in self.bad.items()
        ]
        return f"{self.n_bad} bad line(s) skipped in {self.path}: " + "; ".join(parts)


def _check(raw: Any) -> Optional[str]:
    """Why a parsed line is not a HellaSwag example, or None."""
    if not isinstance(raw, dict):
        return "not a JSON object"
    missing = [k for k in ("ctx", "endings", "label") if k not in raw]
    if missing:
        return f"missing key {missing[0]!r}"
    if not isinstance(raw["ctx"], str) or not raw["ctx"].strip():
        return "ctx is not a non-empty string"
    e = raw["endings"]
    if not isinstance(e, list) or len(e) != N_ENDINGS or not all(isinstance(x, str) and x for x in e):
        return f"endings is not a list of {N_ENDINGS} non-empty strings"
    label = raw["label"]
    if isinstance(label, str) and label.strip().isdigit():  # the HF datasets copy stores "3"
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < N_ENDINGS:
        return f"label not in 0..{N_ENDINGS - 1}"
    return None


def read_hellaswag(
    path: str | os.PathLike, tokenizer: Any, block_size: int, limit: Optional[int] = None
) -> HellaSwagFile:
    """Read and tokenize a HellaSwag JSONL file; bad lines are skipped, counted and named (logged).

    Args:
        path: local JSONL file.
        tokenizer: a ``tokenizers.Tokenizer`` (the run's ``tokenizer.json``).
        block_size: the model's context; a row of ``block_size + 1`` tokens fits (the last
            token is only a target).
        limit: keep the first ``limit`` good examples (None = all).

    Raises:
        DataError: the file is missing, or holds no usable example (names the bad lines).
    """
    path = str(path)
    if not os.path.isfile(path):
        raise DataError(f"HellaSwag file not found: {path} (a JSONL file with ctx, endings, label per line)")
    out = HellaSwagFile(path=path, examples=[])
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError:
                out.bad.setdefault("not JSON", []).append(n)
                continue
            why = _check(raw)
            if why is None:
                ex, why = _render(raw, n, tokenizer, block_size)
                if ex is not None:
                    out.truncated += ex.truncated
                    out.examples.append(ex)
            if why is not None:
                out.bad.setdefault(why, []).append(n)
            if limit is not None and len(out.examples) >= limit:
                break
    if out.bad:
        log.warning(out.describe_bad())
    if not out.examples:
        detail = out.describe_bad() or f"{path} is empty"
        raise DataError(f"no usable HellaSwag example in {path}: {detail}")
    return out


def _render(raw: Dict[str, Any], line: int, tokenizer: Any, block_size: int):
    ctx = tokenizer.encode(raw["ctx"]).ids
    endings = [tokenizer.encode(" " + e).ids for e in raw["endings"]]  # " " + ending, as llm.c
    longest = max(len(e) for e in endings)
    room = block_size + 1 - longest  # context tokens that fit beside the longest ending
    if room < 1:
        return None, f"an ending is longer than the model's context ({block_size} tokens)"
    return Example(
        line=line, ctx=ctx[-room:], endings=endings, label=int(raw["label"]), truncated=len(ctx) > room
    ), None


# ----------------------------------------------------------------------------- scoring


def _batch(examples: Sequence[Example]):
    """``(tokens (4k, L) int64, mask (4k, L) bool)``; mask is True on ending tokens; right-padded."""
    rows = [(ex.ctx + e, len(ex.ctx)) for ex in examples for e in ex.endings]
    L = max(len(r) for r, _ in rows)
    tokens = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, (r, c) in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
        mask[i, c : len(r)] = True
    return tokens, mask


@torch.no_grad()
def ending_losses(model: Any, examples: Sequence[Example], device: Any) -> torch.Tensor:
    """Per-candidate ``(n, 4, 2)`` float32: [..., 0] the sum, [..., 1] the mean cross-entropy
    (nats/token) of each ending given its context. ``model(idx)`` -> ``(B, T, V)`` logits."""
    tokens, mask = _batch(examples)
    tokens, mask = tokens.to(device), mask.to(device)
    logits = model(tokens[:, :-1])  # right padding never reaches earlier positions (causal)
    ce = F.cross_entropy(logits.float().transpose(1, 2), tokens[:, 1:], reduction="none")  # (4k, L-1)
    m = mask[:, 1:].float()  # the loss at position t predicts token t+1
    total = (ce * m).sum(1)
    return torch.stack([total, total / m.sum(1)], dim=-1).view(len(examples), N_ENDINGS, 2).cpu()


def score(model: Any, examples: Sequence[Example], device: Any, batch_examples: int = 8) -> List[Dict[str, Any]]:
    """One result per example, in order: ``{"line", "label", "pred" (argmin of sums),
    "pred_norm" (argmin of means), "sum_loss" [4], "mean_loss" [4]}``."""
    out: List[Dict[str, Any]] = []
    for i in range(0, len(examples), batch_examples):
        chunk = examples[i : i + batch_examples]
        losses = ending_losses(model, chunk, device)
        for ex, lo in zip(chunk, losses):
            out.append(
                {
                    "line": ex.line,
                    "label": ex.label,
                    "pred": int(lo[:, 0].argmin()),
                    "pred_norm": int(lo[:, 1].argmin()),
                    "sum_loss": lo[:, 0].tolist(),
                    "mean_loss": lo[:, 1].tolist(),
                }
            )
    return out


def accuracy(results: Sequence[Dict[str, Any]]) -> Dict[str, float]:
    """``{"acc", "acc_norm", "examples"}`` of :func:`score` results."""
    n = len(results)
    return {
        "acc": sum(r["pred"] == r["label"] for r in results) / n,
        "acc_norm": sum(r["pred_norm"] == r["label"] for r in results) / n,
        "examples": float(n),
    }


@torch.no_grad()
def shared_metrics(
    model: Any, examples: Sequence[Example], rank: int, world: int, device: Any, batch_examples: int = 8
) -> Dict[str, float]:
    """This rank's share (``examples[rank::world]``) scored, as ``hellaswag_acc`` and
    ``hellaswag_acc_norm`` scaled so that the mean over ranks is the accuracy over all examples.

    Every rank runs the same number of forwards (an empty slot runs a one-token forward), so a
    ZeRO-3 engine's parameter gathers stay in step."""
    share = list(examples[rank::world])
    n_forwards = math.ceil(math.ceil(len(examples) / world) / batch_examples)
    results: List[Dict[str, Any]] = []
    for b in range(n_forwards):
        chunk = share[b * batch_examples : (b + 1) * batch_examples]
        if chunk:
            results += score(model, chunk, device, batch_examples)
        else:
            model(torch.zeros(1, 1, dtype=torch.long, device=device))
    scale = world / len(examples)
    return {
        "hellaswag_acc": scale * sum(r["pred"] == r["label"] for r in results),
        "hellaswag_acc_norm": scale * sum(r["pred_norm"] == r["label"] for r in results),
    }
