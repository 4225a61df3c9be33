"""The loop's evaluation part: when it is due, validation metrics with every module, then artifacts.

Evaluation sees every module of the task: the trainable ones (their DeepSpeed engines for the
metrics, the plain modules for artifacts), the EMA copy as ``"model"`` when ``train.ema_decay``
is on, and the task's frozen modules (a VAE or vocoder that decodes samples).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch

from megaray.config import RunConfig
from megaray.train.reporter import Reporter, is_count, mean_across_ranks, ratio_metrics


class Evaluator:
    """Validation metrics on ``info.val_batches`` batches per rank and rank-0 artifacts.

    Args:
        task: the run's :class:`~megaray.tasks.base.Task`.
        cfg: the run config (``train.eval_every``, ``data.batch_size``, ``train.zero_stage``).
        val_shard: returns this rank's ``ray.train.get_dataset_shard("val")``; called at the first
            evaluation (on every rank alike: it is a barrier), not at start-up, since Ray Train
            starts the split's ``SplitCoordinator`` actor (a Python process) when rank 0 asks for
            it: that start would land in the run's first step and in every restart's.
        frozen: the task's frozen modules, already on the device in eval mode.
        ema: the :class:`~megaray.train.ema.EMA` or None.
    """

    #: validation batches up to this many bytes per rank are read once and kept in memory
    CACHE_BYTES = int(os.environ.get("MEGARAY_VAL_CACHE_MB", "1024")) << 20

    def __init__(
        self,
        task: Any,
        cfg: RunConfig,
        val_shard: Callable[[], Any],
        world: int,
        frozen: Mapping[str, torch.nn.Module],
        ema: Optional[Any] = None,
    ):
        self.task, self.cfg, self.val_shard, self.world = task, cfg, val_shard, world
        self._shard: Any = None
        self.frozen, self.ema = dict(frozen), ema
        self.cache: Optional[List[Mapping[str, torch.Tensor]]] = None
        #: Ray Data executions of the validation split by this rank (1 when the cache holds it)
        self.reads = 0

    def due(self, step: int) -> bool:
        """Every ``train.eval_every`` steps and at ``train.max_steps``."""
        return step % self.cfg.train.eval_every == 0 or step >= self.cfg.train.max_steps

    def modules(self, engines: Mapping[str, Any], plain: bool = False) -> Dict[str, Any]:
        """Every module for evaluation: engines (or their plain modules when ``plain``), the EMA
        copy in place of ``"model"`` when on, and the frozen modules."""
        out = {name: (e.module if plain else e) for name, e in engines.items()}
        if self.ema is not None:
            out["model"] = self.ema.module
        return {**out, **self.frozen}

    @torch.no_grad()
    def metrics(self, engines: Mapping[str, Any]) -> Dict[str, float]:
        """Mean of the task's eval metrics over ``info.val_batches`` batches per rank, averaged
        across ranks (every rank runs the same number of forwards: ZeRO-3 gathers need that).
        Collective."""
        modules = self.modules(engines)
        trained = [m for m in modules.values() if m.training]
        for m in trained:
            m.eval()
        device = engines["model"].device
        sums: Dict[str, float] = {}
        batches = self.batches()
        for raw in batches:
            batch = self.task.collate(raw, device)
            for k, v in self.task.eval_step(modules, batch).items():
                sums[k] = sums.get(k, 0.0) + v
        for m in trained:
            m.train()
        n = len(batches)
        means = ratio_metrics(mean_across_ranks({k: v / n for k, v in sums.items()}, self.world))
        return self.task.finalize_eval(means)

    def batches(self) -> List[Mapping[str, torch.Tensor]]:
        """This rank's ``info.val_batches`` validation batches (CPU tensors).

        The first call runs the Ray Data pipeline; when the batches fit in
        :attr:`CACHE_BYTES` (``MEGARAY_VAL_CACHE_MB``, default 1024) they are kept, so every
        later evaluation is forward passes only (no new Ray Data execution, which costs seconds
        to tens of seconds). Larger splits are streamed again at every evaluation."""
        if self.cache is not None:
            return self.cache
        self.reads += 1
        n = int(self.task.info.val_batches)
        if self._shard is None:
            self._shard = self.val_shard()
        it = iter(self._shard.iter_torch_batches(batch_size=self.cfg.data.batch_size, drop_last=True))
        out, size = [], 0
        for _ in range(n):
            batch = next(it)
            size += sum(t.numel() * t.element_size() for t in batch.values() if isinstance(t, torch.Tensor))
            out.append(batch)
        if size <= self.CACHE_BYTES:
            self.cache = out
        return out

    def artifacts(self, engines: Mapping[str, Any], step: int, reporter: Reporter) -> None:
        """Rank 0: the task's artifacts (samples, audio, images) to the run's trackers
        (:meth:`~megaray.train.reporter.Reporter.log_eval_files`: in MLflow under ``eval/step_<step>``,
        its texts under ``<key>/step_<step>.txt``; TensorBoard / W&B as ``eval/<file name>`` images,
        audio and texts). Skipped under ZeRO-3, where no rank holds full weights."""
        if reporter.rank != 0 or self.cfg.train.zero_stage >= 3:
            return
        with tempfile.TemporaryDirectory() as d:
            texts = self.task.eval_artifacts(self.modules(engines, plain=True), d, step)
            reporter.log_eval_files(d, step, texts)
        for key, text in texts.items():
            reporter.say(f"{key} @ {step}: {text!r}")

    def run(self, engines: Mapping[str, Any], step: int, reporter: Reporter) -> Dict[str, float]:
        """Metrics (collective), the console line (the ``val_`` metrics but bookkeeping counts,
        :func:`~megaray.train.reporter.is_count`) and artifacts (rank 0); returns the metrics."""
        out = self.metrics(engines)
        shown = {k: v for k, v in out.items() if k.startswith("val_") and not is_count(k)}
        reporter.say(f"eval step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in shown.items()))
        self.artifacts(engines, step, reporter)
        return out
