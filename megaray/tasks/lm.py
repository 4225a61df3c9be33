"""LMTask: causal language modelling on prepared token shards (the GPT family)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from megaray.config import ConfigError
from megaray.fs import join
from megaray.tasks.base import Task, TaskInfo, unwrap


@dataclass
class LMInfo(TaskInfo):
    """:class:`TaskInfo` of a language-model run.

    Attributes:
        vocab_size: the tokenizer's vocabulary (<= ``model.vocab_size``).
        tokenizer_path: the run's ``tokenizer.json`` (absolute path or URI, resolved on the
            driver; read where needed: sampling, checkpoints).
        unigram_entropy: nats/token of the val split's unigram distribution (a baseline the
            val loss must beat); None when unknown.
        train_windows: packed training windows per epoch (all ranks together).
        hellaswag: ``eval.hellaswag``'s examples, tokenized on the driver
            (:class:`megaray.tasks.hellaswag.Example`); None when off.
    """

    vocab_size: int = 0
    tokenizer_path: Optional[str] = None
    unigram_entropy: Optional[float] = None
    train_windows: int = 0
    hellaswag: Optional[list] = None


class LMTask(Task):
    """Next-token prediction. Batches are ``{"input_ids": (B, T) int64, "targets": (B, T) int64}``
    windows packed by :func:`megaray.data.text.text_datasets`; the loss is mean cross-entropy plus
    the MoE load-balancing loss (``model.aux_loss``, zero for dense models)."""

    unit = "tokens"
    info_class = LMInfo
    supports_val_shards = True
    _hellaswag: Optional[Dict[str, float]] = None  # this evaluation's HellaSwag metrics (eval.hellaswag)

    def datasets(self) -> Dict[str, Any]:
        """Packed windows of ``data.shards`` or of the weighted mixture ``data.sources`` (which
        must share one tokenizer); validation on ``data.val_shards`` when given (the same
        tokenizer; its val split, or its train split when its val split is empty); fills :class:`LMInfo`."""
        from megaray.data import text
        from megaray.data.text.datasets import check_val_shards

        sources = self.cfg.data.resolved_sources()
        where = sources[0].shards if len(sources) == 1 else "data.sources"
        manifest = text.check_same_tokenizer(sources)  # the first source's manifest
        val_shards = self.cfg.data.val_shards
        vocab = int(manifest["tokenizer"]["vocab_size"])
        if vocab > self.cfg.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size ({self.cfg.model.vocab_size}) is smaller than the tokenizer's vocabulary "
                f"({vocab}) in {sources[0].shards}/manifest.json: set model.vocab_size >= {vocab}"
            )
        T, seed = self.cfg.model.block_size, self.cfg.train.seed
        counted = manifest if len(sources) == 1 else sources  # one source: counted from its manifest
        train_windows = text.num_windows(counted, T, "train", seed=seed)
        if val_shards:  # validation on another folder (DataError: not prepared, another tokenizer)
            val_manifest, val_split = check_val_shards(sources, val_shards)
            val_windows = text.num_windows(val_manifest, T, val_split)
            unigram = val_manifest["splits"][val_split].get("unigram_entropy_nats")
        else:
            val_windows = text.num_windows(counted, T, "val", seed=seed)
            unigram = manifest["splits"]["val"].get("unigram_entropy_nats") if len(sources) == 1 else None
        self.info = LMInfo(
            **self.batch_plan(
                train_windows,
                val_windows,
                where,
                f"windows of {T + 1} tokens",
                "prepare more text or lower data.batch_size / model.block_size",
                val_where=f"data.val_shards {val_shards} ({val_split} split)" if val_shards else None,
            ),
            manifest=manifest,
            vocab_size=vocab,
            train_windows=train_windows,
            tokenizer_path=join(sources[0].shards, manifest["tokenizer"]["path"]),
            unigram_entropy=unigram,
        )
        if self.cfg.eval.hellaswag:  # read and tokenized once, on the driver (bad lines counted, named)
            from megaray.tasks.hellaswag import read_hellaswag

            self.info.hellaswag = read_hellaswag(
                self.cfg.eval.hellaswag, _tokenizer(self.info.tokenizer_path), T, self.cfg.eval.hellaswag_limit
            ).examples
        arg = sources[0].shards if len(sources) == 1 else sources
        return text.text_datasets(
            arg, block_size=T, seed=seed, shuffle_buffer=0, on_corrupt=self.cfg.data.on_corrupt, val_shards=val_shards
        )

    def train_stream(self, epoch: int, cursor: int, plan: Any) -> Any:
        """Packed windows of epochs ``epoch ..`` the last one ``train.max_steps`` needs, from sample
        ``cursor`` of ``epoch`` on (:func:`megaray.data.text.text_stream`); windows are permuted
        inside blocks of ``data.shuffle_block`` windows, seeded by (seed, epoch, block)."""
        from megaray.data import order, text

        t = self.cfg.train
        if cursor >= plan.served:  # the checkpoint closed an epoch
            epoch, cursor = epoch + 1, 0
        spec = text.StreamSpec(
            block_size=self.cfg.model.block_size,
            global_batch=plan.global_batch,
            per_epoch=plan.served,
            seed=t.seed,
            chunk=order.block_size(self.cfg.data.shuffle_block, plan.global_batch),
        )
        last = max(epoch, (t.max_steps - 1) // plan.steps_per_epoch)
        sources = self.cfg.data.resolved_sources()
        arg = sources[0].shards if len(sources) == 1 else sources
        return text.text_stream(arg, spec, epoch, cursor, last, plan.micro_batch, on_corrupt=self.cfg.data.on_corrupt)

    def prepare_command(self, shards: str) -> Optional[str]:
        return f"megaray prepare text --source stdlib --out {shards} --vocab-size {self.cfg.model.vocab_size}"

    def batch_units(self, batch: Mapping[str, torch.Tensor]) -> int:
        return int(batch["input_ids"].numel())

    def loss(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, float]]:
        _, ce = model(batch["input_ids"], batch["targets"])
        aux = unwrap(model).aux_loss
        if isinstance(aux, torch.Tensor) and aux.requires_grad:
            metrics = {"ce": float(ce.detach()), "moe_aux": float(aux.detach())}
            # per-step moe_aux (balance), moe_z_loss, moe_dropped_frac where the model reports them
            metrics.update({k: float(v) for k, v in getattr(unwrap(model), "moe_stats", {}).items()})
            return ce + aux, metrics
        return ce, {}

    @torch.no_grad()
    def eval_step(self, modules: Mapping[str, Any], batch: Mapping[str, torch.Tensor]) -> Dict[str, float]:
        _, ce = modules["model"](batch["input_ids"], batch["targets"])
        out = {"val_loss": float(ce)}
        if self.info.hellaswag:  # scored on the first batch of an evaluation, each rank a share
            if self._hellaswag is None:
                self._hellaswag = _hellaswag_share(modules["model"], self.info.hellaswag)
            out.update(self._hellaswag)
        return out

    def finalize_eval(self, metrics: Dict[str, float]) -> Dict[str, float]:
        metrics["val_ppl"] = math.exp(min(metrics["val_loss"], 50.0))
        self._hellaswag = None  # the next evaluation scores again
        return metrics

    def flops_per_unit(self, modules: Mapping[str, torch.nn.Module]) -> Optional[float]:
        return float(modules["model"].flops_per_token())

    def checkpoint_files(self) -> Dict[str, str]:
        path = self.info.tokenizer_path
        return {"tokenizer.json": _tokenizer(path).to_str()} if path else {}

    def mlflow_model(self) -> Optional[Dict[str, Any]]:
        """Text generation: a prompt in, the prompt and its continuation out (:func:`sample_text`)."""
        return {
            "input": "prompt",
            "files": ["tokenizer.json"],
            "params": {"max_new_tokens": self.cfg.eval.sample_tokens or 48, "temperature": 0.8, "top_k": 40},
        }

    def predict(
        self, model: torch.nn.Module, files: Mapping[str, str], inputs: List[Any], params: Mapping[str, Any]
    ) -> List[Any]:
        tok = _tokenizer(files["tokenizer.json"])
        top_k = int(params["top_k"]) or None
        return [
            sample_text(
                model, tok, str(p), int(params["max_new_tokens"]), temperature=float(params["temperature"]), top_k=top_k
            )
            for p in inputs
        ]

    def eval_artifacts(self, modules: Mapping[str, torch.nn.Module], out_dir: str, step: int) -> Dict[str, Any]:
        """A sample continuation of ``eval.sample_prompt`` (top-k 40, temperature 0.8)."""
        n = self.cfg.eval.sample_tokens
        if not n or not self.info.tokenizer_path:
            return {}
        tok = _tokenizer(self.info.tokenizer_path)
        return {"sample": sample_text(modules["model"], tok, self.cfg.eval.sample_prompt, n, seed=step)}


def _hellaswag_share(model: Any, examples: list) -> Dict[str, float]:
    """HellaSwag accuracies of this rank's share, scaled so the loop's mean over ranks is the
    accuracy over all examples (:func:`megaray.tasks.hellaswag.shared_metrics`)."""
    from megaray.tasks.hellaswag import shared_metrics

    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if dist else (0, 1)
    device = getattr(model, "device", None) or next(unwrap(model).parameters()).device
    return shared_metrics(model, examples, rank, world, device)


@lru_cache(maxsize=4)
def _tokenizer(path: str):
    """The tokenizer at ``path``, read once per process (raises DataError naming the file)."""
    from megaray.data.tokenizer import load_tokenizer

    return load_tokenizer(path)


def sample_text(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: Optional[int] = 40,
    top_p: Optional[float] = None,
    seed: int = 0,
) -> str:
    """Decode ``max_new_tokens`` after ``prompt``; returns prompt + text.

    ``tokenizer``: a ``tokenizers.Tokenizer`` or the text of a ``tokenizer.json``."""
    from tokenizers import Tokenizer

    from megaray.models.gpt.sampling import generate

    tok = Tokenizer.from_str(tokenizer) if isinstance(tokenizer, str) else tokenizer
    ids = tok.encode(prompt).ids or [0]
    device = next(model.parameters()).device
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    eos = tok.token_to_id("<|endoftext|>")
    g = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    out = generate(
        model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, stop_token=eos, generator=g
    )
    model.train(was_training)
    return tok.decode(out[0].tolist(), skip_special_tokens=True)
