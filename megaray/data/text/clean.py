"""Document cleaning for :func:`megaray.data.text.prepare_text`: length, repetition and MinHash
near-duplicate filters, applied to every document in read order, before the train/val split.

One small config (:class:`CleanConfig`) and one stateful filter (:class:`TextCleaner`) whose
:meth:`TextCleaner.check` returns ``None`` (keep) or ``(reason, detail)`` for the manifest's
rejects (:class:`megaray.data.rejects.Rejects`)::

    too_short       "too short (12 words < 50)"
    too_long        "too long (120,000 words > 100,000)"
    repetitive      "repetitive (dup-line fraction 0.45 > 0.30)"
                    "repetitive (top 2-gram fraction 0.31 > 0.20)"
    near_duplicate  "near-duplicate of <kept doc id> (jaccard ~0.91)"

Sources of the measures:

- **Length and repetition**: Gopher's MassiveText quality and repetition rules (Rae et al. 2021,
  "Scaling Language Models: Methods, Analysis & Insights from Training Gopher", appendix A.1.1 and
  Table A1). Words are whitespace-separated tokens (Gopher keeps 50..100,000 words; here both
  bounds are off by default: see :class:`CleanConfig`). From Table A1 two measures:

  * *duplicate line fraction* (Gopher drops a document above 0.30): of the document's non-blank
    lines (stripped), the fraction that repeat an earlier line.
  * *top 2-gram character fraction* (Gopher: above 0.20): the characters of the words covered by
    the most frequent word 2-gram, over the characters of all words. Two departures from the
    usual implementation (``len(ngram) * count / len(text)``), both to keep short documents from
    tripping it: only a 2-gram that occurs at least twice counts (a single occurrence is not
    repetition), and overlapping occurrences cover each word once (so the fraction stays <= 1).

- **Near duplicates**: MinHash (Broder 1997) over word 5-gram shingles (lower-cased ``\\w+``
  words; a document of at most 5 words is one shingle), 128 permutations with a fixed seed, and
  a :class:`datasketch.MinHashLSH` index. Every document is compared with the documents kept before
  it: LSH candidates are ranked by their MinHash estimate of the Jaccard similarity of the shingle
  sets (``matches / 128``); a document whose best estimate is at least the threshold is dropped and
  names the kept document it duplicates; otherwise it is kept and indexed. The LSH bands are chosen
  for recall (:func:`lsh_bands`: a pair of Jaccard exactly at the threshold is a candidate with
  probability >= 0.99), since every candidate is checked against the threshold anyway; datasketch's
  own tuning (equal false-positive and false-negative weights) finds such a pair only 40% of the
  time at 0.8, and misses 15% of pairs at 0.88. Memory: one 128-value signature per kept document
  (512 bytes with datasketch 2's uint32 hashes) plus the LSH bands.

Determinism: the seed of the permutations is fixed (:data:`MINHASH_SEED`) and documents are
visited in the fixed read order, so the same sources give the same kept set on every run (with the
same datasketch: 2.0 changed its permutation scheme, so 1.x estimates differ). With a
given threshold, a pair's outcome depends on the estimate, whose standard error at 128
permutations is ``sqrt(J (1 - J) / 128)`` (0.035 at J = 0.8): pairs much closer to the threshold
than that can fall either way, deterministically.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple

from megaray.errors import ConfigError

#: MinHash permutations (fixed: 128 as in common LLM dedupe pipelines).
NUM_PERM = 128
#: words per shingle.
SHINGLE_WORDS = 5
#: seed of the MinHash permutations; fixed so that re-running prepare gives identical shards.
MINHASH_SEED = 1
#: accepted ``dedupe_threshold`` range: below 0.5 pairs are not near duplicates (and LSH finds too
#: many candidates); 1 drops only documents whose 128 MinHash values all match an earlier one's.
THRESHOLD_RANGE = (0.5, 1.0)
#: a pair whose Jaccard equals the threshold is an LSH candidate with at least this probability.
LSH_RECALL = 0.99

_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class CleanConfig:
    """What :class:`TextCleaner` filters.

    Defaults (measured on the 5,103 stdlib docstrings, CPython 3.11): near dedupe at 0.8 drops 51
    (1.0%, true Jaccard 0.75-1.0: lzma/bz2 and os.spawn* twins, functools' comparison helpers,
    imp/importlib copies, ...; 4 of them val documents whose twin is in train); the duplicate-line
    fraction at 0.5 drops none (Gopher's 0.30 would drop 6 good ones: doctest transcripts and reST
    tables); the word bounds (Gopher's 50 drops 3,664 short docstrings) and the top-2-gram
    measure (0.20 drops 69) are off.

    Args:
        min_words: drop documents with fewer whitespace-separated words (0 = off).
        max_words: drop documents with more words (0 = no limit).
        max_dup_line_fraction: drop documents whose duplicate-line fraction is above this, in
            (0, 1]; 1 = off (Gopher: 0.30; the default 0.5 keeps doctest-heavy docstrings).
        max_top_2gram_fraction: drop documents whose top-2-gram character fraction is above this,
            in (0, 1]; 1 = off (Gopher: 0.20).
        near_dedupe: drop MinHash near duplicates of earlier kept documents.
        dedupe_threshold: estimated Jaccard similarity (of word 5-gram sets) at or above which a
            document is a near duplicate, in :data:`THRESHOLD_RANGE`.

    Raises:
        ConfigError: a value out of range (names the argument, the value and the range).
    """

    min_words: int = 0
    max_words: int = 0
    max_dup_line_fraction: float = 0.5
    max_top_2gram_fraction: float = 1.0
    near_dedupe: bool = True
    dedupe_threshold: float = 0.8

    def __post_init__(self) -> None:
        if self.min_words < 0 or self.max_words < 0:
            raise ConfigError(
                f"clean: min_words and max_words must be >= 0 (0 = off), got {self.min_words} and {self.max_words}"
            )
        if self.max_words and self.min_words > self.max_words:
            raise ConfigError(
                f"clean: min_words ({self.min_words}) is above max_words ({self.max_words}); "
                "every document would be dropped"
            )
        for name in ("max_dup_line_fraction", "max_top_2gram_fraction"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ConfigError(f"clean: {name} must be in (0, 1] (1 = off), got {v:g}")
        lo, hi = THRESHOLD_RANGE
        if not lo <= self.dedupe_threshold <= hi:
            raise ConfigError(f"clean: dedupe_threshold must be in [{lo:g}, {hi:g}], got {self.dedupe_threshold:g}")

    @classmethod
    def off(cls) -> "CleanConfig":
        """Every filter off (exact dedupe, a separate ``prepare_text`` flag, is not part of this)."""
        return cls(max_dup_line_fraction=1.0, max_top_2gram_fraction=1.0, near_dedupe=False)

    def to_json(self) -> Dict[str, Any]:
        """The manifest's ``clean`` entry (with the fixed MinHash settings when near dedupe is on)."""
        out: Dict[str, Any] = asdict(self)
        if self.near_dedupe:
            from importlib.metadata import version

            bands, rows = lsh_bands(self.dedupe_threshold)
            out["minhash"] = {
                "num_perm": NUM_PERM,
                "shingle_words": SHINGLE_WORDS,
                "seed": MINHASH_SEED,
                "lsh_bands": bands,
                "lsh_rows": rows,
                "datasketch": version("datasketch"),
            }
        return out


def dup_line_fraction(text: str) -> float:
    """Fraction of the non-blank (stripped) lines that repeat an earlier line; 0 for one line."""
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    if len(lines) < 2:
        return 0.0
    return (len(lines) - len(set(lines))) / len(lines)


def top_ngram_fraction(text: str, n: int = 2) -> float:
    """Characters of the words covered by the most frequent word ``n``-gram (occurring at least
    twice; the first of equally frequent ones), over the characters of all words; 0 if none repeats."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    top, count = Counter(grams).most_common(1)[0]
    if count < 2:
        return 0.0
    covered = [False] * len(words)
    for i, g in enumerate(grams):
        if g == top:
            covered[i : i + n] = [True] * n
    return sum(len(w) for w, c in zip(words, covered) if c) / sum(len(w) for w in words)


def shingles(text: str, k: int = SHINGLE_WORDS) -> List[bytes]:
    """The word ``k``-gram shingles of ``text`` (lower-cased ``\\w+`` words joined by a space), as
    UTF-8 bytes, in order with repeats; one shingle of all words when there are fewer than ``k``;
    empty when there are no words."""
    words = _WORD.findall(text.lower())
    if len(words) <= k:
        return [" ".join(words).encode("utf-8")] if words else []
    return [" ".join(words[i : i + k]).encode("utf-8") for i in range(len(words) - k + 1)]


def lsh_bands(threshold: float, num_perm: int = NUM_PERM, recall: float = LSH_RECALL) -> Tuple[int, int]:
    """``(bands, rows)`` of the LSH index: the most rows per band (fewest chance candidates) with
    ``bands = num_perm // rows`` such that a pair of Jaccard ``threshold`` collides in some band with
    probability ``1 - (1 - threshold**rows)**bands >= recall``. 0.8 gives (21, 6): 0.998 at 0.8,
    0.28 at 0.5, 0.015 at 0.3."""
    best = (num_perm // 2, 2)
    for rows in range(2, num_perm // 2 + 1):
        bands = num_perm // rows
        if 1.0 - (1.0 - threshold**rows) ** bands >= recall:
            best = (bands, rows)
    return best


def jaccard(a: str, b: str) -> float:
    """True Jaccard similarity of the shingle sets of two texts (what MinHash estimates)."""
    sa, sb = set(shingles(a)), set(shingles(b))
    return len(sa & sb) / len(sa | sb) if sa or sb else 1.0


class TextCleaner:
    """The filters of one :class:`CleanConfig` over one prepare run (holds the near-dedupe index).

    Call :meth:`check` on every document in a fixed order; a kept document joins the index, so
    later near duplicates of it are dropped.
    """

    def __init__(self, config: CleanConfig) -> None:
        self.config = config
        self._kept_ids: List[str] = []
        self._signatures: List[Any] = []  # hash values (numpy) of each indexed document
        self._lsh: Any = None
        self._template: Any = None
        if config.near_dedupe:
            from datasketch import MinHash, MinHashLSH  # lazy: only prepare needs it

            self._template = MinHash(num_perm=NUM_PERM, seed=MINHASH_SEED)
            self._lsh = MinHashLSH(num_perm=NUM_PERM, params=lsh_bands(config.dedupe_threshold))

    def check(self, doc_id: str, text: str) -> Optional[Tuple[str, str]]:
        """``None`` to keep ``text`` (and index it), else ``(reason, detail)`` to reject it."""
        c = self.config
        if c.min_words or c.max_words:
            n = len(text.split())
            if n < c.min_words:
                return "too_short", f"too short ({n:,} words < {c.min_words:,})"
            if c.max_words and n > c.max_words:
                return "too_long", f"too long ({n:,} words > {c.max_words:,})"
        if c.max_dup_line_fraction < 1.0:
            f = dup_line_fraction(text)
            if f > c.max_dup_line_fraction:
                return "repetitive", f"repetitive (dup-line fraction {f:.2f} > {c.max_dup_line_fraction:.2f})"
        if c.max_top_2gram_fraction < 1.0:
            f = top_ngram_fraction(text, 2)
            if f > c.max_top_2gram_fraction:
                return "repetitive", f"repetitive (top 2-gram fraction {f:.2f} > {c.max_top_2gram_fraction:.2f})"
        if c.near_dedupe:
            return self._near_duplicate(doc_id, text)
        return None

    def _near_duplicate(self, doc_id: str, text: str) -> Optional[Tuple[str, str]]:
        import numpy as np

        sh = shingles(text)
        if not sh:
            return None  # no words: nothing to compare (kept, not indexed)
        m = self._template.copy()
        m.update_batch(sh)
        best, best_key = -1.0, -1
        for key in sorted(self._lsh.query(m)):
            est = float(np.count_nonzero(self._signatures[key] == m.hashvalues)) / NUM_PERM
            if est > best:
                best, best_key = est, key
        if best >= self.config.dedupe_threshold:
            return "near_duplicate", f"near-duplicate of {self._kept_ids[best_key]} (jaccard ~{best:.2f})"
        key = len(self._kept_ids)
        self._kept_ids.append(doc_id)
        self._signatures.append(m.hashvalues)
        self._lsh.insert(key, m, check_duplication=False)
        return None
