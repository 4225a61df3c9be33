"""DiT network and Gaussian diffusion process (no Ray): sizes, diffusers parity, the process's
formulas against diffusers' schedulers, guidance, conditioning, non-square inputs, a tiny overfit."""

from __future__ import annotations

import math

import pytest
import torch

from megaray.errors import ConfigError
from megaray.models.diffusion import DiT, DiTConfig, GaussianDiffusion, cfg_model_fn, guided

# facebookresearch/DiT models.py at 256x256 (32x32x4 latents, learn_sigma, 1000 classes), pos_embed included
REFERENCE_PARAMS = {"DiT-S/2": 32_963_360, "DiT-B/2": 130_512_416, "DiT-L/2": 458_102_816, "DiT-XL/2": 675_129_632}


def _randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Random values in every parameter, so zero-initialised gates and heads do not hide a path."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def _tiny(**kw) -> DiT:
    torch.manual_seed(0)
    return _randomize(DiT(DiTConfig.from_name("tiny", **kw)))


# ----------------------------------------------------------------------------- config and sizes


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_preset_parameter_counts_match_the_dit_reference(name):
    with torch.device("meta"):
        model = DiT(DiTConfig.from_name(name))
    n = model.num_params()
    assert abs(n - REFERENCE_PARAMS[name]) <= 0.01 * REFERENCE_PARAMS[name], (name, n)
    assert model.config.out_channels == 8 and model.config.grid_input == (32, 32)


def test_seed_presets_sit_between_s_and_b():
    for name in ("small_dit", "medium_dit"):
        with torch.device("meta"):
            n = DiT(DiTConfig.from_name(name)).num_params()
        assert REFERENCE_PARAMS["DiT-S/2"] < n < REFERENCE_PARAMS["DiT-B/2"], (name, n)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (dict(input_size=9), "input_size"),
        (dict(input_size=[80, 63]), "input_size"),
        (dict(hidden_size=66, num_heads=4), "hidden_size"),
        (dict(text_vocab_size=256), "text_vocab_size"),
        (dict(schedule="quadratic"), "schedule"),
    ],
)
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        DiTConfig.from_name("tiny", **overrides)


# ----------------------------------------------------------------------------- diffusers parity


def _diffusers_dit(seed: int = 0, tie: bool = True):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    hf = diffusers.DiTTransformer2DModel(
        num_attention_heads=4,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=3,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
    )
    _randomize(hf, seed, std=0.05)
    if tie:  # as in checkpoints converted from the original weights: one embedder, copied per block
        first = hf.transformer_blocks[0].norm1.emb.state_dict()
        for block in hf.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(first)
    return hf


def test_from_diffusers_matches_diffusers_outputs():
    from megaray.models.diffusion import from_diffusers

    hf = _diffusers_dit()
    model = from_diffusers(hf).eval()
    assert model.config.learn_sigma and model.config.num_classes == 10 and model.config.freq_shift == 1.0
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=g)
    t, y = torch.tensor([0, 17, 999]), torch.tensor([1, 9, 10])  # 10 = the null class
    with torch.no_grad():
        ref = hf(x, timestep=t, class_labels=y).sample
        torch.testing.assert_close(model(x, t, y), ref, atol=1e-4, rtol=1e-4)
        model.blocks[1].mlp.c_fc.weight[0, 0] += 0.5  # the comparison sees a single weight
        assert (model(x, t, y) - ref).abs().max() > 1e-4


def test_from_diffusers_refuses_per_block_embedders_that_differ():
    from megaray.models.diffusion import from_diffusers

    hf = _diffusers_dit()
    with torch.no_grad():
        hf.transformer_blocks[2].norm1.emb.class_embedder.embedding_table.weight[3, 0] += 1.0
    with pytest.raises(ValueError, match=r"transformer_blocks\.2\.norm1\.emb\.class_embedder"):
        from_diffusers(hf)


# ----------------------------------------------------------------------------- the process


def test_schedules_match_their_formulas_and_diffusers():
    schedulers = pytest.importorskip("diffusers").DDPMScheduler
    T = 1000
    lin, cos = GaussianDiffusion(T, "linear"), GaussianDiffusion(T, "cosine")
    for d in (lin, cos):
        ab = d.alphas_cumprod
        assert (ab[1:] < ab[:-1]).all() and 0 < ab[-1] < ab[0] < 1
    torch.testing.assert_close(
        lin.alphas_cumprod, torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0)
    )
    s, t = 0.008, torch.arange(1, T + 1, dtype=torch.float64) / T
    f = lambda u: torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    unclipped = cos.betas < 0.999  # alpha_bar(t) / alpha_bar(0) until the beta clip at 0.999
    torch.testing.assert_close(
        cos.alphas_cumprod[unclipped], (f(t) / f(torch.zeros(1, dtype=torch.float64)))[unclipped]
    )
    for ours, name in ((lin, "linear"), (cos, "squaredcos_cap_v2")):
        ref = schedulers(num_train_timesteps=T, beta_schedule=name).alphas_cumprod.double()
        torch.testing.assert_close(ours.alphas_cumprod, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_predictions_recover_x0_and_noise(prediction):
    d = GaussianDiffusion(1000, "cosine", prediction)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(5, 2, 4, 4, generator=g), torch.randn(5, 2, 4, 4, generator=g)
    t = torch.tensor([0, 1, 300, 700, 999])
    x_t = d.q_sample(x0, t, noise)
    target = noise if prediction == "epsilon" else d.v_target(x0, t, noise)
    rx0, reps = d.predict_x0_eps(x_t, t, target)
    torch.testing.assert_close(reps, noise, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        rx0, x0, atol=2e-3 if prediction == "epsilon" else 1e-5, rtol=1e-4
    )  # eps at t=999 divides by sqrt(abar)
    if prediction == "v":  # v = sqrt(abar) eps - sqrt(1 - abar) x0, written out
        ab = d.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        torch.testing.assert_close(target, ab.sqrt() * noise - (1 - ab).sqrt() * x0)


@pytest.mark.parametrize(
    "prediction, diffusers_name, spacing",
    [("epsilon", "epsilon", "leading"), ("v", "v_prediction", "trailing"), ("epsilon", "epsilon", "trailing")],
)
def test_ddim_matches_diffusers_ddim_scheduler(prediction, diffusers_name, spacing):
    DDIMScheduler = pytest.importorskip("diffusers").DDIMScheduler
    d = GaussianDiffusion(1000, "linear", prediction)
    model_fn = lambda x, t: 0.3 * x + 0.01 * t.float().view(-1, 1, 1, 1).sin()  # noqa: E731  any smooth function
    noise = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    ours = d.ddim_sample(model_fn, noise, steps=10, spacing=spacing)
    sched = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=True,
        prediction_type=diffusers_name,
        timestep_spacing=spacing,
    )
    sched.set_timesteps(10)
    assert sched.timesteps.tolist() == d.ddim_timesteps(10, spacing).tolist()
    x = noise
    for t in sched.timesteps:
        x = sched.step(model_fn(x, t.expand(2)), t, x, eta=0.0).prev_sample
    torch.testing.assert_close(ours, x, atol=1e-4, rtol=1e-4)


def test_ddim_sampling_is_finite_shaped_and_seeded():
    model = _tiny()
    d = GaussianDiffusion.from_config(model.config)
    y = torch.tensor([0, 3, 10])
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    fn = cfg_model_fn(model, y, torch.full_like(y, 10), 4.0)
    a = d.ddim_sample(fn, noise, steps=5, eta=1.0, generator=torch.Generator().manual_seed(1))
    b = d.ddim_sample(fn, noise, steps=5, eta=1.0, generator=torch.Generator().manual_seed(1))
    assert a.shape == noise.shape and torch.isfinite(a).all() and torch.equal(a, b)
    assert torch.isfinite(d.ddim_sample(fn, noise, steps=3, eta=0.0)).all()


def test_cfg_scale_one_is_the_conditional_prediction_and_guides_only_epsilon():
    model = _tiny()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    y, null = torch.tensor([1, 2]), torch.tensor([10, 10])
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, null)
        assert torch.equal(cfg_model_fn(model, y, null, 1.0)(x, t), cond)
        assert torch.equal(guided(lambda a, b: model(a, b, y), lambda a, b: model(a, b, null), 1.0)(x, t), cond)
        out = cfg_model_fn(model, y, null, 4.0)(x, t)  # doubled batch
        torch.testing.assert_close(
            out[:, :4], uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4]), atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(out[:, 4:], cond[:, 4:], atol=1e-6, rtol=1e-6)  # variance channels stay conditional
        assert (out[:, :4] - cond[:, :4]).abs().max() > 1e-3


def test_training_loss_hybrid_and_channel_check():
    d = GaussianDiffusion(1000, "linear", "epsilon", learn_sigma=True)
    x0 = torch.randn(4, 2, 4, 4).clamp(-1, 1)
    noise, t = torch.randn_like(x0), torch.tensor([0, 5, 500, 999])
    perfect = lambda x_t, tt: torch.cat([noise, torch.zeros_like(noise)], 1)  # noqa: E731
    loss, stats = d.training_losses(perfect, x0, t, noise)
    assert stats["mse"] == 0.0 and stats["vlb"] > 0 and loss.item() == pytest.approx(stats["vlb"], rel=1e-5)
    with pytest.raises(ValueError, match="channels"):
        d.training_losses(lambda x_t, tt: x_t, x0, t, noise)
    # the variance channels get a gradient from L_vlb, the mean none (stop-grad on the mean)
    out = torch.zeros(4, 4, 4, 4, requires_grad=True)
    d.training_losses(lambda x_t, tt: out, x0, t, noise)[0].backward()
    assert out.grad[:, 2:].abs().sum() > 0
    mse_only = (out.grad[:, :2] - (-2 * noise / noise[0].numel() / 4)).abs().max()
    assert mse_only < 1e-6


def test_tiny_dit_overfits_a_handful_of_latents():
    torch.manual_seed(0)
    cfg = DiTConfig.from_name("tiny", class_dropout_prob=0.0, num_timesteps=100)
    model, d = DiT(cfg), GaussianDiffusion.from_config(cfg)
    g = torch.Generator().manual_seed(0)
    x0, y = torch.randn(4, 4, 8, 8, generator=g).clamp(-1, 1), torch.arange(4)
    t_eval, n_eval = torch.randint(0, 100, (32,), generator=g), torch.randn(32, 4, 8, 8, generator=g)

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss, _ = d.training_losses(lambda a, b: model(a, b, y.repeat(8)), x0.repeat(8, 1, 1, 1), t_eval, n_eval)
        model.train()
        return loss.item()

    before = eval_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    for _ in range(40):
        loss, _ = d.training_losses(lambda a, b: model(a, b, y.repeat(4)), x0.repeat(4, 1, 1, 1), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after <= 0.5 * before, (before, after)


# ----------------------------------------------------------------------------- conditioning and shapes


def test_cross_attention_context_masks_and_token_ids():
    model = _tiny(context_dim=16, text_vocab_size=64)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 600]), torch.tensor([1, 2])
    ids = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        none = model(x, t, y)
        with_text = model(x, t, y, context=ids)
        assert (with_text - none).abs().max() > 1e-3
        assert not torch.equal(model(x, t, y, context=ids.flip(1)), with_text)  # order matters (positions)
        masked = model(x, t, y, context=ids, context_mask=torch.zeros(2, 5, dtype=torch.bool))
        assert torch.equal(masked, none)
        keep3 = torch.tensor([[1, 1, 1, 0, 0]] * 2, dtype=torch.bool)
        padded = ids.clone()
        padded[:, 3:] = 0
        torch.testing.assert_close(
            model(x, t, y, context=ids, context_mask=keep3),
            model(x, t, y, context=padded, context_mask=keep3),
            atol=1e-6,
            rtol=1e-6,
        )
        feats = torch.randn(2, 5, 16)
        assert model(x, t, y, context=feats).shape == (2, 8, 8, 8)
    with pytest.raises(ValueError, match="context_dim 0"):
        _tiny()(x, t, y, context=feats)


def test_training_drops_class_and_text_together_for_guidance():
    model = _tiny(context_dim=16, class_dropout_prob=0.5)
    x, t = torch.randn(16, 4, 8, 8), torch.full((16,), 50)
    y, ctx = torch.arange(16) % 10, torch.randn(16, 3, 16)
    with torch.no_grad():
        cond, uncond = model(x, t, y, context=ctx), model(x, t, torch.full_like(y, 10))
        model.train()
        torch.manual_seed(3)
        mixed = model(x, t, y, context=ctx)
    is_cond = (mixed - cond).flatten(1).abs().amax(1) < 1e-5
    is_uncond = (mixed - uncond).flatten(1).abs().amax(1) < 1e-5
    assert (is_cond ^ is_uncond).all() and is_cond.any() and is_uncond.any()


def test_non_square_mel_inputs():
    model = _tiny(input_size=[16, 24], in_channels=1, num_classes=0, context_dim=8)
    mel = torch.randn(2, 1, 16, 24)  # (B, 1, n_mels, frames)
    with torch.no_grad():
        out = model(mel, torch.tensor([1, 2]), context=torch.randn(2, 4, 8))
        assert out.shape == (2, 2, 16, 24) and torch.isfinite(out).all()
        longer = model(torch.randn(2, 1, 16, 40), torch.tensor([1, 2]))  # more frames than configured
        assert longer.shape == (2, 2, 16, 40)
        with pytest.raises(ValueError, match="patch_size"):
            model(torch.randn(1, 1, 16, 25), torch.tensor([1]))
    # the grid is row-major over (H/p, W/p): the sin-cos table differs per row and column
    assert not torch.equal(model.positions(8, 12)[0, 1], model.positions(8, 12)[0, 12])


def test_activation_checkpointing_gives_the_same_gradients():
    model = _tiny(class_dropout_prob=0.0).train()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 50]), torch.tensor([1, 2])
    grads = []
    for flag in (False, True):
        model.set_activation_checkpointing(flag).zero_grad()
        model(x, t, y).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])
    with pytest.raises(ValueError, match="null class"):
        model(x, t)


def test_vlb_kl_is_the_gaussian_kl():
    from torch.distributions import Normal, kl_divergence

    from megaray.models.diffusion.process import normal_kl

    g = torch.Generator().manual_seed(0)
    m1, m2, lv1, lv2 = (torch.randn(50, generator=g) for _ in range(4))
    ref = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), ref, atol=1e-5, rtol=1e-5)


def test_ddim_samples_of_a_memorising_dit_are_its_training_latents():
    """End to end: train a tiny class-conditioned DiT (v prediction, cosine schedule, learned sigma)
    on two latents, then DDIM from fresh noise must land on the latent of the class asked for."""
    torch.manual_seed(0)
    cfg = DiTConfig.from_name("tiny", class_dropout_prob=0.0, prediction="v", schedule="cosine")
    model, d = DiT(cfg), GaussianDiffusion.from_config(cfg)
    g = torch.Generator().manual_seed(0)
    x0, y = torch.randn(2, 4, 8, 8, generator=g).clamp(-1, 1), torch.arange(2)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    for _ in range(400):
        loss, _ = d.training_losses(lambda a, b: model(a, b, y.repeat(8)), x0.repeat(8, 1, 1, 1), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    samples = d.ddim_sample(lambda a, b: model(a, b, y.repeat(4)), torch.randn(8, 4, 8, 8, generator=g), steps=50)
    err = (samples - x0.repeat(4, 1, 1, 1)).square().mean()
    assert err < 0.05 * x0.var(), (err, x0.var())
