"""The training guard (``train.guard``): a non-finite or spiking optimizer step is undone.

After each optimizer step the guard judges it, on every rank alike:

* the step's loss: the mean ``loss`` metric of its micro-batches, all ranks together (one
  all-reduce of two numbers per optimizer step; none at world size 1);
* the gradient norm of every engine, where DeepSpeed computed it anyway
  (``engine.get_global_grad_norm()``: already global, the same on every rank; ZeRO 1-3 report it,
  and ``inf`` for a non-finite gradient; a ZeRO-0 fp32 engine reports none, so only its loss is
  judged; in fp16 an ``inf`` norm is the loss scaler's overflow, a step DeepSpeed skipped itself,
  and is not judged).

A step is *bad* when one of those is non-finite, or when, after ``min_history`` good steps, one
is above ``spike_factor`` x its running median over the last ``window`` good steps
(:class:`SpikeDetector`, plain Python: unit-tested without Ray).

A bad step is undone by an in-process rollback to the last checkpoint
(:meth:`megaray.train.loop._Worker.rollback`): weights, optimizer moments, LR schedule, step
counters, EMA and RNG come back exactly as saved, the train stream restarts at the checkpoint's
cursor, and the micro-batches of every bad step so far are skipped (their served sample
positions, :attr:`Guard.skips`). The run thus continues exactly as a run whose data never held
those samples. Why a rollback and not an in-place skip: DeepSpeed 0.19.8 has no clean skip. Its
only one is the fp16/overflow path (``engine._take_model_step`` with ``optimizer.overflow``),
which still advances ``global_steps`` and ``global_samples``, halves an fp16 loss scale, and is
reached differently by each optimizer (ZeRO 1/2 ``step``: ``check_overflow`` only for fp16 or
``bf16.check_grad_overflow``, an invalid norm for fp32; ZeRO 3 its own; the bf16 optimizer none;
ZeRO 0 with a torch optimizer none); and in a two-engine GAN step the discriminator has already
stepped on the micro-batch before the generator's step can be judged. The check runs after the
step because the gradient norm is only known there, at no cost. A bad step before the run's
first checkpoint has nothing to roll back to: a non-finite one stops the run
(:class:`GuardTripped`), a spike stands (a console line and ``guard/kept``).

``max_bad_in_a_row`` bad steps with no good step between mean the rollback does not cure it (the
checkpoint's weights or the learning rate, not the data): the run stops with
:class:`GuardTripped` rather than loop.

Each decision is a console line and MLflow metrics at the bad step (``guard/bad_steps``,
``guard/rollbacks``, ``guard/nonfinite``, ``guard/spike``, ``guard/kept``, ``guard/skipped_samples``,
``guard/loss``, ``guard/median_loss``); the skipped samples are the artifact
``guard/skipped_samples.json``.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, Iterable, List, Mapping, Optional, Set, Tuple

import torch

from megaray.errors import MegarayError
from megaray.train.extras import Extra

if TYPE_CHECKING:
    from megaray.config import GuardConfig

#: the MLflow artifact that lists the skipped samples
ARTIFACT = "guard/skipped_samples.json"


class GuardTripped(MegarayError, RuntimeError):
    """The guard cannot undo a bad step: no checkpoint yet, or ``max_bad_in_a_row`` reached."""


@dataclass(frozen=True)
class Verdict:
    """The judgement of one optimizer step.

    Attributes:
        step: the step clock after the step (1-based).
        values: what was judged: ``loss`` and ``grad_norm`` / ``grad_norm_<engine>``.
        medians: the running median of each value over the window (absent before ``min_history``).
        reason: None (good), ``"nonfinite"`` or ``"spike"``.
        detail: for a bad step, which value and why, e.g. ``"loss nan"``, ``"grad_norm 812 > 10 x 3.1"``.
        in_a_row: bad steps in a row, this one included (0 for a good step).
    """

    step: int
    values: Mapping[str, float]
    medians: Mapping[str, float]
    reason: Optional[str] = None
    detail: str = ""
    in_a_row: int = 0

    @property
    def bad(self) -> bool:
        return self.reason is not None


class SpikeDetector:
    """The decision logic, without Ray or torch: :meth:`judge` one step's values at a time.

    Args:
        spike_factor: a value above ``spike_factor`` x its running median is a spike (> 1).
        window: good steps the running median looks back on.
        min_history: good steps a value needs before its spikes are judged (non-finite values
            are judged from the first step).
        max_bad_in_a_row: the bad step after which :meth:`judge` raises instead.
    """

    def __init__(self, spike_factor: float, window: int, min_history: int, max_bad_in_a_row: int):
        self.k, self.window, self.min_history, self.max_bad = spike_factor, window, min_history, max_bad_in_a_row
        self.history: Dict[str, Deque[float]] = {}
        self.in_a_row = 0

    def judge(self, step: int, values: Mapping[str, float]) -> Verdict:
        """Judge step ``step``'s ``values``; a good step's values join the history.

        Raises:
            GuardTripped: this is the ``max_bad_in_a_row``-th bad step in a row.
        """
        medians = {
            k: statistics.median(h)
            for k, h in self.history.items()
            if k in values and len(h) >= min(self.min_history, self.window)
        }
        reason, detail = None, ""
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            reason, detail = "nonfinite", ", ".join(f"{k} {values[k]}" for k in bad)
        else:
            spikes = [k for k, v in values.items() if k in medians and v > self.k * medians[k]]
            if spikes:
                reason = "spike"
                detail = ", ".join(f"{k} {values[k]:.4g} > {self.k:g} x median {medians[k]:.4g}" for k in spikes)
        if reason is None:
            self.in_a_row = 0
            for k, v in values.items():
                self.history.setdefault(k, deque(maxlen=self.window)).append(float(v))
            return Verdict(step, dict(values), medians)
        self.in_a_row += 1
        if self.in_a_row >= self.max_bad:
            raise GuardTripped(
                f"train.guard: step {step} is the {self.in_a_row}th bad step in a row ({detail}); rolling back "
                f"and skipping their samples did not cure it (train.guard.max_bad_in_a_row={self.max_bad}): "
                "the weights of the last checkpoint or the learning rate are the likelier cause; lower "
                "train.lr, resume from an older checkpoint (--resume-from), or raise train.guard.spike_factor"
            )
        return Verdict(step, dict(values), medians, reason, detail, self.in_a_row)


@dataclass
class Skipped:
    """One bad step and the samples it trained on (``(epoch, position)``, all ranks)."""

    step: int
    reason: str
    detail: str
    samples: List[Tuple[int, int]] = field(default_factory=list)


class Guard(Extra):
    """The guard as a loop part: gathers each micro-batch's served positions and ``loss``
    (:meth:`served`, :meth:`after_batch`), judges each optimizer step (:meth:`check`, collective),
    keeps the positions to skip (:attr:`skips`: ``(epoch, position)`` of each skipped micro-batch's
    first sample, what :func:`megaray.train.loop.positioned_batches` skips) and reports each decision.

    Args:
        cfg: ``train.guard``.
        rank / world: this worker's rank and the world size.
        device: where the all-reduced tensor lives (the collective backend's device).
        say: rank 0's console line; ``logger``: the run's :class:`~megaray.train.mlflow.RunLogger`.
        skip: positions to skip from the start (the test hook ``MEGARAY_SKIP_SAMPLES``).
    """

    def __init__(
        self,
        cfg: "GuardConfig",
        rank: int,
        world: int,
        device: torch.device,
        say: Callable[[str], None],
        logger: Any,
        skip: Iterable[Tuple[int, int]] = (),
    ):
        self.detector = SpikeDetector(cfg.spike_factor, cfg.window, cfg.min_history, cfg.max_bad_in_a_row)
        self.rank, self.world, self.device, self.say, self.logger = rank, world, device, say, logger
        self.skips: Set[Tuple[int, int]] = set(skip)
        self.skipped: List[Skipped] = []
        self.rollbacks = self.bad_steps = 0
        self._added: Set[Tuple[int, int]] = set()  # the skips the last bad step added
        self._ids: List[int] = []  # the next micro-batch's served positions
        self._served: List[Tuple[int, List[int]]] = []  # this step's micro-batches: (epoch, positions)
        self._loss_sum, self._loss_n = 0.0, 0

    # -- the loop part's hooks --------------------------------------------------------------
    def served(self, ids: List[int]) -> None:
        self._ids = ids

    def before_batch(self, batch: Mapping[str, torch.Tensor], state: Any, engines: Mapping[str, Any]) -> None:
        self._served.append((state.epoch, self._ids))

    def after_batch(self, metrics: Mapping[str, float]) -> None:
        if "loss" in metrics:
            self._loss_sum += float(metrics["loss"])
            self._loss_n += 1

    # -- the decision -----------------------------------------------------------------------
    def check(self, step: int, engines: Mapping[str, Any]) -> Verdict:
        """Judge the optimizer step that just moved the clock to ``step``; the same verdict on
        every rank (collective at world size > 1). A bad verdict records its samples, says it and
        logs it; the caller then rolls back (:meth:`megaray.train.loop._Worker.rollback`) and
        calls :meth:`rolled_back`.

        Raises:
            GuardTripped: ``max_bad_in_a_row`` reached (:meth:`SpikeDetector.judge`).
        """
        loss_sum, n = self._loss_sum, self._loss_n
        if self.world > 1:
            t = torch.tensor([loss_sum, float(n)], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(t)
            loss_sum, n = float(t[0]), int(t[1])
        values: Dict[str, float] = {}
        if n:
            values["loss"] = loss_sum / n
        for name, engine in engines.items():
            gn = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
            if gn is None or (not math.isfinite(gn) and _fp16(engine)):
                continue  # none computed; or fp16's loss scaler found an overflow and skipped the step itself
            values["grad_norm" if name == "model" else f"grad_norm_{name}"] = float(gn)
        served, self._served, self._loss_sum, self._loss_n = self._served, [], 0.0, 0
        verdict = self.detector.judge(step, values)
        if verdict.bad:
            samples = [(e, i) for e, ids in served for i in ids]
            if self.world > 1:  # every rank's micro-batches of the step (rare: bad steps only)
                box: List[Any] = [None] * self.world
                torch.distributed.all_gather_object(box, samples)
                samples = [s for part in box for s in part]
            self.skipped.append(Skipped(step, verdict.reason or "", verdict.detail, sorted(samples)))
            firsts = {(e, ids[0]) for e, ids in served if ids}  # this rank's micro-batches
            if self.world > 1:  # and every other rank's
                box = [None] * self.world
                torch.distributed.all_gather_object(box, sorted(firsts))
                firsts = {tuple(x) for part in box for x in part}
            self._added = firsts - self.skips
            self.skips |= firsts
            self.bad_steps += 1
        return verdict

    def kept(self, verdict: Verdict) -> None:
        """A spike before the run's first checkpoint: nothing to roll back to, so the step stands
        (its samples are not skipped); rank 0 says so and logs it (``guard/kept``)."""
        self.skipped.pop()
        self.skips -= self._added
        self.say(
            f"guard: step {verdict.step} spikes ({verdict.detail}) before the run's first checkpoint: "
            f"nothing to roll back to, so it stands; {verdict.in_a_row} bad in a row"
        )
        self.logger.metrics(
            {"guard/bad_steps": float(self.bad_steps), "guard/spike": 1.0, "guard/kept": 1.0}, verdict.step
        )

    def rolled_back(self, verdict: Verdict, to_step: Optional[int], where: Optional[str]) -> None:
        """Count, say and log the rollback that undid ``verdict``'s step (rank 0 logs)."""
        self.rollbacks += 1
        last = self.skipped[-1]
        n_samples = sum(len(s.samples) for s in self.skipped)
        self.say(
            f"guard: step {verdict.step} is bad ({verdict.detail}); rolled back to step {to_step} ({where}); "
            f"its {len(last.samples)} samples skipped from now on ({_ranges(last.samples)}); "
            f"{verdict.in_a_row} bad in a row, {self.rollbacks} rollback(s) in this run"
        )
        m = {
            "guard/bad_steps": float(self.bad_steps),
            "guard/rollbacks": float(self.rollbacks),
            "guard/nonfinite": float(verdict.reason == "nonfinite"),
            "guard/spike": float(verdict.reason == "spike"),
            "guard/skipped_samples": float(n_samples),
        }
        if "loss" in verdict.values:
            m["guard/loss"] = verdict.values["loss"]
        if "loss" in verdict.medians:
            m["guard/median_loss"] = verdict.medians["loss"]
        self.logger.metrics(m, verdict.step)
        self.logger.text(self.artifact(), ARTIFACT)

    def artifact(self) -> str:
        """The JSON of :data:`ARTIFACT`: every bad step with its reason and samples."""
        return json.dumps(
            {
                "skipped": [
                    {"step": s.step, "reason": s.reason, "detail": s.detail, "samples": [list(x) for x in s.samples]}
                    for s in self.skipped
                ]
            },
            indent=1,
        )


def _fp16(engine: Any) -> bool:
    """Whether ``engine`` trains in DeepSpeed's fp16, whose dynamic loss scaler skips an overflowing
    step on its own (an ``inf`` gradient norm there is routine while the scale settles)."""
    fp16 = getattr(engine, "fp16_enabled", None)
    return bool(fp16()) if callable(fp16) else False


def _ranges(samples: List[Tuple[int, int]]) -> str:
    """``[(0, 16), (0, 17), (0, 18)]`` -> ``"epoch 0: 16-18"``."""
    out: List[str] = []
    for epoch in sorted({e for e, _ in samples}):
        ids = sorted(i for e, i in samples if e == epoch)
        runs, start = [], ids[0]
        for a, b in zip(ids, ids[1:] + [None]):
            if b != a + 1:
                runs.append(f"{start}-{a}" if a != start else str(a))
                start = b
        out.append(f"epoch {epoch}: {', '.join(runs)}")
    return "; ".join(out)
