"""The image VAE family: components, diffusers parity, the task's loss and GAN step, and one
end-to-end run (2 Ray Train workers, GAN on, crash and exact resume, PNG artifacts, PSNR up)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from helpers import StandInEngine, crash_then_rerun, read_trace

from megaray.errors import ConfigError
from megaray.families import build_run_config, load_config
from megaray.models.image import ImageVAE, ImageVAEConfig
from megaray.models.image.discriminator import NLayerDiscriminator, hinge_d_loss, hinge_g_loss
from megaray.models.image.vae import DiagonalGaussian


def _tiny(**kw) -> ImageVAE:
    torch.manual_seed(0)
    return ImageVAE(ImageVAEConfig.from_name("tiny", **kw))


# ----------------------------------------------------------------------------- network


@pytest.mark.parametrize("preset,f,latent", [("tiny", 2, 4), ("small_4_2", 4, 2), ("gan_4_2", 4, 2), ("kl_f8", 8, 4)])
def test_preset_names_give_the_downsampling_factor_and_latent_channels(preset, f, latent):
    cfg = ImageVAEConfig.from_name(preset)
    assert (cfg.downsample_factor, cfg.latent_channels) == (f, latent)


def test_encode_decode_sizes_on_a_non_square_image():
    vae = _tiny().eval()
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    post = vae.encode(x)
    assert post.mean.shape == post.logvar.shape == (2, 4, 8, 12) and vae.downsample_factor == 2
    assert vae.decode(post.sample()).shape == (2, 3, 16, 24)
    recon, post2 = vae(x)  # eval mode: the posterior mode
    torch.testing.assert_close(recon, vae.decode(post.mode()))
    with pytest.raises(ValueError, match="multiples of 2"):
        vae.encode(torch.zeros(1, 3, 15, 16))


def test_kl_f8_has_stable_diffusions_parameter_count():
    with torch.device("meta"):
        vae = ImageVAE(ImageVAEConfig.from_name("kl_f8"))
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863


def test_diagonal_gaussian_kl_sample_and_mode():
    torch.manual_seed(0)
    moments = torch.randn(3, 4, 5, 6)
    moments[:, 2:] = moments[:, 2:].clamp(-3, 3)
    post = DiagonalGaussian(moments)
    mean, logvar = moments[:, :2], moments[:, 2:]
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, (0.5 * logvar).exp()), torch.distributions.Normal(0.0, 1.0)
    ).sum(dim=[1, 2, 3])
    torch.testing.assert_close(post.kl(), ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(post.mode(), mean) and torch.equal(post.mean, mean)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(post.sample(generator=g1), post.sample(generator=g2))
    z = DiagonalGaussian(
        torch.cat([torch.zeros(1, 1, 200, 200), torch.full((1, 1, 200, 200), math.log(4.0))], 1)
    ).sample()
    assert abs(float(z.std()) - 2.0) < 0.05 and abs(float(z.mean())) < 0.05
    assert float(DiagonalGaussian(torch.full((1, 2, 1, 1), 50.0)).logvar.max()) == 20.0  # clamped as LDM


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="norm_groups"):
        ImageVAEConfig.from_name("tiny", channels=[8, 6])
    with pytest.raises(ConfigError, match="lpips_vgg_path"):
        ImageVAEConfig.from_name("tiny", perceptual_weight=1.0)
    with pytest.raises(ConfigError, match="disc_layers"):
        ImageVAEConfig.from_name("tiny", adversarial=True, disc_layers=4)
    with pytest.raises(ConfigError, match="valid presets"):
        ImageVAEConfig.from_name("kl_f4")


def test_perceptual_loss_reads_local_vgg_weights_and_names_a_missing_path(tmp_path):
    from torchvision.models.vgg import cfgs, make_layers

    from megaray.models.image.perceptual import VGGPerceptualLoss

    with pytest.raises(ConfigError, match=str(tmp_path / "nope.pth")):
        VGGPerceptualLoss(str(tmp_path / "nope.pth"))
    torch.manual_seed(0)
    path = tmp_path / "vgg16_features.pth"
    with torch.device("meta"):
        features = make_layers(cfgs["D"])
    state = {f"features.{k}": torch.randn(v.shape) * 0.05 for k, v in features.state_dict().items()}
    torch.save(state, path)
    loss = VGGPerceptualLoss(str(path))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert float(loss(x, x)) == 0.0 and float(loss(x, -x)) > 0.0
    assert not any(p.requires_grad for p in loss.parameters())


# ----------------------------------------------------------------------------- diffusers parity


def test_from_diffusers_reconstructs_like_autoencoder_kl():
    """A randomly initialised diffusers AutoencoderKL (3 stages, mid attention) converted: the
    posterior and the mode -> decode reconstruction equal diffusers' within 1e-4 (fp32)."""
    diffusers = pytest.importorskip("diffusers")
    from megaray.models.image.convert import config_from_diffusers, from_diffusers

    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    ).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))  # move norms and biases off their init too
    vae = from_diffusers(ref).eval()
    assert vae.cfg.downsample_factor == 4 and vae.cfg.scaling_factor == ref.config.scaling_factor
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        want_post = ref.encode(x).latent_dist
        got_post = vae.encode(x)
        torch.testing.assert_close(got_post.mean, want_post.mean, atol=1e-4, rtol=0)
        torch.testing.assert_close(got_post.logvar, want_post.logvar, atol=1e-4, rtol=0)
        want = ref.decode(want_post.mode()).sample
        got = vae.decode(got_post.mode())
    assert float(want.std()) > 0.05  # a non-trivial output
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="shift_factor"):
        config_from_diffusers(type("C", (), {**dict(ref.config), "shift_factor": 0.1})())


# ----------------------------------------------------------------------------- GAN pieces


def test_patchgan_shape_and_hinge_losses():
    d = NLayerDiscriminator(3, channels=4, n_layers=3)
    assert d(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)  # pix2pix's 70x70 PatchGAN at 256
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert float(hinge_d_loss(real, fake)) == pytest.approx(0.5 * (0.25 + 0.5))
    assert float(hinge_d_loss(torch.full((3,), 1.0), torch.full((3,), -1.0))) == 0.0
    assert float(hinge_g_loss(torch.tensor([1.0, 3.0]))) == -2.0


def test_task_loss_and_gan_step_with_an_adaptive_weight():
    from megaray.tasks.image_vae import ImageVAETask

    cfg = build_run_config(
        {
            "model": {
                "family": "image_vae",
                "preset": "tiny",
                "adversarial": True,
                "adv_start_step": 1,
                "kl_weight": 0.5,
                "l2_weight": 2.0,
            }
        }
    )
    task = ImageVAETask(cfg)
    torch.manual_seed(0)
    mods = task.build_modules()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    loss, recon, m = task.terms(mods["model"], x, sample=False)
    post = mods["model"].encode(x)
    by_hand = F.l1_loss(recon, x) + 2.0 * F.mse_loss(recon, x) + 0.5 * post.kl().mean() / (3 * 32 * 32)
    torch.testing.assert_close(loss, by_hand)
    assert m["kl"] == pytest.approx(float(post.kl().mean().detach()), rel=1e-5)

    # the adaptive weight, recomputed off the engines' graph, equals VQGAN's autograd.grad version
    from megaray.tasks.adversarial import adaptive_weight

    vae, disc = mods["model"], mods["disc"]
    captured = {}
    hook = vae.decoder.conv_out.register_forward_pre_hook(lambda _, a: captured.setdefault("h", a[0].detach()))
    recon, _ = vae(x, sample=False)
    hook.remove()
    rec, _ = task.recon_loss(recon, x)
    running = disc.main[3].running_mean.clone()
    want = adaptive_weight(rec, hinge_g_loss(disc(recon)), vae.last_layer)
    disc.main[3].running_mean.copy_(running)
    got = task.adaptive_ratio(vae.decoder.conv_out, captured["h"], x, disc)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert torch.equal(disc.main[3].running_mean, running)  # the private copy left BatchNorm alone
    vae.zero_grad(set_to_none=True)
    disc.zero_grad(set_to_none=True)

    engines = {k: StandInEngine(v) for k, v in mods.items()}
    out = task.train_step(engines, {"image": x, "label": torch.zeros(2, dtype=torch.int64)}, step=0)
    assert "loss_disc" not in out and engines["disc"].steps == 0  # before adv_start_step
    out = task.train_step(engines, {"image": x, "label": torch.zeros(2, dtype=torch.int64)}, step=1)
    assert {"loss_disc", "loss_gen_adv", "adv_weight"} <= set(out) and engines["disc"].steps == 1
    assert math.isfinite(out["adv_weight"]) and 0 < out["adv_weight"] < 1e4 * cfg.model.adv_weight
    assert out["loss"] == pytest.approx(out["loss_recon"] + out["adv_weight"] * out["loss_gen_adv"], rel=1e-5)
    assert all(p.grad is None and p.requires_grad for p in mods["disc"].parameters())


def test_shipped_image_vae_configs_load():
    from megaray.tune.config import load_tune_config

    tiny = load_config(REPO / "configs" / "image_vae_tiny.yaml")
    assert tiny.model.adversarial and tiny.train.optim_for("disc").lr != tiny.train.optim_for("model").lr
    gan = load_config(REPO / "configs" / "image_vae_gan.yaml")
    assert (gan.model.preset, gan.model.resolution, gan.model.downsample_factor) == ("gan_4_2", 256, 4)
    search = load_tune_config(REPO / "configs" / "tune" / "image_vae.yaml", strict=True)
    assert set(search.config.space) == {"model.kl_weight", "model.latent_channels", "train.lr", "model.adv_start_step"}


# ----------------------------------------------------------------------------- end to end


def _history(tmp_path, run_id, key):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


@pytest.mark.slow
def test_gan_image_vae_trains_crashes_resumes_exactly_and_logs_image_grids(image_shards, tmp_path, monkeypatch):
    """2 Ray Train workers, GAN from step 2 with its own lr: crashed right after the step-2
    checkpoint and re-run, the per-step losses (VAE, discriminator, adversarial) equal an
    uninterrupted run's; reconstruction grids land in MLflow; val PSNR rises from the first eval
    to the last."""
    from mlflow.tracking import MlflowClient

    from megaray.train.launch import fit

    def cfg(name):
        return load_config(
            REPO / "configs" / "image_vae_tiny.yaml",
            [
                f"name={name}",
                f"data.shards={image_shards}",
                "data.batch_size=4",
                "data.num_val_batches=2",
                f"scaling.storage_path={tmp_path / 'runs'}",
                f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                "train.max_steps=4",
                "train.checkpoint_every=2",
                "train.eval_every=2",
                "train.log_every=1",
                "train.warmup_steps=1",
                "train.lr=3e-3",
                "train.min_lr=1e-3",
                "scaling.max_failures=0",
                "model.adv_start_step=1",
                "train.modules.disc.lr=1e-4",
                "tracking.system_metrics_interval_s=0",
            ],
        )

    result = crash_then_rerun(monkeypatch, cfg("vae-crash"), tmp_path / "trace", 2)
    assert result.metrics["step"] == 4
    for rank in (0, 1):
        got = read_trace(tmp_path / "trace", rank)
        assert [r["step"] for r in got] == [1, 2, 3, 4] and got[1]["pid"] != got[2]["pid"]  # resumed at 3
    assert {p.name for p in Path(result.checkpoint).iterdir() if p.is_dir()} == {"model", "disc"}
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for step in (2, 4):
        files = {Path(a.path).name for a in client.list_artifacts(result.mlflow_run_id, f"eval/step_{step:08d}")}
        assert "recon_grid.png" in files, (step, files)

    monkeypatch.delenv("MEGARAY_TRACE")
    straight = fit(cfg("vae-straight"))
    for key in ("loss", "loss_disc", "loss_gen_adv", "adv_weight", "val_loss"):
        resumed, want = _history(tmp_path, result.mlflow_run_id, key), _history(tmp_path, straight.mlflow_run_id, key)
        steps = sorted(want)
        assert sorted(resumed) == steps and steps[-1] == 4, key
        assert [resumed[s] for s in steps] == pytest.approx([want[s] for s in steps], abs=1e-6, rel=1e-6), key
    assert sorted(_history(tmp_path, result.mlflow_run_id, "loss_disc")) == [2, 3, 4]  # GAN from step 2
    lr, lr_disc = (_history(tmp_path, result.mlflow_run_id, k) for k in ("lr", "lr_disc"))
    assert lr_disc[1] <= 1e-4 * 1.0001 and lr[1] > 1e-3  # each engine its own learning rate
    psnr = _history(tmp_path, result.mlflow_run_id, "val_psnr")
    ssim = _history(tmp_path, result.mlflow_run_id, "val_ssim")
    assert sorted(psnr) == sorted(ssim) == [2, 4]
    assert psnr[4] > psnr[2], psnr

    from megaray.train.checkpoint import load_for_inference

    vae, run_cfg, _ = load_for_inference(result.checkpoint)  # like every family
    assert isinstance(vae, ImageVAE) and run_cfg.model.adversarial
    assert vae.encode(torch.zeros(1, 3, 32, 32)).mode().shape == (1, 4, 16, 16)
