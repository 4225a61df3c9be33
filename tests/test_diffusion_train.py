"""Diffusion training and sampling end to end: image latents from a frozen VAE through Ray Data,
a class-conditioned DiT with 2 Ray Train workers that crashes and resumes exactly, a text-conditioned
mel DiT on speech whose samples a vocoder renders, ``megaray sample`` for both, and the errors a
user gets for a missing or mismatched VAE. The VAE and the vocoder are randomly initialised tiny
networks saved in the checkpoint layout :func:`~megaray.train.checkpoint.load_for_inference` reads
(their quality is not what these tests check)."""

from __future__ import annotations

import glob
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REPO
from helpers import read_trace
from typer.testing import CliRunner

from megaray.cli import app
from megaray.families import build_model, build_run_config, load_config
from megaray.train.checkpoint import STATE_FILE, WEIGHTS_FILE

pytestmark = pytest.mark.slow
runner = CliRunner()


def _save_checkpoint(path: Path, model_section: dict, seed: int = 0) -> Path:
    """A randomly initialised network of ``model_section`` as a one-step checkpoint."""
    torch.manual_seed(seed)
    cfg = build_run_config({"model": model_section})
    path.mkdir(parents=True)
    cfg.to_yaml(path / "config.yaml")
    torch.save(build_model(cfg.model).state_dict(), path / WEIGHTS_FILE)
    (path / STATE_FILE).write_text(json.dumps({"step": 1, "tokens": 0}))
    return path


def _history(db: Path, run_id: str, key: str):
    from mlflow.tracking import MlflowClient

    return {m.step: m.value for m in MlflowClient(f"sqlite:///{db}").get_metric_history(run_id, key)}


def _artifacts(db: Path, run_id: str, step: int):
    from mlflow.tracking import MlflowClient

    return {Path(a.path).name for a in MlflowClient(f"sqlite:///{db}").list_artifacts(run_id, f"eval/step_{step:08d}")}


@pytest.fixture(scope="module")
def vae_ckpt(tmp_path_factory):
    return _save_checkpoint(tmp_path_factory.mktemp("vae") / "step_00000001", {"family": "image_vae", "preset": "tiny"})


@pytest.fixture(scope="module")
def latents(image_shards, vae_ckpt, tmp_path_factory):
    """``megaray prepare image-latents`` as docs/diffusion.md runs it (the suite's run of the
    command: tests/test_docs_commands.py skips the image journey for these tests): its manifest."""
    from megaray.data.manifest import read_manifest

    out = tmp_path_factory.mktemp("latents") / "skimage-32-latents"
    r = runner.invoke(
        app,
        ["prepare", "image-latents", "--vae-checkpoint", str(vae_ckpt), "--source", image_shards, "--out", str(out)],
    )
    assert r.exit_code == 0, (r.output, r.exception)
    return {**read_manifest(str(out), kind="image_latents"), "out_dir": str(out)}


def test_image_latents_are_the_vaes_scaled_means_of_every_image(image_shards, vae_ckpt, latents):
    import numpy as np
    import pyarrow.parquet as pq

    from megaray.data.image import load_examples, read_manifest
    from megaray.train.checkpoint import load_for_inference

    images = read_manifest(image_shards)
    assert latents["kind"] == "image_latents" and latents["latent_channels"] == 4 and latents["latent_size"] == 16
    assert latents["labels"] == images["labels"] and latents["vae_checkpoint"] == str(vae_ckpt)
    for split in ("train", "val"):
        rows = pq.read_table(glob.glob(f"{latents['out_dir']}/{split}/*.parquet")).to_pylist()
        assert len(rows) == latents["splits"][split]["latents"] == images["splits"][split]["images"]
        assert all(len(r["latent"]) == 4 * 16 * 16 for r in rows)
    # each validation image's centre crop, encoded here, is one of the stored latents (same label)
    vae = load_for_inference(vae_ckpt)[0]
    stored = {}
    for r in rows:
        stored.setdefault(r["label"], []).append(np.asarray(r["latent"]))
    for ex in load_examples(image_shards, "val", n=3):
        with torch.no_grad():
            z = (vae.cfg.scaling_factor * vae.encode(torch.as_tensor(ex["image"])[None]).mean)[0].numpy().reshape(-1)
        assert min(np.abs(s - z).max() for s in stored[ex["label"]]) < 1e-5


def _dit_cfg(latents, tmp_path, *extra):
    n_classes = len(latents["labels"])
    return load_config(
        REPO / "configs" / "dit_tiny.yaml",
        [
            f"data.shards={latents['out_dir']}",
            "data.batch_size=4",
            "data.num_val_batches=1",
            f"model.num_classes={n_classes}",
            f"scaling.storage_path={tmp_path / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "train.max_steps=4",
            "train.checkpoint_every=2",
            "train.eval_every=2",
            "train.log_every=1",
            "train.warmup_steps=1",
            "train.ema_decay=0.5",
            "scaling.max_failures=0",
            "diffusion.sample_steps=2",
            "diffusion.n_samples=4",
            *extra,
        ],
    )


def test_class_dit_trains_crashes_resumes_exactly_and_samples(latents, tmp_path, monkeypatch):
    """Crashed after its step-2 checkpoint and re-run, the DiT's per-step losses (random timesteps,
    noise and label dropout included), EMA and val_loss equal an uninterrupted run's; each eval logs
    a sample grid; `megaray sample` draws a grid of the requested size from the checkpoint."""
    from PIL import Image

    from megaray.train.launch import fit

    # one restart allowed: Ray Train restarts the worker group from the step-2 checkpoint
    monkeypatch.setenv("MEGARAY_TRACE", str(tmp_path / "trace"))
    monkeypatch.setenv("MEGARAY_FAULT_AT_STEP", "2")
    result = fit(_dit_cfg(latents, tmp_path, "name=dit-crash", "scaling.max_failures=1"))
    assert result.metrics["step"] == 4
    for rank in (0, 1):
        got = read_trace(tmp_path / "trace", rank)
        assert [r["step"] for r in got] == [1, 2, 3, 4] and got[1]["pid"] != got[2]["pid"]  # new workers at 3
    monkeypatch.delenv("MEGARAY_TRACE")
    monkeypatch.delenv("MEGARAY_FAULT_AT_STEP")
    straight = fit(_dit_cfg(latents, tmp_path, "name=dit-straight"))
    db = tmp_path / "mlflow.db"
    for key in ("loss", "mse", "vlb"):
        resumed, want = _history(db, result.mlflow_run_id, key), _history(db, straight.mlflow_run_id, key)
        assert sorted(resumed) == sorted(want) == [1, 2, 3, 4], key
        assert [resumed[s] for s in want] == pytest.approx([want[s] for s in want], abs=1e-6, rel=1e-6), key
    assert result.metrics["val_loss"] == pytest.approx(straight.metrics["val_loss"], abs=1e-6, rel=1e-6)
    ema, ema_straight = (torch.load(Path(r.checkpoint) / "ema.pt") for r in (result, straight))
    for k in ema:
        torch.testing.assert_close(ema[k], ema_straight[k], atol=1e-6, rtol=1e-6)
    for step in (2, 4):
        assert "samples.png" in _artifacts(db, result.mlflow_run_id, step)

    names = sorted(latents["labels"])
    r = runner.invoke(
        app,
        [
            "sample",
            "--checkpoint",
            str(tmp_path / "runs" / "dit-crash"),
            "--n",
            "6",
            "--class",
            names[1],
            "--steps",
            "3",
            "--cfg",
            "2.0",
            "--output",
            str(tmp_path / "grid.png"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "grid.png").size == (3 * 32 + 4, 2 * 32 + 3)  # 6 images, 3 a row, 1 px padding
    bad = runner.invoke(
        app, ["sample", "--checkpoint", result.checkpoint, "--class", "nope", "--output", str(tmp_path / "x.png")]
    )
    assert bad.exit_code == 2 and "--class 'nope'" in bad.output and names[0] in bad.output


def test_vae_checkpoint_missing_or_with_other_latent_channels_is_a_clear_error(
    latents, image_shards, vae_ckpt, tmp_path
):
    from megaray.errors import ConfigError
    from megaray.tasks.dit import dit_task

    missing = tmp_path / "no-such-vae"
    r = runner.invoke(
        app,
        [
            "prepare",
            "image-latents",
            "--vae-checkpoint",
            str(missing),
            "--source",
            image_shards,
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert r.exit_code == 2 and "error: checkpoint not found" in r.output and str(missing) in r.output
    wide = _save_checkpoint(
        tmp_path / "vae8" / "step_00000001", {"family": "image_vae", "preset": "tiny", "latent_channels": 8}
    )
    cfg = _dit_cfg(latents, tmp_path, f"diffusion.vae_checkpoint={wide}")
    with pytest.raises(
        ConfigError,
        match=r"model.in_channels \(4\) differs from the latent_channels \(8\) of the VAE "
        rf"at {wide} \(diffusion.vae_checkpoint\)",
    ):
        dit_task(cfg).datasets()
    with pytest.raises(ConfigError, match=r"diffusion.vae_checkpoint: .*no-such-vae: no image VAE checkpoint"):
        dit_task(_dit_cfg(latents, tmp_path, f"diffusion.vae_checkpoint={missing}")).datasets()


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
def test_mel_dit_trains_on_speech_and_logs_a_vocoded_wav(speech_shards, tmp_path):
    """A text-conditioned mel DiT trains on the espeak clips with their transcripts and logs a mel
    PNG and wavs decoded by the vocoder; `megaray sample --text` writes a wav soundfile reads."""
    import soundfile as sf

    from megaray.train.launch import fit

    voc = _save_checkpoint(
        tmp_path / "vocoder" / "step_00000001", {"family": "vocoder", "preset": "tiny_lightheaded_freq_domain_vocoder"}
    )
    cfg = load_config(
        REPO / "configs" / "mel_dit_tiny.yaml",
        [
            f"data.shards={speech_shards}",
            "data.batch_size=2",
            "data.num_val_batches=1",
            "model.input_size=[80,32]",
            f"scaling.storage_path={tmp_path / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "scaling.num_workers=1",
            "train.max_steps=2",
            "train.eval_every=2",
            "train.checkpoint_every=2",
            "train.log_every=1",
            "train.warmup_steps=1",
            "diffusion.sample_steps=2",
            f"diffusion.vocoder_checkpoint={voc}",
        ],
    )
    result = fit(cfg)
    assert result.metrics["step"] == 2 and result.metrics["val_loss"] > 0
    files = _artifacts(tmp_path / "mlflow.db", result.mlflow_run_id, 2)
    assert {"samples_mel.png", "samples0.wav", "samples1.wav"} <= files

    r = runner.invoke(
        app,
        [
            "sample",
            "--checkpoint",
            result.checkpoint,
            "--n",
            "2",
            "--text",
            "hello world",
            "--steps",
            "2",
            "--output",
            str(tmp_path / "hello.png"),
        ],
    )
    assert r.exit_code == 0, r.output
    wave, sr = sf.read(tmp_path / "hello0.wav")
    assert sr == 16000 and len(wave) == 31 * 128 and (tmp_path / "hello_mel.png").is_file()


def test_gpt_text_encoder_gives_the_frozen_gpts_final_hidden_states(tmp_path):
    """``diffusion.text_encoder: gpt``: the byte ids of the batch are decoded, re-tokenized with the
    GPT checkpoint's tokenizer.json, and the context is the GPT's final-norm hidden states (its LM
    head maps them to the GPT's own logits); a mel DiT trains and samples with it."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from megaray.data.audio.datasets import text_bytes
    from megaray.tasks.diffusion import DiffusionInfo, load_frozen, sample
    from megaray.tasks.dit import dit_task
    from megaray.tasks.mel_diffusion import MelDiffusionTask

    gpt_dir = _save_checkpoint(tmp_path / "gpt" / "step_00000001", {"family": "gpt", "preset": "debug"})
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(gpt_dir / "tokenizer.json"))
    width = load_config(gpt_dir / "config.yaml").model.n_embd
    cfg = build_run_config(
        {
            "model": {
                "family": "dit",
                "preset": "tiny",
                "input_size": [80, 16],
                "in_channels": 1,
                "num_classes": 0,
                "context_dim": width,
            },
            "diffusion": {"text_encoder": "gpt", "text_encoder_path": str(gpt_dir.parent), "sample_steps": 2},
        }
    )
    task = dit_task(
        cfg,
        DiffusionInfo(
            kind="audio",
            texts=["hello world"],
            mel={"sample_rate": 16000, "n_mels": 80, "n_fft": 512, "hop_length": 128},
        ),
    )
    assert isinstance(task, MelDiffusionTask)  # picked by the info's kind
    task.text.load()
    ids, mask = text_bytes(["hello world", "world"], 16)
    batch = task.collate(
        {"mel": torch.randn(2, 80, 16), "text_ids": torch.from_numpy(ids), "text_mask": torch.from_numpy(mask)},
        torch.device("cpu"),
    )
    cond = task.conditioning(batch)
    assert cond["context_mask"].tolist() == [[True, True], [True, False]]
    gpt = load_frozen(str(gpt_dir))
    with torch.no_grad():
        torch.testing.assert_close(gpt.lm_head(cond["context"][:1]), gpt(torch.tensor([[1, 2]])))
    net = build_model(cfg.model)
    loss, _ = task.loss(net, batch)
    loss.backward()
    assert torch.isfinite(loss) and net.blocks[0].cross_attn is not None
    x = sample(task, net.eval(), 2, {"texts": ["hello", "world"]}, 3.0, 2, 0)
    assert x.shape == (2, 1, 80, 16) and torch.isfinite(x).all()


# --------------------------------------------------------------------------- text-to-image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def test_text_to_image_dit_trains_with_captions_through_ray(latents, tmp_path):
    """The latents keep a caption column (scikit-image's photographs carry labels, so each caption
    is "a photo of <label>"); a text-conditioned DiT (configs/image_dit_text_tiny.yaml) trains on
    them through the one loop and logs a sample grid drawn for the first validation captions."""
    import pyarrow.parquet as pq

    from megaray.train.launch import fit

    rows = pq.read_table(glob.glob(f"{latents['out_dir']}/train/*.parquet"), columns=["caption", "label"]).to_pylist()
    assert len(rows) == latents["splits"]["train"]["latents"] and all(r["caption"] == "" for r in rows)
    cfg = load_config(
        REPO / "configs" / "image_dit_text_tiny.yaml",
        [
            f"data.shards={latents['out_dir']}",
            "data.batch_size=2",
            "data.num_val_batches=1",
            f"scaling.storage_path={tmp_path / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "train.max_steps=2",
            "train.checkpoint_every=2",
            "train.eval_every=2",
            "train.log_every=1",
            "train.warmup_steps=1",
            "scaling.num_workers=1",
            "scaling.max_failures=0",
            "diffusion.sample_steps=2",
            "diffusion.n_samples=2",
        ],
    )
    result = fit(cfg)
    assert result.metrics["step"] == 2 and "val_loss" in result.metrics
    assert "samples.png" in _artifacts(tmp_path / "mlflow.db", result.mlflow_run_id, 2)
    info = json.loads((Path(result.checkpoint) / "diffusion.json").read_text())
    names = {v: k for k, v in latents["labels"].items()}
    assert len(info["texts"]) == 2 and all(
        t.startswith("a photo of ") and t[11:] in names.values() for t in info["texts"]
    )


def test_text_to_image_dit_overfits_four_captioned_photographs(ray_cluster, tmp_path):
    """Four photographs with caption sidecars go through `prepare images` and `prepare
    image-latents` (captions kept); a tiny image VAE and the text-conditioned DiT of
    configs/image_dit_text_tiny.yaml are fitted to them in this process (the task's own batches,
    loss and checkpoint files; the Ray loop is the test above); then for each caption `megaray
    sample --text CAPTION` draws an image closer (MSE) to its own photograph than to the other three."""
    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image
    from skimage import data as skdata

    from megaray.data.image import load_examples, prepare_images
    from megaray.inference.latents import encode_image_latents
    from megaray.tasks.dit import dit_task
    from megaray.tasks.image_diffusion import ImageDiffusionTask, _reshape_latents

    torch.manual_seed(0)
    src = tmp_path / "photos"
    src.mkdir()
    for name in PHOTOS:
        im = Image.fromarray(getattr(skdata, name)()).convert("RGB")
        side = min(im.size)
        left, top = (im.size[0] - side) // 2, (im.size[1] - side) // 2
        im.crop((left, top, left + side, top + side)).resize((32, 32), Image.BICUBIC).save(src / f"{name}.png")
        (src / f"{name}.txt").write_text(f"a photo of {name}")
    images = tmp_path / "images"
    man = prepare_images(str(src), str(images), size=32, val_fraction=0.25, seed=0, concurrency=1, verbose=False)
    assert man["captions"] == 4
    photos = {
        ex["name"].rsplit(".", 1)[0]: torch.as_tensor(ex["image"])
        for split in ("train", "val")
        for ex in load_examples(str(images), split, n=4)
    }
    assert sorted(photos) == sorted(PHOTOS)

    # a tiny image VAE that reconstructs the four (L1, 400 Adam steps)
    vae_cfg = build_run_config({"model": {"family": "image_vae", "preset": "tiny"}})
    vae = build_model(vae_cfg.model)
    x = torch.stack([photos[n] for n in PHOTOS])
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    for _ in range(400):
        post = vae.encode(x)
        loss = (vae.decode(post.sample()) - x).abs().mean() + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    vae_ckpt = tmp_path / "vae" / "step_00000400"
    vae_ckpt.mkdir(parents=True)
    vae_cfg.to_yaml(vae_ckpt / "config.yaml")
    torch.save(vae.state_dict(), vae_ckpt / WEIGHTS_FILE)
    (vae_ckpt / STATE_FILE).write_text(json.dumps({"step": 400, "tokens": 0}))

    lat = encode_image_latents(
        str(images), str(tmp_path / "latents"), vae.eval(), vae_checkpoint=str(vae_ckpt), verbose=False
    )
    assert lat["captions"] == 4
    table = pq.read_table(glob.glob(f"{lat['out_dir']}/*/*.parquet"), columns=["latent", "label", "caption"])
    assert sorted(table.column("caption").to_pylist()) == sorted(f"a photo of {n}" for n in PHOTOS)

    cfg = load_config(
        REPO / "configs" / "image_dit_text_tiny.yaml",
        [
            f"data.shards={lat['out_dir']}",
            f"scaling.storage_path={tmp_path / 'runs'}",
            "tracking.enabled=false",
            "data.batch_size=1",
            "data.num_val_batches=1",
            "scaling.num_workers=1",
        ],
    )
    task = dit_task(cfg)
    assert isinstance(task, ImageDiffusionTask)  # picked by the latents' manifest
    task.datasets()  # checks the VAE and the shards; fills task.info (eval captions) for the checkpoint
    rows = _reshape_latents(table.to_pydict(), shape=(4, 16, 16), text_max_len=cfg.diffusion.text_max_len)
    batch = task.collate({k: torch.as_tensor(v) for k, v in rows.items()}, torch.device("cpu"))
    assert "y" not in batch and batch["text_ids"].shape == (4, cfg.diffusion.text_max_len)
    net = build_model(cfg.model)
    steps = 2000
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=1e-5)
    for _ in range(steps):
        loss, _ = task.loss(net, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    ckpt = tmp_path / "runs" / "t2i" / f"step_{steps:08d}"
    ckpt.mkdir(parents=True)
    cfg.to_yaml(ckpt / "config.yaml")
    torch.save(net.state_dict(), ckpt / WEIGHTS_FILE)
    (ckpt / STATE_FILE).write_text(json.dumps({"step": steps, "tokens": 0}))
    for name, text in task.checkpoint_files().items():
        (ckpt / name).write_text(text)

    for name in PHOTOS:
        out = tmp_path / f"{name}.png"
        r = runner.invoke(
            app,
            [
                "sample",
                "--checkpoint",
                str(ckpt.parent),
                "--n",
                "1",
                "--text",
                f"a photo of {name}",
                "--steps",
                "50",
                "--cfg",
                "2.0",
                "--output",
                str(out),
            ],
        )
        assert r.exit_code == 0, r.output
        drawn = torch.from_numpy(np.asarray(Image.open(out).convert("RGB"), np.float32) / 255.0).permute(2, 0, 1)
        mse = {other: float(((drawn - (photos[other] + 1) / 2) ** 2).mean()) for other in PHOTOS}
        assert min(mse, key=mse.get) == name, (name, mse)
    bad = runner.invoke(
        app, ["sample", "--checkpoint", str(ckpt.parent), "--class", "astronaut", "--output", str(tmp_path / "x.png")]
    )
    assert bad.exit_code == 2 and "text-to-image" in bad.output
