"""The latent-diffusion KL autoencoder (Rombach et al. 2022, arXiv:2112.10752).

Follows ``CompVis/latent-diffusion`` ``ldm/modules/diffusionmodules/model.py`` (``Encoder``,
``Decoder``) and ``ldm/models/autoencoder.py`` (``AutoencoderKL``), the layout ``diffusers``
keeps in ``AutoencoderKL``, so weights convert one-to-one (:mod:`megaray.models.image.convert`)::

    x (B, 3, H, W) in [-1, 1]
      -> conv_in -> stages (ResNet blocks, strided-conv downsampling after all but the last)
      -> mid (ResNet, self-attention over H'W' positions, ResNet) -> GroupNorm, SiLU, conv_out
      -> quant_conv (1x1) -> mean, logvar  (B, latent_channels, H/f, W/f)     = DiagonalGaussian
    z -> post_quant_conv (1x1) -> conv_in -> mid -> stages (layers_per_block + 1 ResNet blocks,
      nearest upsampling + conv) -> GroupNorm, SiLU, conv_out -> (B, 3, H, W)
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from megaray.models.common.attention import sdpa_attention
from megaray.models.common.checkpointing import run_block
from megaray.models.common.conv import Downsample2d, ResnetBlock2d, Upsample2d, group_norm
from megaray.models.image.config import ImageVAEConfig


class DiagonalGaussian:
    """The posterior ``N(mean, exp(logvar))`` over latents ``(B, C, h, w)`` (LDM
    ``DiagonalGaussianDistribution``; ``logvar`` clamped to ``[-30, 20]``).

    Built from the encoder's moments ``(B, 2C, h, w)`` (mean first, then logvar).
    """

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``mean + std * eps``, ``eps ~ N(0, I)`` from ``generator`` (the global RNG when None)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        """The posterior mean (its mode)."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """``KL(N(mean, var) || N(0, I))`` summed over each image's latent elements: ``(B,)``, nats."""
        mean, logvar = self.mean.float(), self.logvar.float()
        return 0.5 * torch.sum(mean**2 + logvar.exp() - 1.0 - logvar, dim=[1, 2, 3])


class AttnBlock(nn.Module):
    """LDM ``AttnBlock``: single-head self-attention over the ``h * w`` positions with a residual,
    ``(B, C, h, w) -> (B, C, h, w)``: ``x + proj_out(softmax(q k^T / sqrt(C)) v)`` on ``norm(x)``."""

    def __init__(self, channels: int, groups: int, eps: float):
        super().__init__()
        self.norm = group_norm(channels, groups, eps)
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, h, w = x.shape
        t = self.norm(x).flatten(2).transpose(1, 2)  # (B, hw, C)
        q, k, v = (lin(t)[:, None] for lin in (self.to_q, self.to_k, self.to_v))  # (B, 1, hw, C)
        out = sdpa_attention(q, k, v, causal=False)[:, 0]  # (B, hw, C)
        return x + self.proj_out(out).transpose(1, 2).reshape(B, C, h, w)


class MidBlock(nn.Module):
    """ResNet block, optional :class:`AttnBlock`, ResNet block at constant width."""

    def __init__(self, ch: int, cfg: ImageVAEConfig):
        super().__init__()
        self.block_1 = ResnetBlock2d(ch, ch, groups=cfg.norm_groups, eps=cfg.norm_eps)
        self.attn = AttnBlock(ch, cfg.norm_groups, cfg.norm_eps) if cfg.mid_attention else nn.Identity()
        self.block_2 = ResnetBlock2d(ch, ch, groups=cfg.norm_groups, eps=cfg.norm_eps)
        self.activation_checkpointing = cfg.activation_checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ckpt = self.activation_checkpointing and self.training
        for block in (self.block_1, self.attn, self.block_2):
            x = run_block(block, x, enabled=ckpt)
        return x


class Stage(nn.Module):
    """``blocks`` (ResNet) then ``resample`` (a :class:`Downsample2d`, :class:`Upsample2d` or identity);
    each block recomputed in backward when ``activation_checkpointing`` and training."""

    def __init__(self, blocks: List[nn.Module], resample: nn.Module, activation_checkpointing: bool = False):
        super().__init__()
        self.blocks, self.resample = nn.ModuleList(blocks), resample
        self.activation_checkpointing = activation_checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = run_block(block, x, enabled=self.activation_checkpointing and self.training)
        return self.resample(x)


def _blocks(cin: int, cout: int, n: int, cfg: ImageVAEConfig) -> List[nn.Module]:
    return [ResnetBlock2d(cin if i == 0 else cout, cout, groups=cfg.norm_groups, eps=cfg.norm_eps) for i in range(n)]


class Encoder(nn.Module):
    """``(B, in_channels, H, W) -> moments (B, 2 * latent_channels, H / f, W / f)`` (before quant_conv)."""

    def __init__(self, cfg: ImageVAEConfig):
        super().__init__()
        chans = cfg.channels
        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        stages, cin = [], chans[0]
        for i, ch in enumerate(chans):
            down = Downsample2d(ch, 2, padding="asymmetric") if i < len(chans) - 1 else nn.Identity()
            stages.append(Stage(_blocks(cin, ch, cfg.layers_per_block, cfg), down, cfg.activation_checkpointing))
            cin = ch
        self.stages = nn.ModuleList(stages)
        self.mid = MidBlock(cin, cfg)
        self.norm_out = group_norm(cin, cfg.norm_groups, cfg.norm_eps)
        self.conv_out = nn.Conv2d(cin, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.stages:
            h = stage(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """``z (B, latent_channels, h, w) -> (B, in_channels, h * f, w * f)`` (after post_quant_conv)."""

    def __init__(self, cfg: ImageVAEConfig):
        super().__init__()
        chans = list(reversed(cfg.channels))
        self.conv_in = nn.Conv2d(cfg.latent_channels, chans[0], 3, padding=1)
        self.mid = MidBlock(chans[0], cfg)
        stages, cin = [], chans[0]
        for i, ch in enumerate(chans):
            up = Upsample2d(ch, 2) if i < len(chans) - 1 else nn.Identity()
            stages.append(Stage(_blocks(cin, ch, cfg.layers_per_block + 1, cfg), up, cfg.activation_checkpointing))
            cin = ch
        self.stages = nn.ModuleList(stages)
        self.norm_out = group_norm(cin, cfg.norm_groups, cfg.norm_eps)
        self.conv_out = nn.Conv2d(cin, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in self.stages:
            h = stage(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class ImageVAE(nn.Module):
    """KL autoencoder ``(B, 3, H, W)`` in ``[-1, 1]`` <-> ``(B, latent_channels, H/f, W/f)``.

    ``H`` and ``W`` must be multiples of :attr:`downsample_factor` (ValueError otherwise).
    Diffusion models take ``cfg.scaling_factor * z``; :meth:`decode` takes unscaled ``z``.
    ``cfg.activation_checkpointing`` recomputes each ResNet / attention block in backward while training.
    """

    def __init__(self, cfg: ImageVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        L = cfg.latent_channels
        self.quant_conv = nn.Conv2d(2 * L, 2 * L, 1) if cfg.use_quant_conv else nn.Identity()
        self.post_quant_conv = nn.Conv2d(L, L, 1) if cfg.use_quant_conv else nn.Identity()

    @property
    def downsample_factor(self) -> int:
        """``f``: latents are ``H / f x W / f``."""
        return self.cfg.downsample_factor

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output conv weight (where the adaptive GAN weight balances gradients)."""
        return self.decoder.conv_out.weight

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Images ``(B, 3, H, W)`` -> the posterior over ``(B, latent_channels, H/f, W/f)``."""
        f = self.downsample_factor
        if x.dim() != 4 or x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(
                f"expected images (B, {self.cfg.in_channels}, H, W) with H and W multiples of {f}, got {tuple(x.shape)}"
            )
        return DiagonalGaussian(self.quant_conv(self.encoder(x.to(self.encoder.conv_in.weight.dtype))))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, latent_channels, h, w)`` -> images ``(B, 3, h * f, w * f)`` (about [-1, 1])."""
        return self.decoder(self.post_quant_conv(z.to(self.decoder.conv_in.weight.dtype)))

    def forward(
        self, x: torch.Tensor, sample: Optional[bool] = None, generator: Optional[torch.Generator] = None
    ) -> Tuple[torch.Tensor, DiagonalGaussian]:
        """``(reconstruction (B, 3, H, W), posterior)``; decodes a posterior sample when ``sample``
        (default: in training mode), else its mode."""
        posterior = self.encode(x)
        sample = self.training if sample is None else sample
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior


def build_image_vae(cfg: ImageVAEConfig) -> ImageVAE:
    """Registry builder: ``cfg -> ImageVAE``."""
    return ImageVAE(cfg)
