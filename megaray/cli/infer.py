"""Commands on trained checkpoints: ``eval`` (perplexity, HellaSwag), ``generate``, ``vocode``,
``sample`` (DiT images or mels), ``export`` (single process, CPU or CUDA; HellaSwag over Ray Data for large files; the work lives
in :mod:`megaray.inference`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from megaray.cli.app import app
from megaray.cli.options import TRACKING_URI_HELP, at_least, in_interval, input_file, one_of, use_tracking_uri
from megaray.cli.output import JSON_OPTION, emit, json_stdout

_MODEL_URIS = "or an MLflow model: models:/<model_id>, models:/<name>/<version>, models:/<name>@<alias>"
_CHECKPOINT_HELP = f"checkpoint directory, a run directory (its latest checkpoint), {_MODEL_URIS}"
_TRACKING_URI = typer.Option(None, "--tracking-uri", callback=use_tracking_uri, help=TRACKING_URI_HELP)


@app.command("eval")
def eval_cmd(
    checkpoint: str = typer.Option(..., help=_CHECKPOINT_HELP),
    shards: Optional[str] = typer.Option(None, help="prepared shards (default: the run's data.shards)"),
    split: str = typer.Option("val", callback=one_of(("val", "train")), help="split to evaluate: val | train"),
    max_batches: int = typer.Option(50, callback=at_least(1), help="batches to evaluate"),
    batch_size: int = typer.Option(8, callback=at_least(1), help="windows of block_size tokens per batch"),
    task: str = typer.Option(
        "perplexity",
        callback=one_of(("perplexity", "hellaswag")),
        help="perplexity (on shards) | hellaswag (multiple choice on --data)",
    ),
    data: Optional[str] = typer.Option(None, help="hellaswag: the JSONL file (ctx, endings, label per line)"),
    limit: Optional[int] = typer.Option(None, callback=at_least(1), help="hellaswag: first N examples only"),
    ray_above: int = typer.Option(
        2000, callback=at_least(0), help="hellaswag: score over Ray Data (actor pool) above this many examples"
    ),
    tracking_uri: Optional[str] = typer.Option(
        None,
        callback=use_tracking_uri,
        help="MLflow URI where models:/ checkpoints are looked up and hellaswag logs to (default $MLFLOW_TRACKING_URI)",
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Perplexity of a trained text model on a prepared split, or its HellaSwag accuracy (--json: as JSON).

    Example: megaray eval --checkpoint runs/gpt-debug --max-batches 20
    Example: megaray eval --task hellaswag --data hellaswag_val.jsonl --checkpoint runs/gpt-debug --json
    """
    if task == "hellaswag":
        from megaray.errors import ConfigError
        from megaray.inference.hellaswag import evaluate_hellaswag

        if not data:
            raise ConfigError("--task hellaswag needs --data FILE.jsonl (HellaSwag's own JSONL: ctx, endings, label)")
        with json_stdout(as_json):
            out = evaluate_hellaswag(checkpoint, data, limit=limit, ray_above=ray_above, tracking_uri=tracking_uri)
        emit(out, as_json)
        return
    from megaray.inference.eval import evaluate_text

    with json_stdout(as_json):
        out = evaluate_text(checkpoint, shards=shards, split=split, max_batches=max_batches, batch_size=batch_size)
    emit(out, as_json)


@app.command("generate")
def generate_cmd(
    checkpoint: str = typer.Option(..., help=_CHECKPOINT_HELP),
    prompt: Optional[str] = typer.Option(
        None,
        help="text to continue (default: the run's generation.prompt, else "
        "'The '); multimodal: the caption or transcript to draw or speak, or the "
        "start of a transcription",
    ),
    max_new_tokens: Optional[int] = typer.Option(
        None,
        callback=at_least(1),
        help="tokens to add (fewer if the end-of-text token comes; default: "
        "the run's generation.max_new_tokens, 64 unless set)",
    ),
    temperature: Optional[float] = typer.Option(
        None, callback=at_least(0), help="0 = greedy (default: the run's generation.temperature, 0.8 unless set)"
    ),
    top_k: Optional[int] = typer.Option(
        None,
        callback=at_least(0),
        help="sample among the k most likely tokens, 0 = all (default: the run's generation.top_k, 40 unless set)",
    ),
    top_p: Optional[float] = typer.Option(
        None,
        callback=in_interval(0, 1, low_open=True, high_open=False),
        help="nucleus sampling: the smallest set of tokens with this much probability "
        "(default: the run's generation.top_p, off unless set)",
    ),
    seed: Optional[int] = typer.Option(None, help="random seed of the sampler (default: the run's generation.seed, 0)"),
    interactive: bool = typer.Option(
        False,
        "--interactive",
        "-i",
        help="text models: load the model once, then continue each line read from stdin "
        "(a '> ' prompt on a terminal); an empty line, ':q' or end of input ends",
    ),
    to: str = typer.Option(
        "text",
        callback=one_of(("text", "audio", "image")),
        help="multimodal checkpoints: what to generate: text | audio | image",
    ),
    out: Optional[Path] = typer.Option(
        None, help="--to audio: the wav (or .npy + _mel.png without --vocoder); --to image: the PNG"
    ),
    audio: Optional[Path] = typer.Option(None, callback=input_file, help="an audio file to transcribe (--to text)"),
    image: Optional[Path] = typer.Option(None, callback=input_file, help="a picture to caption (--to text)"),
    vocoder: Optional[str] = typer.Option(None, help="--to audio: vocoder checkpoint that turns the mel into a wav"),
    vae: Optional[str] = typer.Option(None, help="image-VAE checkpoint of a model on latents (image_channels != 3)"),
    tracking_uri: Optional[str] = _TRACKING_URI,
    as_json: bool = typer.Option(
        False,
        "--json",
        help="print the result as one JSON document on stdout and nothing else there: {to, text} or "
        "{to, files, note} (not with --interactive)",
    ),
) -> None:
    """Continue a prompt with a trained text model (KV-cached sampling), or continue an interleaved
    prompt with a multimodal one: text -> image (PNG), text -> audio (wav), audio or image -> text.
    Unset sampling flags take the run's generation: section (saved with the checkpoint). Text is
    printed as is, written files as key/value lines (--json: either as JSON).

    Example: megaray generate --checkpoint runs/gpt-debug --prompt "Return the" --max-new-tokens 20
    Example: megaray generate --checkpoint runs/gpt-debug --interactive
    Example: megaray generate --checkpoint models:/megaray-lm@champion --tracking-uri sqlite:///mlflow.db
    Example: megaray generate --checkpoint runs/mm --prompt "a photo of astronaut" --to image --out astronaut.png
    Example: megaray generate --checkpoint runs/mm --audio hello.wav --to text
    """
    from megaray.errors import ConfigError

    if interactive and as_json:
        raise ConfigError("--json and --interactive: --interactive prints one completion per prompt line; drop --json")
    from megaray.inference.generate import run_generation, sampling
    from megaray.inference.multimodal import checkpoint_family, generate

    given = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    files = {"out": out, "audio": audio, "image": image, "vocoder": vocoder, "vae": vae}
    if to != "text" or any(v is not None for v in files.values()) or checkpoint_family(checkpoint) == "multimodal":
        if interactive:
            raise ConfigError(
                "--interactive continues text prompts with a text model (gpt, ngpt, mamba, recurrent); "
                "give a multimodal checkpoint one --prompt per command"
            )
        with json_stdout(as_json):
            s = sampling(run_generation(checkpoint), prompt=prompt, **given)
            result = generate(checkpoint, to=to, **s, **{k: v and str(v) for k, v in files.items()})
        emit(result, as_json, human=result["text"] if to == "text" else None)
        return
    if interactive:
        import sys

        from megaray.inference.generate import TextGenerator, interactive as prompt_loop

        if prompt is not None:
            raise ConfigError("--prompt and --interactive: with --interactive every line read from stdin is a prompt")
        gen = TextGenerator(checkpoint)
        tty = sys.stdin.isatty()
        if tty:
            shown = ", ".join(f"{k} {v}" for k, v in gen.settings(**given).items() if k != "prompt")
            typer.echo(f"{gen.checkpoint} loaded ({shown}); type a prompt; an empty line or :q ends", err=True)
        prompt_loop(lambda line: gen(line, **given), sys.stdin, sys.stdout, show_prompt=tty)
        return
    from megaray.inference.generate import generate_text

    with json_stdout(as_json):
        text = generate_text(checkpoint, prompt, **given)
    emit({"to": "text", "text": text}, as_json, human=text)


@app.command("vocode")
def vocode_cmd(
    checkpoint: str = typer.Option(..., help=f"vocoder checkpoint (or its run directory, {_MODEL_URIS})"),
    input: Path = typer.Option(..., "--input", "-i", help="audio file to analyse (any soundfile format)"),
    output: Path = typer.Option(..., "--output", "-o", help="wav to write"),
    tracking_uri: Optional[str] = _TRACKING_URI,
    as_json: bool = JSON_OPTION,
) -> None:
    """Analysis -> log-mel -> vocoder -> waveform; prints the wav written and the real-time factor (--json: as JSON).

    Example: megaray vocode --checkpoint runs/vocoder-tiny --input in.wav --output out.wav
    """
    from megaray.inference.vocode import vocode_checkpoint

    with json_stdout(as_json):
        result = vocode_checkpoint(checkpoint, str(input), str(output))
    emit(result, as_json)


@app.command("sample")
def sample_cmd(
    checkpoint: str = typer.Option(..., help=f"dit checkpoint, or its run directory (its latest), {_MODEL_URIS}"),
    n: int = typer.Option(16, "--n", callback=at_least(1), help="samples to draw"),
    output: Path = typer.Option(
        Path("grid.png"), "--output", "-o", help="image runs: the PNG grid; mel runs: <stem>_mel.png and <stem>N.wav"
    ),
    class_name: Optional[str] = typer.Option(
        None, "--class", help="class name (image runs; default: every class in turn)"
    ),
    text: Optional[str] = typer.Option(
        None,
        help="transcript to speak (mel runs) or caption to draw (text-to-image runs); default: the run's eval texts",
    ),
    cfg: Optional[float] = typer.Option(
        None,
        "--cfg",
        callback=at_least(1),
        help="classifier-free guidance scale, 1 = none (default: the run's diffusion.cfg_scale)",
    ),
    steps: Optional[int] = typer.Option(
        None, callback=at_least(1), help="DDIM steps (default: the run's diffusion.sample_steps)"
    ),
    seed: int = typer.Option(0, help="seed of the initial noise"),
    vocoder: Optional[str] = typer.Option(
        None, help="vocoder checkpoint for mel runs (default: the run's diffusion.vocoder_checkpoint)"
    ),
    tracking_uri: Optional[str] = _TRACKING_URI,
    as_json: bool = JSON_OPTION,
) -> None:
    """Sample a trained DiT: a PNG grid of images, or log-mel PNGs and wavs; prints the files written (--json: as JSON).

    Example: megaray sample --checkpoint runs/dit-tiny --n 16 --class astronaut --output grid.png
    Example: megaray sample --checkpoint runs/mel-dit-tiny --n 2 --text "hello world" --output hello.png
    Example: megaray sample --checkpoint runs/image-dit-text-tiny --n 4 --text "a photo of astronaut" --output x.png
    """
    from megaray.inference.sample import sample_checkpoint

    with json_stdout(as_json):
        result = sample_checkpoint(
            checkpoint,
            str(output),
            n=n,
            class_name=class_name,
            text=text,
            cfg_scale=cfg,
            steps=steps,
            seed=seed,
            vocoder=vocoder,
        )
    emit(result, as_json)


@app.command("export")
def export_cmd(
    checkpoint: str = typer.Option(..., help=_CHECKPOINT_HELP),
    format: str = typer.Option("hf", "--format", callback=one_of(("hf",)), help="hf = a Hugging Face model directory"),
    out: Path = typer.Option(..., "--out", "-o", help="directory to write (new or empty)"),
    overwrite: bool = typer.Option(False, help="replace a non-empty --out"),
    tracking_uri: Optional[str] = _TRACKING_URI,
    as_json: bool = JSON_OPTION,
) -> None:
    """Write a GPT checkpoint as a Hugging Face directory (config.json, model.safetensors, tokenizer
    files) that transformers' AutoModelForCausalLM / AutoTokenizer load; prints what it wrote (--json: as JSON).

    Example: megaray export --checkpoint runs/gpt-debug --format hf --out exports/gpt-debug
    """
    from megaray.inference.export import export_checkpoint

    with json_stdout(as_json):
        result = export_checkpoint(checkpoint, out, format, overwrite)
    emit(result, as_json)
