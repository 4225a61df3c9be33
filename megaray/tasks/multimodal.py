"""MultimodalTask: one transformer trained on a weighted mixture of text, speech and images
(``model.family: multimodal``).

Data: :mod:`megaray.data.multimodal` (``data.sources`` over text, audio and image shards; each
row one interleaved sequence: text LM, audio <-> text, image <-> text). Loss: the model's
(:meth:`megaray.models.multimodal.model.MultimodalTransformer.forward`): text cross-entropy plus
the span losses, weighted by ``model.*_loss_weight``.

Metrics: ``loss/text``, ``loss/audio``, ``loss/image`` (and ``val_loss/...``) are means over the
supervised text tokens / span patches of every micro-batch and rank since the last line: each
micro-batch reports ``loss/x_sum`` (its mean times its count) and ``loss/x_count``, and the loop
logs their ratio (:func:`megaray.train.reporter.ratio_metrics`), so a micro-batch without images
does not pull ``loss/image`` towards 0. ``rows/<task>`` counts the rows of each task
(:data:`megaray.data.multimodal.TASKS`) per micro-batch.

Evaluation artifacts (rank 0): ``image.png`` (a validation image beside the image generated from
its caption), ``mel.png`` (a validation clip's mel above the one generated from its transcript)
and, as texts, the model's caption of that image and transcription of that clip.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

from megaray.config import ConfigError
from megaray.tasks.base import Task, TaskInfo, unwrap

#: written into every checkpoint (:meth:`MultimodalTask.checkpoint_files`), read by ``megaray generate``
INFO_FILE = "multimodal.json"
#: most passes over the mixture in one epoch of the train dataset (as the audio tasks' crop passes)
MAX_PASSES = 16
#: text tokens generated for the eval caption / transcription
ARTIFACT_TOKENS = 24


@dataclass
class MultimodalInfo(TaskInfo):
    """:class:`TaskInfo` of a multimodal run.

    Attributes:
        tokenizer_path: the text sources' ``tokenizer.json``. eot_id: its ``<|endoftext|>`` id.
        sources: ``[{"shards", "modality", "weight"}]`` in config order.
        items_per_pass: sequences in one pass over the mixture (train). passes: passes per epoch.
        audio: the speech shards' analysis settings (``sample_rate``, ``n_fft``, ``hop_length``,
            ``n_mels``, ``win_length``), empty without speech.
        labels: image label names by id, empty without images.
        examples: ``{"caption", "transcript"}`` of the first validation image / clip (artifacts).
    """

    tokenizer_path: str = ""
    eot_id: int = 0
    sources: List[Dict[str, Any]] = field(default_factory=list)
    items_per_pass: int = 0
    passes: int = 1
    audio: Dict[str, Any] = field(default_factory=dict)
    labels: List[str] = field(default_factory=list)
    examples: Dict[str, Any] = field(default_factory=dict)


class MultimodalTask(Task):
    """Interleaved text / speech / image sequences; per-modality losses and eval artifacts."""

    unit = "tokens"
    info_class = MultimodalInfo

    # -- data ------------------------------------------------------------------------------
    def datasets(self) -> Dict[str, Any]:
        """The mixture's Ray datasets (:func:`megaray.data.multimodal.mixture_datasets`); fills
        :class:`MultimodalInfo`.

        Raises:
            ConfigError: no text source (the tokenizer), ``model.vocab_size`` differs from the
                tokenizer's, a source of a modality not in ``model.modalities``, speech shards whose
                ``n_mels`` differ from the model's or from each other's analysis, images stored
                smaller than ``model.image_size`` or ``model.image_channels != 3``, too few rows for
                the workers and batch size.
            DataError: a source is not prepared or corrupt (from the data layer).
        """
        from megaray.data import mixture
        from megaray.data import multimodal as mm

        srcs = mm.open_sources(self.cfg.data.resolved_sources())
        tok_path, eot = self._check_sources(srcs)
        layout = mm.Layout.from_model(self.cfg.model, eot)
        world, B, t = self.cfg.scaling.max_workers, self.cfg.data.batch_size, self.cfg.train
        weights = [s.weight for s in srcs]
        n_train = sum(mixture.plan([s.rows("train") for s in srcs], weights))
        n_val = sum(mixture.plan([max(1, s.rows("val")) for s in srcs], weights))
        per_pass = n_train // (world * B)
        if per_pass < t.grad_accum_steps:
            raise ConfigError(f"data.sources: the mixture holds {n_train} training sequences per pass, too few for "
                              f"{world} workers x batch_size {B} x grad_accum_steps {t.grad_accum_steps}; prepare "
                              "more data or lower data.batch_size")
        if n_val < world * B:
            raise ConfigError(f"data.sources: the mixture holds {n_val} validation sequences, fewer than {world} "
                              f"workers x batch_size {B}; prepare with a larger val fraction or lower data.batch_size")
        passes = max(1, min(MAX_PASSES, math.ceil(t.max_steps * t.grad_accum_steps / per_pass)))
        per_world = {w: (passes * n_train // (w * B), min(self.cfg.data.num_val_batches, n_val // (w * B)))
                     for w in range(self.cfg.scaling.min_workers, world + 1)}
        self.info = MultimodalInfo(
            batches_per_epoch=per_world[world][0], val_batches=per_world[world][1], manifest=srcs[0].manifest,
            per_world=per_world, tokenizer_path=tok_path, eot_id=eot, items_per_pass=n_train, passes=passes,
            sources=[{"shards": s.shards, "modality": s.modality, "weight": s.weight} for s in srcs],
            **_side_info(srcs, layout))
        return mm.mixture_datasets(srcs, layout, tok_path, seed=t.seed, passes=passes, rows_per_block=max(B, 64),
                                   on_corrupt=self.cfg.data.on_corrupt)

    def _check_sources(self, srcs: List[Any]) -> Tuple[str, int]:
        """Config-vs-shards checks (ConfigError, see :meth:`datasets`); returns the tokenizer
        path and its eot id."""
        from megaray import fs
        from megaray.data.text import check_same_tokenizer
        from megaray.data.tokenizer import eos_id, load_tokenizer

        m = self.cfg.model
        texts = [s for s in srcs if s.modality == "text"]
        if not texts:
            raise ConfigError("data.sources: a multimodal run needs a text source (`megaray prepare text`): its "
                              "tokenizer encodes the transcripts and captions")
        for s in srcs:
            if s.modality not in m.modalities:
                raise ConfigError(f"data.sources: {s.shards} holds {s.modality} data but model.modalities is "
                                  f"{list(m.modalities)}; add {s.modality!r} or drop the source")
        man = check_same_tokenizer([(s.shards, s.weight) for s in texts])
        path = fs.join(texts[0].shards, man["tokenizer"]["path"])
        tok = load_tokenizer(path)
        if tok.get_vocab_size() != m.vocab_size:
            raise ConfigError(f"model.vocab_size ({m.vocab_size}) must equal the vocabulary of the tokenizer "
                              f"{path} ({tok.get_vocab_size()}); set model.vocab_size={tok.get_vocab_size()}")
        settings = ("sample_rate", "n_fft", "hop_length", "n_mels", "win_length")
        speech = [s for s in srcs if s.modality == "audio"]
        for s in speech:
            if s.manifest["n_mels"] != m.n_mels:
                raise ConfigError(f"model.n_mels ({m.n_mels}) differs from the n_mels ({s.manifest['n_mels']}) of "
                                  f"{s.shards}; set model.n_mels={s.manifest['n_mels']} or re-prepare the audio "
                                  f"with --n-mels {m.n_mels}")
            if any(s.manifest.get(k) != speech[0].manifest.get(k) for k in settings):
                raise ConfigError(f"data.sources: {s.shards} and {speech[0].shards} were prepared with different "
                                  f"mel settings ({', '.join(settings)}); prepare every speech source alike")
        for s in (s for s in srcs if s.modality == "image"):
            if m.image_channels != 3:
                raise ConfigError(f"model.image_channels ({m.image_channels}): image shards ({s.shards}) hold RGB "
                                  "pixels; set model.image_channels=3")
            if int(s.manifest["size"]) < m.image_size:
                raise ConfigError(f"model.image_size ({m.image_size}) exceeds the size {s.manifest['size']} px "
                                  f"{s.shards} was prepared at; run `megaray prepare images --source SOURCE --out "
                                  f"{s.shards} --size {m.image_size} --overwrite` or lower model.image_size")
        return path, eos_id(tok)

    def prepare_command(self, shards: str) -> Optional[str]:
        return f"megaray prepare text --source stdlib --out {shards} --vocab-size {self.cfg.model.vocab_size}"

    def batch_units(self, batch: Mapping[str, torch.Tensor]) -> int:
        return int(batch["tokens"].numel())

    # -- step ------------------------------------------------------------------------------
    def loss(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, float]]:
        """The model's weighted loss; metrics ``loss/x_sum``, ``loss/x_count`` per modality (the
        loop logs ``loss/x``, module docstring) and ``rows/<task>``."""
        from megaray.data.multimodal import TASKS

        out = model(batch)
        metrics: Dict[str, float] = {}
        for name in ("text", "audio", "image"):
            count = float(out[f"count/{name}"])
            metrics[f"loss/{name}_sum"] = float(out[f"loss/{name}"].detach()) * count
            metrics[f"loss/{name}_count"] = count
        tasks = torch.bincount(batch["task"].flatten(), minlength=len(TASKS)).tolist()
        metrics.update({f"rows/{name}": float(n) for name, n in zip(TASKS, tasks)})
        return out["loss"], metrics

    def flops_per_unit(self, modules: Mapping[str, torch.nn.Module]) -> Optional[float]:
        return float(unwrap(modules["model"]).flops_per_token())

    # -- checkpoints -----------------------------------------------------------------------
    def checkpoint_files(self) -> Dict[str, str]:
        """``multimodal.json`` (tokenizer file, eot id, the speech shards' mel settings, image
        label names, the caption template, the audio normalisation) and ``tokenizer.json``."""
        from megaray import fs
        from megaray.data.multimodal import CAPTION_TEMPLATE, P_GENERATE

        info, m = self.info, self.cfg.model
        if not info.tokenizer_path:
            return {}
        meta = {"tokenizer": "tokenizer.json", "eot_id": info.eot_id, "audio": info.audio or None,
                "labels": info.labels, "caption_template": CAPTION_TEMPLATE, "mel_mean": m.mel_mean,
                "mel_std": m.mel_std, "p_generate": P_GENERATE, "sources": info.sources}
        return {INFO_FILE: json.dumps(meta, indent=1), "tokenizer.json": fs.read_bytes(info.tokenizer_path).decode()}

    # -- evaluation artifacts --------------------------------------------------------------
    def _noise(self, device: torch.device) -> torch.Generator:
        """The diffusion head's starting noise for eval samples: the same at every evaluation
        (seeded by ``train.seed``), and the global RNG (training's) is left alone."""
        return torch.Generator(device=device).manual_seed(self.cfg.train.seed)

    @torch.no_grad()
    def eval_artifacts(self, modules: Mapping[str, torch.nn.Module], out_dir: str, step: int) -> Dict[str, Any]:
        """``image.png`` and ``mel.png`` (module docstring) and the caption / transcription texts."""
        from megaray.data import multimodal as mm

        net, ex = unwrap(modules["model"]), self.info.examples
        layout = mm.Layout.from_model(self.cfg.model, self.info.eot_id)
        tok = mm.cached_tokenizer(self.info.tokenizer_path)
        device = next(net.parameters()).device
        texts: Dict[str, Any] = {}
        if "image" in ex:
            real = torch.from_numpy(ex["image"])[None].to(device)
            prompt = _prompt(tok.encode(ex["caption"]).ids, layout.boi, layout.image_tokens, layout, device)
            gen = net.generate_image(prompt, generator=self._noise(device))
            from torchvision.utils import save_image

            save_image((torch.cat([real, gen.float()]).clamp(-1, 1).cpu() + 1) / 2, os.path.join(out_dir, "image.png"),
                       nrow=2, padding=1)
            texts["caption"] = f"{ex['caption']!r} -> " + _to_text(net, tok, layout, "image", real, device)
        if "mel" in ex:
            from megaray.tasks.audio import plot_mels

            real = torch.from_numpy(ex["mel"])[None].to(device)
            prompt = _prompt(tok.encode(ex["transcript"]).ids, layout.boa, layout.audio_tokens, layout, device)
            gen = net.generate_audio(prompt, generator=self._noise(device))
            denorm = [x[0].float().cpu() * layout.mel_std + layout.mel_mean for x in (real, gen)]
            a = self.info.audio
            plot_mels(os.path.join(out_dir, "mel.png"), [(f"validation clip: {ex['transcript'][:60]!r}", denorm[0]),
                                                         (f"generated from its transcript (step {step})", denorm[1])],
                      a["sample_rate"], a["hop_length"])
            texts["transcription"] = f"{ex['transcript']!r} -> " + _to_text(net, tok, layout, "audio", real, device)
        return texts


def _prompt(ids: List[int], opener: int, span: int, layout: Any, device: torch.device) -> torch.Tensor:
    """``(1, T0)`` text ids (truncated as the data layout does) followed by ``opener``."""
    ids = list(ids[:max(0, layout.block_size - span - 2)]) + [opener]
    return torch.tensor([ids], dtype=torch.long, device=device)


def _to_text(net: torch.nn.Module, tok: Any, layout: Any, name: str, content: torch.Tensor,
             device: torch.device) -> str:
    """Greedy text after ``<|name|> [content] <|/name|>`` (a caption or a transcription), decoded."""
    n = layout.audio_tokens if name == "audio" else layout.image_tokens
    bo, eo = (layout.boa, layout.eoa) if name == "audio" else (layout.boi, layout.eoi)
    prompt = torch.tensor([[bo] + [0] * n + [eo]], dtype=torch.long, device=device)
    start = torch.ones(1, dtype=torch.long, device=device)
    out = net.generate_text(prompt, ARTIFACT_TOKENS, stop_id=layout.eot_id, **{name: content, f"{name}_start": start})
    return tok.decode(out[0, prompt.size(1):].tolist(), skip_special_tokens=True)


def _side_info(srcs: List[Any], layout: Any) -> Dict[str, Any]:
    """The speech settings, image labels and the first validation image / clip of the mixture
    (read with pyarrow on the driver, prepared as the validation data is): :class:`MultimodalInfo` fields."""
    import pyarrow.dataset as pads

    from megaray.data import multimodal as mm
    from megaray.data.shards import split_files

    out: Dict[str, Any] = {"audio": {}, "labels": [], "examples": {}}
    for s in srcs:
        if s.modality == "audio" and not out["audio"]:
            keys = ("sample_rate", "n_fft", "hop_length", "n_mels", "win_length")
            out["audio"] = {k: s.manifest.get(k) for k in keys}
        if s.modality == "image" and not out["labels"]:
            out["labels"] = [name for name, _ in sorted(s.manifest["labels"].items(), key=lambda kv: kv[1])]
        key = {"audio": "mel", "image": "image"}.get(s.modality)
        if key is None or key in out["examples"] or s.rows("val") == 0:
            continue
        filesystem, paths, _ = split_files(s.shards, s.manifest, "val")
        row = pads.dataset(paths, filesystem=filesystem, format="parquet").head(
            1, columns=mm.COLUMNS[s.modality]).to_pylist()[0]
        if s.modality == "audio":
            mel = np.asarray(row["mel"], np.float32).reshape(int(s.manifest["n_mels"]), int(row["n_frames"]))
            out["examples"].update(mel=mm.crop_mel(mel, layout, None)[0], transcript=row["text"])
        else:
            out["examples"].update(image=mm.square_image(row["pixels"], int(row["height"]), int(row["width"]),
                                                         layout.image_size),
                                   caption=row["caption"] or mm.CAPTION_TEMPLATE.format(label=row["label"]))
    return out
