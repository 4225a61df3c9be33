"""``megaray generate`` on multimodal checkpoints (issue 12): text -> image (PNG, pixels or through an
image VAE), text -> audio (a wav through a vocoder, or .npy + PNG without one), audio -> text and
image -> text, and the errors a user gets. No Ray: tiny randomly initialised networks saved in the
checkpoint layout training writes (config.yaml, model.pt, megaray.json, plus the multimodal task's
multimodal.json and tokenizer.json). Outputs are compared with the model's own generate_* on the
same inputs and seeds, and the audio span with the log-mel ``megaray prepare audio`` computes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from typer.testing import CliRunner

from megaray.cli import app
from megaray.families import build_model, build_run_config
from megaray.train.checkpoint import STATE_FILE, WEIGHTS_FILE

runner = CliRunner()
#: where `megaray generate` runs the model; the references below run there too
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

#: the tiny vocoder preset's analysis (what the speech shards of the multimodal run would hold)
MEL = {"sample_rate": 16000, "n_fft": 512, "hop_length": 128, "win_length": 512, "n_mels": 80}
TEXTS = [
    "a photo of astronaut",
    "a photo of coffee",
    "hello world",
    "the quick brown fox jumps over the lazy dog",
    "speech and images in one transformer",
] * 4


def _save(path: Path, model_section: dict, task_info=None, seed: int = 0) -> Path:
    """A randomly initialised network of ``model_section`` as a one-step checkpoint, plus the files
    the run's task writes into every checkpoint (``checkpoint_files``) when ``task_info`` is given."""
    from megaray.tasks.multimodal import MultimodalTask

    torch.manual_seed(seed)
    cfg = build_run_config({"model": model_section})
    path.mkdir(parents=True)
    cfg.to_yaml(path / "config.yaml")
    torch.save(build_model(cfg.model).state_dict(), path / WEIGHTS_FILE)
    if task_info is not None:
        for name, text in MultimodalTask(cfg, task_info).checkpoint_files().items():
            (path / name).write_text(text)
    (path / STATE_FILE).write_text(json.dumps({"step": 1, "tokens": 0}))
    return path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A tiny byte-level BPE (``<|endoftext|>`` = 0) and the path of its tokenizer.json."""
    from megaray.data.tokenizer import train_tokenizer

    tok = train_tokenizer(TEXTS, vocab_size=300, min_frequency=1)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return tok, path


def _multimodal(root: Path, tokenizer, **model) -> Path:
    from megaray.tasks.multimodal import MultimodalInfo

    tok, path = tokenizer
    info = MultimodalInfo(tokenizer_path=str(path), eot_id=0, audio=MEL, labels=["astronaut", "coffee"])
    section = {"family": "multimodal", "preset": "tiny", "vocab_size": tok.get_vocab_size(), **model}
    return _save(root / "run" / "step_00000001", section, info)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer):
    """text, audio and image on pixels (16 x 16, 3 channels), regression head."""
    return _multimodal(tmp_path_factory.mktemp("mm"), tokenizer)


@pytest.fixture(scope="module")
def latent_ckpt(tmp_path_factory, tokenizer):
    """text and image on the latents (4 channels, 8 x 8) of a tiny image VAE (factor 2), diffusion head."""
    root = tmp_path_factory.mktemp("mm-latents")
    vae = _save(root / "vae" / "step_00000001", {"family": "image_vae", "preset": "tiny"})
    ckpt = _multimodal(
        root,
        tokenizer,
        modalities=["text", "image"],
        image_channels=4,
        image_size=8,
        continuous_head="diffusion",
        diffusion_sample_steps=2,
    )
    return ckpt, vae


@pytest.fixture(scope="module")
def vocoder(tmp_path_factory):
    return _save(
        tmp_path_factory.mktemp("voc") / "step_00000001",
        {"family": "vocoder", "preset": "tiny_lightheaded_freq_domain_vocoder"},
    )


def _run(*args):
    return runner.invoke(app, ["generate", *[str(a) for a in args]])


def _model(ckpt: Path):
    from megaray.weights import load_for_inference

    return load_for_inference(ckpt, DEVICE)[0]


def _png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        assert im.mode == "RGB"
        return np.asarray(im)


def test_text_to_image_writes_the_models_pixels_as_png(ckpt, tokenizer, tmp_path):
    r = _run(
        "--checkpoint",
        ckpt.parent.parent,
        "--prompt",
        "a photo of coffee",
        "--to",
        "image",
        "--out",
        tmp_path / "coffee.png",
        "--json",
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["files"] == [str(tmp_path / "coffee.png")]
    model = _model(ckpt)
    ids = tokenizer[0].encode("a photo of coffee").ids + [model.BOI]
    x = model.generate_image(torch.tensor([ids], device=DEVICE)).cpu()
    assert x.shape == (1, 3, 16, 16) and torch.isfinite(x).all()
    assert np.array_equal(_png(tmp_path / "coffee.png"), _pixels(x))


def _pixels(x: torch.Tensor) -> np.ndarray:
    """``(1, 3, H, W)`` in [-1, 1] -> uint8 ``(H, W, 3)`` as torchvision's ``save_image`` rounds it."""
    return ((x[0].clamp(-1, 1) + 1) / 2 * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def test_text_to_image_through_the_image_vae(latent_ckpt, tokenizer, tmp_path):
    """Diffusion head on VAE latents: the PNG is the VAE's decoding of the DDIM sample drawn with
    the seed's generator; a caption of a picture goes through the VAE's encoder."""
    ckpt, vae = latent_ckpt
    r = _run(
        "--checkpoint",
        ckpt,
        "--prompt",
        "a photo of astronaut",
        "--to",
        "image",
        "--vae",
        vae,
        "--out",
        tmp_path / "a.png",
        "--seed",
        "3",
    )
    assert r.exit_code == 0, r.output
    model, decoder = _model(ckpt), _model(vae)
    ids = torch.tensor([tokenizer[0].encode("a photo of astronaut").ids + [model.BOI]], device=DEVICE)
    z = model.generate_image(ids, generator=torch.Generator(DEVICE).manual_seed(3))
    assert z.shape == (1, 4, 8, 8)
    x = decoder.decode(z / decoder.cfg.scaling_factor).detach().cpu()
    assert x.shape == (1, 3, 16, 16)  # 8 x 8 latents, decoder factor 2
    assert np.abs(_png(tmp_path / "a.png").astype(int) - _pixels(x).astype(int)).max() <= 1

    from PIL import Image

    from megaray.data.multimodal import square_image

    pixels = np.random.default_rng(1).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "in.png")
    r = _run("--checkpoint", ckpt, "--image", tmp_path / "in.png", "--vae", vae, "--max-new-tokens", "3")
    assert r.exit_code == 0, r.output
    image = torch.from_numpy(square_image(pixels.tobytes(), 20, 20, 16))[None].to(DEVICE)  # 16 px: 8 latent cells
    latents = decoder.cfg.scaling_factor * decoder.encode(image).mean
    prefix = [model.BOI] + [0] * 4 + [model.EOI]
    out = model.generate_text(
        torch.tensor([prefix], device=DEVICE),
        3,
        image=latents.detach(),
        image_start=torch.tensor([1], device=DEVICE),
        temperature=0.0,
        stop_id=0,
    )
    new = [i for i in out[0, len(prefix) :].tolist() if i < model.BOA]
    assert r.output == tokenizer[0].decode(new, skip_special_tokens=True) + "\n"
    from megaray.inference.multimodal import load_multimodal, read_image_span

    span = read_image_span(load_multimodal(ckpt, DEVICE), str(tmp_path / "in.png"), decoder)
    assert span.shape == (1, 4, 8, 8)
    torch.testing.assert_close(span, latents.float(), rtol=1e-4, atol=1e-4)

    r = _run("--checkpoint", ckpt, "--prompt", "a photo of astronaut", "--to", "image", "--out", tmp_path / "b.png")
    assert r.exit_code == 2 and "error: --vae: the checkpoint" in r.output and "image_channels=4" in r.output


def test_text_to_audio_with_and_without_a_vocoder(ckpt, vocoder, tmp_path):
    import soundfile as sf

    r = _run(
        "--checkpoint",
        ckpt,
        "--prompt",
        "hello world",
        "--to",
        "audio",
        "--vocoder",
        vocoder,
        "--out",
        tmp_path / "hello.wav",
    )
    assert r.exit_code == 0, r.output
    wave, sr = sf.read(tmp_path / "hello.wav")
    assert sr == 16000 and len(wave) == 31 * 128 and np.isfinite(wave).all()  # 32 frames, hop 128

    r = _run("--checkpoint", ckpt, "--prompt", "hello world", "--to", "audio", "--out", tmp_path / "mel.wav", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["files"] == [str(tmp_path / "mel.npy"), str(tmp_path / "mel_mel.png")]
    assert "no --vocoder" in out["note"] and (tmp_path / "mel_mel.png").stat().st_size > 0
    model = _model(ckpt)
    ids = Tokenizer.from_file(str(ckpt / "tokenizer.json")).encode("hello world").ids + [model.BOA]
    x = model.generate_audio(torch.tensor([ids], device=DEVICE)).cpu()
    mel = np.load(tmp_path / "mel.npy")
    assert mel.shape == (80, 32) and np.isfinite(mel).all()
    c = model.config
    np.testing.assert_allclose(mel, (x[0] * c.mel_std + c.mel_mean).numpy(), rtol=1e-5, atol=1e-5)


def test_vocoder_with_other_mel_settings_names_both_checkpoints(ckpt, tmp_path):
    voc = _save(
        tmp_path / "voc256" / "step_00000001",
        {"family": "vocoder", "preset": "tiny_lightheaded_freq_domain_vocoder", "hop_length": 256},
    )
    r = _run("--checkpoint", ckpt, "--prompt", "hello", "--to", "audio", "--vocoder", voc, "--out", tmp_path / "x.wav")
    assert r.exit_code == 2, r.output
    for needle in ("error: --vocoder", str(voc), "hop_length=256", "hop_length=128", str(ckpt)):
        assert needle in r.output, (needle, r.output)


def _wav(path: Path, seconds: float = 0.5, sr: int = 22050) -> Path:
    import soundfile as sf

    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * np.random.default_rng(0).standard_normal(len(t)), sr)
    return path


def test_audio_to_text_uses_the_shards_log_mel_and_prints_the_greedy_transcription(ckpt, tmp_path):
    from megaray.data.audio import AudioPrepSettings, mel_features, process_clip
    from megaray.inference.multimodal import load_multimodal, read_audio_span

    wav = _wav(tmp_path / "in.wav")
    r = _run("--checkpoint", ckpt, "--audio", wav, "--max-new-tokens", "6")
    assert r.exit_code == 0, r.output

    settings = AudioPrepSettings(**MEL)  # what `megaray prepare audio` does to the clip
    mel = torch.from_numpy(process_clip(wav.read_bytes(), settings, mel_features(settings))["mel"])
    mm = load_multimodal(ckpt, "cpu")
    span = read_audio_span(mm, str(wav))
    assert span.shape == (1, 80, 32) and mel.shape[1] == 63  # 0.5 s at hop 128, cropped to the span's 32
    c = mm.cfg.model
    torch.testing.assert_close(span[0], ((mel - c.mel_mean) / c.mel_std)[:, :32], rtol=1e-4, atol=1e-4)

    model = _model(ckpt)
    prefix = [model.BOA] + [0] * 8 + [model.EOA]
    out = model.generate_text(
        torch.tensor([prefix], device=DEVICE),
        6,
        audio=span.to(DEVICE),
        audio_start=torch.tensor([1], device=DEVICE),
        temperature=0.0,
        stop_id=0,
    )
    new = [i for i in out[0, len(prefix) :].tolist() if i < model.BOA]
    text = Tokenizer.from_file(str(ckpt / "tokenizer.json")).decode(new, skip_special_tokens=True)
    assert len(out[0]) > len(prefix)
    assert r.output == text + "\n"


def test_image_to_text_prints_the_greedy_caption(ckpt, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (24, 16, 3), dtype=np.uint8)  # portrait: resized to 16 wide, centre crop
    Image.fromarray(pixels).save(tmp_path / "in.png")
    r = _run("--checkpoint", ckpt, "--image", tmp_path / "in.png", "--max-new-tokens", "5")
    assert r.exit_code == 0, r.output

    model = _model(ckpt)
    image = torch.from_numpy(pixels[4:20].transpose(2, 0, 1).astype(np.float32) / 127.5 - 1)[None]
    prefix = [model.BOI] + [0] * 16 + [model.EOI]
    out = model.generate_text(
        torch.tensor([prefix], device=DEVICE),
        5,
        image=image.to(DEVICE),
        image_start=torch.tensor([1], device=DEVICE),
        temperature=0.0,
        stop_id=0,
    )
    new = [i for i in out[0, len(prefix) :].tolist() if i < model.BOA]
    assert len(out[0]) > len(prefix)
    assert r.output == Tokenizer.from_file(str(ckpt / "tokenizer.json")).decode(new, skip_special_tokens=True) + "\n"


def test_text_continuation_of_a_multimodal_checkpoint(ckpt):
    r = _run("--checkpoint", ckpt, "--prompt", "hello", "--max-new-tokens", "4", "--temperature", "0")
    assert r.exit_code == 0 and r.output.startswith("hello"), r.output


def test_user_errors_name_the_file_or_option(ckpt, latent_ckpt, vocoder, tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"RIFF not really a wav file")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG truncated")
    cases = [
        (["--audio", tmp_path / "missing.wav"], [f"--audio: file not found: {tmp_path / 'missing.wav'}"]),
        (["--audio", tmp_path / "bad.wav"], [str(tmp_path / "bad.wav")]),
        (["--image", tmp_path / "bad.png"], [f"--image {tmp_path / 'bad.png'}"]),
        (["--prompt", "hi", "--to", "image"], ["--to image needs --out"]),
        (["--audio", tmp_path / "bad.wav", "--to", "image", "--out", tmp_path / "o.png"], ["use --to text"]),
    ]
    for args, needles in cases:
        r = _run("--checkpoint", ckpt, *args)
        assert r.exit_code == 2 and "error: " in r.output, (args, r.output)
        for n in needles:
            assert n in r.output, (n, r.output)
        assert "Traceback" not in r.output
    r = _run("--checkpoint", latent_ckpt[0], "--prompt", "hi", "--to", "audio", "--out", tmp_path / "o.wav")
    assert r.exit_code == 2 and "--to audio: this checkpoint was trained on text, image" in r.output, r.output
    r = _run("--checkpoint", vocoder, "--prompt", "hi", "--to", "image", "--out", tmp_path / "o.png")
    assert r.exit_code == 2 and f"--checkpoint {vocoder}: a 'vocoder' checkpoint" in r.output, r.output


def test_speech_in_or_out_of_an_audio_latent_run_is_refused_naming_why(tokenizer, tmp_path):
    """Audio-VAE latent shards record no VAE, so nothing can turn a wav into the run's audio spans
    or its spans into a mel: `--audio` and `--to audio` end in an error, not in a wrong mel."""
    from megaray.tasks.multimodal import MultimodalInfo

    tok, path = tokenizer
    info = MultimodalInfo(
        tokenizer_path=str(path), eot_id=0, audio=MEL, audio_latents={"latent_channels": 4, "bands": 20, "down_time": 4}
    )
    ckpt = _save(
        tmp_path / "run" / "step_00000001",
        {"family": "multimodal", "preset": "tiny", "vocab_size": tok.get_vocab_size()},
        info,
    )
    for args in (
        ["--prompt", "hi", "--to", "audio", "--out", tmp_path / "o.wav"],
        ["--audio", _wav(tmp_path / "in.wav")],
    ):
        r = _run("--checkpoint", ckpt, *args)
        assert r.exit_code == 2 and "its audio spans are audio-VAE latents" in r.output, (args, r.output)
    r = _run("--checkpoint", ckpt, "--prompt", "hi", "--to", "image", "--out", tmp_path / "o.png")
    assert r.exit_code == 0 and (tmp_path / "o.png").is_file(), r.output  # images are unaffected
