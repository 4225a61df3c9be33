"""Names of the 1-D position schemes and which lists of them combine (no torch: configs validate
with it). The modules themselves are in :mod:`megaray.models.common.position`.

``cfg.position`` is one name of :data:`POSITION_NAMES` or a list applied together: at most one
absolute scheme (:data:`ABSOLUTE`, added to the token embeddings) with ``rope`` (on q/k) and/or
``alibi`` (the attention bias); ``none`` only alone.
"""

from __future__ import annotations

from typing import Sequence, Tuple, Union

#: every 1-D scheme, as ``cfg.position`` spells it
POSITION_NAMES: Tuple[str, ...] = ("learned", "sinusoidal", "rope", "alibi", "none")
#: the absolute schemes (added to the token embeddings); a combination holds at most one
ABSOLUTE: Tuple[str, ...] = ("learned", "sinusoidal")


def position_names(position: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    """``cfg.position`` (one name or a list of names) as a tuple of names."""
    return (position,) if isinstance(position, str) else tuple(position)


def check_positions(names: Sequence[str]) -> None:
    """Check a list of position schemes to apply together.

    Valid: one name of :data:`POSITION_NAMES`, or 2-3 distinct names with at most one absolute
    scheme, e.g. ``[learned, rope]``, ``[sinusoidal, alibi]``, ``[rope, alibi]``,
    ``[learned, rope, alibi]``.

    Raises:
        ValueError: an empty list, an unknown or repeated name, ``none`` with another scheme, or two
            absolute schemes; the message names them.
    """
    names = list(names)
    known = ", ".join(POSITION_NAMES)
    if not names:
        raise ValueError(f"position list is empty; give one or more of {known}")
    unknown = [n for n in names if n not in POSITION_NAMES]
    if unknown:
        raise ValueError(f"unknown position {unknown[0]!r} in {names}; known: {known}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"position list {names} repeats {', '.join(repeated)}; list each scheme once")
    if "none" in names and len(names) > 1:
        raise ValueError(
            f"position list {names} combines 'none' with {', '.join(n for n in names if n != 'none')}: "
            "'none' means no position information; drop it or use it alone"
        )
    absolute = [n for n in names if n in ABSOLUTE]
    if len(absolute) > 1:
        raise ValueError(
            f"position list {names} adds two absolute embeddings ({', '.join(absolute)}) to the tokens; "
            "keep one of them (combine it with rope and/or alibi)"
        )
