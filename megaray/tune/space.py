"""The search space: one distribution per dotted key of the resolved run config.

``space`` maps a dotted key (``train.lr``, ``model.n_layer``, or a section such as ``model``
whose choices are mappings set together) to a :class:`Distribution`. This module checks every
key and every value a distribution can produce against the base config before any trial starts,
gives non-scalar choices string labels (Optuna and Tune's tables need scalars), and turns the
space into Ray Tune domains (:func:`param_space`, the only part that imports Ray).
"""

from __future__ import annotations

import json
import math
from typing import Any, Dict, List, Optional, Tuple

from pydantic import BaseModel, Field, model_validator

from megaray.config import ConfigError, StrictConfig, flatten, suggest
from megaray.families import build_run_config

PRIMITIVE = (str, int, float, bool, type(None))
KINDS = ("uniform", "loguniform", "randint", "choice", "grid")


class Distribution(StrictConfig):
    """One search-space entry; exactly one field is set.

    ``uniform``/``loguniform``: ``[low, high]`` floats (loguniform needs ``low > 0``).
    ``randint``: ``[low, high]`` integers, both ends included.
    ``choice``: values sampled uniformly. ``grid``: every value is tried (``num_samples`` times).
    A choice/grid value may be a mapping when the key names a section (``model``): its entries
    are set together, e.g. ``{attention: gqa, n_kv_heads: 2}``.
    """

    uniform: Optional[Tuple[float, float]] = None
    loguniform: Optional[Tuple[float, float]] = None
    randint: Optional[Tuple[int, int]] = None
    choice: Optional[List[Any]] = Field(None, min_length=1)
    grid: Optional[List[Any]] = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one(self) -> "Distribution":
        set_ = [k for k in KINDS if getattr(self, k) is not None]
        if len(set_) != 1:
            raise ValueError(f"give exactly one of {', '.join(KINDS)}" + (f" (got {', '.join(set_)})" if set_ else ""))
        lo_hi = self.uniform or self.loguniform or self.randint
        if lo_hi is not None and not lo_hi[0] < lo_hi[1]:
            raise ValueError(f"{self.kind}: low ({lo_hi[0]}) must be below high ({lo_hi[1]})")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform: low must be > 0, got {self.loguniform[0]}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    @property
    def values(self) -> Optional[List[Any]]:
        """The discrete values of a choice/grid (None for ranges)."""
        return self.choice if self.choice is not None else self.grid

    def describe(self) -> str:
        """Short text form for MLflow params and tables, e.g. ``loguniform[0.0001, 0.03]``."""
        return f"{self.kind}{json.dumps(list(getattr(self, self.kind)), default=str)}"

    def probes(self) -> List[Any]:
        """Values checked before a search starts: every choice, both ends of a range and one
        point inside it."""
        if self.values is not None:
            return list(self.values)
        lo, hi = getattr(self, self.kind)
        if self.kind == "uniform":
            return [lo, hi, lo + 0.371 * (hi - lo)]
        if self.kind == "loguniform":
            return [lo, hi, math.exp(math.log(lo) + 0.371 * (math.log(hi) - math.log(lo)))]
        return [lo, hi]


def labels(space: Dict[str, Distribution]) -> Dict[str, Dict[str, Any]]:
    """String labels for choice/grid values that are not scalars; ``{key: {label: value}}``
    (``n_layer=4,n_embd=64`` for a mapping)."""
    out: Dict[str, Dict[str, Any]] = {}
    for key, dist in space.items():
        vals = dist.values
        if vals is None or all(isinstance(v, PRIMITIVE) for v in vals):
            continue
        table: Dict[str, Any] = {}
        for v in vals:
            if isinstance(v, dict):
                label = ",".join(f"{k}={x if isinstance(x, str) else json.dumps(x)}" for k, x in flatten(v).items())
            else:
                label = json.dumps(v, default=str)
            base, n = label, 2
            while label in table:
                label, n = f"{base}#{n}", n + 1
            table[label] = v
        out[key] = table
    return out


# ----------------------------------------------------------------------------- checks


def check_space(search: Any) -> None:
    """Every space key of ``search`` (a :class:`megaray.tune.config.TuneSearch`, which imports
    this module) exists in the resolved base config, and every probe gives a valid run config.

    Raises:
        ConfigError: ``space.<key>: no key ...; did you mean ...?`` or ``space.<key>: value v
            (kind[...]) gives an invalid run config: ...``.
    """
    base = search.require_base()
    valid = _all_paths(base.model_dump(mode="json"))
    for key, dist in search.config.space.items():
        target, found = _lookup(base, key.split("."))
        if not found:
            raise ConfigError(
                f"space.{key}: no key {key!r} in the base config {search.base_path}{suggest(key, valid)} "
                f"(space keys are dotted paths of the resolved run config, e.g. train.lr, model.n_layer)"
            )
        for v in dist.values or []:
            if isinstance(v, dict):
                _check_mapping_value(key, target, v)
        for v in dist.probes():
            try:
                build_run_config(search.trial_raw({key: v}, "probe"))
            except ConfigError as e:
                hint = (
                    "; an integer key needs randint (or choice/grid)"
                    if dist.kind in ("uniform", "loguniform") and "valid integer" in str(e)
                    else ""
                )
                raise ConfigError(
                    f"space.{key}: value {v!r} ({dist.describe()}) gives an invalid run config{hint}: {e}"
                ) from None


def _check_mapping_value(key: str, target: Any, value: Dict[str, Any]) -> None:
    if not isinstance(target, (BaseModel, dict)):
        raise ConfigError(f"space.{key}: a mapping value {value!r} needs {key!r} to be a section (e.g. model)")
    for sub in flatten(value):
        if not _lookup(target, sub.split("."))[1]:
            dump = target.model_dump(mode="json") if isinstance(target, BaseModel) else dict(target)
            raise ConfigError(f"space.{key}: no key {key}.{sub} in the base config{suggest(sub, _all_paths(dump))}")


def _lookup(obj: Any, parts: List[str]) -> Tuple[Any, bool]:
    """Walk a resolved config by attribute (pydantic models) or key (plain dict fields, where any
    key is allowed, e.g. ``scaling.resources_per_worker.GPU``)."""
    for p in parts:
        if isinstance(obj, BaseModel):
            if p not in type(obj).model_fields and p not in (obj.model_extra or {}):  # extras: family sections
                return None, False
            obj = getattr(obj, p)
        elif isinstance(obj, dict):
            return obj.get(p), True
        else:
            return None, False
    return obj, True


def _all_paths(d: Dict[str, Any], prefix: str = "") -> List[str]:
    out = []
    for k, v in d.items():
        out.append(prefix + k)
        if isinstance(v, dict):
            out.extend(_all_paths(v, f"{prefix}{k}."))
    return sorted(out)


# ----------------------------------------------------------------------------- Ray Tune domains


def param_space(search: Any) -> Dict[str, Any]:
    """The Tune ``param_space`` of a :class:`megaray.tune.config.TuneSearch`: one Tune domain per
    space key (labels for non-scalar choices)."""
    from ray import tune

    out: Dict[str, Any] = {}
    for key, dist in search.config.space.items():
        if dist.values is not None:
            vals = list(search.labels[key]) if key in search.labels else list(dist.values)
            out[key] = tune.choice(vals) if dist.kind == "choice" else tune.grid_search(vals)
        elif dist.kind == "randint":
            out[key] = tune.randint(dist.randint[0], dist.randint[1] + 1)  # YAML: both ends included
        else:
            out[key] = getattr(tune, dist.kind)(*getattr(dist, dist.kind))
    return out
