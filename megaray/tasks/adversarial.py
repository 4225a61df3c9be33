"""A reusable adversarial step: discriminator update, generator adversarial + feature-matching loss.

Used by the GAN vocoder (:mod:`megaray.tasks.vocoder`) and meant for the image VAE next. Per
micro-batch, from optimizer step ``start_step`` on::

    D:  loss_d = d_loss(D(real), D(fake.detach()))          -> disc.backward, disc.step
    G:  loss   = base + w_adv * g_loss(D(fake)) + w_fm * fm(D(real), D(fake))

with the discriminator frozen (``requires_grad=False``) during the generator's forward, so the
generator's backward leaves no gradient on it. ``w_adv`` is either fixed or *adaptive*:
taming-transformers' VQGAN ``calculate_adaptive_weight`` (Esser et al. 2021, eq. 7)::

    w_adv = adv_weight * clamp(||grad_L base|| / (||grad_L g_loss|| + 1e-4), 0, 1e4)

where ``L`` is the generator's last layer, which balances the two gradients at that layer.
The loss functions are given by the task (LSGAN for HiFi-GAN / Vocos, hinge for VQGAN).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch

from megaray.tasks.base import Engine, unwrap

#: ``(D(real), D(fake)) -> scalar``
PairLoss = Callable[[Any, Any], torch.Tensor]


def adaptive_weight(
    base_loss: torch.Tensor, adv_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """taming-transformers' ``calculate_adaptive_weight`` without the outer factor: the ratio of
    the gradient norms of ``base_loss`` and ``adv_loss`` at ``last_layer`` (a parameter both
    depend on), clamped to ``[0, max_weight]`` and detached. Keeps both graphs (retain_graph)."""
    g_base = torch.autograd.grad(base_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)[0]
    return torch.clamp(torch.norm(g_base) / (torch.norm(g_adv) + 1e-4), 0.0, max_weight).detach()


class AdversarialStep:
    """The GAN part of one micro-batch, reusable across families.

    Args:
        d_loss: discriminator loss ``(D(real), D(fake)) -> scalar``.
        g_loss: generator adversarial loss ``D(fake) -> scalar``.
        fm_loss: feature-matching loss ``(D(real), D(fake)) -> scalar``; None = no feature matching.
        start_step: optimizer step from which the discriminator trains and the GAN terms apply
            (before it: reconstruction only, as HiFi-GAN / VQGAN warm-ups).
        adv_weight: weight of the adversarial term (the outer factor when ``adaptive``).
        fm_weight: weight of the feature-matching term.
        adaptive: scale the adversarial term by :func:`adaptive_weight` (needs ``last_layer``).
    """

    def __init__(
        self,
        d_loss: PairLoss,
        g_loss: Callable[[Any], torch.Tensor],
        fm_loss: Optional[PairLoss] = None,
        *,
        start_step: int = 0,
        adv_weight: float = 1.0,
        fm_weight: float = 0.0,
        adaptive: bool = False,
    ):
        self.d_loss, self.g_loss, self.fm_loss = d_loss, g_loss, fm_loss
        self.start_step, self.adv_weight, self.fm_weight, self.adaptive = start_step, adv_weight, fm_weight, adaptive

    def active(self, step: int) -> bool:
        """Whether the discriminator trains and the GAN terms apply at optimizer step ``step``."""
        return step >= self.start_step

    def discriminator_step(self, disc: Engine, real: torch.Tensor, fake: torch.Tensor) -> Dict[str, float]:
        """One update of ``disc`` (a DeepSpeed engine or any :class:`~megaray.tasks.base.Engine`)
        on ``real`` vs ``fake.detach()``."""
        loss_d = self.d_loss(disc(real), disc(fake.detach()))
        disc.backward(loss_d)
        disc.step()
        return {"loss_disc": float(loss_d.detach())}

    def generator_loss(
        self,
        disc: Engine,
        real: torch.Tensor,
        fake: torch.Tensor,
        base_loss: torch.Tensor,
        last_layer: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Dict[str, float]]:
        """``base_loss + w_adv * g_loss + fm_weight * fm_loss`` through a frozen ``disc``.

        Returns ``(loss, metrics)``; metrics hold ``loss_gen_adv``, ``loss_fm`` and, when adaptive,
        ``adv_weight``. ``last_layer``: the generator's last-layer weight, or a callable returning
        the :func:`adaptive_weight` ratio itself (for engines whose backward hooks forbid a
        ``torch.autograd.grad`` through their graph, e.g. DeepSpeed ZeRO). Raises ValueError when
        ``adaptive`` and no ``last_layer`` is given."""
        module = unwrap(disc)
        flags = [p.requires_grad for p in module.parameters()]
        module.requires_grad_(False)
        try:
            d_fake = disc(fake)
            with torch.no_grad():
                d_real = disc(real) if self.fm_loss is not None else None
            adv = self.g_loss(d_fake)
            fm = self.fm_loss(d_real, d_fake) if self.fm_loss is not None else None
        finally:
            for p, flag in zip(module.parameters(), flags):
                p.requires_grad_(flag)
        metrics = {"loss_gen_adv": float(adv.detach())}
        weight: Any = self.adv_weight
        if self.adaptive:
            if last_layer is None:
                raise ValueError("AdversarialStep(adaptive=True) needs the generator's last_layer weight")
            ratio = last_layer() if callable(last_layer) else adaptive_weight(base_loss, adv, last_layer)
            weight = self.adv_weight * ratio
            metrics["adv_weight"] = float(weight)
        loss = base_loss + weight * adv
        if fm is not None:
            loss = loss + self.fm_weight * fm
            metrics["loss_fm"] = float(fm.detach())
        return loss, metrics

    def __call__(
        self,
        disc: Optional[Engine],
        real: torch.Tensor,
        fake: torch.Tensor,
        base_loss: torch.Tensor,
        step: int,
        last_layer: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Dict[str, float]]:
        """The whole step at optimizer step ``step``: :meth:`discriminator_step` then
        :meth:`generator_loss` when :meth:`active` (and a ``disc`` is given), else ``base_loss``.
        The caller backpropagates and steps the generator with the returned loss."""
        if disc is None or not self.active(step):
            return base_loss, {}
        metrics = self.discriminator_step(disc, real, fake)
        loss, g_metrics = self.generator_loss(disc, real, fake, base_loss, last_layer)
        return loss, {**metrics, **g_metrics}
