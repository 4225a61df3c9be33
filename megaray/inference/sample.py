"""``megaray sample``: draw samples from a trained DiT checkpoint (image grid, or mels and wavs).

The checkpoint's EMA weights when kept (:func:`~megaray.train.checkpoint.load_for_inference`),
its ``diffusion.json`` (what the run trained on: written by
:meth:`~megaray.tasks.diffusion.DiffusionTask.checkpoint_files`), and the sampling and rendering
the run's evaluations use (:func:`megaray.tasks.diffusion.sample` / the task's
:meth:`~megaray.tasks.diffusion.DiffusionTask.render`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

import torch

from megaray.errors import CheckpointError, ConfigError


def sample_checkpoint(
    checkpoint: str,
    output: str,
    *,
    n: int = 16,
    class_name: Optional[str] = None,
    text: Optional[str] = None,
    cfg_scale: Optional[float] = None,
    steps: Optional[int] = None,
    seed: int = 0,
    vocoder: Optional[str] = None,
) -> Dict[str, Any]:
    """Sample ``n`` images or mels from a ``dit`` checkpoint.

    Image-latent runs: ``output`` is a PNG grid of ``n`` VAE decodings (``ceil(sqrt(n))`` per
    row), of class ``class_name`` (default: the classes in turn), or, for a text-to-image DiT
    (``model.context_dim > 0``), of caption ``text`` (default: the run's evaluation captions in turn). Mel runs: ``n`` samples of
    transcript ``text`` (default: the run's evaluation transcripts in turn) as
    ``<output stem>_mel.png`` and, with a vocoder (``vocoder``, else the run's
    ``diffusion.vocoder_checkpoint``), ``<output stem>N.wav``.

    Args:
        cfg_scale / steps: classifier-free guidance scale and DDIM steps (default: the run's
            ``diffusion.cfg_scale`` / ``sample_steps``). seed: of the initial noise.

    Returns:
        ``{"files": [paths written], "kind", "n", "steps", "cfg_scale"}``.

    Raises:
        CheckpointError: no complete checkpoint, or one without ``diffusion.json``.
        ConfigError: not a ``dit`` checkpoint; an unknown ``class_name`` (the valid names are
            listed); ``class_name`` for a text-conditioned run or ``text`` for a class-conditioned one; a missing or
            mismatched VAE / vocoder.
    """
    from megaray.tasks.diffusion import INFO_FILE, DiffusionInfo, check_vae, check_vocoder, sample
    from megaray.tasks.dit import dit_task
    from megaray.train.checkpoint import load_for_inference

    device = "cuda" if torch.cuda.is_available() else "cpu"
    net, cfg, ckpt = load_for_inference(checkpoint, device)
    if cfg.model.family != "dit":
        raise ConfigError(f"--checkpoint {ckpt}: a {cfg.model.family!r} checkpoint, not a dit one")
    if not (ckpt / INFO_FILE).is_file():
        raise CheckpointError(f"{ckpt}: no {INFO_FILE} (written by every checkpoint of a dit run); re-save it")
    info = DiffusionInfo(**json.loads((ckpt / INFO_FILE).read_text()))
    task = dit_task(cfg, info)  # the image-latent or mel task, by info.kind
    d = cfg.diffusion
    scale, steps = d.cfg_scale if cfg_scale is None else cfg_scale, steps or d.sample_steps
    stem = os.path.splitext(str(output))[0]
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    modules: Dict[str, Any] = {}
    if info.kind == "image_latents" and cfg.model.context_dim:  # text-to-image
        if class_name is not None:
            raise ConfigError(
                '--class: this checkpoint is a text-to-image DiT (conditioned on captions); use --text "..."'
            )
        texts = info.texts or [""]
        cond: Dict[str, Any] = {"texts": [text] * n if text is not None else [texts[i % len(texts)] for i in range(n)]}
        modules["vae"] = load_for_inference(
            check_vae(d.vae_checkpoint or info.vae_checkpoint, cfg.model.in_channels), device
        )[0]
        encoder = task.text.load()
        if encoder is not None:
            encoder.to(device)
    elif info.kind == "image_latents":
        if text is not None:
            raise ConfigError("--text: this checkpoint is class-conditioned (image latents); use --class NAME")
        names = sorted(info.labels, key=info.labels.get)
        if class_name is not None and class_name not in info.labels:
            raise ConfigError(f"--class {class_name!r}: not a class of this run; valid names: {', '.join(names)}")
        ids = [info.labels[class_name]] * n if class_name is not None else [i % max(1, len(names)) for i in range(n)]
        cond = {"y": ids}
        vae = check_vae(d.vae_checkpoint or info.vae_checkpoint, cfg.model.in_channels)
        modules["vae"] = load_for_inference(vae, device)[0]
    else:
        if class_name is not None:
            raise ConfigError('--class: this checkpoint is a text-conditioned mel DiT; use --text "..."')
        texts = info.texts or [""]
        cond = {"texts": [text] * n if text is not None else [texts[i % len(texts)] for i in range(n)]}
        voc = vocoder or d.vocoder_checkpoint
        if voc:
            modules["vocoder"] = load_for_inference(check_vocoder(voc, info.mel, "--vocoder"), device)[0]
        encoder = task.text.load()
        if encoder is not None:
            encoder.to(device)
    x = sample(task, net, n, cond, scale, steps, seed)
    files = task.render(x, modules, stem, titles=cond.get("texts"))
    if info.kind == "image_latents" and files[0] != str(output):
        os.replace(files[0], str(output))
        files = [str(output)]
    return {"files": files, "kind": info.kind, "n": n, "steps": steps, "cfg_scale": scale}
