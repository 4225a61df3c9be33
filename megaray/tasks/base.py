"""Task: what one model family supplies to the generic training loop.

The loop (:mod:`megaray.train.loop`) owns distribution, DeepSpeed engines, checkpoints,
schedules, logging and resume. A family's :class:`Task` owns the model, its loss, its Ray
datasets and its evaluation artifacts. A family with a second network (a GAN discriminator)
returns it from :meth:`Task.build_modules`; the loop gives every module its own DeepSpeed engine
and hands all engines to :meth:`Task.train_step`.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from megaray.config import RunConfig


class Task:
    """Base class. Subclasses implement :meth:`loss` and :meth:`datasets`.

    Args:
        cfg: the resolved run config.
        info: facts the driver found while building the datasets (vocabulary, batch counts),
            handed to the workers; :meth:`datasets` fills it on the driver.
    """

    #: how many tokens / samples one batch row counts as, for throughput; set by subclasses.
    unit: str = "samples"

    def __init__(self, cfg: RunConfig, info: Optional[Dict[str, Any]] = None):
        self.cfg = cfg
        self.info: Dict[str, Any] = dict(info or {})

    # -- model -----------------------------------------------------------------------------
    def build_modules(self) -> Dict[str, torch.nn.Module]:
        """``{"model": module, ...}``; every entry gets its own DeepSpeed engine and optimizer."""
        from megaray import families

        return {"model": families.build_model(self.cfg.model)}

    def param_groups(self, name: str, module: torch.nn.Module) -> list:
        """AdamW groups: weight decay on >=2-D weights, none on biases, norms and gains."""
        decay = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in module.parameters() if p.requires_grad and p.dim() < 2]
        return [
            {"params": decay, "weight_decay": self.cfg.train.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    # -- data ------------------------------------------------------------------------------
    def datasets(self) -> Dict[str, Any]:
        """``{"train": ray.data.Dataset, "val": ray.data.Dataset}``, built on the driver.

        Must set ``self.info["batches_per_epoch"]`` (micro-batches per rank per epoch, equal on
        every rank) and ``self.info["val_batches"]`` (validation batches per rank per eval)."""
        raise NotImplementedError

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
        accumulation boundaries). Returns metrics including ``loss``."""
        engine = engines["model"]
        loss, metrics = self.loss(engine, batch)
        engine.backward(loss)
        engine.step()
        return {"loss": float(loss.detach()), **metrics}

    @torch.no_grad()
    def eval_step(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> Dict[str, float]:
        """Validation metrics of one batch (means); the loop averages across batches and ranks."""
        loss, metrics = self.loss(model, batch)
        return {"val_loss": float(loss), **{f"val_{k}": v for k, v in metrics.items()}}

    def finalize_eval(self, metrics: Dict[str, float]) -> Dict[str, float]:
        """Derived metrics after averaging (e.g. perplexity = exp(val_loss))."""
        return metrics

    def flops_per_unit(self, modules: Mapping[str, torch.nn.Module]) -> Optional[float]:
        """Training FLOPs per :attr:`unit` (forward + backward), for MFU; None if unknown."""
        return None

    def eval_artifacts(self, model: torch.nn.Module, out_dir: str, step: int) -> Dict[str, Any]:
        """Write evaluation artifacts (samples, audio, images) into ``out_dir`` on rank 0.

        Called on rank 0 only, and only when the module holds full weights (ZeRO stage < 3).
        Returns extra text to log (e.g. ``{"sample": "..."}``)."""
        return {}

    def checkpoint_files(self) -> Dict[str, str]:
        """``{file name: text}`` written into every checkpoint by rank 0 (e.g. tokenizer.json)."""
        return {}
