"""``megaray generate`` on a multimodal checkpoint: continue an interleaved prompt into text, a
log-mel (a wav through a vocoder checkpoint) or an image (a PNG, through an image-VAE checkpoint
when the model works on latents).

The prompts are the training layouts of :mod:`megaray.data.multimodal` (docs/models.md), cut
where the model takes over:

=================  ==========================================  ===============================
``--to``, input    sequence given to the model                 then
=================  ==========================================  ===============================
text -> text       ``prompt``                                  ``generate_text`` (sampled)
text -> audio      ``prompt <|audio|>``                        ``generate_audio``: a log-mel span
text -> image      ``prompt <|image|>``                        ``generate_image``: an image span
audio -> text      ``<|audio|> [span] <|/audio|> prompt``      ``generate_text``, greedy, to EOT
image -> text      ``<|image|> [span] <|/image|> prompt``      ``generate_text``, greedy, to EOT
=================  ==========================================  ===============================

Audio spans are normalised log-mels ``(log_mel - mel_mean) / mel_std`` (the config's scalars) of the
analysis settings the checkpoint's ``multimodal.json`` records (those of its speech shards); image
spans are pixels in [-1, 1], or ``scaling_factor * z`` of an image VAE when ``image_channels != 3``
(as :func:`megaray.inference.latents.encode_image_latents` writes them). Input spans are made as
the training rows are (:func:`megaray.data.multimodal.crop_mel` / ``square_image``); outputs are
decoded with the DiT path's pieces (:func:`megaray.tasks.diffusion.check_vocoder`,
:func:`megaray.tasks.audio.plot_mels`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from megaray.errors import CheckpointError, ConfigError, DataError
from megaray.tasks.multimodal import INFO_FILE

#: ``--to`` values that write a file (``--out``)
_FILE_OUTPUTS = ("audio", "image")


@dataclass
class MultimodalCheckpoint:
    """A loaded multimodal checkpoint: ``model`` (eval mode), run ``cfg``, directory ``path``,
    ``info`` (its ``multimodal.json``) and ``tokenizer`` (a ``tokenizers.Tokenizer``)."""

    model: torch.nn.Module
    cfg: Any
    path: Path
    info: Dict[str, Any]
    tokenizer: Any

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def eot_id(self) -> Optional[int]:
        """The end-of-text id that ends a transcription or caption (``multimodal.json`` ``eot_id``,
        else the tokenizer's ``<|endoftext|>``)."""
        if self.info.get("eot_id") is not None:
            return int(self.info["eot_id"])
        return self.tokenizer.token_to_id("<|endoftext|>")

    def encode(self, text: str) -> List[int]:
        return self.tokenizer.encode(text).ids if text else []

    def decode(self, ids: List[int]) -> str:
        """Text of ``ids``: boundary ids (>= the text vocabulary) dropped, special tokens skipped."""
        vocab = self.cfg.model.vocab_size
        return self.tokenizer.decode([i for i in ids if i < vocab], skip_special_tokens=True)


def checkpoint_family(checkpoint: str | os.PathLike) -> str:
    """``model.family`` of the checkpoint at ``checkpoint`` (its config only; no weights read).

    Raises:
        CheckpointError: no complete checkpoint there (see :func:`megaray.weights.resolve`).
    """
    from megaray.families import load_config
    from megaray.weights import resolve

    return load_config(resolve(checkpoint) / "config.yaml").model.family


def load_multimodal(checkpoint: str | os.PathLike, device: str) -> MultimodalCheckpoint:
    """Load a ``multimodal`` checkpoint with its ``multimodal.json`` and tokenizer.

    Raises:
        ConfigError: another family's checkpoint (names it).
        CheckpointError: no complete checkpoint, corrupt weights, no or unreadable
            ``multimodal.json`` / tokenizer, or a tokenizer whose size differs from ``model.vocab_size``.
    """
    from megaray.data.tokenizer import load_tokenizer
    from megaray.families import load_config
    from megaray.weights import load_for_inference, resolve

    ckpt = resolve(checkpoint)
    _check_family(ckpt, load_config(ckpt / "config.yaml").model.family)
    try:
        info = json.loads((ckpt / INFO_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"{ckpt / INFO_FILE}: missing or unreadable ({e}); a multimodal run writes it into "
            "every checkpoint, so this one is incomplete: use another step_* of the run"
        ) from None
    try:
        tokenizer = load_tokenizer(ckpt / info.get("tokenizer", "tokenizer.json"))
    except DataError as e:
        raise CheckpointError(f"{ckpt}: {e}") from None
    model, cfg, ckpt = load_for_inference(ckpt, device)
    if tokenizer.get_vocab_size() > cfg.model.vocab_size:
        raise CheckpointError(
            f"{ckpt}: the tokenizer has {tokenizer.get_vocab_size()} tokens but model.vocab_size "
            f"is {cfg.model.vocab_size}; the checkpoint's files do not belong together"
        )
    return MultimodalCheckpoint(model, cfg, ckpt, info, tokenizer)


def _check_family(ckpt: Path, family: str) -> None:
    if family != "multimodal":
        raise ConfigError(
            f"--checkpoint {ckpt}: a {family!r} checkpoint; --to audio|image, --audio, --image, --out, "
            "--vocoder and --vae need a multimodal one (model.family: multimodal)"
        )


def check_request(
    modalities: List[str], to: str, audio: Optional[str], image: Optional[str], out: Optional[str]
) -> str:
    """The input modality (``text``, ``audio`` or ``image``) of a request, after checking it.

    Raises:
        ConfigError: ``--audio`` and ``--image`` together; an input or ``--to`` modality the
            checkpoint was not trained on (names its modalities); audio/image in and audio/image
            out; ``--to audio|image`` without ``--out``.
        DataError: a local ``--audio`` / ``--image`` file that does not exist.
    """
    if audio and image:
        raise ConfigError("--audio and --image: give one input span per call")
    source = "audio" if audio else "image" if image else "text"
    asked = [(f"--to {to}", to)] + ([(f"--{source} {audio or image}", source)] if source != "text" else [])
    for flag, m in asked:
        if m not in modalities:
            raise ConfigError(
                f"{flag}: this checkpoint was trained on {', '.join(modalities)} (model.modalities), not {m}"
            )
    if source != "text" and to != "text":
        raise ConfigError(f"--{source} with --to {to}: a {source} prompt is transcribed or captioned; use --to text")
    if to in _FILE_OUTPUTS and not out:
        raise ConfigError(f"--to {to} needs --out PATH (" + ("a .png" if to == "image" else "a .wav") + " to write)")
    path = audio or image
    if path and "://" not in str(path) and not os.path.isfile(path):
        raise DataError(f"--{source}: file not found: {path}")
    return source


def generate(
    checkpoint: str | os.PathLike,
    *,
    to: str = "text",
    prompt: Optional[str] = None,
    out: Optional[str] = None,
    audio: Optional[str] = None,
    image: Optional[str] = None,
    vocoder: Optional[str] = None,
    vae: Optional[str] = None,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: Optional[int] = 40,
    top_p: Optional[float] = None,
    seed: int = 0,
) -> Dict[str, Any]:
    """``megaray generate`` on a multimodal checkpoint (the module docstring lists the five cases).

    Args:
        to: ``text``, ``audio`` or ``image``. prompt: the text to continue (default ``"The "``), the
            caption / transcript to draw / speak (required), or the start of a transcription or
            caption (default none). out: the file to write (audio, image).
        audio / image: an input wav (any soundfile format) / picture to transcribe / caption.
        vocoder: a ``vocoder`` checkpoint with the checkpoint's mel settings (audio out; without
            one the mel is written as ``<out stem>.npy`` plus ``<out stem>_mel.png``).
        vae: the ``image_vae`` checkpoint whose latents the model generates (``image_channels != 3``;
            default ``multimodal.json``'s ``vae_checkpoint``).
        temperature, top_k, top_p: sampling of text continuations (transcriptions and captions are
            greedy). seed: of the sampler and of the diffusion head's initial noise.

    Returns:
        ``{"to", "text"}`` for text; ``{"to", "files": [paths], "note"?}`` for audio and image.

    Raises:
        ConfigError / DataError: see :func:`check_request`; a missing or mismatched VAE or vocoder
        (names both checkpoints and the differing setting); a prompt longer than ``block_size``.
        CheckpointError: see :func:`load_multimodal`.
    """
    from megaray.families import load_config
    from megaray.weights import resolve

    ckpt_dir = resolve(checkpoint)
    mcfg = load_config(ckpt_dir / "config.yaml").model
    _check_family(ckpt_dir, mcfg.family)
    source = check_request(list(mcfg.modalities), to, audio, image, out)
    if to != "text" and not prompt:
        raise ConfigError(
            f"--to {to} needs --prompt, the "
            + ('caption to draw ("a photo of astronaut")' if to == "image" else 'transcript to speak ("hello world")')
        )
    if prompt is None:
        prompt = "The " if source == "text" else ""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mm = load_multimodal(ckpt_dir, device)
    if mm.info.get("audio_latents") and "audio" in (to, source):
        raise ConfigError(
            f"--checkpoint {mm.path}: its audio spans are audio-VAE latents, and `megaray prepare "
            "audio-latents` records no VAE that could turn a wav into them or them into a mel; "
            "speech in or out needs a run trained on log-mels (`megaray prepare audio`)"
        )
    g = torch.Generator(device=device).manual_seed(seed)
    if to == "image":
        vae_net = _image_vae(mm, vae)
        ids = _fit(mm, mm.encode(prompt) + [mm.model.BOI], mm.cfg.model.image_tokens + 1)
        return {"to": "image", "files": [write_image(mm.model.generate_image(ids, generator=g), str(out), vae_net)]}
    if to == "audio":
        ids = _fit(mm, mm.encode(prompt) + [mm.model.BOA], mm.cfg.model.audio_tokens + 1)
        x = mm.model.generate_audio(ids, generator=g)
        return {"to": "audio", **write_audio(mm, x, str(out), vocoder, title=prompt)}
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "generator": g}
    return {"to": "text", "text": _generate_text(mm, source, prompt, audio or image, vae, max_new_tokens, sampling)}


def _fit(mm: MultimodalCheckpoint, ids: List[int], room: int) -> torch.Tensor:
    """``ids`` as a ``(1, T)`` tensor on the model's device, after checking that ``room`` more
    positions fit in ``block_size``. Raises ConfigError (the prompt is too long)."""
    block = mm.cfg.model.block_size
    if len(ids) + room > block:
        raise ConfigError(
            f"--prompt: {len(ids)} tokens and the {room} positions to generate exceed "
            f"model.block_size={block}; shorten the prompt"
        )
    return torch.tensor([ids], dtype=torch.long, device=mm.device)


def _generate_text(
    mm: MultimodalCheckpoint,
    source: str,
    prompt: str,
    path: Optional[str],
    vae: Optional[str],
    max_new_tokens: int,
    sampling: Dict[str, Any],
) -> str:
    """Continue ``prompt`` (text; ``sampling``: the keyword arguments of ``generate_text``), or
    transcribe / caption the span read from ``path`` (greedy); up to the end-of-text id. Returns the
    prompt plus the generated text."""
    m = mm.model
    prefix: List[int] = []
    span: Dict[str, torch.Tensor] = {}
    if source == "audio":
        content = read_audio_span(mm, path).to(mm.device)
        prefix = [m.BOA] + [0] * mm.cfg.model.audio_tokens + [m.EOA]
        span = {"audio": content, "audio_start": torch.tensor([1], device=mm.device)}
    elif source == "image":
        content = read_image_span(mm, path, _image_vae(mm, vae)).to(mm.device)
        prefix = [m.BOI] + [0] * mm.cfg.model.image_tokens + [m.EOI]
        span = {"image": content, "image_start": torch.tensor([1], device=mm.device)}
    ids = prefix + mm.encode(prompt)
    if not ids:
        ids = [mm.eot_id if mm.eot_id is not None else 0]  # an empty text prompt starts a new document
    if source != "text":
        sampling = {"temperature": 0.0}
    out = m.generate_text(_fit(mm, ids, 1), max_new_tokens, **span, **sampling, stop_id=mm.eot_id)
    return mm.decode(out[0, len(prefix) :].tolist())


def read_audio_span(mm: MultimodalCheckpoint, path: str) -> torch.Tensor:
    """An audio file as the model's audio span ``(1, n_mels, audio_frames)``: mono at the
    checkpoint's rate, normalised as its shards were (``normalize``: peak by default), the log-mel
    of its analysis settings (:class:`megaray.models.common.dsp.MelFeatures`), then
    ``(log_mel - mel_mean) / mel_std``, cropped from the start or zero-padded to ``audio_frames``
    (:func:`megaray.data.multimodal.crop_mel`, as the validation rows of training).

    Raises:
        DataError: the file is missing or not decodable audio (named).
        CheckpointError: ``multimodal.json`` has no ``audio`` settings, or their ``n_mels`` differ
            from the model's.
    """
    from megaray.data.audio import loudness_normalize
    from megaray.data.multimodal import Layout, crop_mel
    from megaray.inference.vocode import load_wave
    from megaray.models.common.dsp import MelFeatures

    a, m = _audio_settings(mm), mm.cfg.model
    how = a.get("normalize", "peak")
    wave = load_wave(path, int(a["sample_rate"]), "peak" if how == "peak" else None)
    if how == "loudness":
        wave = loudness_normalize(wave, int(a["sample_rate"]), float(a.get("target_lufs", -23.0)))
    features = MelFeatures(
        int(a["sample_rate"]),
        int(a["n_fft"]),
        int(a["hop_length"]),
        int(a["n_mels"]),
        a.get("win_length"),
        float(a.get("f_min") or 0.0),
        a.get("f_max"),
    )
    with torch.no_grad():
        mel = features(wave[None])[0]  # (n_mels, F) natural-log magnitude
    span, _ = crop_mel(mel.numpy(), Layout.from_model(m, mm.eot_id or 0), None)  # as validation rows
    return torch.from_numpy(span)[None]


def _audio_settings(mm: MultimodalCheckpoint) -> Dict[str, Any]:
    a = mm.info.get("audio") or {}
    missing = [k for k in ("sample_rate", "n_fft", "hop_length", "n_mels") if k not in a]
    if missing:
        raise CheckpointError(
            f"{mm.path / INFO_FILE}: no audio analysis settings ({', '.join(missing)} missing); "
            "a checkpoint of a run with speech shards records them"
        )
    if int(a["n_mels"]) != mm.cfg.model.n_mels:
        raise CheckpointError(
            f"{mm.path}: {INFO_FILE} says n_mels={a['n_mels']} but model.n_mels="
            f"{mm.cfg.model.n_mels}; the checkpoint's files do not belong together"
        )
    return a


def read_image_span(mm: MultimodalCheckpoint, path: str, vae: Optional[torch.nn.Module]) -> torch.Tensor:
    """A picture as the model's image span ``(1, image_channels, image_size, image_size)``: decoded
    and converted to RGB as ``megaray prepare images`` does, its centred square resized to the
    span's size and scaled to [-1, 1] as training rows are (:func:`megaray.data.multimodal.square_image`);
    through ``vae`` (``scaling_factor * posterior mean``, at ``image_size * downsample_factor``
    pixels) when the model works on latents.

    Raises:
        DataError: the file is missing or not a decodable image (named).
    """
    import numpy as np

    from megaray import fs
    from megaray.data.image.decode import RejectedImage, open_image, to_rgb
    from megaray.data.multimodal import square_image

    size = mm.cfg.model.image_size * (int(vae.downsample_factor) if vae is not None else 1)
    try:
        hwc = np.asarray(to_rgb(open_image(fs.read_bytes(path))[0]), np.uint8)  # EXIF-oriented RGB
    except RejectedImage as e:
        raise DataError(f"--image {path}: {e}") from None
    x = torch.from_numpy(square_image(hwc.tobytes(), hwc.shape[0], hwc.shape[1], size))[None]
    if vae is not None:
        with torch.no_grad():
            x = vae.cfg.scaling_factor * vae.encode(x.to(next(vae.parameters()).device)).mean
    return x.float()


def _image_vae(mm: MultimodalCheckpoint, path: Optional[str]) -> Optional[torch.nn.Module]:
    """The image VAE that decodes / encodes the model's latents, on the model's device; None for a
    model on pixels (its sources in ``multimodal.json`` hold no ``image_latents``; files without
    source kinds: ``image_channels == 3``).

    Raises:
        ConfigError: ``--vae`` for a pixel model; no VAE for a latent model; not an ``image_vae``
            checkpoint, or its ``latent_channels`` differ from ``model.image_channels`` (names both).
    """
    from megaray.families import load_config
    from megaray.tasks.diffusion import checkpoint_dir
    from megaray.weights import load_for_inference

    channels = mm.cfg.model.image_channels
    kinds = {src.get("kind") for src in mm.info.get("sources") or []}
    latent = "image_latents" in kinds if kinds - {None} else channels != 3  # older files: by channels
    if not latent:
        if path:
            raise ConfigError(
                f"--vae {path}: the checkpoint {mm.path} generates pixels (model.image_channels=3); drop --vae"
            )
        return None
    path = path or mm.info.get("vae_checkpoint")
    if not path:
        raise ConfigError(
            f"--vae: the checkpoint {mm.path} works on image-VAE latents (model.image_channels="
            f"{channels}); pass the image_vae checkpoint they came from"
        )
    ckpt = checkpoint_dir(path, "--vae", "image VAE")
    vae = load_config(ckpt / "config.yaml").model
    if vae.family != "image_vae":
        raise ConfigError(f"--vae: {ckpt} is a {vae.family!r} checkpoint, not an image_vae one")
    if vae.latent_channels != channels:
        raise ConfigError(
            f"--vae: the VAE at {ckpt} has latent_channels={vae.latent_channels} but the checkpoint "
            f"{mm.path} has model.image_channels={channels}; pass the VAE its latents came from"
        )
    return load_for_inference(ckpt, str(mm.device))[0]


@torch.no_grad()
def write_image(x: torch.Tensor, out: str, vae: Optional[torch.nn.Module]) -> str:
    """Write a generated span ``(1, C, S, S)`` as the PNG ``out``: pixels in [-1, 1] directly, or
    ``vae.decode(x / scaling_factor)``. Returns ``out``."""
    from torchvision.utils import save_image

    if vae is not None:
        x = vae.decode(x.to(next(vae.parameters()).device) / vae.cfg.scaling_factor)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_image((x.float().clamp(-1, 1).cpu() + 1) / 2, out, padding=0)
    return out


@torch.no_grad()
def write_audio(
    mm: MultimodalCheckpoint, x: torch.Tensor, out: str, vocoder: Optional[str], title: str = ""
) -> Dict[str, Any]:
    """Write a generated audio span ``(1, n_mels, audio_frames)``: de-normalised to the log-mel
    (``x * mel_std + mel_mean``), then the wav ``out`` through ``vocoder`` (PCM 16 at the
    checkpoint's rate), or without one ``<out stem>.npy`` (float32 ``(n_mels, frames)``) and the
    plot ``<out stem>_mel.png``.

    Returns:
        ``{"files": [paths]}``, plus ``"note"`` saying how to get a wav when there was no vocoder.

    Raises:
        ConfigError: ``vocoder`` is not a vocoder checkpoint or its mel settings differ from the
            checkpoint's (names both and the setting).
    """
    import numpy as np

    from megaray.tasks.audio import plot_mels
    from megaray.tasks.diffusion import check_vocoder
    from megaray.weights import load_for_inference

    a, m = _audio_settings(mm), mm.cfg.model
    mel = x[0].float().cpu() * m.mel_std + m.mel_mean
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if vocoder:
        import soundfile as sf

        try:
            ckpt = check_vocoder(vocoder, a, "--vocoder")
        except ConfigError as e:
            raise ConfigError(f"{e} (the mels of {mm.path}, as its {INFO_FILE} records them)") from None
        net = load_for_inference(ckpt, str(mm.device))[0]
        wave, _ = net(mel[None].to(mm.device))
        sf.write(out, wave[0].float().clamp(-1, 1).cpu().numpy(), int(a["sample_rate"]))
        return {"files": [out]}
    stem = os.path.splitext(out)[0]
    np.save(stem + ".npy", mel.numpy())
    plot = plot_mels(
        stem + "_mel.png",
        [(repr(title[:60]) if title else "generated", mel)],
        int(a["sample_rate"]),
        int(a["hop_length"]),
    )
    return {
        "files": [stem + ".npy", plot],
        "note": f"no --vocoder: wrote the log-mel as {stem}.npy and its plot; pass --vocoder CKPT (a vocoder "
        "checkpoint with the same mel settings) for a wav",
    }
