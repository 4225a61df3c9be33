"""The Gaussian diffusion process: noise schedules, the training loss, DDIM sampling, guidance.

Follows DDPM (Ho et al. 2020, arXiv:2006.11239) in the formulation of improved-diffusion /
DiT's ``diffusion/gaussian_diffusion.py`` (Nichol & Dhariwal 2021, arXiv:2102.09672):

* schedules: ``linear`` (DDPM's betas from ``1e-4`` to ``0.02``, scaled by ``1000 / T``) and
  ``cosine`` (``alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2)``, ``s = 0.008``, betas clipped
  at 0.999);
* predictions: ``epsilon`` (the noise) or ``v = sqrt(abar) * eps - sqrt(1 - abar) * x0``
  (Salimans & Ho 2022, arXiv:2202.00512, section 4);
* learned sigma: the network's extra ``C`` channels ``v_var`` in [-1, 1] interpolate the log
  variance between the posterior's ``beta_tilde`` and ``beta`` (Nichol & Dhariwal eq. 15); the
  loss is ``L_simple + lambda * T * L_vlb_t`` with ``lambda = 0.001`` (their section 3.1, hybrid
  loss), ``L_vlb_t`` in bits per dimension with the mean prediction detached so ``L_vlb`` trains
  only the variance (their footnote; ``frozen_out`` in the reference). At ``T = 1000`` this is
  exactly DiT's ``mse + vb``;
* DDIM sampling (Song et al. 2021, arXiv:2010.02502, eq. 12) on ``steps`` evenly spaced timesteps,
  ``eta`` from 0 (deterministic) to 1 (DDPM-like). Spacing ``leading`` (the default: ``0, T/steps,
  ...``, the last one first, as DDIM, improved-diffusion and DiT's ``ddim50``) or ``trailing``
  (``T-1`` first; Lin et al. 2024, arXiv:2305.08891, table 2). With the cosine schedule and epsilon
  prediction, ``trailing`` starts where ``alpha_bar`` is about 3e-9 and the ``x0`` estimate
  divides the prediction error by its square root: use ``leading`` there (or v prediction);
* classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598):
  ``cond + (scale - 1) * (cond - uncond)`` on the first ``C`` output channels only (the prediction;
  the variance channels stay conditional, as DiT's ``forward_with_cfg``); scale 1 returns the
  conditional prediction exactly.

Tensors: ``x0``, ``x_t``, ``noise`` ``(B, C, *spatial)``; timesteps ``t`` ``(B,)`` int64 in
``[0, T)``. Schedule tables are float64 and gathered per timestep to the data's dtype.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Tuple

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def linear_betas(num_timesteps: int) -> torch.Tensor:
    """DDPM's linear betas ``(T,)`` float64, ``1e-4 -> 0.02`` scaled by ``1000 / T`` (improved-diffusion)."""
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def cosine_alpha_bar(t: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal's ``alpha_bar`` at fractional time ``t`` in [0, 1]: ``cos^2((t + s)/(1 + s) * pi/2)``."""
    return torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2


def cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine-schedule betas ``(T,)`` float64: ``1 - abar((i+1)/T) / abar(i/T)``, clipped at ``max_beta``."""
    i = torch.arange(num_timesteps, dtype=torch.float64)
    ab = cosine_alpha_bar(i / num_timesteps), cosine_alpha_bar((i + 1) / num_timesteps)
    return (1 - ab[1] / ab[0]).clamp(max=max_beta)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood (nats, elementwise) of data in [-1, 1] quantised to 256 bins under a Gaussian
    (DDPM's decoder ``L_0``), with the tanh approximation of the normal CDF as the reference."""

    def cdf(v):
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))

    centered, inv_stdv = x - means, torch.exp(-log_scales)
    cdf_plus, cdf_min = cdf(inv_stdv * (centered + 1.0 / 255.0)), cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.dim())))


class GaussianDiffusion:
    """DDPM forward process, its training loss and DDIM sampling (see the module docstring).

    Args:
        num_timesteps: ``T``.
        schedule: ``"linear"`` or ``"cosine"``.
        prediction: ``"epsilon"`` or ``"v"``: what the model's first ``C`` channels are.
        learn_sigma: the model also outputs ``C`` variance-interpolation channels.
        vlb_weight: ``lambda`` of the hybrid loss (learned sigma only).

    Raises:
        ValueError: an unknown schedule or prediction.
    """

    def __init__(
        self,
        num_timesteps: int = 1000,
        schedule: str = "linear",
        prediction: str = "epsilon",
        learn_sigma: bool = False,
        vlb_weight: float = 0.001,
    ):
        betas = {"linear": linear_betas, "cosine": cosine_betas}.get(schedule)
        if betas is None:
            raise ValueError(f"schedule must be 'linear' or 'cosine', got {schedule!r}")
        if prediction not in ("epsilon", "v"):
            raise ValueError(f"prediction must be 'epsilon' or 'v', got {prediction!r}")
        self.num_timesteps, self.schedule, self.prediction = num_timesteps, schedule, prediction
        self.learn_sigma, self.vlb_weight = learn_sigma, vlb_weight
        self.betas = betas(num_timesteps)  # (T,) float64
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        ab, ab_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        self.posterior_variance = self.betas * (1.0 - ab_prev) / (1.0 - ab)  # beta_tilde
        # log(beta_tilde) with its t=0 entry (0) replaced by t=1's, as the reference
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = self.betas * ab_prev.sqrt() / (1.0 - ab)
        self.posterior_mean_coef2 = (1.0 - ab_prev) * (1.0 - self.betas).sqrt() / (1.0 - ab)
        self.log_betas = torch.log(self.betas)
        self._on_device: Dict[Tuple[int, torch.device], torch.Tensor] = {}

    @classmethod
    def from_config(cls, cfg: Any, **kw: Any) -> "GaussianDiffusion":
        """From a :class:`~megaray.models.diffusion.config.DiTConfig` (``num_timesteps``, ``schedule``,
        ``prediction``, ``learn_sigma``)."""
        return cls(cfg.num_timesteps, cfg.schedule, cfg.prediction, cfg.learn_sigma, **kw)

    def _at(self, table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``table[t]`` as ``(B, 1, ..., 1)`` in ``like``'s dtype and device (tables copied to a
        device once, not at every call)."""
        if t.device.type != "cpu":
            key = (id(table), t.device)
            if key not in self._on_device:
                self._on_device[key] = table.to(t.device)
            table = self._on_device[key]
        out = table[t].to(like.dtype)
        return out.view(-1, *([1] * (like.dim() - 1)))

    # -- forward process and parameterisations ---------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``."""
        ab = self._at(self.alphas_cumprod, t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def v_target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0`` (Salimans & Ho 2022)."""
        ab = self._at(self.alphas_cumprod, t, x0)
        return ab.sqrt() * noise - (1 - ab).sqrt() * x0

    def predict_x0_eps(
        self, x_t: torch.Tensor, t: torch.Tensor, pred: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(x0, eps)`` implied by the model's prediction ``pred`` (its first ``C`` channels) at ``x_t``."""
        ab = self._at(self.alphas_cumprod, t, x_t)
        a, s = ab.sqrt(), (1 - ab).sqrt()
        if self.prediction == "v":
            return a * x_t - s * pred, s * x_t + a * pred
        return (x_t - s * pred) / a, pred

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mean and clipped log variance of ``q(x_{t-1} | x_t, x0)``."""
        mean = self._at(self.posterior_mean_coef1, t, x_t) * x0 + self._at(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, self._at(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)

    def model_log_variance(self, t: torch.Tensor, var_values: torch.Tensor) -> torch.Tensor:
        """Learned range (Nichol & Dhariwal eq. 15): ``frac * log(beta) + (1 - frac) * log(beta_tilde)``,
        ``frac = (v + 1) / 2`` for the network's ``var_values`` in about [-1, 1]."""
        min_log = self._at(self.posterior_log_variance_clipped, t, var_values)
        max_log = self._at(self.log_betas, t, var_values)
        frac = (var_values + 1) / 2
        return frac * max_log + (1 - frac) * min_log

    def vlb_terms(
        self, pred: torch.Tensor, var_values: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample ``L_t`` in bits per dimension ``(B,)``: KL(q posterior || p) for ``t > 0``, the
        discretised decoder NLL at ``t = 0`` (the reference's ``_vb_terms_bpd``)."""
        true_mean, true_logvar = self.q_posterior(x0, x_t, t)
        pred_x0, _ = self.predict_x0_eps(x_t, t, pred)
        model_mean, _ = self.q_posterior(pred_x0, x_t, t)
        model_logvar = self.model_log_variance(t, var_values)
        kl = _mean_flat(normal_kl(true_mean, true_logvar, model_mean, model_logvar)) / math.log(2.0)
        nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    # -- training ----------------------------------------------------------------------------
    def training_losses(
        self,
        model_fn: ModelFn,
        x0: torch.Tensor,
        t: Optional[torch.Tensor] = None,
        noise: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Tuple[torch.Tensor, Dict[str, float]]:
        """The training loss of one batch.

        Args:
            model_fn: ``(x_t, t) -> output (B, C or 2C, ...)`` (bind the conditioning in a closure).
            x0: clean data ``(B, C, ...)``. t: ``(B,)`` timesteps (None = uniform in ``[0, T)``).
            noise: ``eps`` like ``x0`` (None = standard normal). generator: for ``t`` and ``noise``.

        Returns:
            ``(loss, {"mse": float, "vlb": float})``: ``loss`` a scalar with grad, the mean over the
            batch of ``mse + lambda * T * vlb`` (``vlb`` is 0 without learned sigma); ``mse`` is
            against ``eps`` or ``v``.

        Raises:
            ValueError: the model output has the wrong number of channels.
        """
        B, C = x0.shape[:2]
        if t is None:
            t = torch.randint(0, self.num_timesteps, (B,), device=x0.device, generator=generator)
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x_t = self.q_sample(x0, t, noise)
        out = model_fn(x_t, t)
        want = 2 * C if self.learn_sigma else C
        if out.shape[1] != want:
            raise ValueError(
                f"model output has {out.shape[1]} channels, expected {want} "
                f"(in_channels {C}, learn_sigma {self.learn_sigma})"
            )
        pred = out[:, :C]
        target = noise if self.prediction == "epsilon" else self.v_target(x0, t, noise)
        mse = _mean_flat((target.float() - pred.float()) ** 2)  # (B,)
        vlb = torch.zeros_like(mse)
        if self.learn_sigma:  # stop-grad on the mean: L_vlb trains only the variance
            vlb = self.vlb_terms(pred.detach().float(), out[:, C:].float(), x0.float(), x_t.float(), t)
        loss = (mse + self.vlb_weight * self.num_timesteps * vlb).mean()
        return loss, {"mse": float(mse.mean().detach()), "vlb": float(vlb.mean().detach())}

    # -- sampling ----------------------------------------------------------------------------
    def ddim_timesteps(self, steps: int, spacing: str = "leading") -> torch.Tensor:
        """``steps`` descending timesteps: ``leading`` ``(steps-1, ..., 1, 0) * (T // steps)``
        (diffusers' ``timestep_spacing="leading"``), or ``trailing`` from ``T-1`` down in strides
        of ``T / steps`` (``"trailing"``).

        Raises:
            ValueError: ``steps`` outside ``[1, T]`` or an unknown spacing.
        """
        T = self.num_timesteps
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be in [1, {T}], got {steps}")
        if spacing == "leading":
            return torch.arange(steps - 1, -1, -1, dtype=torch.long) * (T // steps)
        if spacing == "trailing":
            return (torch.round(torch.arange(T, 0, -T / steps, dtype=torch.float64)) - 1).long()[:steps]
        raise ValueError(f"spacing must be 'leading' or 'trailing', got {spacing!r}")

    @torch.no_grad()
    def ddim_sample(
        self,
        model_fn: ModelFn,
        noise: torch.Tensor,
        steps: int = 50,
        eta: float = 0.0,
        generator: Optional[torch.Generator] = None,
        clip_denoised: bool = False,
        spacing: str = "leading",
    ) -> torch.Tensor:
        """DDIM from ``x_T = noise`` to ``x0`` in ``steps`` model calls (Song et al. 2021 eq. 12).

        ``x_{s} = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat + sigma z``,
        ``sigma = eta * sqrt((1 - abar_s)/(1 - abar_t)) * sqrt(1 - abar_t/abar_s)``; the last step
        goes to ``abar = 1`` (returns ``x0_hat``). ``model_fn`` as in :meth:`training_losses` (a
        guided one from :func:`guided` / :func:`cfg_model_fn` works); variance channels are ignored.
        ``clip_denoised`` clamps ``x0_hat`` to [-1, 1] (pixels; leave off for latents); ``spacing``
        as :meth:`ddim_timesteps`.

        Returns:
            ``x0`` like ``noise``.
        """
        x = noise
        ts = self.ddim_timesteps(steps, spacing).tolist()
        C = x.shape[1]
        for i, step in enumerate(ts):
            t = torch.full((x.shape[0],), step, dtype=torch.long, device=x.device)
            x0, eps = self.predict_x0_eps(x, t, model_fn(x, t)[:, :C])
            if clip_denoised:
                x0 = x0.clamp(-1, 1)
                eps = (x - self._at(self.alphas_cumprod, t, x).sqrt() * x0) / (
                    1 - self._at(self.alphas_cumprod, t, x)
                ).sqrt()
            ab = float(self.alphas_cumprod[step])
            ab_prev = float(self.alphas_cumprod[ts[i + 1]]) if i + 1 < len(ts) else 1.0
            sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab)) * math.sqrt(max(0.0, 1 - ab / ab_prev))
            x = math.sqrt(ab_prev) * x0 + math.sqrt(max(0.0, 1 - ab_prev - sigma**2)) * eps
            if sigma > 0:
                x = x + sigma * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        return x


# ----------------------------------------------------------------------------- guidance


def _combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float, channels: int) -> torch.Tensor:
    """``cond + (scale - 1) * (cond - uncond)`` on the first ``channels``; the rest stay ``cond``'s."""
    guided_part = cond[:, :channels] + (scale - 1.0) * (cond[:, :channels] - uncond[:, :channels])
    return torch.cat([guided_part, cond[:, channels:]], dim=1)


def guided(model_fn_cond: ModelFn, model_fn_uncond: ModelFn, scale: float) -> ModelFn:
    """Classifier-free guidance of two model functions ``(x_t, t) -> out``: a model function that
    returns ``cond + (scale - 1) * (cond - uncond)`` on the first ``C = x_t.shape[1]`` channels
    (the prediction) and the conditional variance channels. Scale 1 calls only ``model_fn_cond``."""

    def fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if scale == 1.0:
            return model_fn_cond(x_t, t)
        return _combine(model_fn_cond(x_t, t), model_fn_uncond(x_t, t), scale, x_t.shape[1])

    return fn


def cfg_model_fn(
    model: Callable[..., torch.Tensor],
    y: Optional[torch.Tensor],
    null_y: Optional[torch.Tensor],
    scale: float,
    uncond_kwargs: Optional[Dict[str, Any]] = None,
    **kw: Any,
) -> ModelFn:
    """Classifier-free guidance of a DiT in one doubled batch (DiT's ``forward_with_cfg``).

    ``model(x, t, y=..., **kw)`` runs on ``cat([x_t, x_t])`` with ``cat([y, null_y])``; ``kw``
    (e.g. ``context``, ``context_mask``) are duplicated, except keys in ``uncond_kwargs`` whose
    values replace them in the unconditional half (e.g. ``{"context_mask": zeros}`` for text).
    Guidance applies to the first ``C`` output channels only; scale 1 runs the conditional half
    alone and returns its output exactly.
    """
    uncond_kwargs = uncond_kwargs or {}
    if y is not None and null_y is None and scale != 1.0:
        raise ValueError("cfg_model_fn: give null_y (the null class ids, e.g. full_like(y, num_classes)) with y")

    def fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if scale == 1.0:
            return model(x_t, t, y=y, **kw)
        both = {k: torch.cat([v, uncond_kwargs.get(k, v)]) if torch.is_tensor(v) else v for k, v in kw.items()}
        yy = None if y is None else torch.cat([y, null_y])
        out = model(torch.cat([x_t, x_t]), torch.cat([t, t]), y=yy, **both)
        cond, uncond = out.chunk(2)
        return _combine(cond, uncond, scale, x_t.shape[1])

    return fn
