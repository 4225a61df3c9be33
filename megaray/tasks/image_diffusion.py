"""ImageDiffusionTask: a DiT trained on image latents (``megaray prepare image-latents`` shards).

The latents are ``scaling_factor * z`` of a frozen image VAE. The DiT is class-conditioned (it
drops labels to the null class with ``class_dropout_prob``, for classifier-free guidance) or,
with ``model.context_dim > 0``, text-conditioned on the images' captions (the same text encoders
and cross-attention as a mel DiT, :class:`~megaray.tasks.diffusion.TextEncoder`; captions are
dropped with ``class_dropout_prob``). Eval samples are decoded by that VAE into a PNG grid. What
the two DiT tasks share is :class:`~megaray.tasks.diffusion.DiffusionTask`.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from megaray.config import ConfigError
from megaray.tasks.base import unwrap
from megaray.tasks.diffusion import DiffusionTask, check_vae, load_frozen


class ImageDiffusionTask(DiffusionTask):
    """DiT training on image latents, class- or caption-conditioned (``model.context_dim``)."""

    kind = "image_latents"

    # -- data ------------------------------------------------------------------------------
    def _datasets(self, shards: str, man: Dict[str, Any]) -> Dict[str, Any]:
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

    def train_stream(self, epoch: int, cursor: int, plan: Any) -> Any:
        """The training latents (``latent``, ``label``, and with ``model.context_dim`` the captions'
        byte ids, as :func:`_latent_split`) in the world-independent served order of
        :mod:`megaray.data.rows` from sample ``cursor`` of ``epoch`` on; blocks of
        ``plan.micro_batch`` rows."""
        from megaray.data import rows

        man = self.info.manifest
        text = bool(self.cfg.model.context_dim)
        shards, cols = self.shards(), ["latent", "label"] + (["caption"] if text else [])
        ds = rows.split_rows(self.cfg, shards, man, cols, plan=plan, epoch=epoch, cursor=cursor)
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

    def prepare_command(self, shards: str) -> Optional[str]:
        return f"megaray prepare image-latents --vae-checkpoint VAE_RUN --source IMAGES --out {shards}"

    def collate(self, batch: Mapping[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
        """``{"x": (B, C, h, w) latents}`` plus ``"y"`` (class ids) and/or ``"text_ids"``/``"text_mask"``."""
        out = {"x": batch["latent"].to(device).float()}
        if "text_ids" in batch:  # a text-to-image DiT
            out.update(text_ids=batch["text_ids"].to(device), text_mask=batch["text_mask"].to(device))
        if self.cfg.model.num_classes:
            out["y"] = batch["label"].to(device)
        return out

    # -- modules ---------------------------------------------------------------------------
    def decoders(self) -> Dict[str, torch.nn.Module]:
        """``{"vae": the frozen image VAE}`` that decodes the latents."""
        return {"vae": load_frozen(self.info.vae_checkpoint)}

    # -- samples ---------------------------------------------------------------------------
    def eval_conditioning(self, n: int) -> Dict[str, Any]:
        """The first validation captions in turn (text-to-image), else one sample per class in turn."""
        if self.cfg.model.context_dim:
            return super().eval_conditioning(n)
        return {"y": torch.arange(n) % max(1, len(self.info.labels) or self.cfg.model.num_classes)}

    @torch.no_grad()
    def render(
        self,
        x: torch.Tensor,
        modules: Mapping[str, torch.nn.Module],
        prefix: str,
        titles: Optional[List[str]] = None,
        step: Optional[int] = None,
    ) -> List[str]:
        """``<prefix>.png``: a grid of the VAE's (``modules["vae"]``) decodings of latents ``x``
        ``(n, C, h, w)``, ``ceil(sqrt(n))`` per row. Returns ``[its path]``."""
        from torchvision.utils import save_image

        vae = unwrap(modules["vae"])
        dev = next(vae.parameters()).device
        images = vae.decode(x.to(dev) / self.info.scaling_factor).float().clamp(-1, 1).cpu()
        path = prefix + ".png"
        save_image((images + 1) / 2, path, nrow=math.ceil(math.sqrt(len(images))), padding=1)
        return [path]


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
