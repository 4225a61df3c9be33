"""``megaray prepare audio-latents``: encode audio shards into VAE latents with Ray Data.

Lives in inference (not data) because it builds a model: an actor pool each holding the VAE
(:class:`LatentEncoder`) maps whole-clip log-mels to latent means. Output is a prepared folder
of kind ``audio_latents`` (train/, val/, manifest.json last; published atomically).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Dict

import numpy as np

from megaray import fs
from megaray.data.audio import read_manifest
from megaray.data.manifest import new_manifest, write_manifest
from megaray.errors import DataError


def _rebuild_vae(config: Dict[str, Any], state: Dict[str, Any]):
    from megaray.models.audio.config import AudioVAEConfig
    from megaray.models.audio.vae import AudioVAE

    model = AudioVAE(AudioVAEConfig.model_validate(config))
    model.load_state_dict(state)
    return model


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
    """Ray Data UDF holding a VAE on its actor: whole-clip log-mels -> latent means."""

    def __init__(self, factory: Callable[[], Any], device: str = "cpu"):
        import torch

        torch.set_num_threads(1)
        self.device = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = factory().to(self.device).eval()

    def __call__(self, batch: Dict[str, np.ndarray]):
        import pyarrow as pa
        import torch

        latents, shapes = [], []
        with torch.no_grad():
            for i in range(len(batch["path"])):
                mel = np.asarray(batch["mel"][i], np.float32).reshape(int(batch["n_mels"][i]), int(batch["n_frames"][i]))
                mu, _ = self.model.encode(torch.from_numpy(mel)[None, None].to(self.device))
                z = mu[0].float().cpu().numpy()
                latents.append(z.reshape(-1))
                shapes.append(list(z.shape))
        return pa.table({
            "split": pa.array([str(p) for p in batch["split"]]),
            "path": pa.array([str(p) for p in batch["path"]]),
            "name": pa.array([str(p) for p in batch["name"]]),
            "text": pa.array([str(p) for p in batch["text"]]),
            "speaker": pa.array([str(p) for p in batch["speaker"]]),
            "speaker_id": pa.array(np.asarray(batch["speaker_id"], np.int64)),
            "duration": pa.array(np.asarray(batch["duration"], np.float32)),
            "latent": pa.array(latents, type=pa.list_(pa.float32())),
            "latent_shape": pa.array(shapes, type=pa.list_(pa.int32())),
        })


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
    """Encode every clip of :func:`prepare_audio` shards into VAE latents (``megaray prepare
    audio-latents --vae-checkpoint PATH``).

    Runs Ray Data ``map_batches`` over a pool of ``concurrency`` actors, each holding the model
    (:class:`LatentEncoder`). Each output row holds ``latent`` (the posterior mean, flattened
    row-major) with ``latent_shape`` ``[latent_channels, n_mels/down_freq, ceil(F/down_time)]``,
    plus ``text``, ``speaker``, ``speaker_id``, ``duration``, ``path``, ``name``.

    Args:
        shards: audio shards whose ``n_mels`` matches the VAE.
        out_dir: destination (train/, val/, manifest.json written last; atomic when local).
        vae: an :class:`~megaray.models.audio.vae.AudioVAE` (its config and CPU weights are
            shipped to the actors) or a zero-argument callable returning one.
        num_gpus: GPUs per actor (0 = CPU).

    Returns:
        Manifest dict: ``clips`` per split, latent settings, ``vae_config``, ``out_dir``.

    Raises:
        DataError: no audio manifest in ``shards``; the VAE's ``n_mels`` differs from the shards'
            (names both values); ``out_dir`` not empty without ``overwrite``.
    """
    import ray

    man = read_manifest(shards)
    fs.check_target(out_dir, overwrite)
    if callable(vae) and not hasattr(vae, "state_dict"):
        factory, cfg = vae, None
    else:
        net = getattr(vae, "module", vae)
        cfg = net.cfg.model_dump(mode="json")
        state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        factory = functools.partial(_rebuild_vae, cfg, state)
    if cfg is not None and cfg["n_mels"] != man["n_mels"]:
        raise DataError(f"the VAE expects n_mels={cfg['n_mels']} but shards {shards} have n_mels={man['n_mels']}; "
                        f"prepare the audio with `megaray prepare audio --n-mels {cfg['n_mels']}` or use a matching VAE")
    counts = {s: int(man["splits"][s]["clips"]) for s in ("train", "val")}
    cols = ["path", "name", "text", "speaker", "speaker_id", "duration", "mel", "n_mels", "n_frames"]
    parts = [
        ray.data.read_parquet(fs.join(shards, man["splits"][s]["dir"]), columns=cols).map_batches(
            _with_split(s), batch_format="pyarrow")
        for s in ("train", "val") if counts[s]
    ]
    with fs.staged_dir(out_dir, overwrite) as tmp:
        # one pass over both splits, so the actor pool (and its model copies) starts once
        enc = (parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]).map_batches(
            LatentEncoder, fn_constructor_kwargs={"factory": factory, "device": "cuda" if num_gpus else "cpu"},
            batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=concurrency), num_gpus=num_gpus,
            num_cpus=1, batch_format="numpy",
        ).materialize()
        for split in ("train", "val"):
            if counts[split]:
                enc.map_batches(_filter_split(split), batch_format="pyarrow").write_parquet(fs.join(tmp, split))
            elif not fs.is_uri(tmp):
                os.makedirs(fs.join(tmp, split), exist_ok=True)
        manifest = new_manifest(
            "audio_latents", source_shards=shards, sample_rate=man["sample_rate"], n_mels=man["n_mels"],
            hop_length=man["hop_length"], speakers=man["speakers"], vae_config=cfg,
            splits={s: {"dir": s, "clips": int(c)} for s, c in counts.items()}, clips=int(sum(counts.values())),
        )
        write_manifest(tmp, manifest)
    manifest["out_dir"] = out_dir if fs.is_uri(out_dir) else os.path.abspath(out_dir)
    if verbose:
        print(f"[encode_latents] {manifest['clips']} clips -> {manifest['out_dir']}")
    return manifest
