"""NGPTTask: language modelling with nGPT, whose weights stay on the unit sphere.

After every optimizer step (:meth:`NGPTTask.after_step`) every matrix of
:meth:`megaray.models.ngpt.model.NGPT.normalized_weights` is projected back onto the sphere, as
the reference ``train.py`` (github.com/NVIDIA/ngpt) calls ``normalize_matrices()`` after
``optimizer.step()``. Under DeepSpeed the weights exist twice:

* the module's parameters, which the next forward uses (bf16 or fp32);
* ZeRO 1/2 (and ZeRO 0 with bf16, DeepSpeed's ``BF16_Optimizer``): the optimizer's fp32 master
  copy, a flat buffer partitioned across data-parallel ranks
  (``DeepSpeedZeroOptimizer.single_partition_of_fp32_groups`` in ``stage_1_and_2.py``), which
  DeepSpeed copies back into the module's parameters after the next step. Each module parameter
  knows its fragment of this rank's partition (``param._hp_mapping``, DeepSpeed's
  ``utils/tensor_fragment.py``).

So the master copy is normalised in place: each rank sums the squares of its fragment per row,
one all-reduce of those per-row sums (a few floats per row, not the weights) gives every rank
the full row norms, each rank divides its fragment, and every rank divides the module's full
parameter by the same norms. In fp32 both copies then hold identical bits. ZeRO-3 is rejected:
its parameters are partitioned between forwards and re-gathered by hooks, which this task does
not manage.

Every step also measures ``row_norm_err`` and ``row_norm_err_master``: the largest
``| ||row|| - 1 |`` over the normalised matrices of each copy, reported with the next step's metrics (so the value logged at step
``s`` describes the weights step ``s`` trained on: those left by step ``s - 1``, or the init).
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from megaray.config import RunConfig
from megaray.errors import ConfigError
from megaray.tasks.base import Engine, TaskInfo, unwrap
from megaray.tasks.lm import LMTask

log = logging.getLogger("megaray.train")

Weights = Sequence[Tuple[torch.nn.Parameter, int]]


class NGPTTask(LMTask):
    """:class:`~megaray.tasks.lm.LMTask` for the ``ngpt`` family: no weight decay, weights
    re-normalised after every optimizer step, ``row_norm_err`` (module parameters) and, when
    the optimizer keeps an fp32 master copy, ``row_norm_err_master`` in the step metrics.

    Raises:
        ConfigError: ``train.zero_stage`` 3 (at construction, on the driver, before training).
    """

    def __init__(self, cfg: RunConfig, info: Optional[TaskInfo] = None):
        super().__init__(cfg, info)
        if cfg.train.zero_stage == 3:
            raise ConfigError(
                "train.zero_stage: nGPT cannot train under ZeRO stage 3: it re-normalises every weight row "
                "after each optimizer step, and ZeRO-3 keeps each weight partitioned across ranks outside "
                "the forward pass; use train.zero_stage 0, 1 or 2 (ZeRO-2 shards gradients and optimizer state)"
            )
        self._row_norm_err: Optional[Dict[str, float]] = None

    def param_groups(self, name: str, module: torch.nn.Module) -> list:
        """One AdamW group without weight decay (the paper: weights live on the sphere, so decay
        would only shrink the scalers); a non-zero ``train.weight_decay`` is ignored with a warning."""
        if self.cfg.train.optim_for(name).weight_decay:
            log.warning(
                "nGPT trains without weight decay: ignoring train.weight_decay=%s (set it to 0)",
                self.cfg.train.optim_for(name).weight_decay,
            )
        return [{"params": [p for p in module.parameters() if p.requires_grad], "weight_decay": 0.0}]

    def train_step(
        self, engines: Mapping[str, Engine], batch: Mapping[str, torch.Tensor], step: int
    ) -> Dict[str, float]:
        if self._row_norm_err is None:  # first step: the weights as initialised (or restored)
            self._row_norm_err = row_norm_error(engines["model"])
        err = self._row_norm_err
        return {**super().train_step(engines, batch, step), **err}

    def after_step(self, engines: Mapping[str, Engine], step: int) -> None:
        """Re-normalise the module's matrices and the optimizer's master copy; measure both."""
        renormalize(engines["model"])
        self._row_norm_err = row_norm_error(engines["model"])


# ----------------------------------------------------------------------------- the sphere


def _split(model: Any) -> Tuple[List[Tuple[torch.nn.Parameter, int]], List[Tuple[torch.nn.Parameter, int]]]:
    """``(plain, mastered)``: normalised weights stepped directly vs. through an fp32 master copy."""
    weights = unwrap(model).normalized_weights()
    mastered = [(w, d) for w, d in weights if hasattr(w, "_hp_mapping")]
    plain = [(w, d) for w, d in weights if not hasattr(w, "_hp_mapping")]
    return plain, mastered


def _fragment_rows(w: torch.nn.Parameter) -> Optional[Tuple[torch.Tensor, torch.Tensor, int, int]]:
    """This rank's master fragment of ``w (R, C)`` as a zero-padded ``(rows, C)`` fp32 copy:
    ``(padded, fragment, first_row, lead)``; None when the fragment is empty on this rank."""
    mapping = w._hp_mapping
    if mapping is None:
        return None
    frag = mapping.get_hp_fragment()  # 1-D view into the optimizer's flat fp32 partition
    start, C = mapping.lp_fragment_address.start, w.shape[1]
    lead, n = start % C, frag.numel()
    rows = -(-(lead + n) // C)
    padded = torch.zeros(rows * C, dtype=torch.float32, device=frag.device)
    padded[lead : lead + n] = frag.float()
    return padded.view(rows, C), frag, start // C, lead


def _master_norms(mastered: Weights) -> List[torch.Tensor]:
    """Full per-vector L2 norms of each master matrix along its ``dim`` (one all-reduce of the
    per-row partial sums of squares over the data-parallel group; a collective)."""
    import deepspeed.comm as dist

    partials = []
    for w, dim in mastered:
        part = torch.zeros(w.shape[0] if dim == 1 else w.shape[1], dtype=torch.float32, device=w.device)
        got = _fragment_rows(w)
        if got is not None:
            padded, _, r0, _ = got
            sq = padded.square()
            if dim == 1:
                part[r0 : r0 + padded.size(0)] += sq.sum(1)
            else:
                part += sq.sum(0)
        partials.append(part)
    flat = torch.cat(partials)
    dist.all_reduce(flat, group=mastered[0][0]._dp_group)
    return [s.sqrt() for s in flat.split([p.numel() for p in partials])]


@torch.no_grad()
def renormalize(model: Any) -> None:
    """Project every normalised matrix of ``model`` (an :class:`NGPT` or a DeepSpeed engine
    around one) onto the unit sphere, module parameters and fp32 master copy alike. Collective
    under DeepSpeed ZeRO 1/2 (every rank must call it)."""
    from megaray.models.ngpt.model import unit_norm

    plain, mastered = _split(model)
    for w, dim in plain:
        w.copy_(unit_norm(w.float(), dim).to(w.dtype))
    if not mastered:
        return
    for (w, dim), norms in zip(mastered, _master_norms(mastered)):
        norms = norms.clamp_min(1e-12)
        shape = (-1, 1) if dim == 1 else (1, -1)
        got = _fragment_rows(w)
        if got is not None:
            padded, frag, r0, lead = got
            div = norms[r0 : r0 + padded.size(0)].view(-1, 1) if dim == 1 else norms.view(1, -1)
            frag.copy_((padded / div).view(-1)[lead : lead + frag.numel()])
        w.copy_((w.float() / norms.view(shape)).to(w.dtype))


@torch.no_grad()
def row_norm_error(model: Any) -> Dict[str, float]:
    """Largest ``| ||v|| - 1 |`` over the normalised vectors: ``{"row_norm_err": of the module's
    parameters}``, plus ``"row_norm_err_master"``: of the optimizer's fp32 master copy, when there
    is one (ZeRO 1/2, bf16). Collective under ZeRO 1/2."""
    plain, mastered = _split(model)
    errs = [(w.float().norm(dim=dim) - 1).abs().max() for w, dim in plain + mastered]
    out = {"row_norm_err": float(torch.stack(errs).max())}
    if mastered:
        out["row_norm_err_master"] = float(torch.stack([(n - 1).abs().max() for n in _master_norms(mastered)]).max())
    return out
