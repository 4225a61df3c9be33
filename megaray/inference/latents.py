"""The one latents encoder: prepared audio or images -> frozen-VAE latents, with Ray Data.

``megaray prepare audio-latents`` (:func:`encode_latents`, kind ``audio_latents``) and ``megaray
prepare image-latents`` (:func:`encode_image_latents`, kind ``image_latents``) share one
pipeline (:func:`_encode`): the rows of both splits, tagged with their split, pass once through
``map_batches`` over a pool of actors that each hold the VAE (:class:`LatentEncoder`), and each
split is written as parquet into a staged folder whose manifest is written last (published
atomically). Pre-extracted latents roughly double DiT training speed (fast-DiT), since the
VAE encoder no longer runs every step.

Lives in inference (not data) because it builds a model.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from megaray import fs
from megaray.data.manifest import new_manifest, write_manifest
from megaray.errors import DataError


def _rebuild(config: Dict[str, Any], state: Dict[str, Any]):
    """The network of a model config dict (with its ``family``) and CPU weights, on an actor."""
    from megaray import families

    cfg = families.config_class(config["family"]).model_validate(config)
    model = families.build_model(cfg)
    model.load_state_dict(state)
    return model


def _factory(vae: Any) -> Tuple[Callable[[], Any], Optional[Dict[str, Any]]]:
    """``(zero-argument builder, config dict or None)`` of a VAE module (or of a builder)."""
    if callable(vae) and not hasattr(vae, "state_dict"):
        return vae, None
    net = getattr(vae, "module", vae)
    cfg = net.cfg.model_dump(mode="json")
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    return functools.partial(_rebuild, cfg, state), cfg


def _with_split(split: str):
    def fn(t):
        import pyarrow as pa

        return t.append_column("split", pa.array([split] * t.num_rows, pa.string()))

    return fn


def _filter_split(split: str):
    def fn(t):
        import pyarrow.compute as pc

        return t.filter(pc.equal(t["split"], split)).drop_columns(["split"])

    return fn


class LatentEncoder:
    """Ray Data UDF holding a frozen VAE on its actor.

    ``kind="audio"``: whole-clip log-mels ``(n_mels, F)`` -> the posterior mean ``mu``.
    ``kind="images"``: images ``(3, S, S)`` in [-1, 1] -> ``scaling_factor * posterior mean``
    (``flip=True`` adds each image's horizontally flipped copy as a second row).
    """

    def __init__(
        self,
        factory: Callable[[], Any],
        kind: str = "audio",
        device: str = "cpu",
        scaling_factor: float = 1.0,
        flip: bool = False,
    ):
        import torch

        torch.set_num_threads(1)
        self.device = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = factory().to(self.device).eval()
        self.kind, self.scaling_factor, self.flip = kind, scaling_factor, flip

    def __call__(self, batch: Dict[str, np.ndarray]):
        import torch

        with torch.no_grad():
            return self._audio(batch) if self.kind == "audio" else self._images(batch)

    def _audio(self, batch: Dict[str, np.ndarray]):
        import pyarrow as pa
        import torch

        latents, shapes = [], []
        for i in range(len(batch["path"])):
            mel = np.asarray(batch["mel"][i], np.float32).reshape(int(batch["n_mels"][i]), int(batch["n_frames"][i]))
            mu, _ = self.model.encode(torch.from_numpy(mel)[None, None].to(self.device))
            z = mu[0].float().cpu().numpy()
            latents.append(z.reshape(-1))
            shapes.append(list(z.shape))
        return pa.table(
            {
                "split": pa.array([str(p) for p in batch["split"]]),
                "path": pa.array([str(p) for p in batch["path"]]),
                "name": pa.array([str(p) for p in batch["name"]]),
                "text": pa.array([str(p) for p in batch["text"]]),
                "speaker": pa.array([str(p) for p in batch["speaker"]]),
                "speaker_id": pa.array(np.asarray(batch["speaker_id"], np.int64)),
                "duration": pa.array(np.asarray(batch["duration"], np.float32)),
                "latent": pa.array(latents, type=pa.list_(pa.float32())),
                "latent_shape": pa.array(shapes, type=pa.list_(pa.int32())),
            }
        )

    def _images(self, batch: Dict[str, np.ndarray]):
        import pyarrow as pa
        import torch

        x = torch.from_numpy(np.asarray(batch["image"], np.float32)).to(self.device)
        views = [(x, False)] + ([(torch.flip(x, dims=[-1]), True)] if self.flip else [])
        cols: Dict[str, List[Any]] = {"split": [], "label": [], "caption": [], "flipped": [], "latent": []}
        captions = [str(c) for c in batch["caption"]] if "caption" in batch else [""] * len(x)
        for view, flipped in views:
            z = (self.scaling_factor * self.model.encode(view).mean).float().cpu().numpy()
            cols["latent"] += [row.reshape(-1) for row in z]
            cols["label"] += [int(v) for v in batch["label"]]
            cols["caption"] += captions
            cols["split"] += [str(s) for s in batch["split"]]
            cols["flipped"] += [flipped] * len(z)
        return pa.table(
            {
                "split": pa.array(cols["split"]),
                "label": pa.array(cols["label"], pa.int64()),
                "caption": pa.array(cols["caption"], pa.string()),
                "flipped": pa.array(cols["flipped"]),
                "latent": pa.array(cols["latent"], type=pa.list_(pa.float32())),
            }
        )


def _encode(
    parts: Dict[str, Any],
    out_dir: str,
    overwrite: bool,
    encoder_kwargs: Dict[str, Any],
    *,
    concurrency: int,
    batch_size: int,
    num_gpus: float,
    manifest: Callable[[], Dict[str, Any]],
) -> Dict[str, Any]:
    """Run ``parts`` (``{split: Ray Dataset}``, empty splits left out) through one actor pool of
    :class:`LatentEncoder` and write ``<out_dir>/<split>/*.parquet`` and the manifest (last)."""
    import ray

    tagged = [ds.map_batches(_with_split(s), batch_format="pyarrow") for s, ds in parts.items()]
    with fs.staged_dir(out_dir, overwrite) as tmp:
        # one pass over both splits, so the actor pool (and its model copies) starts once
        enc = (
            (tagged[0].union(*tagged[1:]) if len(tagged) > 1 else tagged[0])
            .map_batches(
                LatentEncoder,
                fn_constructor_kwargs={**encoder_kwargs, "device": "cuda" if num_gpus else "cpu"},
                batch_size=batch_size,
                compute=ray.data.ActorPoolStrategy(size=concurrency),
                num_gpus=num_gpus,
                num_cpus=1,
                batch_format="numpy",
            )
            .materialize()
        )
        for split in ("train", "val"):
            if split in parts:
                enc.map_batches(_filter_split(split), batch_format="pyarrow").write_parquet(fs.join(tmp, split))
            elif not fs.is_uri(tmp):
                os.makedirs(fs.join(tmp, split), exist_ok=True)
        man = manifest()
        write_manifest(tmp, man)
    man["out_dir"] = out_dir if fs.is_uri(out_dir) else os.path.abspath(out_dir)
    return man


def encode_latents(
    shards: str,
    out_dir: str,
    vae: Any,
    *,
    concurrency: int = 1,
    batch_size: int = 8,
    num_gpus: float = 0,
    overwrite: bool = False,
    verbose: bool = True,
) -> Dict[str, Any]:
    """Encode every clip of :func:`prepare_audio` shards into audio-VAE latents (``megaray
    prepare audio-latents --vae-checkpoint PATH``).

    Each output row holds ``latent`` (the posterior mean, flattened row-major) with
    ``latent_shape`` ``[latent_channels, n_mels/down_freq, ceil(F/down_time)]``, plus ``text``,
    ``speaker``, ``speaker_id``, ``duration``, ``path``, ``name``.

    Args:
        shards: audio shards whose ``n_mels`` matches the VAE.
        out_dir: destination (train/, val/, manifest.json written last; atomic when local).
        vae: an :class:`~megaray.models.audio.vae.AudioVAE` (its config and CPU weights are
            shipped to the actors) or a zero-argument callable returning one.
        num_gpus: GPUs per actor (0 = CPU).

    Returns:
        Manifest dict (kind ``audio_latents``): ``clips`` per split, ``vae_config``, ``out_dir``.

    Raises:
        DataError: no audio manifest in ``shards``; the VAE's ``n_mels`` differs from the shards'
            (names both values); ``out_dir`` not empty without ``overwrite``.
    """
    import ray

    from megaray.data.audio import read_manifest

    man = read_manifest(shards)
    fs.check_target(out_dir, overwrite)
    factory, cfg = _factory(vae)
    if cfg is not None and cfg["n_mels"] != man["n_mels"]:
        raise DataError(
            f"the VAE expects n_mels={cfg['n_mels']} but shards {shards} have n_mels={man['n_mels']}; "
            f"prepare the audio with `megaray prepare audio --n-mels {cfg['n_mels']}` or use a matching VAE"
        )
    counts = {s: int(man["splits"][s]["clips"]) for s in ("train", "val")}
    cols = ["path", "name", "text", "speaker", "speaker_id", "duration", "mel", "n_mels", "n_frames"]
    parts = {
        s: ray.data.read_parquet(fs.join(shards, man["splits"][s]["dir"]), columns=cols)
        for s in ("train", "val")
        if counts[s]
    }
    out = _encode(
        parts,
        out_dir,
        overwrite,
        {"factory": factory, "kind": "audio"},
        concurrency=concurrency,
        batch_size=batch_size,
        num_gpus=num_gpus,
        manifest=lambda: new_manifest(
            "audio_latents",
            source_shards=shards,
            sample_rate=man["sample_rate"],
            n_mels=man["n_mels"],
            hop_length=man["hop_length"],
            speakers=man["speakers"],
            vae_config=cfg,
            splits={s: {"dir": s, "clips": int(c)} for s, c in counts.items()},
            clips=int(sum(counts.values())),
        ),
    )
    if verbose:
        print(f"[encode_latents] {out['clips']} clips -> {out['out_dir']}")
    return out


def encode_image_latents(
    shards: str,
    out_dir: str,
    vae: Any,
    *,
    vae_checkpoint: Optional[str] = None,
    flip: bool = False,
    concurrency: int = 1,
    batch_size: int = 16,
    num_gpus: float = 0,
    overwrite: bool = False,
    verbose: bool = True,
) -> Dict[str, Any]:
    """Encode ``megaray prepare images`` shards into image-VAE latents (``megaray prepare
    image-latents``), the inputs of a DiT on latents (Peebles & Xie 2023, after Rombach et al.
    2022: latents are ``scaling_factor * z``, here the posterior mean of centre crops).

    Output rows: ``latent`` float32 ``latent_channels * latent_size**2`` (row-major ``(C, h, w)``),
    ``label`` int64, ``caption`` str (the image's caption, "" when it had none: what a
    text-to-image DiT conditions on), ``flipped`` bool. ``flip=True`` adds the horizontally flipped copy of every
    train and val image (twice the rows; training then sees both orientations).

    Args:
        shards: a folder of kind ``images``. vae: an :class:`~megaray.models.image.ImageVAE`
            (or DeepSpeed engine around one). vae_checkpoint: recorded in the manifest.
        batch_size: images per actor call. num_gpus: GPUs per actor (0 = CPU).

    Returns:
        The manifest (kind ``image_latents``): ``latent_channels``, ``latent_size``,
        ``scaling_factor``, ``vae_checkpoint``, ``vae_config``, ``labels``, ``captions`` (rows with
        one), ``size``, ``splits``
        (``{"train": {"dir", "latents"}, "val": ...}``), ``out_dir``.

    Raises:
        DataError: ``shards`` is not an images folder (names the command that makes one); its
            image size is not a multiple of the VAE's downsampling factor; ``out_dir`` not empty.
    """
    from megaray.data.image import image_datasets, read_manifest

    man = read_manifest(shards)
    fs.check_target(out_dir, overwrite)
    net = getattr(vae, "module", vae)
    factor, size = int(net.downsample_factor), int(man["size"])
    if size % factor:
        raise DataError(
            f"shards {shards} hold {size}px images, not a multiple of the VAE's downsampling "
            f"factor {factor}; prepare images with --size {size - size % factor or factor}"
        )
    factory, cfg = _factory(vae)
    scaling = float(net.cfg.scaling_factor)
    counts = {s: int(man["splits"][s]["images"]) for s in ("train", "val")}
    ds = image_datasets(shards, size, seed=0, crop="center", flip=False, captions=True)
    parts = {s: ds[s] for s in ("train", "val") if counts[s]}
    copies = 2 if flip else 1
    out = _encode(
        parts,
        out_dir,
        overwrite,
        {"factory": factory, "kind": "images", "scaling_factor": scaling, "flip": flip},
        concurrency=concurrency,
        batch_size=batch_size,
        num_gpus=num_gpus,
        manifest=lambda: new_manifest(
            "image_latents",
            source_shards=shards,
            size=size,
            latent_channels=int(cfg["latent_channels"]),
            latent_size=size // factor,
            scaling_factor=scaling,
            vae_checkpoint=vae_checkpoint,
            vae_config=cfg,
            labels=man.get("labels", {}),
            flipped_copies=flip,
            captions=copies * int(man.get("captions", 0)),
            splits={s: {"dir": s, "latents": copies * c} for s, c in counts.items()},
        ),
    )
    if verbose:
        print(f"[encode_image_latents] {sum(s['latents'] for s in out['splits'].values())} latents -> {out['out_dir']}")
    return out
