"""Task: what one model family supplies to the generic training loop, and the hooks it may use.

The loop (:mod:`megaray.train.loop`) owns distribution, DeepSpeed engines, checkpoints, the
schedule, EMA, logging and resume. A family's :class:`Task` owns its networks, loss, Ray
datasets, evaluation and artifacts. The hooks, in the order the loop calls them:

==========================  =====================================================================
``datasets()``              driver: Ray datasets; fills :attr:`Task.info` (a :class:`TaskInfo`)
``build_modules()``         worker: trainable networks ``{"model": ..., "disc": ...}``; one
                            DeepSpeed engine each, optimizer settings from ``train.modules.<name>``
``param_groups(name, m)``   worker: AdamW groups of one module
``frozen_modules()``        worker: networks loaded from another run (a VAE, a vocoder used to
                            decode samples): no engine, eval mode, moved to the device
``train_step(engines, b)``  one micro-batch: forward, ``engine.backward``, ``engine.step``
                            (``engines``: ``Mapping[str, Engine]``, one :class:`Engine` a module)
``global_step(engines)``    the step clock: optimizer steps taken (``engines["model"]``'s)
``after_step(engines, s)``  after every optimizer step (nGPT re-normalises its weights here)
``eval_step(modules, b)``   validation metrics of one batch; ``modules`` holds every module
                            (the EMA copy as ``"model"`` when ``train.ema_decay`` is on) plus
                            the frozen ones
``eval_artifacts(...)``     rank 0: samples, audio, images from the same ``modules``
==========================  =====================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Mapping, Optional, Protocol, Tuple, runtime_checkable

import torch

from megaray.config import RunConfig
from megaray.data import order
from megaray.data.order import BatchPlan


@dataclass
class TaskInfo:
    """What the driver finds while building the datasets, shipped to every worker (pickled by Ray).

    Attributes:
        plan: the train split's :class:`~megaray.data.order.BatchPlan` (samples per epoch, the
            global batch, the micro-batch): the same at every world size.
        val_samples: validation samples (all ranks together); val_limit: ``data.num_val_batches``.
        batches_per_epoch: micro-batches per rank per epoch, equal on every rank (so collectives
            never wait on a rank with a shorter epoch); val_batches: validation batches per rank
            per evaluation. Both are those of the largest world size on the driver; each worker
            takes its own (:meth:`for_world`).
        manifest: the shard manifest, read once on the driver (workers never read it again).
    """

    plan: Optional[BatchPlan] = None
    val_samples: int = 0
    val_limit: int = 1
    batches_per_epoch: int = 0
    val_batches: int = 0
    manifest: Dict[str, Any] = field(default_factory=dict, repr=False)

    def for_world(self, world: int, global_batch: Optional[int] = None) -> "TaskInfo":
        """A copy for ``world`` ranks (and, when given, the global batch a resumed run keeps)."""
        if self.plan is None:
            return self
        plan = (
            self.plan
            if global_batch in (None, self.plan.global_batch)
            else replace(self.plan, global_batch=global_batch)
        )
        return replace(
            self,
            plan=plan,
            batches_per_epoch=plan.micro_batches(world),
            val_batches=order.val_batches(self.val_samples, world, plan.micro_batch, self.val_limit),
        )


@runtime_checkable
class Engine(Protocol):
    """What a task uses of a DeepSpeed engine (``deepspeed.DeepSpeedEngine``, one per trainable
    module, built by :func:`megaray.train.engines.build_engines`), and all a stand-in needs
    (the tests' ``StandInEngine``): call it as the module, ``backward(loss)`` (DeepSpeed scales
    for accumulation and precision), ``step()`` (an optimizer step at an accumulation boundary,
    else nothing), and ``module``, the wrapped network (:func:`unwrap`).

    The default step clock (:meth:`Task.global_step`) also reads DeepSpeed's ``global_steps``
    (optimizer steps taken) of the ``"model"`` engine: :class:`CountingEngine`. The loop alone
    uses the rest of DeepSpeed's surface (learning rate, gradient norm, checkpoints)."""

    module: torch.nn.Module

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def backward(self, loss: torch.Tensor) -> Any: ...

    def step(self) -> Any: ...


@runtime_checkable
class CountingEngine(Engine, Protocol):
    """An :class:`Engine` that counts its optimizer steps (DeepSpeed's ``global_steps``)."""

    global_steps: int


def unwrap(module: Any) -> torch.nn.Module:
    """The ``torch.nn.Module`` inside a DeepSpeed engine (or the module itself)."""
    return getattr(module, "module", module)


class Task:
    """Base class. Subclasses implement :meth:`loss` and :meth:`datasets`.

    Args:
        cfg: the resolved run config (its paths already absolute: :func:`megaray.train.launch.fit`).
        info: what :meth:`datasets` found on the driver; None on the driver before that.
    """

    #: how many tokens / samples one batch row counts as, for throughput; set by subclasses.
    unit: str = "samples"
    #: the :class:`TaskInfo` subclass :meth:`datasets` fills
    info_class: type = TaskInfo
    #: :meth:`datasets` validates on ``data.val_shards`` when given (else the driver refuses it)
    supports_val_shards: bool = False

    def __init__(self, cfg: RunConfig, info: Optional[TaskInfo] = None):
        self.cfg = cfg
        self.info = info if info is not None else self.info_class()

    # -- modules ---------------------------------------------------------------------------
    def module_names(self) -> List[str]:
        """Names :meth:`build_modules` returns (checked against ``train.modules`` on the driver)."""
        return ["model"]

    def build_modules(self) -> Dict[str, torch.nn.Module]:
        """``{"model": module, ...}``; every entry gets its own DeepSpeed engine and optimizer."""
        from megaray import families

        return {"model": families.build_model(self.cfg.model)}

    def frozen_modules(self) -> Dict[str, torch.nn.Module]:
        """Networks the task uses but does not train (loaded from another run's checkpoint, e.g. a
        VAE or vocoder that decodes samples). The loop moves them to the device, puts them in
        eval mode without gradients, and hands them to :meth:`eval_step` / :meth:`eval_artifacts`."""
        return {}

    def param_groups(self, name: str, module: torch.nn.Module) -> list:
        """AdamW groups: weight decay (``train.modules.<name>.weight_decay``, else
        ``train.weight_decay``) on >=2-D weights, none on biases, norms and gains."""
        wd = self.cfg.train.optim_for(name).weight_decay
        decay = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in module.parameters() if p.requires_grad and p.dim() < 2]
        return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]

    # -- data ------------------------------------------------------------------------------
    def datasets(self) -> Dict[str, Any]:
        """``{"train": ray.data.Dataset, "val": ray.data.Dataset}``, built on the driver.

        Must fill :attr:`info` (:meth:`batch_plan`'s fields, the manifest)."""
        raise NotImplementedError

    def batch_plan(
        self,
        train_samples: int,
        val_samples: int,
        where: str,
        unit: str = "samples",
        hint: str = "prepare more data or lower data.batch_size",
        val_where: Optional[str] = None,
    ) -> Dict[str, Any]:
        """The :class:`TaskInfo` fields of the batch arithmetic (one home: :mod:`megaray.data.order`)
        for a train split of ``train_samples`` and a val split of ``val_samples`` per epoch:
        ``plan``, ``val_samples``, ``val_limit`` and the largest world size's batch counts.
        ``where`` names the data in messages; ``val_where`` the validation data when it lives
        elsewhere (``data.val_shards``).

        Raises:
            ConfigError: fewer train samples than one global batch, fewer val samples than
                ``max_workers x batch_size``, or a world size in ``scaling.num_workers`` that
                cannot divide ``train.global_batch_size`` (each names the counts).
        """
        c = self.cfg
        B, lo, hi = c.data.batch_size, c.scaling.min_workers, c.scaling.max_workers
        G = order.global_batch_size(c.train.global_batch_size, B, c.train.grad_accum_steps, hi)
        plan = order.train_plan(train_samples, G, B, where, unit, hint)
        if not plan.worlds(lo, hi):
            plan.accum(hi)  # raises, naming the sizes that divide it
        order.check_val(val_samples, hi, B, val_where or where, unit)
        info = TaskInfo(plan=plan, val_samples=int(val_samples), val_limit=c.data.num_val_batches).for_world(hi)
        return {
            "plan": plan,
            "val_samples": info.val_samples,
            "val_limit": info.val_limit,
            "batches_per_epoch": info.batches_per_epoch,
            "val_batches": info.val_batches,
        }

    def train_stream(self, epoch: int, cursor: int, plan: BatchPlan) -> Any:
        """The train split as one Ray Dataset over the rest of the run, starting at sample
        ``cursor`` of ``epoch`` (a multiple of ``plan.global_batch``), built by rank 0 each time
        the worker group starts, from the checkpoint it restores (so a restart starts reading at
        its position, in constant time, at any world size, and epochs follow each other without a
        new execution). Rows carry ``epoch`` and ``index`` (served position in the epoch, the same
        at every world size: :mod:`megaray.data.order`) in blocks of ``plan.micro_batch`` rows,
        dealt round robin to the ranks. See :mod:`megaray.data.order`,
        :mod:`megaray.data.text.stream` and :mod:`megaray.data.rows`."""
        raise NotImplementedError(f"{type(self).__name__} has no positioned train stream")

    def prepare_command(self, shards: str) -> Optional[str]:
        """The ``megaray prepare ...`` command that writes shards this task can train on into
        ``shards`` (for hints in error messages); None when there is none."""
        return None

    def collate(self, batch: Mapping[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
        """Move one ``iter_torch_batches`` batch to ``device`` (override to reshape)."""
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    def batch_units(self, batch: Mapping[str, torch.Tensor]) -> int:
        """How many :attr:`unit` one batch holds (tokens for text)."""
        return int(next(iter(batch.values())).shape[0])

    # -- step ------------------------------------------------------------------------------
    def loss(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Scalar training loss and extra metrics for one micro-batch."""
        raise NotImplementedError

    def train_step(
        self, engines: Mapping[str, Engine], batch: Mapping[str, torch.Tensor], step: int
    ) -> Dict[str, float]:
        """One micro-batch: forward, ``engine.backward``, ``engine.step`` (DeepSpeed handles
        accumulation boundaries). ``step``: optimizer steps taken so far. Returns metrics
        including ``loss``."""
        engine = engines["model"]
        loss, metrics = self.loss(engine, batch)
        engine.backward(loss)
        engine.step()
        return {"loss": float(loss.detach()), **metrics}

    def global_step(self, engines: Mapping[str, CountingEngine]) -> int:
        """The step clock: optimizer steps taken. Default: the ``"model"`` engine's count (a
        GAN's discriminator may step less often)."""
        return int(engines["model"].global_steps)

    def after_step(self, engines: Mapping[str, Engine], step: int) -> None:
        """Called once after every optimizer step ``step`` (1-based), before the EMA update."""

    @torch.no_grad()
    def eval_step(self, modules: Mapping[str, Any], batch: Mapping[str, torch.Tensor]) -> Dict[str, float]:
        """Validation metrics of one batch (means); the loop averages across batches and ranks."""
        loss, metrics = self.loss(modules["model"], batch)
        return {"val_loss": float(loss), **{f"val_{k}": v for k, v in metrics.items()}}

    def finalize_eval(self, metrics: Dict[str, float]) -> Dict[str, float]:
        """Derived metrics after averaging (e.g. perplexity = exp(val_loss))."""
        return metrics

    def flops_per_unit(self, modules: Mapping[str, torch.nn.Module]) -> Optional[float]:
        """Training FLOPs per :attr:`unit` (forward + backward), for MFU; None if unknown."""
        return None

    def eval_artifacts(self, modules: Mapping[str, torch.nn.Module], out_dir: str, step: int) -> Dict[str, Any]:
        """Write evaluation artifacts (samples, audio, images) into ``out_dir``.

        Called on rank 0 only, and only when modules hold full weights (ZeRO stage < 3).
        ``modules``: plain ``torch.nn.Module``s, as for :meth:`eval_step`. Returns extra text
        to log (e.g. ``{"sample": "..."}``)."""
        return {}

    def checkpoint_files(self) -> Dict[str, str]:
        """``{file name: text}`` written into every checkpoint by rank 0 (e.g. tokenizer.json)."""
        return {}

    # -- export ----------------------------------------------------------------------------
    def mlflow_model(self) -> Optional[Dict[str, Any]]:
        """How the final checkpoint is served as an MLflow ``pyfunc`` model
        (:func:`megaray.train.mlflow.log_model`), or None (the default): no model is logged.

        Returns ``{"input": input column name, "files": [checkpoint files :meth:`predict` reads,
        besides the weights and config], "params": {name: default (int, float, bool or str)}}``."""
        return None

    def predict(
        self, model: torch.nn.Module, files: Mapping[str, str], inputs: List[Any], params: Mapping[str, Any]
    ) -> List[Any]:
        """The served model's answer, one output per input. ``model``: the network in eval mode
        (from :func:`megaray.train.checkpoint.load_for_inference`); ``files``: ``{name: local
        path}`` of the spec's files; ``params``: the spec's params, overridden by the caller's."""
        raise NotImplementedError(f"{type(self).__name__} serves no MLflow model")
