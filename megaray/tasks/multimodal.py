"""MultimodalTask: one transformer trained on a weighted mixture of text, speech and images
(``model.family: multimodal``).

Data: :mod:`megaray.data.multimodal` (``data.sources`` over text, audio and image shards; each
row one interleaved sequence: text LM, audio <-> text, image <-> text). Loss: the model's
(:meth:`megaray.models.multimodal.model.MultimodalTransformer.forward`): text cross-entropy plus
the span losses, weighted by ``model.*_loss_weight``.

Metrics: ``loss/text``, ``loss/audio``, ``loss/image`` (and ``val_loss/...``) are means over the
supervised text tokens / span patches of every micro-batch and rank since the last line: each
micro-batch reports ``loss/x_sum`` (its mean times its count) and ``loss/x_count``, and the loop
logs their ratio (:func:`megaray.train.reporter.ratio_metrics`, which drops the pair), so a
micro-batch without images does not pull ``loss/image`` towards 0. Bookkeeping has its own names
(:data:`megaray.train.reporter.COUNT_PREFIXES`; logged, but not on the console's eval line):
``supervised/<modality>`` counts the supervised text tokens / span patches and ``rows/<task>`` the
rows of each task (:data:`megaray.data.multimodal.TASKS`) per micro-batch (``val_supervised/...``,
``val_rows/...`` in evaluation).

Evaluation artifacts (rank 0): ``image.png`` (a validation image beside the image generated from
its caption), ``mel.png`` (a validation clip's mel above the one generated from its transcript)
and, as texts, the model's caption of that image and transcription of that clip.

Latent sources (``image_latents``, ``audio_latents``; :mod:`megaray.data.multimodal`): the image
VAE named in the image latents' manifest (``vae_checkpoint``) is checked on the driver, loaded on
every worker as a frozen module (:meth:`MultimodalTask.frozen_modules`) and decodes both latents of
``image.png``; its path goes into ``multimodal.json`` so ``megaray generate --to image`` decodes
without ``--vae``. Latents prepared without a ``vae_checkpoint`` train, but get no ``image.png``.
Audio-latent manifests name no VAE checkpoint: their runs write no ``mel.png`` (the transcription
text still).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from megaray.config import ConfigError
from megaray.data import order
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
        vae_checkpoint: the image VAE checkpoint directory of image-latent sources (None: pixels,
            or latents prepared without one). audio_latents: ``{"latent_channels", "bands",
            "down_time"}`` of audio-latent sources (their audio VAE's), empty for log-mels.
    """

    tokenizer_path: str = ""
    eot_id: int = 0
    sources: List[Dict[str, Any]] = field(default_factory=list)
    items_per_pass: int = 0
    passes: int = 1
    audio: Dict[str, Any] = field(default_factory=dict)
    labels: List[str] = field(default_factory=list)
    examples: Dict[str, Any] = field(default_factory=dict)
    vae_checkpoint: Optional[str] = None
    audio_latents: Dict[str, Any] = field(default_factory=dict)


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
                tokenizer's, a source of a modality not in ``model.modalities``, two kinds of one
                modality (log-mels and audio latents, pixels and image latents), speech shards whose
                ``n_mels`` differ from the model's or from each other's analysis, images stored
                smaller than ``model.image_size`` or ``model.image_channels != 3``, latents whose
                shape differs from ``model.image_channels`` / ``image_size`` (``n_mels``) or from
                each other's VAE, an image VAE checkpoint in the manifest that is gone or does not
                match, too few rows for the workers and batch size.
            DataError: a source is not prepared or corrupt (from the data layer).
        """
        from megaray.data import mixture, multimodal as mm

        srcs = mm.open_sources(self.cfg.data.resolved_sources())
        tok_path, eot = self._check_sources(srcs)
        layout = mm.Layout.from_model(self.cfg.model, eot)
        world, B, t = self.cfg.scaling.max_workers, self.cfg.data.batch_size, self.cfg.train
        weights = [s.weight for s in srcs]
        n_train = sum(mixture.plan([s.rows("train") for s in srcs], weights))
        n_val = sum(mixture.plan([max(1, s.rows("val")) for s in srcs], weights))
        G = order.global_batch_size(t.global_batch_size, B, t.grad_accum_steps, world)
        passes = max(1, min(MAX_PASSES, math.ceil(t.max_steps * G / max(1, n_train))))  # world-independent
        self.info = MultimodalInfo(
            **self.batch_plan(
                passes * n_train,
                n_val,
                "data.sources",
                f"sequences ({n_train} per pass x {passes} passes)",
                "prepare more data or lower data.batch_size",
            ),
            manifest=srcs[0].manifest,
            tokenizer_path=tok_path,
            eot_id=eot,
            items_per_pass=n_train,
            passes=passes,
            sources=[{"shards": s.shards, "modality": s.modality, "kind": s.kind, "weight": s.weight} for s in srcs],
            **_side_info(srcs, layout),
        )
        return mm.mixture_datasets(
            srcs,
            layout,
            tok_path,
            seed=t.seed,
            passes=passes,
            rows_per_block=max(B, 64),
            on_corrupt=self.cfg.data.on_corrupt,
        )

    def train_stream(self, epoch: int, cursor: int, plan: Any) -> Any:
        """The mixture's sequences in a world-independent served order from sample ``cursor`` of
        ``epoch`` on (:func:`megaray.data.multimodal.reader.mixture_stream`: epoch ``e`` is passes
        ``e * passes ..`` of the mixture, permuted inside blocks of ``data.shuffle_block``); blocks
        of ``plan.micro_batch`` rows."""
        from megaray.data import multimodal as mm
        from megaray.data.multimodal.reader import mixture_stream
        from megaray.data.rows import last_epoch

        t = self.cfg.train
        srcs = mm.open_sources(self.cfg.data.resolved_sources())
        layout = mm.Layout.from_model(self.cfg.model, self.info.eot_id)
        return mixture_stream(
            srcs,
            layout,
            self.info.tokenizer_path,
            seed=t.seed,
            shuffle_block=self.cfg.data.shuffle_block,
            plan=plan,
            epoch=epoch,
            cursor=cursor,
            last_epoch=last_epoch(t.max_steps, epoch, plan),
            passes=self.info.passes,
            on_corrupt=self.cfg.data.on_corrupt,
            rows_per_output=max(plan.micro_batch, 64),
        )

    def _check_sources(self, srcs: List[Any]) -> Tuple[str, int]:
        """Config-vs-shards checks (ConfigError, see :meth:`datasets`); returns the tokenizer
        path and its eot id."""
        from megaray import fs
        from megaray.data.multimodal.checks import check_audio_sources, check_image_sources, check_one_kind
        from megaray.data.text import check_same_tokenizer
        from megaray.data.tokenizer import eos_id, load_tokenizer

        m = self.cfg.model
        texts = [s for s in srcs if s.modality == "text"]
        if not texts:
            raise ConfigError(
                "data.sources: a multimodal run needs a text source (`megaray prepare text`): its "
                "tokenizer encodes the transcripts and captions"
            )
        for s in srcs:
            if s.modality not in m.modalities:
                raise ConfigError(
                    f"data.sources: {s.shards} holds {s.modality} data but model.modalities is "
                    f"{list(m.modalities)}; add {s.modality!r} or drop the source"
                )
        man = check_same_tokenizer([(s.shards, s.weight) for s in texts])
        path = fs.join(texts[0].shards, man["tokenizer"]["path"])
        tok = load_tokenizer(path)
        if tok.get_vocab_size() != m.vocab_size:
            raise ConfigError(
                f"model.vocab_size ({m.vocab_size}) must equal the vocabulary of the tokenizer "
                f"{path} ({tok.get_vocab_size()}); set model.vocab_size={tok.get_vocab_size()}"
            )
        check_one_kind(srcs)
        check_audio_sources([s for s in srcs if s.modality == "audio"], m)
        check_image_sources([s for s in srcs if s.modality == "image"], m)
        return path, eos_id(tok)

    def frozen_modules(self) -> Dict[str, torch.nn.Module]:
        """``{"vae": the image VAE}`` that decodes image latents for ``image.png`` (loaded with
        :func:`megaray.tasks.diffusion.load_frozen`), when the latents name one; else none."""
        if not self.info.vae_checkpoint:
            return {}
        from megaray.tasks.diffusion import load_frozen

        return {"vae": load_frozen(self.info.vae_checkpoint)}

    def prepare_command(self, shards: str) -> Optional[str]:
        return f"megaray prepare text --source stdlib --out {shards} --vocab-size {self.cfg.model.vocab_size}"

    def batch_units(self, batch: Mapping[str, torch.Tensor]) -> int:
        return int(batch["tokens"].numel())

    # -- step ------------------------------------------------------------------------------
    def loss(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, float]]:
        """The model's weighted loss; metrics ``loss/x_sum``, ``loss/x_count`` per modality (the
        loop logs their ratio ``loss/x``, module docstring), ``supervised/x`` (the count again,
        under its own name) and ``rows/<task>``."""
        from megaray.data.multimodal import TASKS

        out = model(batch)
        metrics: Dict[str, float] = {}
        for name in ("text", "audio", "image"):
            count = float(out[f"count/{name}"])
            metrics[f"loss/{name}_sum"] = float(out[f"loss/{name}"].detach()) * count
            metrics[f"loss/{name}_count"] = count
            metrics[f"supervised/{name}"] = count
        tasks = torch.bincount(batch["task"].flatten(), minlength=len(TASKS)).tolist()
        metrics.update({f"rows/{name}": float(n) for name, n in zip(TASKS, tasks)})
        return out["loss"], metrics

    def flops_per_unit(self, modules: Mapping[str, torch.nn.Module]) -> Optional[float]:
        return float(unwrap(modules["model"]).flops_per_token())

    # -- checkpoints -----------------------------------------------------------------------
    def checkpoint_files(self) -> Dict[str, str]:
        """``multimodal.json`` (tokenizer file, eot id, the speech shards' mel settings, image
        label names, the caption template, the audio normalisation, the sources with their kinds,
        the image VAE of latent images, the audio latents' shape) and ``tokenizer.json``."""
        from megaray import fs
        from megaray.data.multimodal import CAPTION_TEMPLATE, P_GENERATE

        info, m = self.info, self.cfg.model
        if not info.tokenizer_path:
            return {}
        meta = {
            "tokenizer": "tokenizer.json",
            "eot_id": info.eot_id,
            "audio": info.audio or None,
            "labels": info.labels,
            "caption_template": CAPTION_TEMPLATE,
            "mel_mean": m.mel_mean,
            "mel_std": m.mel_std,
            "p_generate": P_GENERATE,
            "sources": info.sources,
            "vae_checkpoint": info.vae_checkpoint,
            "audio_latents": info.audio_latents or None,
        }
        return {INFO_FILE: json.dumps(meta, indent=1), "tokenizer.json": fs.read_bytes(info.tokenizer_path).decode()}

    # -- evaluation artifacts --------------------------------------------------------------
    def _noise(self, device: torch.device) -> torch.Generator:
        """The diffusion head's starting noise for eval samples: the same at every evaluation
        (seeded by ``train.seed``), and the global RNG (training's) is left alone."""
        return torch.Generator(device=device).manual_seed(self.cfg.train.seed)

    @torch.no_grad()
    def eval_artifacts(self, modules: Mapping[str, torch.nn.Module], out_dir: str, step: int) -> Dict[str, Any]:
        """``image.png`` and ``mel.png`` (module docstring; image latents through ``modules["vae"]``,
        none for latents without a VAE or for audio latents) and the caption / transcription texts."""
        from megaray.data import multimodal as mm

        net, ex = unwrap(modules["model"]), self.info.examples
        layout = mm.Layout.from_model(self.cfg.model, self.info.eot_id)
        tok = mm.cached_tokenizer(self.info.tokenizer_path)
        device = next(net.parameters()).device
        texts: Dict[str, Any] = {}
        if "image" in ex:
            real = torch.from_numpy(ex["image"])[None].to(device)
            latent = any(s.get("kind") == "image_latents" for s in self.info.sources)
            if not latent or "vae" in modules:  # latents without their VAE: no picture, the caption still
                prompt = _prompt(tok.encode(ex["caption"]).ids, layout.boi, layout.image_tokens, layout, device)
                pair = torch.cat([real, net.generate_image(prompt, generator=self._noise(device)).float()])
                if latent:
                    vae = unwrap(modules["vae"])
                    pair = vae.decode(pair.to(next(vae.parameters()).device) / vae.cfg.scaling_factor).float()
                from torchvision.utils import save_image

                save_image((pair.clamp(-1, 1).cpu() + 1) / 2, os.path.join(out_dir, "image.png"), nrow=2, padding=1)
            texts["caption"] = f"{ex['caption']!r} -> " + _to_text(net, tok, layout, "image", real, device)
        if "mel" in ex:
            real = torch.from_numpy(ex["mel"])[None].to(device)
            if not self.info.audio_latents:  # log-mels: plotted (audio latents: no VAE to decode them)
                from megaray.tasks.audio import plot_mels

                prompt = _prompt(tok.encode(ex["transcript"]).ids, layout.boa, layout.audio_tokens, layout, device)
                gen = net.generate_audio(prompt, generator=self._noise(device))
                denorm = [x[0].float().cpu() * layout.mel_std + layout.mel_mean for x in (real, gen)]
                a = self.info.audio
                plot_mels(
                    os.path.join(out_dir, "mel.png"),
                    [
                        (f"validation clip: {ex['transcript'][:60]!r}", denorm[0]),
                        (f"generated from its transcript (step {step})", denorm[1]),
                    ],
                    a["sample_rate"],
                    a["hop_length"],
                )
            texts["transcription"] = f"{ex['transcript']!r} -> " + _to_text(net, tok, layout, "audio", real, device)
        return texts


def _prompt(ids: List[int], opener: int, span: int, layout: Any, device: torch.device) -> torch.Tensor:
    """``(1, T0)`` text ids (truncated as the data layout does) followed by ``opener``."""
    ids = list(ids[: max(0, layout.block_size - span - 2)]) + [opener]
    return torch.tensor([ids], dtype=torch.long, device=device)


def _to_text(
    net: torch.nn.Module, tok: Any, layout: Any, name: str, content: torch.Tensor, device: torch.device
) -> str:
    """Greedy text after ``<|name|> [content] <|/name|>`` (a caption or a transcription), decoded."""
    from megaray.data.multimodal import span_prompt

    prompt = torch.tensor([span_prompt(name, layout)], dtype=torch.long, device=device)
    start = torch.ones(1, dtype=torch.long, device=device)
    out = net.generate_text(prompt, ARTIFACT_TOKENS, stop_id=layout.eot_id, **{name: content, f"{name}_start": start})
    return tok.decode(out[0, prompt.size(1) :].tolist(), skip_special_tokens=True)


def _side_info(srcs: List[Any], layout: Any) -> Dict[str, Any]:
    """The speech settings, image labels, the first validation image / clip of the mixture (read
    with pyarrow on the driver, prepared as the validation data is), the image latents' VAE
    (checked: :func:`megaray.tasks.diffusion.check_vae`) and the audio latents' shape:
    :class:`MultimodalInfo` fields."""
    from megaray.data import multimodal as mm
    from megaray.data.multimodal.checks import first_val_example, speech_settings
    from megaray.tasks.diffusion import check_vae

    out: Dict[str, Any] = {"audio": {}, "labels": [], "examples": {}, "vae_checkpoint": None, "audio_latents": {}}
    for s in srcs:
        man = s.manifest
        if s.modality == "audio" and not out["audio"]:
            out.update(speech_settings(s))
        if s.modality == "image" and not out["labels"]:
            out["labels"] = mm.label_names(man)
        if s.kind == "image_latents" and man.get("vae_checkpoint") and not out["vae_checkpoint"]:
            out["vae_checkpoint"] = check_vae(
                man["vae_checkpoint"], layout.image_channels, f"{s.shards}/manifest.json vae_checkpoint"
            )
        key = {"audio": "mel", "image": "image"}.get(s.modality)
        if key is None or key in out["examples"] or s.rows("val") == 0:
            continue
        out["examples"].update(first_val_example(s, layout))
    return out
