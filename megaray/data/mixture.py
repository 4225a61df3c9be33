"""Weighted mixtures of data sources (``data.sources: [{shards, weight}]``).

The rule, per epoch: with source sizes ``s_i`` (rows, or tokens for text) and weights ``w_i``,
the epoch holds ``N = sum(s_i)`` units and source ``i`` contributes
``n_i = round(w_i / sum(w) * N)`` of them, taken from the start of the source in its own order,
**repeated** whole when ``n_i > s_i`` and **truncated** when ``n_i < s_i``. Units of all sources
are then interleaved evenly (:func:`interleave`): the ``k``-th unit of source ``i`` sits at
fraction ``(k + 0.5) / n_i`` of the epoch, ties broken by a hash of ``(seed, i)``. Nothing
depends on process state, so every epoch (and a resumed run) reads the same composition in the
same order; Ray's per-epoch local shuffle (seed + epoch) then mixes neighbouring rows.

Text mixes at row-group granularity before packing (:func:`take_measured`: whole row groups
until a source's token target is reached), as one list of read items: a ``union`` of Ray Datasets
would interleave its inputs in completion order, which differs between executions. The audio
families train on one source today; a modality mixture (the multimodal issue) plans its items the
same way.
"""

from __future__ import annotations

import hashlib
from typing import List, Sequence, Tuple

from megaray.errors import DataError


def plan(sizes: Sequence[int], weights: Sequence[float]) -> List[int]:
    """Units each source contributes per epoch: ``round(w_i / sum(w) * sum(sizes))``.

    Raises:
        DataError: lengths differ, a weight is not positive, or a source is empty.
    """
    if len(sizes) != len(weights) or not sizes:
        raise DataError(f"mixture: {len(sizes)} sources but {len(weights)} weights")
    if any(w <= 0 for w in weights):
        raise DataError(f"data.sources: every weight must be > 0, got {list(weights)}")
    if any(s <= 0 for s in sizes):
        raise DataError(f"data.sources: source {[i for i, s in enumerate(sizes) if s <= 0][0]} is empty")
    total, wsum = sum(sizes), float(sum(weights))
    return [int(round(w / wsum * total)) for w in weights]


def take_measured(measures: Sequence[int], target: int) -> List[int]:
    """Indices into a source of units with sizes ``measures`` (e.g. tokens per row group), in
    order and cycling, until their total reaches ``target`` (the last may overshoot by less than
    one unit). ``target <= 0`` gives ``[]``."""
    out: List[int] = []
    total, n = 0, len(measures)
    if n == 0 or sum(measures) <= 0:
        return out
    while total < target:
        i = len(out) % n
        out.append(i)
        total += measures[i]
    return out


def interleave(counts: Sequence[int], seed: int = 0) -> List[Tuple[int, int]]:
    """Deterministic even interleaving: ``(source, k)`` pairs for ``k < counts[source]``, the
    ``k``-th of each source at fraction ``(k + 0.5) / counts[source]`` of the sequence."""

    def tie(i: int) -> int:
        return int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "big")

    keyed = [((k + 0.5) / n, tie(i), i, k) for i, n in enumerate(counts) for k in range(n)]
    keyed.sort()
    return [(i, k) for _, _, i, k in keyed]
