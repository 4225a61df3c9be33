"""Checks and reads of a multimodal mixture's sources on the driver, before training starts.

:func:`check_audio_sources` and :func:`check_image_sources` hold every speech / image source
(:class:`megaray.data.multimodal.reader.MixSource`, from :func:`open_sources`) against the model
config (``model.n_mels``, ``image_channels``, ``image_size``) and against each other (one mel
analysis, one VAE); :func:`speech_settings` reads a speech source's analysis settings and
:func:`first_val_example` the first validation row of a source (with pyarrow, prepared as the
validation data is), for the task's evaluation artifacts.

Every failure is a :class:`megaray.errors.ConfigError` naming the source folder, the model key
and what to set or re-prepare.
"""

from __future__ import annotations

from typing import Any, Dict, List

from megaray.data.multimodal.layout import COLUMNS, Layout
from megaray.data.multimodal.reader import audio_content, image_content, read_specs
from megaray.errors import ConfigError

#: the mel analysis settings every speech source of one mixture shares
MEL_SETTINGS = ("sample_rate", "n_fft", "hop_length", "n_mels", "win_length")


def check_one_kind(sources: List[Any]) -> None:
    """ConfigError when the audio (or the image) sources mix kinds (``audio`` with
    ``audio_latents``, ``images`` with ``image_latents``): a model's spans hold one or the other."""
    for modality in ("audio", "image"):
        kinds = sorted({s.kind for s in sources if s.modality == modality})
        if len(kinds) > 1:
            raise ConfigError(
                f"data.sources: the {modality} sources mix the kinds {' and '.join(kinds)}; the "
                f"model's {modality} spans hold one or the other: drop the sources of one kind"
            )


def check_audio_sources(speech: List[Any], m: Any) -> None:
    """ConfigError unless every speech source fits ``model.n_mels`` (log-mels: their bands; audio
    latents: ``latent_channels * n_mels / down_freq`` of their VAE) and all share one analysis
    (log-mels: the mel settings; latents: the VAE config)."""
    settings = MEL_SETTINGS
    for s in speech:
        if s.kind == "audio_latents":
            vae = s.manifest.get("vae_config")
            if not vae:
                raise ConfigError(
                    f"data.sources: {s.shards} records no vae_config; prepare it with `megaray prepare "
                    f"audio-latents --vae-checkpoint CHECKPOINT --out {s.shards} --overwrite`"
                )
            frames = vae["latent_channels"] * (vae["n_mels"] // vae["down_freq"])
            if frames != m.n_mels:
                raise ConfigError(
                    f"model.n_mels ({m.n_mels}) differs from the latent frame size of {s.shards} "
                    f"(latent_channels {vae['latent_channels']} x {vae['n_mels'] // vae['down_freq']} "
                    f"bands = {frames}); set model.n_mels={frames}"
                )
            if vae != speech[0].manifest.get("vae_config"):
                raise ConfigError(
                    f"data.sources: {s.shards} and {speech[0].shards} were encoded by different audio "
                    "VAEs; encode every audio-latent source with the same one"
                )
            continue
        if s.manifest["n_mels"] != m.n_mels:
            raise ConfigError(
                f"model.n_mels ({m.n_mels}) differs from the n_mels ({s.manifest['n_mels']}) of "
                f"{s.shards}; set model.n_mels={s.manifest['n_mels']} or re-prepare the audio "
                f"with --n-mels {m.n_mels}"
            )
        if any(s.manifest.get(k) != speech[0].manifest.get(k) for k in settings):
            raise ConfigError(
                f"data.sources: {s.shards} and {speech[0].shards} were prepared with different "
                f"mel settings ({', '.join(settings)}); prepare every speech source alike"
            )


def check_image_sources(images: List[Any], m: Any) -> None:
    """ConfigError unless every image source fits the model: pixels need ``image_channels`` 3 and
    a stored size >= ``image_size``; latents need ``image_channels`` = ``latent_channels`` and
    ``image_size`` = ``latent_size``, and one VAE (checkpoint and scaling) across sources."""
    for s in images:
        man = s.manifest
        if s.kind == "image_latents":
            for key, latent in (("image_channels", "latent_channels"), ("image_size", "latent_size")):
                if getattr(m, key) != int(man[latent]):
                    raise ConfigError(
                        f"model.{key} ({getattr(m, key)}) differs from the {latent} ({man[latent]}) "
                        f"of the image latents {s.shards}; set model.{key}={man[latent]}"
                    )
            first = images[0].manifest
            if any(man.get(k) != first.get(k) for k in ("vae_checkpoint", "scaling_factor", "vae_config")):
                raise ConfigError(
                    f"data.sources: {s.shards} and {images[0].shards} were encoded by different image "
                    "VAEs (vae_checkpoint, scaling_factor); encode every image-latent source with one"
                )
            continue
        if m.image_channels != 3:
            raise ConfigError(
                f"model.image_channels ({m.image_channels}): image shards ({s.shards}) hold RGB "
                "pixels; set model.image_channels=3"
            )
        if int(man["size"]) < m.image_size:
            raise ConfigError(
                f"model.image_size ({m.image_size}) exceeds the size {man['size']} px "
                f"{s.shards} was prepared at; run `megaray prepare images --source SOURCE --out "
                f"{s.shards} --size {m.image_size} --overwrite` or lower model.image_size"
            )


def speech_settings(source: Any) -> Dict[str, Any]:
    """``{"audio": {mel setting: value}, "audio_latents": {...}}`` of a speech ``source``: its
    :data:`MEL_SETTINGS` (None where the manifest lacks one) and, for ``audio_latents``, the
    latent shape (``latent_channels``, ``bands`` = ``n_mels // down_freq``, ``down_time``) of its
    VAE; ``audio_latents`` is ``{}`` for log-mel sources."""
    man = source.manifest
    latents: Dict[str, Any] = {}
    if source.kind == "audio_latents":
        vae = man["vae_config"]
        latents = {
            "latent_channels": vae["latent_channels"],
            "bands": vae["n_mels"] // vae["down_freq"],
            "down_time": vae["down_time"],
        }
    return {"audio": {k: man.get(k) for k in MEL_SETTINGS}, "audio_latents": latents}


def first_val_example(source: Any, layout: Layout) -> Dict[str, Any]:
    """The first validation row of an audio or image ``source`` as artifact inputs: audio ->
    ``{"mel": (n_mels, audio_frames) float32 content, "transcript": str}``; image ->
    ``{"image": content as the model takes it, "caption": str}``. Read with pyarrow (one row of
    :data:`COLUMNS`), prepared as :func:`audio_content` / :func:`image_content` prepare the
    validation data. The caller checks ``source.rows("val") > 0`` first."""
    import pyarrow.dataset as pads

    from megaray.data.shards import split_files

    filesystem, paths, _ = split_files(source.shards, source.manifest, "val")
    row = pads.dataset(paths, filesystem=filesystem, format="parquet").head(1, columns=COLUMNS[source.kind])
    cols = {k: [v] for k, v in row.to_pylist()[0].items()}
    if source.modality == "audio":
        return {"mel": audio_content(source.kind, cols, 0, layout, None)[0], "transcript": cols["text"][0]}
    caption, image = image_content(read_specs([source], "val")[0], cols, 0, layout)
    return {"image": image, "caption": caption}
