"""DiffusionTask: a DiT trained as a denoising diffusion model (``model.family: dit``).

Two kinds of shards, told apart by their manifest's ``kind``:

* ``image_latents`` (``megaray prepare image-latents``): ``scaling_factor * z`` of a frozen image
  VAE, class-conditioned (the DiT drops labels to the null class with ``class_dropout_prob``,
  for classifier-free guidance), or text-conditioned on the images' captions when
  ``model.context_dim > 0`` (the same text encoders and cross-attention as mels; captions are
  dropped with ``class_dropout_prob``); eval samples are decoded by that VAE into a PNG grid.
* ``audio`` (``megaray prepare audio``): log-mels of whole clips, cropped from their start (or
  padded) to ``model.input_size = [n_mels, frames]`` and normalised with ``diffusion.mel_mean /
  mel_std``, seen as 1-channel images, text-conditioned on the clips' transcripts (byte ids through
  the DiT's learned embedding, or a frozen GPT / T5 encoder: :class:`TextEncoder`); eval samples
  are a mel PNG and, with ``diffusion.vocoder_checkpoint``, wav files.

Loss: :meth:`GaussianDiffusion.training_losses` (Ho et al. 2020; learned sigma as Nichol &
Dhariwal 2021). Evaluation: ``val_loss`` at fixed timesteps and noise; samples by DDIM (Song et
al. 2021) with classifier-free guidance (Ho & Salimans 2022) from the same noise at every eval.
The sampling and rendering here (:func:`sample`, :func:`render`) are what ``megaray sample`` uses.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from megaray.config import ConfigError, RunConfig
from megaray.errors import CheckpointError
from megaray.tasks.base import Task, TaskInfo, unwrap

KINDS = ("image_latents", "audio")
#: written into every checkpoint (:meth:`DiffusionTask.checkpoint_files`), read by ``megaray sample``
INFO_FILE = "diffusion.json"


@dataclass
class DiffusionInfo(TaskInfo):
    """:class:`TaskInfo` of a diffusion run.

    Attributes:
        kind: the shards' kind (``image_latents`` or ``audio``).
        labels: ``{class name: id}`` (image latents).
        vae_checkpoint / vocoder_checkpoint: the checkpoint directories of the frozen image VAE
            and vocoder that decode samples (found and checked on the driver).
        scaling_factor: latents are ``scaling_factor * z``; decode ``latent / scaling_factor``.
        texts: transcripts (mels) or captions (text-conditioned image latents) of the eval
            samples: the first validation examples'.
        mel: ``{sample_rate, n_mels, n_fft, hop_length}`` of audio shards.
    """

    kind: str = ""
    labels: Dict[str, int] = field(default_factory=dict)
    vae_checkpoint: Optional[str] = None
    vocoder_checkpoint: Optional[str] = None
    scaling_factor: float = 1.0
    texts: List[str] = field(default_factory=list)
    mel: Dict[str, int] = field(default_factory=dict)


def checkpoint_dir(path: str, key: str, what: str) -> Path:
    """The absolute complete checkpoint directory at ``path`` (:func:`megaray.weights.resolve`:
    the directory itself or the latest ``step_*`` below a run directory). Raises ConfigError
    naming ``key``, ``path`` and what was expected."""
    from megaray.weights import resolve

    try:
        return resolve(Path(path).expanduser().resolve())  # absolute: workers run in Ray's working directory
    except CheckpointError as e:
        raise ConfigError(f"{key}: {path}: no {what} checkpoint there ({e})") from None


def load_frozen(ckpt: str) -> torch.nn.Module:
    """The network of checkpoint ``ckpt`` in eval mode on the CPU, with the weights
    :func:`megaray.weights.load_for_inference` picks (``ema.pt`` when kept, else ``model.pt``):
    a frozen VAE, vocoder or text encoder of a diffusion run."""
    from megaray.weights import load_for_inference

    return load_for_inference(ckpt)[0]


def check_vae(path: Optional[str], in_channels: int, key: str = "diffusion.vae_checkpoint") -> str:
    """The checkpoint directory of the image VAE at ``path``, after checking (config only, no
    weights) that it is an ``image_vae`` whose ``latent_channels`` equal the DiT's ``in_channels``.

    Raises:
        ConfigError: ``path`` unset or not a checkpoint, another family, or a channel mismatch;
            the message names ``key``, the path and both values.
    """
    from megaray.families import load_config

    if not path:
        raise ConfigError(
            f"{key}: a run on image latents needs the image VAE checkpoint that decodes them; set "
            "it (or prepare the latents with `megaray prepare image-latents --vae-checkpoint VAE_RUN "
            "--source IMAGES --out DIR`)"
        )
    ckpt = checkpoint_dir(path, key, "image VAE")
    vae = load_config(ckpt / "config.yaml").model
    if vae.family != "image_vae":
        raise ConfigError(f"{key}: {ckpt} is a {vae.family!r} checkpoint, not an image_vae one")
    if vae.latent_channels != in_channels:
        raise ConfigError(
            f"model.in_channels ({in_channels}) differs from the latent_channels "
            f"({vae.latent_channels}) of the VAE at {ckpt} ({key}); set model.in_channels="
            f"{vae.latent_channels} or use a VAE with {in_channels} latent channels"
        )
    return str(ckpt)


def check_vocoder(path: str, mel: Mapping[str, Any], key: str) -> str:
    """The checkpoint directory of the vocoder at ``path`` after checking (config only) that it
    is a ``vocoder`` with the mel settings ``mel`` (``sample_rate``, ``n_mels``, ``n_fft``,
    ``hop_length``). Raises ConfigError naming ``key``, the path and the differing setting."""
    from megaray.families import load_config

    ckpt = checkpoint_dir(path, key, "vocoder")
    voc = load_config(ckpt / "config.yaml").model
    if voc.family != "vocoder":
        raise ConfigError(f"{key}: {ckpt} is a {voc.family!r} checkpoint, not a vocoder")
    for k in ("sample_rate", "n_mels", "n_fft", "hop_length"):
        if k in mel and getattr(voc, k) != mel[k]:
            raise ConfigError(
                f"{key}: the vocoder at {ckpt} has {k}={getattr(voc, k)} but the mels have "
                f"{k}={mel[k]}; use a vocoder trained on the same mel settings"
            )
    return str(ckpt)


class TextEncoder:
    """Transcripts -> the DiT's text context (``diffusion.text_encoder``).

    ``bytes``: the batch's byte ids pass through (the DiT embeds them: ``model.text_vocab_size``).
    ``gpt``: the final-norm hidden states ``(B, L, n_embd)`` of a frozen megaray GPT checkpoint
    (tokens from its ``tokenizer.json``). ``t5``: ``last_hidden_state`` of a local Hugging Face
    T5 encoder directory (``transformers.T5EncoderModel``). The feature width must equal
    ``model.context_dim``.
    """

    def __init__(self, cfg: RunConfig):
        self.kind, self.max_len = cfg.diffusion.text_encoder, cfg.diffusion.text_max_len
        self.path, self.net, self.tokenize = cfg.diffusion.text_encoder_path, None, None

    def load(self) -> Optional[torch.nn.Module]:
        """Build the frozen encoder (None for ``bytes``). Raises ConfigError for a bad path."""
        if self.kind == "bytes":
            return None
        if not self.path:
            raise ConfigError(f"diffusion.text_encoder_path: text_encoder {self.kind!r} needs a path")
        if self.kind == "gpt":
            from tokenizers import Tokenizer

            ckpt = checkpoint_dir(self.path, "diffusion.text_encoder_path", "GPT")
            self.net = load_frozen(str(ckpt))
            tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
            self.tokenize = lambda texts: [e.ids[: self.max_len] or [0] for e in tok.encode_batch(texts)]
        else:
            if not os.path.isdir(self.path):
                raise ConfigError(f"diffusion.text_encoder_path: {self.path} is not a local T5 directory")
            from transformers import AutoTokenizer, T5EncoderModel

            self.net = T5EncoderModel.from_pretrained(self.path).eval()
            tok = AutoTokenizer.from_pretrained(self.path)
            self.tokenize = lambda texts: [ids[: self.max_len] for ids in tok(texts)["input_ids"]]
        return self.net

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Byte ids ``(B, L)`` and mask -> ``(context, context_mask)`` for the DiT."""
        if self.kind == "bytes":
            return ids, mask
        texts = [bytes((row[m] - 1).tolist()).decode("utf-8", "replace") for row, m in zip(ids.cpu(), mask.cpu())]
        toks = self.tokenize(texts)
        L, dev = max(len(t) for t in toks), ids.device
        tid = torch.zeros(len(toks), L, dtype=torch.long, device=dev)
        tmask = torch.zeros(len(toks), L, dtype=torch.bool, device=dev)
        for i, t in enumerate(toks):
            tid[i, : len(t)], tmask[i, : len(t)] = torch.tensor(t, device=dev), True
        if self.kind == "t5":
            return self.net(input_ids=tid, attention_mask=tmask.long()).last_hidden_state.float(), tmask
        states = {}
        hook = self.net.transformer.ln_f.register_forward_hook(lambda m, i, o: states.update(h=o))
        try:
            self.net(tid)
        finally:
            hook.remove()
        return states["h"].float(), tmask


class DiffusionTask(Task):
    """DiT training on image latents (class-conditioned) or log-mels (text-conditioned)."""

    info_class = DiffusionInfo

    def __init__(self, cfg: RunConfig, info: Optional[TaskInfo] = None):
        super().__init__(cfg, info)
        from megaray.models.diffusion.process import GaussianDiffusion

        self.diffusion = GaussianDiffusion.from_config(cfg.model)
        self.text = TextEncoder(cfg)

    # -- data ------------------------------------------------------------------------------
    def datasets(self) -> Dict[str, Any]:
        from megaray.data.manifest import read_manifest

        sources = self.cfg.data.resolved_sources()
        if len(sources) > 1:
            raise ConfigError("data.sources: a diffusion run trains on one shard set; give data.shards")
        shards = sources[0].shards
        man = read_manifest(shards)
        if man.get("kind") not in KINDS:
            raise ConfigError(
                f"data.shards: {shards} holds {man.get('kind')!r} data; a dit run trains on "
                f"image latents (`megaray prepare image-latents`) or audio (`megaray prepare audio`)"
            )
        return self._latent_datasets(shards, man) if man["kind"] == "image_latents" else self._mel_datasets(shards, man)

    def _latent_datasets(self, shards: str, man: Dict[str, Any]) -> Dict[str, Any]:
        m = self.cfg.model
        if m.in_channels != man["latent_channels"]:
            raise ConfigError(
                f"model.in_channels ({m.in_channels}) differs from the latent_channels "
                f"({man['latent_channels']}) of {shards}; set model.in_channels={man['latent_channels']}"
            )
        if m.grid_input != (man["latent_size"],) * 2:
            raise ConfigError(
                f"model.input_size ({m.input_size}) differs from the latent_size ({man['latent_size']}) "
                f"of {shards}; set model.input_size={man['latent_size']}"
            )
        text = bool(m.context_dim)
        if text:
            self._check_text_model()
            if "captions" not in man:
                raise ConfigError(
                    f"model.context_dim ({m.context_dim}) makes a text-to-image DiT, but {shards} was "
                    "prepared without a caption column (an older megaray); re-run `megaray prepare "
                    "image-latents`, or set model.context_dim=0 for class conditioning"
                )
        elif m.num_classes < len(man["labels"]):
            raise ConfigError(
                f"model.num_classes ({m.num_classes}) is smaller than the {len(man['labels'])} labels "
                f"of {shards}; set model.num_classes={len(man['labels'])}"
            )
        key = (
            "diffusion.vae_checkpoint"
            if self.cfg.diffusion.vae_checkpoint
            else f"{shards}/manifest.json vae_checkpoint"
        )
        vae = check_vae(self.cfg.diffusion.vae_checkpoint or man.get("vae_checkpoint"), m.in_channels, key)
        n_train, n_val = man["splits"]["train"]["latents"], man["splits"]["val"]["latents"]
        texts = _first_captions(shards, man, self.cfg.diffusion.n_samples, _names(man)) if text else []
        self._set_info(
            man,
            n_train,
            n_val,
            shards,
            kind="image_latents",
            labels=man["labels"],
            vae_checkpoint=vae,
            scaling_factor=float(man["scaling_factor"]),
            texts=texts,
        )
        shape = (m.in_channels, man["latent_size"], man["latent_size"])
        max_len = self.cfg.diffusion.text_max_len if text else None
        return {
            s: _latent_split(shards, man, s, shape, self.cfg.data.on_corrupt, max_len, _names(man))
            for s in ("train", "val")
        }

    def _check_text_model(self) -> None:
        """The byte-level text encoder needs the DiT's token table (>= 257 ids). Raises ConfigError."""
        m = self.cfg.model
        if self.cfg.diffusion.text_encoder == "bytes" and m.text_vocab_size < 257:
            raise ConfigError(
                f"model.text_vocab_size ({m.text_vocab_size}): byte-level text needs >= 257 "
                "(256 bytes + padding) and model.context_dim > 0"
            )

    def _mel_datasets(self, shards: str, man: Dict[str, Any]) -> Dict[str, Any]:
        from megaray.data.audio import audio_datasets, load_examples

        m, d = self.cfg.model, self.cfg.diffusion
        n_mels, frames = m.grid_input
        if m.in_channels != 1 or n_mels != man["n_mels"]:
            raise ConfigError(
                f"model.input_size / in_channels: a mel DiT takes (1, n_mels, frames) inputs; {shards} "
                f"has n_mels={man['n_mels']}, so set model.in_channels=1 and model.input_size="
                f"[{man['n_mels']}, FRAMES] (got in_channels={m.in_channels}, input_size={m.input_size})"
            )
        self._check_text_model()
        vocoder = d.vocoder_checkpoint and check_vocoder(d.vocoder_checkpoint, man, "diffusion.vocoder_checkpoint")
        n_train, n_val = man["splits"]["train"]["clips"], man["splits"]["val"]["clips"]
        # tiny val sets: every clip several times, so each rank gets a full batch
        repeats = max(1, math.ceil(self.cfg.scaling.max_workers * self.cfg.data.batch_size / max(1, n_val)))
        texts = [ex["text"] for ex in load_examples(shards, "val", d.n_samples)]
        self._set_info(
            man,
            n_train,
            n_val * repeats,
            shards,
            kind="audio",
            texts=texts,
            vocoder_checkpoint=vocoder,
            mel={k: int(man[k]) for k in ("sample_rate", "n_mels", "n_fft", "hop_length")},
        )
        return audio_datasets(
            shards,
            (frames - 1) * int(man["hop_length"]),
            seed=self.cfg.train.seed,
            from_start=True,
            text_max_len=d.text_max_len,
            val_repeats=repeats,
            on_corrupt=self.cfg.data.on_corrupt,
        )

    def _set_info(self, man: Dict[str, Any], n_train: int, n_val: int, shards: str, **kw: Any) -> None:
        self.info = DiffusionInfo(**self.batch_plan(n_train, n_val, shards, "examples"), manifest=man, **kw)

    def train_stream(self, epoch: int, cursor: int, plan: Any) -> Any:
        """The training examples in the world-independent served order of :mod:`megaray.data.rows`
        from sample ``cursor`` of ``epoch`` on: image latents (``latent``, ``label``, as
        :func:`_latent_split`) or mels cropped from the clip's start with their transcripts' byte
        ids (:func:`megaray.tasks.audio.crop_stream`); blocks of ``plan.micro_batch`` rows."""
        from megaray.data import rows

        man, t = self.info.manifest, self.cfg.train
        if self.info.kind == "audio":
            from megaray.tasks.audio import crop_stream

            frames = self.cfg.model.grid_input[1]
            return crop_stream(
                self.cfg,
                man,
                plan,
                epoch,
                cursor,
                segment=(frames - 1) * int(man["hop_length"]),
                from_start=True,
                text_max_len=self.cfg.diffusion.text_max_len,
            )
        text = bool(self.cfg.model.context_dim)
        shards, cols = self.cfg.data.resolved_sources()[0].shards, ["latent", "label"] + (["caption"] if text else [])
        filesystem, items, schema, hint = rows.split_items(shards, man, "train", cols)
        ds = rows.positioned_rows(
            filesystem,
            items,
            cols,
            schema,
            seed=t.seed,
            shuffle_block=self.cfg.data.shuffle_block,
            plan=plan,
            epoch=epoch,
            cursor=cursor,
            last_epoch=rows.last_epoch(t.max_steps, epoch, plan),
            on_corrupt=self.cfg.data.on_corrupt,
            hint=hint,
        )
        shape = (self.cfg.model.in_channels, int(man["latent_size"]), int(man["latent_size"]))
        return rows.map_positioned(
            ds,
            _reshape_latents,
            plan.micro_batch,
            fn_kwargs={
                "shape": shape,
                "text_max_len": self.cfg.diffusion.text_max_len if text else None,
                "names": _names(man),
            },
        )

    def checkpoint_files(self) -> Dict[str, str]:
        """``diffusion.json``: what ``megaray sample`` needs besides the weights (the shards' kind,
        class names, latent scaling, the VAE, mel settings, eval transcripts)."""
        keep = ("kind", "labels", "vae_checkpoint", "scaling_factor", "texts", "mel")
        return {INFO_FILE: json.dumps({k: getattr(self.info, k) for k in keep}, indent=1)}

    def prepare_command(self, shards: str) -> Optional[str]:
        if (
            self.cfg.model.context_dim and self.cfg.model.in_channels == 1
        ):  # text-conditioned: a mel DiT on audio shards
            return f"megaray prepare audio --source espeak --out {shards} --n-mels {self.cfg.model.grid_input[0]}"
        return f"megaray prepare image-latents --vae-checkpoint VAE_RUN --source IMAGES --out {shards}"

    def collate(self, batch: Mapping[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
        """``{"x": (B, C, H, W)}`` plus ``"y"`` (class ids) and/or ``"text_ids"``/``"text_mask"``."""
        if "latent" in batch:
            out = {"x": batch["latent"].to(device).float()}
            if "text_ids" in batch:  # a text-to-image DiT
                out.update(text_ids=batch["text_ids"].to(device), text_mask=batch["text_mask"].to(device))
            if self.cfg.model.num_classes:
                out["y"] = batch["label"].to(device)
            return out
        d = self.cfg.diffusion
        x = (batch["mel"].to(device).float()[:, None] - d.mel_mean) / d.mel_std
        return {"x": x, "text_ids": batch["text_ids"].to(device), "text_mask": batch["text_mask"].to(device)}

    # -- modules ---------------------------------------------------------------------------
    def frozen_modules(self) -> Dict[str, torch.nn.Module]:
        """The image VAE (image latents), the vocoder (``diffusion.vocoder_checkpoint``) and a GPT
        / T5 text encoder (:func:`load_frozen`; checkpoint directories checked on the driver)."""
        out: Dict[str, torch.nn.Module] = {}
        if self.info.kind == "image_latents":
            out["vae"] = load_frozen(self.info.vae_checkpoint)
        elif self.info.vocoder_checkpoint:
            out["vocoder"] = load_frozen(self.info.vocoder_checkpoint)
        text = self.text.load() if self.cfg.model.context_dim else None
        if text is not None:
            out["text_encoder"] = text
        return out

    # -- step ------------------------------------------------------------------------------
    def conditioning(self, batch: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The DiT's keyword arguments of a collated batch: ``y`` and/or ``context``/``context_mask``."""
        out: Dict[str, torch.Tensor] = {"y": batch["y"]} if "y" in batch else {}
        if "text_ids" in batch:
            out["context"], out["context_mask"] = self.text(batch["text_ids"], batch["text_mask"])
        return out

    def loss(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, float]]:
        cond = self.conditioning(batch)
        return self.diffusion.training_losses(lambda xt, t: model(xt, t, **cond), batch["x"])

    @torch.no_grad()
    def eval_step(self, modules: Mapping[str, Any], batch: Mapping[str, torch.Tensor]) -> Dict[str, float]:
        """``val_loss`` (and its terms) at timesteps and noise drawn from ``diffusion.sample_seed``
        alone, so every evaluation scores the same noisy inputs."""
        x = batch["x"]
        g = torch.Generator(device=x.device).manual_seed(self.cfg.diffusion.sample_seed)
        t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), generator=g, device=x.device)
        noise = torch.randn(x.shape, generator=g, device=x.device)
        cond, net = self.conditioning(batch), modules["model"]
        loss, metrics = self.diffusion.training_losses(lambda xt, tt: net(xt, tt, **cond), x, t=t, noise=noise)
        return {"val_loss": float(loss), **{f"val_{k}": float(v) for k, v in metrics.items()}}

    @torch.no_grad()
    def eval_artifacts(self, modules: Mapping[str, torch.nn.Module], out_dir: str, step: int) -> Dict[str, Any]:
        """``samples.png`` (a grid decoded by the VAE; one sample per class in turn) or
        ``samples_mel.png`` (+ ``samplesN.wav`` with a vocoder; the first validation transcripts in turn),
        all from the same noise (``diffusion.sample_seed``) at every evaluation."""
        d, info = self.cfg.diffusion, self.info
        net = unwrap(modules["model"])
        was = net.training
        net.eval()
        n = d.n_samples
        if info.kind == "image_latents" and not self.cfg.model.context_dim:
            cond: Dict[str, Any] = {"y": torch.arange(n) % max(1, len(info.labels) or self.cfg.model.num_classes)}
        else:
            texts = info.texts or [""]
            cond = {"texts": [texts[i % len(texts)] for i in range(n)]}
        x = sample(self, net, n, cond, d.cfg_scale, d.sample_steps, d.sample_seed)
        files = render(self, x, modules, os.path.join(out_dir, "samples"), titles=cond.get("texts"), step=step)
        net.train(was)
        return {"samples": ", ".join(os.path.basename(f) for f in files)}


def _names(man: Dict[str, Any]) -> Dict[int, str]:
    """``{label id: class name}`` of a latent manifest (the captions' fallback)."""
    return {int(i): str(name) for name, i in man.get("labels", {}).items()}


def captions_of(b: Mapping[str, Any], names: Mapping[int, str]) -> List[str]:
    """The rows' captions; a row without one gets the multimodal family's template with its class
    name (``"a photo of astronaut"``, :data:`megaray.data.multimodal.CAPTION_TEMPLATE`), as
    scikit-image's photographs and class folders carry labels, not captions."""
    from megaray.data.multimodal import CAPTION_TEMPLATE

    return [
        str(c) or CAPTION_TEMPLATE.format(label=names.get(int(y), str(int(y))))
        for c, y in zip(b["caption"], b["label"])
    ]


def _latent_split(
    shards: str,
    man: Dict[str, Any],
    split: str,
    shape: Sequence[int],
    on_corrupt: str,
    text_max_len: Optional[int] = None,
    names: Optional[Dict[int, str]] = None,
) -> Any:
    """Ray Dataset of one split of image latents: ``latent`` float32 ``shape``, ``label`` int64
    (and the captions' byte ids with ``text_max_len``: :func:`_reshape_latents`); rows in file
    order (one block per row group: exact resume)."""
    from megaray.data.shards import read_split

    cols = ["latent", "label"] + (["caption"] if text_max_len else [])
    ds = read_split(shards, man, split, cols, on_corrupt)
    return ds.map_batches(
        _reshape_latents,
        batch_format="numpy",
        fn_kwargs={"shape": tuple(shape), "text_max_len": text_max_len, "names": names or {}},
    )


def _reshape_latents(
    b: Dict[str, np.ndarray],
    *,
    shape: Sequence[int],
    text_max_len: Optional[int] = None,
    names: Optional[Mapping[int, str]] = None,
) -> Dict[str, np.ndarray]:
    """Stored rows -> ``latent`` float32 ``(n, *shape)`` (row-major ``C*h*w``), ``label`` int64 ``(n,)``;
    with ``text_max_len``, the captions as ``text_ids`` int64 / ``text_mask`` bool ``(n, text_max_len)``
    (:func:`megaray.data.audio.datasets.text_bytes`, as a mel DiT's transcripts; :func:`captions_of`)."""
    out = {
        "latent": np.stack([np.asarray(v, np.float32).reshape(shape) for v in b["latent"]]).reshape(-1, *shape),
        "label": np.asarray(b["label"], np.int64),
    }
    if text_max_len:
        from megaray.data.audio.datasets import text_bytes

        out["text_ids"], out["text_mask"] = text_bytes(captions_of(b, names or {}), text_max_len)
    return out


def _first_captions(shards: str, man: Dict[str, Any], n: int, names: Mapping[int, str]) -> List[str]:
    """The captions of the first ``n`` validation latents (the eval samples' prompts), read with
    pyarrow (no Ray); the train split's when val is empty."""
    import pyarrow.parquet as pq

    from megaray.data.shards import split_files

    for split in ("val", "train"):
        out: List[str] = []
        filesystem, paths, _ = split_files(shards, man, split)
        for path in paths:
            with filesystem.open_input_file(path) as f:
                out += captions_of(pq.read_table(f, columns=["caption", "label"]).to_pydict(), names)
            if len(out) >= n:
                break
        if out:
            return out[:n]
    return []


@torch.no_grad()
def sample(
    task: DiffusionTask, net: torch.nn.Module, n: int, cond: Dict[str, Any], scale: float, steps: int, seed: int
) -> torch.Tensor:
    """``n`` DDIM samples ``(n, C, H, W)`` with classifier-free guidance ``scale`` (1 = none).

    ``cond``: ``{"y": (n,) class ids}`` or ``{"texts": [n strings]}``. The noise comes from a
    generator seeded with ``seed`` (the global RNG is left alone, so training is unaffected).
    """
    from megaray.data.audio.datasets import text_bytes
    from megaray.models.diffusion.process import cfg_model_fn

    m = task.cfg.model
    device = next(net.parameters()).device
    g = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn((n, m.in_channels, *m.grid_input), generator=g).to(device)
    if "y" in cond:  # the null class is id num_classes; text: a context with no position kept
        y = torch.as_tensor(cond["y"], device=device)
        fn = cfg_model_fn(net, y, torch.full_like(y, m.num_classes), scale)
    else:
        ids, mask = text_bytes(cond["texts"], task.cfg.diffusion.text_max_len)
        ctx, cmask = task.text(torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device))
        fn = cfg_model_fn(
            net,
            None,
            None,
            scale,
            uncond_kwargs={"context_mask": torch.zeros_like(cmask)},
            context=ctx,
            context_mask=cmask,
        )
    return task.diffusion.ddim_sample(fn, noise, steps=steps, generator=g).float()


@torch.no_grad()
def render(
    task: DiffusionTask,
    x: torch.Tensor,
    modules: Mapping[str, torch.nn.Module],
    prefix: str,
    titles: Optional[List[str]] = None,
    step: Optional[int] = None,
) -> List[str]:
    """Write samples ``x`` ``(n, C, H, W)``: image latents -> ``<prefix>.png`` (a grid of the
    VAE's decodings, ``ceil(sqrt(n))`` per row); mels -> ``<prefix>_mel.png`` and, when
    ``modules`` holds a ``vocoder``, ``<prefix>N.wav`` (PCM 16, the shards' sample rate).
    Returns the paths written."""
    info = task.info
    if info.kind == "image_latents":
        from torchvision.utils import save_image

        vae = unwrap(modules["vae"])
        dev = next(vae.parameters()).device
        images = vae.decode(x.to(dev) / info.scaling_factor).float().clamp(-1, 1).cpu()
        path = prefix + ".png"
        save_image((images + 1) / 2, path, nrow=math.ceil(math.sqrt(len(images))), padding=1)
        return [path]
    import soundfile as sf

    from megaray.tasks.audio import plot_mels

    d, sr, hop = task.cfg.diffusion, info.mel["sample_rate"], info.mel["hop_length"]
    mels = x[:, 0].cpu() * d.mel_std + d.mel_mean  # (n, n_mels, frames) log-mels
    names = titles or [f"sample {i}" for i in range(len(mels))]
    when = f" (step {step})" if step is not None else ""
    paths = [plot_mels(prefix + "_mel.png", [(f"{t[:60]!r}{when}", m) for t, m in zip(names, mels)], sr, hop)]
    if "vocoder" in modules:
        voc = unwrap(modules["vocoder"])
        dev = next(voc.parameters()).device
        for i, mel in enumerate(mels):
            wave, _ = voc(mel[None].to(dev))
            paths.append(f"{prefix}{i}.wav")
            sf.write(paths[-1], wave[0].float().clamp(-1, 1).cpu().numpy(), sr)
    return paths
