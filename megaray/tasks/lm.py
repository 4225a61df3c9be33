"""LMTask: causal language modelling on prepared token shards (the GPT family)."""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from megaray.config import ConfigError
from megaray.tasks.base import Task


class LMTask(Task):
    """Next-token prediction. Batches are ``{"input_ids": (B, T) int64, "targets": (B, T) int64}``
    windows packed by :func:`megaray.data.text.text_datasets`; the loss is mean cross-entropy plus
    the MoE load-balancing loss (``model.aux_loss``, zero for dense models)."""

    unit = "tokens"

    def datasets(self) -> Dict[str, Any]:
        from megaray.data import text

        shards = self.cfg.data.shards
        manifest = text.load_manifest(shards)
        vocab = int(manifest["tokenizer"]["vocab_size"])
        if vocab > self.cfg.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size ({self.cfg.model.vocab_size}) is smaller than the tokenizer's vocabulary "
                f"({vocab}) in {shards}/manifest.json: set model.vocab_size >= {vocab}"
            )
        T = self.cfg.model.block_size
        world = self.cfg.scaling.num_workers
        B = self.cfg.data.batch_size
        train_windows = text.num_windows(manifest, T, "train")
        val_windows = text.num_windows(manifest, T, "val")
        bpe = text.equal_batches(train_windows, world, B)
        if bpe < self.cfg.train.grad_accum_steps:
            raise ConfigError(
                f"data: the train split of {shards} packs into {train_windows} windows of {T + 1} tokens, "
                f"too few for {world} workers x batch_size {B} x grad_accum_steps {self.cfg.train.grad_accum_steps}; "
                "prepare more text or lower data.batch_size / model.block_size"
            )
        val_batches = min(self.cfg.data.num_val_batches, text.equal_batches(val_windows, world, B))
        if val_batches < 1:
            raise ConfigError(
                f"data: the val split of {shards} packs into {val_windows} windows, fewer than "
                f"{world} workers x batch_size {B}; prepare with a larger val fraction or lower data.batch_size"
            )
        self.info.update(
            batches_per_epoch=bpe,
            val_batches=val_batches,
            train_windows=train_windows,
            vocab_size=vocab,
            unigram_entropy=manifest["splits"]["val"].get("unigram_entropy_nats"),
            tokenizer_json=text.manifest_tokenizer(shards).to_str(),
        )
        return text.text_datasets(shards, block_size=T, seed=self.cfg.train.seed, shuffle_buffer=0)

    def batch_units(self, batch: Mapping[str, torch.Tensor]) -> int:
        return int(batch["input_ids"].numel())

    def loss(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, float]]:
        _, ce = model(batch["input_ids"], batch["targets"])
        aux = getattr(model, "module", model).aux_loss
        if isinstance(aux, torch.Tensor) and aux.requires_grad:
            return ce + aux, {"ce": float(ce.detach()), "moe_aux": float(aux.detach())}
        return ce, {}

    @torch.no_grad()
    def eval_step(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> Dict[str, float]:
        _, ce = model(batch["input_ids"], batch["targets"])
        return {"val_loss": float(ce)}

    def finalize_eval(self, metrics: Dict[str, float]) -> Dict[str, float]:
        metrics["val_ppl"] = math.exp(min(metrics["val_loss"], 50.0))
        return metrics

    def flops_per_unit(self, modules: Mapping[str, torch.nn.Module]) -> Optional[float]:
        return float(modules["model"].flops_per_token())

    def checkpoint_files(self) -> Dict[str, str]:
        return {"tokenizer.json": self.info["tokenizer_json"]} if self.info.get("tokenizer_json") else {}

    def eval_artifacts(self, model: torch.nn.Module, out_dir: str, step: int) -> Dict[str, Any]:
        """A sample continuation of ``tracking.sample_prompt`` (top-k 40, temperature 0.8)."""
        n = self.cfg.tracking.sample_tokens
        if not n or not self.info.get("tokenizer_json"):
            return {}
        return {"sample": sample_text(model, self.info["tokenizer_json"], self.cfg.tracking.sample_prompt, n, seed=step)}


def sample_text(model: torch.nn.Module, tokenizer_json: str, prompt: str, max_new_tokens: int,
                temperature: float = 0.8, top_k: Optional[int] = 40, top_p: Optional[float] = None,
                seed: int = 0) -> str:
    """Decode ``max_new_tokens`` after ``prompt`` with the run's tokenizer; returns prompt + text."""
    from tokenizers import Tokenizer

    from megaray.models.gpt.sampling import generate

    tok = Tokenizer.from_str(tokenizer_json)
    ids = tok.encode(prompt).ids or [0]
    device = next(model.parameters()).device
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    eos = tok.token_to_id("<|endoftext|>")
    g = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    out = generate(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   stop_token=eos, generator=g)
    model.train(was_training)
    return tok.decode(out[0].tolist(), skip_special_tokens=True)
