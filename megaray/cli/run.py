"""Run commands: ``config``, ``train``, ``tune``, ``demo``. Each loads a config, calls one function
and prints its result; errors propagate to :mod:`megaray.cli.app`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional

import typer

from megaray.cli.app import VERBOSE_OPTION, app, setup_logging
from megaray.cli.options import SET_HELP, at_least
from megaray.cli.output import emit

_DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


@app.command("config")
def config_cmd(
    config: Path = typer.Argument(..., help="run config YAML"),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    as_json: bool = typer.Option(
        False, "--json", help="print the resolved config as one JSON document on stdout instead of YAML"
    ),
) -> None:
    """Validate a run config and print it fully resolved (presets expanded, defaults filled), as YAML (--json: JSON).

    Example: megaray config configs/demo.yaml --set model.n_layer=2
    """
    from megaray.families import load_config

    cfg = load_config(config, set_)
    if as_json:
        emit(cfg.model_dump(mode="json"), as_json)
    else:
        typer.echo(cfg.to_yaml(), nl=False)


@app.command("train")
def train_cmd(
    config: Path = typer.Argument(..., help="run config YAML (see configs/)"),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    resume_from: Optional[str] = typer.Option(
        None,
        "--resume-from",
        metavar="CHECKPOINT",
        help="resume from this checkpoint of the run instead of its newest: runs/<name>/step_00000400, or step_400; "
        "its later checkpoints move to runs/<name>/branches/ and the same MLflow run continues (a branch)",
    ),
    profile: Optional[int] = typer.Option(
        None,
        "--profile",
        metavar="STEPS",
        callback=at_least(1),
        help="profile STEPS optimizer steps (after 2 warm-up steps) with torch.profiler on rank 0 in a separate short "
        "run <name>-profile without checkpoints or evaluation; writes a Chrome trace and an operator table to "
        "<storage_path>/<name>-profile/profile/ and MLflow",
    ),
    verbose: bool = VERBOSE_OPTION,
) -> None:
    """Train with Ray Train + DeepSpeed; re-running the same command resumes from the latest checkpoint.

    RAY_ADDRESS picks an existing cluster, else a local one starts. The console is also appended to
    <storage_path>/<name>/log.txt. --resume-from branches the run at an older checkpoint; --profile runs a
    short torch.profiler run of the config instead (docs/training.md).

    Example: megaray train configs/gpt_debug.yaml --set train.max_steps=50
    """
    from megaray.families import describe_model, load_config
    from megaray.train.console import keep_console
    from megaray.train.launch import fit, run_folder
    from megaray.train.profiler import profile_config

    setup_logging(verbose)
    cfg = load_config(config, set_)
    with keep_console(run_folder(profile_config(cfg, profile) if profile else cfg)):
        typer.echo(f"model type: {describe_model(cfg.model)}")
        print_result(fit(cfg, resume_from=resume_from, profile=profile))


@app.command("finetune")
def finetune_cmd(
    config: Path = typer.Argument(..., help="run config YAML whose data.shards come from `megaray prepare sft`"),
    from_: str = typer.Option(
        ...,
        "--from",
        help="checkpoint (or run directory, or MLflow model models:/<model_id> | "
        "models:/<name>/<version>, looked up at the run's tracking URI) "
        "whose weights start the run",
    ),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    verbose: bool = VERBOSE_OPTION,
) -> None:
    """Supervised fine-tuning: `train` with train.task=sft and train.init_from=--from (loss on completions only).

    Example: megaray finetune configs/finetune_tiny.yaml --from runs/gpt-debug
    """
    from megaray.families import load_config
    from megaray.train.console import keep_console
    from megaray.train.launch import fit, run_folder

    setup_logging(verbose)
    cfg = load_config(config, [*set_, "train.task=sft", f"train.init_from={from_}"])
    with keep_console(run_folder(cfg)):
        print_result(fit(cfg))


def print_result(result) -> None:
    """The final metrics, checkpoint and MLflow link of a finished run."""
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
    if Path(result.run_dir, "tensorboard").is_dir():
        typer.echo(f"  tensorboard tensorboard --logdir {Path(result.run_dir, 'tensorboard')}")
    typer.echo(f"  console     {result.run_dir.rstrip('/')}/log.txt")
    profile = Path(result.run_dir, "profile")
    if (profile / "trace.json").is_file():  # a --profile run (megaray.train.profiler)
        typer.echo(
            f"  profile     {profile / 'trace.json'} (chrome://tracing, ui.perfetto.dev), {profile / 'operators.txt'}"
        )


@app.command("tune")
def tune_cmd(
    config: Path = typer.Argument(..., help="tune config YAML (see configs/tune/)"),
    set_: List[str] = typer.Option([], "--set", help="override in the tune config, e.g. --set search.num_samples=8"),
    resume: bool = typer.Option(
        False, "--resume", help="continue an interrupted search; finished trials are not re-run"
    ),
    verbose: bool = VERBOSE_OPTION,
) -> None:
    """Ray Tune search: every trial is a Ray Train run (its own MLflow child run).

    Example: megaray tune configs/tune/transformer.yaml --set search.num_samples=4
    """
    from megaray.tune.search import run_search

    setup_logging(verbose)
    typer.echo(run_search(config, set_, resume=resume).summary())


@app.command("demo")
def demo_cmd(
    config: Path = typer.Option(_DEMO_CONFIG, help="run config"),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    verbose: bool = VERBOSE_OPTION,
) -> None:
    """The main job: prepare the stdlib-docstring corpus, train a small GPT, evaluate, generate.

    Trains with 2 Ray Train workers under ZeRO-2 and compares the validation loss with the
    unigram baseline.

    Example: megaray demo --set train.max_steps=20
    """
    from megaray.data.text import load_manifest, prepare_text
    from megaray.errors import DataError
    from megaray.families import load_config
    from megaray.inference.generate import generate_text
    from megaray.train.launch import fit

    setup_logging(verbose)
    cfg = load_config(config, set_)
    shards = cfg.data.shards
    try:
        load_manifest(shards)
        typer.echo(f"[demo] using prepared corpus {shards}")
    except DataError:
        typer.echo(f"[demo] preparing the stdlib docstring corpus into {shards}")
        prepare_text(["stdlib"], shards, vocab_size=cfg.model.vocab_size, val_fraction=0.05)
    result = fit(cfg)
    print_result(result)
    baseline = getattr(result.info, "unigram_entropy", None)  # an LMInfo field
    val = result.metrics.get("val_loss")
    if val is not None and baseline:
        verdict = "below" if val < baseline else "NOT below"
        typer.secho(
            f"  val loss {val:.3f} nats/token vs unigram baseline {baseline:.3f} ({verdict}; "
            f"ppl {math.exp(val):.1f} vs {math.exp(baseline):.1f})",
            bold=True,
        )
    if result.checkpoint:
        sample = generate_text(result.checkpoint, "Return the", max_new_tokens=40, seed=0)
        typer.echo(f"  sample      {sample!r}")
