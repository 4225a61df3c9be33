"""Every error a user can cause is a :class:`MegarayError`; the CLI catches it once.

The CLI prints ``error: <message>`` and exits 2 without a traceback (``MEGARAY_DEBUG=1`` shows
it). A message names the file, key or value at fault and says what to do about it. Errors that
are not a user's doing (a killed worker, a lost node, a bug) are not ``MegarayError``: Ray Train
retries those, and the CLI shows their traceback.

Each subclass also derives from the built-in it replaces, so ``except ValueError`` /
``except FileNotFoundError`` in callers keeps working.
"""

from __future__ import annotations


class MegarayError(Exception):
    """Base of every user-facing megaray error."""


class ConfigError(MegarayError, ValueError):
    """A config or command-line option that cannot run: unknown key, wrong type, value out of
    range, impossible combination. The message names the full dotted key path or option."""


class DataError(MegarayError, ValueError):
    """Input data that cannot be used: missing or empty source, corrupt shard or file, a
    manifest of the wrong kind or version. The message names the file (and row group)."""


class CheckpointError(MegarayError, FileNotFoundError):
    """A checkpoint that is missing, incomplete, truncated or of the wrong family; names the file."""


class SearchError(MegarayError, RuntimeError):
    """A Ray Tune search that cannot start, or in which every trial failed."""
