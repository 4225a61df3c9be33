"""ImageVAETask: the latent-diffusion KL autoencoder, GAN-capable (``model.family: image_vae``).

Batches come from :func:`megaray.data.image.image_datasets`: ``{"image": (B, 3, R, R) float32 in
[-1, 1], "label": (B,) int64}`` with ``R = model.resolution`` (random crops and flips for training,
a function of (seed, image, pass), centre crops for validation).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from megaray.config import ConfigError
from megaray.data import order
from megaray.tasks.adversarial import AdversarialStep
from megaray.tasks.base import Engine, Task, TaskInfo, unwrap


@dataclass
class ImageInfo(TaskInfo):
    """:class:`TaskInfo` of an image run: images per split and random-crop passes per epoch."""

    train_images: int = 0
    val_images: int = 0
    passes: int = 1


class ImageVAETask(Task):
    """Images ``(B, 3, R, R)`` -> posterior -> reconstruction.

    Loss (LDM ``LPIPSWithDiscriminator`` without its learned log-variance)::

        l1_weight * L1 + l2_weight * MSE + perceptual_weight * VGG distance + kl_weight * KL_sum / (3 R R)

    and, when ``model.adversarial`` and the optimizer step reaches ``adv_start_step``, the
    PatchGAN hinge loss through :class:`~megaray.tasks.adversarial.AdversarialStep` with the
    adaptive weight on the decoder's last conv (VQGAN eq. 7). The discriminator is a second
    module (``"disc"``): its own DeepSpeed engine and optimizer (``train.modules.disc``),
    updated first in each step.
    """

    unit = "images"
    info_class = ImageInfo
    #: validation images in the reconstruction grid of :meth:`eval_artifacts`
    n_artifacts: int = 4
    #: most random-crop passes in one epoch of the train dataset
    max_passes: int = 16

    def __init__(self, cfg, info=None):
        super().__init__(cfg, info)
        from megaray.models.image.discriminator import hinge_d_loss, hinge_g_loss

        m = cfg.model
        self.adversarial = AdversarialStep(
            hinge_d_loss, hinge_g_loss, start_step=m.adv_start_step, adv_weight=m.adv_weight, adaptive=True
        )
        self._perceptual: Optional[torch.nn.Module] = None

    # -- modules ---------------------------------------------------------------------------
    def module_names(self) -> List[str]:
        return ["model", "disc"] if self.cfg.model.adversarial else ["model"]

    def build_modules(self) -> Dict[str, torch.nn.Module]:
        from megaray.models.image.discriminator import build_discriminator
        from megaray.models.image.vae import ImageVAE

        mods: Dict[str, torch.nn.Module] = {"model": ImageVAE(self.cfg.model)}
        if self.cfg.model.adversarial:
            mods["disc"] = build_discriminator(self.cfg.model)
        return mods

    # -- data ------------------------------------------------------------------------------
    def datasets(self) -> Dict[str, Any]:
        from megaray.data import image

        sources = self.cfg.data.resolved_sources()
        if len(sources) > 1:
            raise ConfigError("data.sources: the image VAE trains on one image set; give data.shards")
        shards, m = sources[0].shards, self.cfg.model
        man = image.read_manifest(shards)  # DataError naming the folder and the prepare command
        if man.get("size", 0) < m.resolution:
            raise ConfigError(
                f"model.resolution: {m.resolution} px crops need images stored at >= {m.resolution} px, "
                f"but {shards} was prepared at {man.get('size')}; set model.resolution={man.get('size')} "
                f"or re-prepare with --size {m.resolution}"
            )
        if m.perceptual_weight > 0:
            self._check_vgg(m.lpips_vgg_path)
        t, B, world = self.cfg.train, self.cfg.data.batch_size, self.cfg.scaling.max_workers
        n_train, n_val = man["splits"]["train"]["images"], man["splits"]["val"]["images"]
        G = order.global_batch_size(t.global_batch_size, B, t.grad_accum_steps, world)
        passes = max(1, min(self.max_passes, math.ceil(t.max_steps * G / max(1, n_train))))  # world-independent
        self.info = ImageInfo(
            **self.batch_plan(
                passes * n_train,
                n_val,
                shards,
                f"crops ({n_train} training images x {passes} passes)",
                "prepare more images or lower data.batch_size",
            ),
            manifest=man,
            train_images=n_train,
            val_images=n_val,
            passes=passes,
        )
        return image.image_datasets(
            shards,
            m.resolution,
            seed=t.seed,
            crop="random",
            flip=True,
            passes=passes,
            on_corrupt=self.cfg.data.on_corrupt,
        )

    def train_stream(self, epoch: int, cursor: int, plan: Any) -> Any:
        """Random ``model.resolution`` crops and flips of the training images (:attr:`ImageInfo.passes`
        passes an epoch, seeded by (seed, image, pass) as :func:`megaray.data.image.image_datasets`)
        in the world-independent served order of :mod:`megaray.data.rows`, from sample ``cursor``
        of ``epoch`` on; blocks of ``plan.micro_batch`` rows."""
        from megaray.data import rows
        from megaray.data.image.datasets import _crop_batch

        t, shards = self.cfg.train, self.cfg.data.resolved_sources()[0].shards
        cols = ["name", "pixels", "height", "width", "label_id"]
        ds = rows.split_rows(
            self.cfg, shards, self.info.manifest, cols, plan=plan, epoch=epoch, cursor=cursor, passes=self.info.passes
        )
        return rows.map_positioned(
            ds,
            _crop_batch,
            plan.micro_batch,
            fn_kwargs=dict(size=self.cfg.model.resolution, seed=t.seed, random=True, flip=True),
        )

    def prepare_command(self, shards: str) -> Optional[str]:
        return f"megaray prepare images --source skimage --out {shards} --size {self.cfg.model.resolution}"

    @staticmethod
    def _check_vgg(path: Optional[str]) -> None:
        if not path or not os.path.isfile(path):
            raise ConfigError(
                f"model.lpips_vgg_path: {path} does not exist; give a local torchvision VGG16 "
                f"state_dict (.pth) or set model.perceptual_weight=0"
            )

    # -- loss ------------------------------------------------------------------------------
    def perceptual(self, device: torch.device) -> torch.nn.Module:
        """The frozen VGG feature distance (built on first use, on ``device``)."""
        if self._perceptual is None:
            from megaray.models.image.perceptual import VGGPerceptualLoss

            self._perceptual = VGGPerceptualLoss(self.cfg.model.lpips_vgg_path).to(device)
        return self._perceptual

    def recon_loss(self, recon: torch.Tensor, x: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, float]]:
        """``l1_weight * L1 + l2_weight * MSE + perceptual_weight * VGG distance`` (fp32) and its metrics."""
        m = self.cfg.model
        recon = recon.float()
        l1 = F.l1_loss(recon, x)
        rec = m.l1_weight * l1
        metrics = {"l1": float(l1.detach())}
        if m.l2_weight > 0:
            rec = rec + m.l2_weight * F.mse_loss(recon, x)
        if m.perceptual_weight > 0:
            p = self.perceptual(x.device)(recon, x)
            rec = rec + m.perceptual_weight * p
            metrics["perceptual"] = float(p.detach())
        return rec, metrics

    def terms(
        self, model: Any, x: torch.Tensor, sample: Optional[bool] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, float]]:
        """``(loss, reconstruction, metrics)`` of the reconstruction + KL objective on images
        ``x (B, 3, R, R)``; ``model`` is the VAE or its engine. Metrics: ``recon``, ``l1``, ``kl``
        (per image, nats) and ``perceptual`` when on."""
        recon, posterior = model(x, sample=sample)
        recon = recon.float()
        rec, metrics = self.recon_loss(recon, x)
        kl = posterior.kl().mean()  # (B,) summed over latent elements -> mean over the batch
        loss = rec + self.cfg.model.kl_weight * kl / x[0].numel()
        metrics.update(recon=float(rec.detach()), kl=float(kl.detach()))
        return loss, recon, metrics

    def loss(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Reconstruction + KL only; the GAN terms live in :meth:`train_step`."""
        loss, _, metrics = self.terms(model, batch["image"])
        return loss, metrics

    def train_step(
        self, engines: Mapping[str, Engine], batch: Mapping[str, torch.Tensor], step: int
    ) -> Dict[str, float]:
        """One micro-batch: discriminator update (from ``adv_start_step``), then the VAE update
        with ``loss = base + adaptive weight * hinge G loss``."""
        vae, x = engines["model"], batch["image"]
        last = unwrap(vae).decoder.conv_out
        captured: Dict[str, torch.Tensor] = {}
        hook = last.register_forward_pre_hook(lambda _, args: captured.__setitem__("h", args[0].detach()))
        try:
            loss, recon, metrics = self.terms(vae, x)
        finally:
            hook.remove()
        metrics["loss_recon"] = float(loss.detach())
        if self.cfg.model.adversarial:
            disc = engines.get("disc")
            ratio = (lambda: self.adaptive_ratio(last, captured["h"], x, unwrap(disc))) if disc is not None else None
            loss, gan = self.adversarial(disc, x, recon, loss, step, ratio)
            metrics.update(gan)
        vae.backward(loss)
        vae.step()
        return {"loss": float(loss.detach()), **metrics}

    def adaptive_ratio(
        self, last: torch.nn.Conv2d, h: torch.Tensor, x: torch.Tensor, disc: torch.nn.Module
    ) -> torch.Tensor:
        """VQGAN's adaptive-weight ratio ``||dL_rec/dW|| / (||dL_G/dW|| + 1e-4)`` at the decoder's
        last conv ``W``, on a private copy of that conv's step (its input ``h``, detached) and of
        the discriminator (``torch.func.functional_call`` with cloned BatchNorm buffers), so no
        gradient flows through the DeepSpeed engines (their backward hooks forbid a second
        ``autograd.grad``) and no running statistic changes. The KL term does not depend on ``W``."""
        from torch.func import functional_call

        from megaray.models.image.discriminator import hinge_g_loss
        from megaray.tasks.adversarial import adaptive_weight

        with torch.enable_grad():
            w = last.weight.detach().float().requires_grad_(True)
            y = F.conv2d(h.float(), w, last.bias.detach().float(), padding=last.padding)
            rec, _ = self.recon_loss(y, x)
            dtype = next(disc.parameters()).dtype
            state = {
                **{k: v.detach() for k, v in disc.named_parameters()},
                **{k: v.clone() for k, v in disc.named_buffers()},
            }
            adv = hinge_g_loss(functional_call(disc, state, (y.to(dtype),)))
            return adaptive_weight(rec, adv, w)

    # -- evaluation ------------------------------------------------------------------------
    @torch.no_grad()
    def eval_step(self, modules: Mapping[str, Any], batch: Mapping[str, torch.Tensor]) -> Dict[str, float]:
        """``val_loss`` (reconstruction + KL through the posterior mode), ``val_l1``, ``val_kl``,
        ``val_psnr`` (dB) and ``val_ssim`` on images mapped to [0, 1] (torchmetrics)."""
        from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

        x = batch["image"]
        loss, recon, metrics = self.terms(modules["model"], x, sample=False)
        a, b = _to_unit(recon), _to_unit(x.float())
        psnr = peak_signal_noise_ratio(a, b, data_range=1.0)
        ssim = structural_similarity_index_measure(a, b, data_range=1.0)
        return {
            "val_loss": float(loss),
            **{f"val_{k}": v for k, v in metrics.items()},
            "val_psnr": float(psnr),
            "val_ssim": float(ssim),
        }

    def _examples(self) -> List[Dict[str, Any]]:
        if not hasattr(self, "_example_cache"):
            from megaray.data.image import load_examples

            self._example_cache = load_examples(self.cfg.data.resolved_sources()[0].shards, "val", self.n_artifacts)
        return self._example_cache

    @torch.no_grad()
    def eval_artifacts(self, modules: Mapping[str, torch.nn.Module], out_dir: str, step: int) -> Dict[str, Any]:
        """``recon_grid.png``: the first validation images (centre crops of ``model.resolution``) in the top row, their
        reconstructions (posterior mode) below. Draws no random numbers."""
        from torchvision.utils import make_grid, save_image

        examples = self._examples()
        if not examples:
            return {}
        net = unwrap(modules["model"])
        was_training = net.training
        net.eval()
        device = next(net.parameters()).device
        r = self.cfg.model.resolution
        x = torch.stack([torch.as_tensor(ex["image"]) for ex in examples])  # (n, 3, size, size), stored size
        top, left = (x.shape[-2] - r) // 2, (x.shape[-1] - r) // 2
        x = x[..., top : top + r, left : left + r].to(device)  # centre crops at the model's resolution
        recon, _ = net(x, sample=False)
        net.train(was_training)
        grid = make_grid(torch.cat([_to_unit(x.float()), _to_unit(recon.float())]).cpu(), nrow=len(examples), padding=2)
        save_image(grid, os.path.join(out_dir, "recon_grid.png"))
        return {"recon_images": "\n".join(f"{i}: {ex.get('name', '')}" for i, ex in enumerate(examples))}


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    """``[-1, 1] -> [0, 1]``, clamped."""
    return ((x + 1) / 2).clamp(0, 1)
