"""The one reject scheme of every prepare: skipped inputs counted by reason, with named examples.

Stored in the manifest as ``"rejected": {"total": n, "by_reason": {reason: {"count": c,
"examples": ["<where>[: <detail>]", ...]}}}`` and printed by :func:`summary_lines`. Nothing is
dropped silently: every skipped document, file or clip lands in a count.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional


class Rejects:
    """Counts of skipped inputs by reason, keeping the first ``max_examples`` places of each.

    Args:
        max_examples: examples kept per reason (the count is always exact).
    """

    def __init__(self, max_examples: int = 5) -> None:
        self.max_examples = max_examples
        self.by_reason: Dict[str, Dict[str, Any]] = {}

    def add(self, reason: str, where: str, n: int = 1, detail: Optional[str] = None) -> None:
        """Count ``n`` rejects of ``reason`` at ``where`` (a file, ``file:line``, ``file#row``)."""
        e = self.by_reason.setdefault(reason, {"count": 0, "examples": []})
        e["count"] += n
        example = f"{where}: {detail}" if detail else where
        if len(e["examples"]) < self.max_examples and example not in e["examples"]:
            e["examples"].append(example)

    @property
    def total(self) -> int:
        return sum(e["count"] for e in self.by_reason.values())

    def to_json(self) -> Dict[str, Any]:
        return {"total": self.total, "by_reason": dict(sorted(self.by_reason.items()))}

    def describe(self) -> str:
        """One line: ``reason=count (e.g. example), ...`` or ``none``."""
        return (
            ", ".join(f"{k}={v['count']} (e.g. {v['examples'][0]})" for k, v in sorted(self.by_reason.items()))
            or "none"
        )


def summary_lines(rejected: Dict[str, Any], examples: int = 3) -> List[str]:
    """Summary lines for a manifest's ``rejected`` entry (what every prepare prints)."""
    if not rejected["total"]:
        return ["  rejected:  0"]
    lines = [f"  rejected:  {rejected['total']:,}"]
    for reason, e in rejected["by_reason"].items():
        lines.append(f"    {reason:<22}{e['count']:>8,}  e.g. {'; '.join(e['examples'][:examples])}")
    return lines
