"""Commands on trained checkpoints: ``eval``, ``generate``, ``vocode`` (single process, CPU or CUDA;
the work lives in :mod:`megaray.inference`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from megaray.cli.app import app
from megaray.cli.options import at_least, in_interval, one_of

_CHECKPOINT_HELP = "checkpoint directory, or a run directory (its latest checkpoint)"


@app.command("eval")
def eval_cmd(
    checkpoint: str = typer.Option(..., help=_CHECKPOINT_HELP),
    shards: Optional[str] = typer.Option(None, help="prepared shards (default: the run's data.shards)"),
    split: str = typer.Option("val", callback=one_of(("val", "train")), help="split to evaluate: val | train"),
    max_batches: int = typer.Option(50, callback=at_least(1), help="batches to evaluate"),
    batch_size: int = typer.Option(8, callback=at_least(1), help="windows of block_size tokens per batch"),
) -> None:
    """Perplexity of a trained text model on a prepared split; prints JSON.

    Example: megaray eval --checkpoint runs/gpt-debug --max-batches 20
    """
    from megaray.inference.eval import evaluate_text

    out = evaluate_text(checkpoint, shards=shards, split=split, max_batches=max_batches, batch_size=batch_size)
    typer.echo(json.dumps(out, indent=2))


@app.command("generate")
def generate_cmd(
    checkpoint: str = typer.Option(..., help=_CHECKPOINT_HELP),
    prompt: str = typer.Option("The ", help="text to continue"),
    max_new_tokens: int = typer.Option(64, callback=at_least(1),
                                       help="tokens to add (fewer if the end-of-text token comes)"),
    temperature: float = typer.Option(0.8, callback=at_least(0), help="0 = greedy"),
    top_k: Optional[int] = typer.Option(40, callback=at_least(1), help="sample among the k most likely tokens"),
    top_p: Optional[float] = typer.Option(None, callback=in_interval(0, 1, low_open=True, high_open=False),
                                          help="nucleus sampling: the smallest set of tokens with this much probability"),
    seed: int = typer.Option(0, help="random seed of the sampler"),
) -> None:
    """Continue a prompt with a trained text model (KV-cached sampling).

    Example: megaray generate --checkpoint runs/gpt-debug --prompt "Return the" --max-new-tokens 20
    """
    from megaray.inference.generate import generate_text

    typer.echo(generate_text(checkpoint, prompt, max_new_tokens, temperature, top_k, top_p, seed))


@app.command("vocode")
def vocode_cmd(
    checkpoint: str = typer.Option(..., help="vocoder checkpoint (or its run directory)"),
    input: Path = typer.Option(..., "--input", "-i", help="audio file to analyse (any soundfile format)"),
    output: Path = typer.Option(..., "--output", "-o", help="wav to write"),
) -> None:
    """Analysis -> log-mel -> vocoder -> waveform; prints the real-time factor as JSON.

    Example: megaray vocode --checkpoint runs/vocoder-tiny --input in.wav --output out.wav
    """
    from megaray.inference.vocode import vocode_checkpoint

    typer.echo(json.dumps(vocode_checkpoint(checkpoint, str(input), str(output)), indent=2))
