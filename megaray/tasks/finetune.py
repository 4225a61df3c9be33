"""SFTTask: supervised fine-tuning of a GPT on chat/completion records (``train.task: sft``).

Data: shards of ``megaray prepare sft`` (:mod:`megaray.data.sft`), packed on the driver into
windows ``{"input_ids", "targets", "doc_ids"}`` (B, T) int64: ``targets`` is -1 outside the
completion tokens, ``doc_ids`` feeds the GPT's document mask so no record attends to another. The
loss is the GPT's mean cross-entropy over completion tokens only (``ignore_index=-1``) plus the MoE
auxiliary loss. Weights usually start from a pre-trained run (``train.init_from``, loaded by the
training loop). Checkpoints carry ``tokenizer.json`` and ``chat_template.json``.

Packing is done once on the driver (fine-tuning sets are small: thousands to a few hundred
thousand records) and handed to Ray Data with ``ray.data.from_items``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from megaray.errors import ConfigError
from megaray.fs import join
from megaray.tasks.base import unwrap
from megaray.tasks.lm import LMInfo, LMTask, _tokenizer, sample_text

log = logging.getLogger(__name__)


@dataclass
class SFTInfo(LMInfo):
    """:class:`LMInfo` of a fine-tuning run. ``chat_template``: the template's JSON text;
    ``dropped``: records per split longer than ``block_size + 1`` (left out of the windows)."""

    chat_template: str = ""
    dropped: Optional[Dict[str, int]] = None


class SFTTask(LMTask):
    """Completion-only next-token loss on packed, document-masked chat records."""

    info_class = SFTInfo
    supports_val_shards = False  # its splits come packed from one `prepare sft` folder

    def datasets(self) -> Dict[str, Any]:
        """Packed windows of both splits of ``data.shards`` (an ``sft`` manifest); fills :class:`SFTInfo`.

        Raises:
            DataError: not an ``sft`` folder. ConfigError: vocabulary larger than the model's, or
                too few windows for the workers and batch size.
        """
        import ray

        from megaray.data import sft
        from megaray.fs import read_text

        shards = self.cfg.data.shards
        manifest = sft.load_manifest(shards)
        vocab = int(manifest["vocab_size"])
        if vocab > self.cfg.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size ({self.cfg.model.vocab_size}) is smaller than the tokenizer's "
                f"vocabulary ({vocab}) in {shards}/manifest.json: set model.vocab_size >= {vocab}"
            )
        T = self.cfg.model.block_size
        packed, dropped = {}, {}
        for split in ("train", "val"):
            packed[split], dropped[split] = sft.pack(
                sft.read_split(shards, manifest, split), T, int(manifest["eos_id"])
            )
            if dropped[split]:
                log.warning(
                    "sft: %d %s record(s) longer than block_size + 1 = %d tokens left out; prepare with "
                    "--max-tokens %d to reject them by name",
                    dropped[split],
                    split,
                    T + 1,
                    T + 1,
                )
        n_train, n_val = (len(packed[s]["input_ids"]) for s in ("train", "val"))
        self.info = SFTInfo(
            **self.batch_plan(
                n_train, n_val, shards, f"windows of {T + 1} tokens", "add records or lower data.batch_size"
            ),
            manifest=manifest,
            vocab_size=vocab,
            tokenizer_path=join(shards, manifest["tokenizer"]["path"]),
            train_windows=n_train,
            chat_template=read_text(join(shards, manifest["chat_template"])),
            dropped=dropped,
        )
        return {
            s: ray.data.from_items(
                [{k: v[i] for k, v in packed[s].items()} for i in range(len(packed[s]["input_ids"]))]
            )
            for s in ("train", "val")
        }

    def train_stream(self, epoch: int, cursor: int, plan: Any) -> Any:
        """The packed train windows in the world-independent served order of
        :func:`megaray.data.rows.positioned_table` (each epoch a permutation of the windows seeded
        by (seed, epoch), then permuted inside blocks of ``data.shuffle_block``), from sample
        ``cursor`` of ``epoch`` on. The records are re-read and packed here, on the process that
        builds the stream (rank 0 of the worker group; packing is deterministic), and go to the
        object store once."""
        from megaray.data import sft
        from megaray.data.rows import last_epoch, positioned_table

        man, t = self.info.manifest, self.cfg.train
        packed, _ = sft.pack(
            sft.read_split(self.cfg.data.shards, man, "train"), self.cfg.model.block_size, int(man["eos_id"])
        )
        return positioned_table(
            packed,
            seed=t.seed,
            shuffle_block=self.cfg.data.shuffle_block,
            plan=plan,
            epoch=epoch,
            cursor=cursor,
            last_epoch=last_epoch(t.max_steps, epoch, plan),
        )

    def prepare_command(self, shards: str) -> Optional[str]:
        return (
            f"megaray prepare sft --source FILE.jsonl --tokenizer PRETRAINED_RUN_OR_SHARDS --out {shards} "
            f"--max-tokens {self.cfg.model.block_size + 1}"
        )

    def loss(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, float]]:
        _, ce = model(batch["input_ids"], batch["targets"], doc_ids=batch["doc_ids"])
        aux = unwrap(model).aux_loss
        if isinstance(aux, torch.Tensor) and aux.requires_grad:
            return ce + aux, {"ce": float(ce.detach()), "moe_aux": float(aux.detach())}
        return ce, {}

    @torch.no_grad()
    def eval_step(self, modules: Mapping[str, Any], batch: Mapping[str, torch.Tensor]) -> Dict[str, float]:
        _, ce = modules["model"](batch["input_ids"], batch["targets"], doc_ids=batch["doc_ids"])
        return {"val_loss": float(ce)}

    def batch_units(self, batch: Mapping[str, torch.Tensor]) -> int:
        return int((batch["doc_ids"] > 0).sum())  # tokens of records, padding excluded

    def checkpoint_files(self) -> Dict[str, str]:
        from megaray.data.sft import TEMPLATE_FILE

        files = super().checkpoint_files()
        if self.info.chat_template:
            files[TEMPLATE_FILE] = self.info.chat_template
        return files

    def eval_artifacts(self, modules: Mapping[str, torch.nn.Module], out_dir: str, step: int) -> Dict[str, Any]:
        """The reply to ``eval.sample_prompt`` as one user turn (greedy-ish: top-k 40, T 0.8)."""
        import json

        from megaray.data.sft import render_prompt

        n = self.cfg.eval.sample_tokens
        if not n or not self.info.tokenizer_path or not self.info.chat_template:
            return {}
        prompt = render_prompt(
            [{"role": "user", "content": self.cfg.eval.sample_prompt}], json.loads(self.info.chat_template)
        )
        return {"sample": sample_text(modules["model"], _tokenizer(self.info.tokenizer_path), prompt, n, seed=step)}
