"""Text cleaning in ``prepare_text`` (megaray/data/text/clean.py): length and Gopher repetition
filters, MinHash near-duplicate removal (threshold, naming, determinism, before the split), the
``megaray prepare text`` flags. The documents are real: standard-library docstrings, and edited
copies of them (a handful of words replaced, inserted or deleted)."""

from __future__ import annotations

import inspect
import json
import logging
import random
import textwrap
import unittest
from pathlib import Path
from typing import List, Tuple

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from megaray.data.splits import split_of
from megaray.data.text import prepare_text
from megaray.data.text.clean import (
    CleanConfig,
    TextCleaner,
    dup_line_fraction,
    jaccard,
    shingles,
    top_ngram_fraction,
)
from megaray.data.tokenizer import load_tokenizer
from megaray.errors import ConfigError

#: real prose: long docstrings of the running Python's standard library.
DOCS = {
    "textwrap.TextWrapper": inspect.getdoc(textwrap.TextWrapper),
    "unittest.TestCase": inspect.getdoc(unittest.TestCase),
    "logging.Formatter": inspect.getdoc(logging.Formatter),
    "logging.Logger": inspect.getdoc(logging.Logger),
    "json.dumps": inspect.getdoc(json.dumps),
}
REPETITIVE = "Subscribe now for the best deals!\n" * 6 + "Our newsletter covers prices on everything you need."
SHORT = "Too short to train on."


def edited(text: str, k: int, seed: int = 0) -> str:
    """``text`` with ``k`` word edits at random places, cycling replace / insert / delete."""
    words, rng = text.split(), random.Random(seed)
    for i in range(k):
        pos = rng.randrange(len(words))
        if i % 3 == 0:
            words[pos] = f"quux{i}"
        elif i % 3 == 1:
            words.insert(pos, f"zork{i}")
        else:
            del words[pos]
    return " ".join(words)


def variant_near(text: str, target: float) -> Tuple[str, float]:
    """The edited copy of ``text`` whose true shingle Jaccard with it is closest to ``target``."""
    best = min(
        ((edited(text, k), jaccard(text, edited(text, k))) for k in range(1, 60)), key=lambda vj: abs(vj[1] - target)
    )
    return best


def test_measures():
    assert shingles("One two, THREE four five six") == [b"one two three four five", b"two three four five six"]
    assert shingles("just three words") == [b"just three words"] and shingles("...") == []
    assert dup_line_fraction("a\n\n  a\nb\na") == pytest.approx(2 / 4)  # blank lines ignored, lines stripped
    assert dup_line_fraction(DOCS["textwrap.TextWrapper"]) < 0.1 and dup_line_fraction("one line") == 0.0
    assert dup_line_fraction(REPETITIVE) == pytest.approx(5 / 7)
    # top 2-gram: only a 2-gram seen twice counts; overlapping occurrences cover a word once (<= 1)
    assert top_ngram_fraction("the cat sat on the mat") == 0.0
    assert top_ngram_fraction("ab ab ab") == 1.0
    assert top_ngram_fraction("of the cat of the dog") == pytest.approx(10 / 16)
    assert jaccard("a b c d e f", "a b c d e f") == 1.0
    assert jaccard("a b c d e f", "a b c d e g") == pytest.approx(1 / 3)


def test_config_validation():
    for bad in (
        dict(min_words=-1),
        dict(min_words=10, max_words=5),
        dict(max_dup_line_fraction=0.0),
        dict(max_top_2gram_fraction=1.5),
        dict(dedupe_threshold=1.01),
        dict(dedupe_threshold=0.2),
    ):
        with pytest.raises(ConfigError, match="clean: "):
            CleanConfig(**bad)
    off = CleanConfig.off()
    assert TextCleaner(off).check("x", SHORT) is None and TextCleaner(off).check("x", REPETITIVE) is None
    assert "minhash" not in off.to_json() and CleanConfig().to_json()["minhash"]["num_perm"] == 128


def test_length_and_repetition_rejects():
    c = TextCleaner(
        CleanConfig(
            min_words=10, max_words=200, max_dup_line_fraction=0.3, max_top_2gram_fraction=0.2, near_dedupe=False
        )
    )
    assert c.check("s", SHORT) == ("too_short", "too short (5 words < 10)")
    n = len(DOCS["textwrap.TextWrapper"].split())
    assert c.check("l", DOCS["textwrap.TextWrapper"]) == ("too_long", f"too long ({n} words > 200)")
    assert c.check("r", REPETITIVE) == ("repetitive", "repetitive (dup-line fraction 0.71 > 0.30)")
    spam = "Click here to win. " + "best price best price best price " * 3 + "today only."
    assert c.check("t", spam) == ("repetitive", "repetitive (top 2-gram fraction 0.76 > 0.20)")
    assert c.check("ok", DOCS["logging.Logger"]) is None


def test_threshold_pairs_follow_true_jaccard():
    """Pairs whose true 5-gram Jaccard is just above / below the threshold are dropped / kept; the
    reported estimate is close to the truth; a lower threshold drops the lower pair too."""
    base = DOCS["unittest.TestCase"]
    above, j_above = variant_near(base, 0.88)
    below, j_below = variant_near(base, 0.72)
    assert 0.85 <= j_above <= 0.92 and 0.68 <= j_below <= 0.75, (j_above, j_below)
    c = TextCleaner(CleanConfig(dedupe_threshold=0.8))
    assert c.check("orig", base) is None
    reason, detail = c.check("above", above)
    assert reason == "near_duplicate" and detail.startswith("near-duplicate of orig (jaccard ~")
    assert abs(float(detail.split("~")[1].rstrip(")")) - j_above) < 0.1
    assert c.check("below", below) is None  # kept (and indexed)
    c = TextCleaner(CleanConfig(dedupe_threshold=0.6))
    c.check("orig", base)
    assert c.check("below", below)[0] == "near_duplicate"
    # a distinct document of the same style is kept
    assert c.check("other", DOCS["logging.Formatter"]) is None


def _corpus(tmp_path: Path) -> Tuple[Path, List[str], List[str]]:
    """A jsonl corpus: five real docstrings, edited copies of three of them (at least one whose id
    hashes into val: dedupe happens before the split), a too-short and a repetitive document."""
    rows, copies = [{"id": f"orig-{k}", "text": t} for k, t in DOCS.items()], []
    for n, k in enumerate(["textwrap.TextWrapper", "unittest.TestCase", "logging.Formatter"]):
        want = "val" if n == 0 else "train"
        cid = next(f"copy-{k}-{i}" for i in range(1000) if split_of(f"copy-{k}-{i}", 0.3) == want)
        text = edited(DOCS[k], 3, seed=n)
        assert jaccard(DOCS[k], text) > 0.85
        rows.append({"id": cid, "text": text})
        copies.append(cid)
    rows += [{"id": "short", "text": SHORT}, {"id": "spam", "text": REPETITIVE}]
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return src, copies, [r["text"] for r in rows[: len(DOCS)]]


def _kept(out: Path) -> List[str]:
    tok = load_tokenizer(str(out / "tokenizer.json"))
    texts = []
    for f in sorted(out.glob("*/part-*.parquet")):
        texts += [tok.decode(r[:-1]) for r in pq.read_table(f).column("tokens").to_pylist()]
    return texts


def test_prepare_text_drops_and_names_near_duplicates(tmp_path):
    src, copies, originals = _corpus(tmp_path)
    kw = dict(vocab_size=300, val_fraction=0.3, progress=False, verbose=False, clean=CleanConfig(min_words=8))
    m = prepare_text([str(src)], str(tmp_path / "a"), **kw)
    by = m["rejected"]["by_reason"]
    assert set(by) == {"near_duplicate", "too_short", "repetitive"} and by["near_duplicate"]["count"] == 3
    for cid, ex in zip(copies, by["near_duplicate"]["examples"]):
        orig = "orig-" + cid.split("-")[1]
        assert ex.startswith(f"{src} (id {cid}): near-duplicate of {orig} (jaccard ~"), ex
    assert by["too_short"]["examples"] == [f"{src} (id short): too short (5 words < 8)"]
    assert by["repetitive"]["examples"] == [f"{src} (id spam): repetitive (dup-line fraction 0.71 > 0.50)"]
    assert m["clean"]["near_dedupe"] and m["clean"]["dedupe_threshold"] == 0.8 and m["clean"]["min_words"] == 8
    kept = _kept(tmp_path / "a")
    assert sorted(kept) == sorted(originals)  # the distinct documents all kept, in train or val
    # determinism: a second run gives the same shards and the same rejects
    m2 = prepare_text([str(src)], str(tmp_path / "b"), **kw)
    assert m2["rejected"] == m["rejected"] and _kept(tmp_path / "b") == kept
    assert m2["splits"]["train"]["tokens"] == m["splits"]["train"]["tokens"]


def test_cli_flags(tmp_path):
    import typer.main

    from megaray.cli import app

    runner = CliRunner()
    for args, msg in [
        (["--dedupe-threshold", "0.3"], "--dedupe-threshold must be in [0.5, 1], got 0.3"),
        (["--max-dup-lines", "0"], "--max-dup-lines must be in (0, 1], got 0"),
        (["--max-top-2gram", "2"], "--max-top-2gram must be in (0, 1], got 2"),
        (["--min-words", "-3"], "--min-words must be >= 0, got -3"),
        (["--min-words", "50", "--max-words", "20"], "--min-words (50) is above --max-words (20)"),
    ]:
        r = runner.invoke(app, ["prepare", "text", "--out", str(tmp_path / "x"), *args])
        assert r.exit_code == 2 and f"error: {msg}" in r.output, (args, r.output)
    assert not (tmp_path / "x").exists()
    # the flags' defaults are CleanConfig's
    cmd = typer.main.get_command(app).commands["prepare"].commands["text"]
    defaults = {p.name: p.default for p in cmd.params}
    cfg = CleanConfig()
    assert {
        k: defaults[k]
        for k in (
            "min_words",
            "max_words",
            "max_dup_line_fraction",
            "max_top_2gram_fraction",
            "near_dedupe",
            "dedupe_threshold",
        )
    } == {
        k: getattr(cfg, k)
        for k in (
            "min_words",
            "max_words",
            "max_dup_line_fraction",
            "max_top_2gram_fraction",
            "near_dedupe",
            "dedupe_threshold",
        )
    }
