"""The ``megaray`` command. Thin: parse, load config, call one function.

    megaray demo                               prepare the stdlib corpus, train, eval, generate
    megaray prepare text --source stdlib --out data/stdlib
    megaray train configs/demo.yaml --set train.max_steps=50
    megaray eval --checkpoint runs/demo
    megaray generate --checkpoint runs/demo --prompt "Return the"
    megaray config configs/demo.yaml --set model.n_layer=2   (print the resolved config)
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from megaray.config import ConfigError

app = typer.Typer(
    help="megaray: Ray Data -> Ray Train + DeepSpeed -> MLflow training for text, audio and image models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
prepare_app = typer.Typer(help="Turn raw sources into training shards plus a manifest.", no_args_is_help=True)
app.add_typer(prepare_app, name="prepare")

SET_HELP = "Dotted override KEY=VALUE, repeatable: --set model.n_layer=4 --set train.lr=3e-4"


def _fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


@app.command("config")
def config_cmd(
    config: Path = typer.Argument(..., help="run config YAML"),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Validate a run config and print it fully resolved (presets expanded, defaults filled)."""
    from megaray.families import load_config

    try:
        typer.echo(load_config(config, set_).to_yaml(), nl=False)
    except ConfigError as e:
        _fail(e)


@app.command("train")
def train_cmd(
    config: Path = typer.Argument(..., help="run config YAML (see configs/)"),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Train with Ray Train + DeepSpeed. Re-running the same command resumes the run from its
    latest checkpoint; RAY_ADDRESS picks an existing cluster, else a local one starts."""
    from megaray.families import load_config
    from megaray.data.sources import DataError
    from megaray.train.checkpoint import CheckpointError

    _setup_logging()
    try:
        cfg = load_config(config, set_)
        result = _train(cfg)
    except (ConfigError, DataError, CheckpointError) as e:
        _fail(e)
    _print_result(result)


def _train(cfg):
    from megaray.train.launch import fit

    return fit(cfg)


def _print_result(result) -> None:
    from megaray.train.mlflow import run_url

    m = result.metrics
    typer.echo("")
    typer.secho("run finished", bold=True)
    for k in ("step", "loss", "val_loss", "val_ppl"):
        if k in m:
            typer.echo(f"  {k:<11} {m[k]:.4f}" if isinstance(m[k], float) else f"  {k:<11} {m[k]}")
    typer.echo(f"  checkpoint  {result.checkpoint}")
    if result.mlflow_run_id:
        typer.echo(f"  mlflow      {run_url(result.tracking_uri, result.mlflow_run_id)}")


@prepare_app.command("text")
def prepare_text_cmd(
    source: List[str] = typer.Option(["stdlib"], "--source", "-s", help="folder, glob, file or s3:// gs:// URI of .txt .md .jsonl .parquet; 'stdlib' = the embedded corpus of Python stdlib docstrings"),
    out: str = typer.Option("data/stdlib", "--out", "-o", help="output directory (shards + manifest.json + tokenizer.json)"),
    vocab_size: int = typer.Option(8192, help="BPE vocabulary size when training a tokenizer"),
    tokenizer: Optional[str] = typer.Option(None, help="use this tokenizer.json instead of training one"),
    val_fraction: float = typer.Option(0.02, help="fraction of documents held out for validation"),
    overwrite: bool = typer.Option(False, help="replace an existing prepared folder"),
) -> None:
    """Tokenize text sources with a byte-level BPE and write train/val parquet shards."""
    from megaray.data.sources import DataError
    from megaray.data.text import prepare_text

    _setup_logging()
    try:
        manifest = prepare_text(source, out, vocab_size=vocab_size, tokenizer=tokenizer, val_fraction=val_fraction,
                                overwrite=overwrite)
    except (DataError, ConfigError) as e:
        _fail(e)
    typer.echo(json.dumps({k: v for k, v in manifest.items() if k != "rejected_examples"}, indent=2, default=str))


@prepare_app.command("audio")
def prepare_audio_cmd(
    source: List[str] = typer.Option(["espeak"], "--source", "-s", help="folder of wav/flac/ogg, a jsonl/csv manifest (path, text, speaker), or an s3:// gs:// URI; 'espeak' = build the embedded espeak-ng speech corpus first"),
    out: str = typer.Option("data/speech", "--out", "-o", help="output directory (parquet shards + manifest.json)"),
    sample_rate: int = typer.Option(16000, help="target sample rate in Hz"),
    n_mels: int = typer.Option(80),
    n_fft: int = typer.Option(1024),
    hop_length: int = typer.Option(256, help="hop length in samples"),
    normalize: str = typer.Option("peak", help="peak | loudness"),
    clips: int = typer.Option(300, help="clips to render for --source espeak"),
) -> None:
    """Decode, resample, normalise and log-mel audio in Ray Data; write train/val shards.
    Corrupt, truncated, empty or silent files are skipped and reported by name."""
    from megaray.data.audio import prepare_audio
    from megaray.data.sources import DataError
    from megaray.data.speech_corpus import EspeakMissing, build_speech_corpus

    _setup_logging()
    try:
        sources = list(source)
        if "espeak" in sources:
            corpus = Path(out).with_name(Path(out).name + "-raw")
            sources[sources.index("espeak")] = str(build_speech_corpus(str(corpus), n_clips=clips))
        from megaray.train.launch import ensure_ray

        ensure_ray()
        manifest = prepare_audio(sources, out, sample_rate=sample_rate, n_mels=n_mels, n_fft=n_fft,
                                 hop_length=hop_length, normalize=normalize)
    except (DataError, ConfigError, EspeakMissing, ValueError) as e:
        _fail(e)
    typer.echo(json.dumps({k: v for k, v in manifest.items() if k not in ("speakers",)}, indent=2, default=str)[:4000])


@prepare_app.command("audio-latents")
def prepare_audio_latents_cmd(
    vae_checkpoint: str = typer.Option(..., help="audio VAE checkpoint (or its run directory)"),
    shards: Optional[str] = typer.Option(None, help="audio shards to encode (default: the VAE run's data.shards)"),
    out: str = typer.Option(..., "--out", "-o", help="output directory for latent shards"),
    concurrency: int = typer.Option(1, help="actors holding the VAE"),
) -> None:
    """Encode audio shards to VAE latents with Ray Data (an actor pool holding the model)."""
    from megaray.data.audio import encode_latents
    from megaray.data.sources import DataError
    from megaray.train.checkpoint import CheckpointError, load_for_inference

    _setup_logging()
    try:
        vae, cfg, _ = load_for_inference(vae_checkpoint)
        if cfg.model.family != "audio_vae":
            raise ConfigError(f"{vae_checkpoint}: a {cfg.model.family!r} checkpoint, not an audio_vae one")
        from megaray.train.launch import ensure_ray

        ensure_ray()
        manifest = encode_latents(shards or cfg.data.shards, out, vae, concurrency=concurrency)
    except (DataError, ConfigError, CheckpointError) as e:
        _fail(e)
    typer.echo(json.dumps(manifest, indent=2, default=str)[:4000])


@app.command("vocode")
def vocode_cmd(
    checkpoint: str = typer.Option(..., help="vocoder checkpoint (or its run directory)"),
    input: Path = typer.Option(..., "--input", "-i", help="audio file to analyse (any soundfile format)"),
    output: Path = typer.Option(..., "--output", "-o", help="wav to write"),
) -> None:
    """Analysis -> log-mel -> vocoder -> waveform; prints the real-time factor."""
    from megaray.models.audio.vocoder import vocode_file
    from megaray.train.checkpoint import CheckpointError, load_for_inference

    try:
        if not input.is_file():
            raise CheckpointError(f"input not found: {input}")
        model, cfg, _ = load_for_inference(checkpoint)
        if cfg.model.family != "vocoder":
            raise ConfigError(f"{checkpoint}: a {cfg.model.family!r} checkpoint, not a vocoder")
        out = vocode_file(model, cfg.model, str(input), str(output))
    except (ConfigError, CheckpointError, ValueError) as e:
        _fail(e)
    typer.echo(json.dumps({"output": str(output), **out}, indent=2))


@app.command("tune")
def tune_cmd(
    config: Path = typer.Argument(..., help="tune config YAML (see configs/tune/)"),
    set_: List[str] = typer.Option([], "--set", help="override in the tune config, e.g. --set search.num_samples=8"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted search; finished trials are not re-run"),
) -> None:
    """Ray Tune search: every trial is a Ray Train run (its own MLflow child run)."""
    from megaray.data.sources import DataError
    from megaray.tune.search import run_search

    _setup_logging()
    try:
        result = run_search(config, set_, resume=resume)
    except (ConfigError, DataError) as e:
        _fail(e)
    typer.echo(result.summary())


@app.command("eval")
def eval_cmd(
    checkpoint: str = typer.Option(..., help="checkpoint directory, or a run directory (its latest checkpoint)"),
    shards: Optional[str] = typer.Option(None, help="prepared shards (default: the run's data.shards)"),
    split: str = typer.Option("val", help="split to evaluate"),
    max_batches: int = typer.Option(50, help="batches to evaluate"),
    batch_size: int = typer.Option(8),
) -> None:
    """Perplexity of a trained text model on a prepared split (single process, CPU or CUDA)."""
    from megaray.data.sources import DataError
    from megaray.train.checkpoint import CheckpointError
    from megaray.inference.eval import evaluate_text

    try:
        out = evaluate_text(checkpoint, shards=shards, split=split, max_batches=max_batches, batch_size=batch_size)
    except (ConfigError, DataError, CheckpointError) as e:
        _fail(e)
    typer.echo(json.dumps(out, indent=2))


@app.command("generate")
def generate_cmd(
    checkpoint: str = typer.Option(..., help="checkpoint directory, or a run directory (its latest checkpoint)"),
    prompt: str = typer.Option("The ", help="text to continue"),
    max_new_tokens: int = typer.Option(64),
    temperature: float = typer.Option(0.8, help="0 = greedy"),
    top_k: Optional[int] = typer.Option(40),
    top_p: Optional[float] = typer.Option(None),
    seed: int = typer.Option(0),
) -> None:
    """Continue a prompt with a trained text model (KV-cached sampling)."""
    from megaray.train.checkpoint import CheckpointError, load_for_inference
    from megaray.tasks.lm import sample_text

    try:
        model, cfg, ckpt = load_for_inference(checkpoint)
        tok = ckpt / "tokenizer.json"
        if not tok.is_file():
            raise CheckpointError(f"{ckpt}: no tokenizer.json in this checkpoint")
        text = sample_text(model, tok.read_text(), prompt, max_new_tokens, temperature, top_k, top_p, seed)
    except (ConfigError, CheckpointError) as e:
        _fail(e)
    typer.echo(text)


@app.command("demo")
def demo_cmd(
    config: Path = typer.Option(Path(__file__).resolve().parent.parent / "configs" / "demo.yaml", help="run config"),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """The main job on the embedded default: prepare the stdlib-docstring corpus, train a small GPT
    with 2 Ray Train workers under ZeRO-2, evaluate against the unigram baseline, generate."""
    from megaray.families import load_config
    from megaray.data.text import load_manifest, prepare_text
    from megaray.data.sources import DataError

    _setup_logging()
    try:
        cfg = load_config(config, set_)
        shards = cfg.data.shards
        try:
            load_manifest(shards)
            typer.echo(f"[demo] using prepared corpus {shards}")
        except DataError:
            typer.echo(f"[demo] preparing the stdlib docstring corpus into {shards}")
            prepare_text(["stdlib"], shards, vocab_size=cfg.model.vocab_size, val_fraction=0.05)
        result = _train(cfg)
    except (ConfigError, DataError) as e:
        _fail(e)
    _print_result(result)
    baseline = result.info.get("unigram_entropy")
    val = result.metrics.get("val_loss")
    if val is not None and baseline:
        verdict = "below" if val < baseline else "NOT below"
        typer.secho(f"  val loss {val:.3f} nats/token vs unigram baseline {baseline:.3f} ({verdict}; "
                    f"ppl {math.exp(val):.1f} vs {math.exp(baseline):.1f})", bold=True)
    if result.checkpoint:
        from megaray.train.checkpoint import load_for_inference
        from megaray.tasks.lm import sample_text

        model, _, ckpt = load_for_inference(result.checkpoint)
        sample = sample_text(model, (ckpt / "tokenizer.json").read_text(), "Return the", 40, seed=0)
        typer.echo(f"  sample      {sample!r}")


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
