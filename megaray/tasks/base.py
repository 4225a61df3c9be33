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
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from megaray.config import RunConfig


@dataclass
class TaskInfo:
    """What the driver finds while building the datasets, shipped to every worker (pickled by Ray).

    Attributes:
        batches_per_epoch: micro-batches per rank per epoch, equal on every rank (so collectives
            never wait on a rank with a shorter epoch).
        val_batches: validation batches per rank per evaluation.
        manifest: the shard manifest, read once on the driver (workers never read it again).
        per_world: ``{world size: (batches_per_epoch, val_batches)}`` for every world size an
            elastic run (``scaling.num_workers: [min, max]``) may get; Ray Train picks the size
            when it starts the worker group, so each worker takes its own (:meth:`for_world`).
        positioned: the train dataset is the task's positioned stream (:meth:`Task.train_stream`):
            one stream for the rest of the run that starts at the checkpoint's position, rather
            than one execution per epoch replayed up to the position.
    """

    batches_per_epoch: int = 0
    val_batches: int = 0
    manifest: Dict[str, Any] = field(default_factory=dict, repr=False)
    per_world: Dict[int, Tuple[int, int]] = field(default_factory=dict)
    positioned: bool = False

    def for_world(self, world: int) -> "TaskInfo":
        """A copy whose ``batches_per_epoch`` and ``val_batches`` are those of ``world`` ranks."""
        if world not in self.per_world:
            return self
        bpe, val = self.per_world[world]
        return replace(self, batches_per_epoch=bpe, val_batches=val)


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

        Must fill :attr:`info` (``batches_per_epoch``, ``val_batches``, the manifest)."""
        raise NotImplementedError

    #: whether :meth:`train_stream` serves the train split as a positioned stream
    positioned_stream: bool = False

    def train_stream(self, epoch: int, batch: int, world: int) -> Any:
        """The train split as one Ray Dataset over the rest of the run, starting at micro-batch
        ``batch`` of ``epoch`` for ``world`` ranks, built by Ray Train each time it starts the
        worker group (so a restart starts reading at the checkpoint's position, in constant
        time, and epochs follow each other without a new execution). Rows carry ``epoch`` and
        ``index`` (served position in the epoch); blocks deal round robin to the ranks. Only
        called when :attr:`positioned_stream` is True; see :mod:`megaray.data.text.stream`."""
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

    def train_step(self, engines: Mapping[str, Any], batch: Mapping[str, torch.Tensor], step: int) -> Dict[str, float]:
        """One micro-batch: forward, ``engine.backward``, ``engine.step`` (DeepSpeed handles
        accumulation boundaries). ``step``: optimizer steps taken so far. Returns metrics
        including ``loss``."""
        engine = engines["model"]
        loss, metrics = self.loss(engine, batch)
        engine.backward(loss)
        engine.step()
        return {"loss": float(loss.detach()), **metrics}

    def global_step(self, engines: Mapping[str, Any]) -> int:
        """The step clock: optimizer steps taken. Default: the ``"model"`` engine's count (a
        GAN's discriminator may step less often)."""
        return int(engines["model"].global_steps)

    def after_step(self, engines: Mapping[str, Any], step: int) -> None:
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

    def predict(self, model: torch.nn.Module, files: Mapping[str, str], inputs: List[Any],
                params: Mapping[str, Any]) -> List[Any]:
        """The served model's answer, one output per input. ``model``: the network in eval mode
        (from :func:`megaray.train.checkpoint.load_for_inference`); ``files``: ``{name: local
        path}`` of the spec's files; ``params``: the spec's params, overridden by the caller's."""
        raise NotImplementedError(f"{type(self).__name__} serves no MLflow model")
