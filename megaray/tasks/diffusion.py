"""What the two DiT tasks share (``model.family: dit``): a DiT trained as a denoising diffusion model.

A dit run trains on one of two kinds of shards, told apart by their manifest's ``kind``; each kind
is its own task, and :func:`megaray.tasks.dit.dit_task` (the family's task) picks it:

* ``image_latents`` (``megaray prepare image-latents``): :class:`~megaray.tasks.image_diffusion.ImageDiffusionTask`,
  ``scaling_factor * z`` of a frozen image VAE, class- or caption-conditioned; eval samples are
  decoded by that VAE into a PNG grid.
* ``audio`` (``megaray prepare audio``): :class:`~megaray.tasks.mel_diffusion.MelDiffusionTask`,
  log-mels of whole clips as 1-channel images, text-conditioned on the clips' transcripts; eval
  samples are a mel PNG and, with ``diffusion.vocoder_checkpoint``, wav files.

Here: the base :class:`DiffusionTask` (the loss, the evaluation, the text conditioning, the
checkpoint's ``diffusion.json``), the text encoders (:class:`TextEncoder`), the checks of the
frozen networks that decode samples (:func:`check_vae`, :func:`check_vocoder`, also used by the
multimodal family) and :func:`sample`.

Loss: :meth:`GaussianDiffusion.training_losses` (Ho et al. 2020; learned sigma as Nichol &
Dhariwal 2021). Evaluation: ``val_loss`` at fixed timesteps and noise; samples by DDIM (Song et
al. 2021) with classifier-free guidance (Ho & Salimans 2022) from the same noise at every eval.
The sampling and rendering here (:func:`sample`, :meth:`DiffusionTask.render`) are what
``megaray sample`` uses.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from megaray.config import ConfigError, RunConfig
from megaray.errors import CheckpointError
from megaray.tasks.base import Task, TaskInfo, unwrap

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
    """DiT training, whatever the shards: the diffusion loss, ``val_loss`` at fixed noise, the
    text conditioning, eval samples and the checkpoint's ``diffusion.json``.

    A subclass trains on one ``kind`` of shards: it reads and checks them (:meth:`_datasets`,
    :meth:`train_stream`), collates their batches to ``{"x": (B, C, H, W), ...}``, names the
    frozen networks that decode its samples (:meth:`decoders`) and writes them (:meth:`render`).
    """

    info_class = DiffusionInfo
    #: the manifest ``kind`` of the shards this task trains on (``image_latents``, ``audio``)
    kind: str = ""

    def __init__(self, cfg: RunConfig, info: Optional[TaskInfo] = None):
        super().__init__(cfg, info)
        from megaray.models.diffusion.process import GaussianDiffusion

        self.diffusion = GaussianDiffusion.from_config(cfg.model)
        self.text = TextEncoder(cfg)

    # -- data ------------------------------------------------------------------------------
    def datasets(self) -> Dict[str, Any]:
        """The train and val splits of ``data.shards`` (:meth:`_datasets`), after checking the
        shards are of this task's kind. Raises ConfigError (several sources, another kind)."""
        from megaray.data.manifest import read_manifest

        shards = self.shards()
        man = read_manifest(shards)
        if man.get("kind") != self.kind:
            raise ConfigError(
                f"data.shards: {shards} holds {man.get('kind')!r} data, not the {self.kind!r} data of a "
                f"{type(self).__name__}; a dit run trains on image latents (`megaray prepare image-latents`) "
                f"or audio (`megaray prepare audio`)"
            )
        return self._datasets(shards, man)

    def shards(self) -> str:
        """``data.shards``: the one shard set of a diffusion run. Raises ConfigError for several."""
        sources = self.cfg.data.resolved_sources()
        if len(sources) > 1:
            raise ConfigError("data.sources: a diffusion run trains on one shard set; give data.shards")
        return sources[0].shards

    def _datasets(self, shards: str, man: Dict[str, Any]) -> Dict[str, Any]:
        """``{"train", "val"}`` Ray Datasets of ``shards`` (manifest ``man``), after checking them
        against the model; fills :attr:`info`."""
        raise NotImplementedError

    def _set_info(self, man: Dict[str, Any], n_train: int, n_val: int, shards: str, **kw: Any) -> None:
        self.info = DiffusionInfo(
            **self.batch_plan(n_train, n_val, shards, "examples"), manifest=man, kind=self.kind, **kw
        )

    def _check_text_model(self) -> None:
        """The byte-level text encoder needs the DiT's token table (>= 257 ids). Raises ConfigError."""
        m = self.cfg.model
        if self.cfg.diffusion.text_encoder == "bytes" and m.text_vocab_size < 257:
            raise ConfigError(
                f"model.text_vocab_size ({m.text_vocab_size}): byte-level text needs >= 257 "
                "(256 bytes + padding) and model.context_dim > 0"
            )

    def checkpoint_files(self) -> Dict[str, str]:
        """``diffusion.json``: what ``megaray sample`` needs besides the weights (the shards' kind,
        class names, latent scaling, the VAE, mel settings, eval transcripts)."""
        keep = ("kind", "labels", "vae_checkpoint", "scaling_factor", "texts", "mel")
        return {INFO_FILE: json.dumps({k: getattr(self.info, k) for k in keep}, indent=1)}

    # -- modules ---------------------------------------------------------------------------
    def decoders(self) -> Dict[str, torch.nn.Module]:
        """The frozen networks that turn samples into images or sound (:func:`load_frozen`;
        checkpoint directories checked on the driver): none here."""
        return {}

    def frozen_modules(self) -> Dict[str, torch.nn.Module]:
        """:meth:`decoders` and, with ``model.context_dim``, a GPT / T5 text encoder."""
        out = self.decoders()
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

    # -- samples ---------------------------------------------------------------------------
    def eval_conditioning(self, n: int) -> Dict[str, Any]:
        """What the ``n`` eval samples are drawn for (:func:`sample`'s ``cond``): the first
        validation transcripts or captions in turn."""
        texts = self.info.texts or [""]
        return {"texts": [texts[i % len(texts)] for i in range(n)]}

    @torch.no_grad()
    def eval_artifacts(self, modules: Mapping[str, torch.nn.Module], out_dir: str, step: int) -> Dict[str, Any]:
        """``diffusion.n_samples`` samples for :meth:`eval_conditioning`, written by
        :meth:`render` under ``out_dir`` (``samples*``), all from the same noise
        (``diffusion.sample_seed``) at every evaluation."""
        d = self.cfg.diffusion
        net = unwrap(modules["model"])
        was = net.training
        net.eval()
        cond = self.eval_conditioning(d.n_samples)
        x = sample(self, net, d.n_samples, cond, d.cfg_scale, d.sample_steps, d.sample_seed)
        files = self.render(x, modules, os.path.join(out_dir, "samples"), titles=cond.get("texts"), step=step)
        net.train(was)
        return {"samples": ", ".join(os.path.basename(f) for f in files)}

    def render(
        self,
        x: torch.Tensor,
        modules: Mapping[str, torch.nn.Module],
        prefix: str,
        titles: Optional[List[str]] = None,
        step: Optional[int] = None,
    ) -> List[str]:
        """Write samples ``x`` ``(n, C, H, W)`` as files named from ``prefix``, decoded by the
        networks of :meth:`decoders` found in ``modules``; ``titles`` / ``step`` label them.
        Returns the paths written."""
        raise NotImplementedError


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
