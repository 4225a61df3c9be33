"""The CLI's help texts, and the commands its error messages tell users to run."""

from __future__ import annotations

import ast
import re
import shlex

import pytest
import typer
from conftest import REPO
from typer.testing import CliRunner

from megaray.cli import app
from megaray.errors import DataError

runner = CliRunner()

COMMANDS = [
    ["config"],
    ["train"],
    ["tune"],
    ["demo"],
    ["eval"],
    ["generate"],
    ["vocode"],
    ["prepare", "text"],
    ["prepare", "audio"],
    ["prepare", "audio-latents"],
]


def _parse_only(args):
    """Parse ``megaray ARGS`` down to the leaf command and run its option checks, without running
    it. Raises what a user would see: an unknown command or option, a missing required option,
    a value the up-front checks reject."""
    cmd = typer.main.get_command(app)
    ctx = cmd.make_context("megaray", list(args))
    while hasattr(cmd, "resolve_command"):  # a group: descend into the named subcommand
        rest = [*getattr(ctx, "_protected_args", []), *getattr(ctx, "protected_args", []), *ctx.args]
        name, cmd, rest = cmd.resolve_command(ctx, rest)
        if not rest and hasattr(cmd, "resolve_command"):  # `megaray prepare` on its own lists its commands
            return ctx
        ctx = cmd.make_context(name, rest, parent=ctx)
    return ctx


def test_top_level_help_lists_every_command_and_a_starting_point():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for cmd in ("train", "prepare", "eval", "generate", "vocode", "tune", "demo", "config"):
        assert cmd in r.output
    assert "megaray demo" in r.output


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_each_command_help_has_an_example_that_parses(path):
    r = runner.invoke(app, [*path, "--help"])
    assert r.exit_code == 0, r.output
    assert "Example: megaray " + " ".join(path) in " ".join(r.output.split()), r.output
    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    example = re.search(r"Example: (megaray [^\n]+)", cmd.help or "")  # one line in the docstring
    assert example, cmd.help
    words = shlex.split(example.group(1))[1:]
    assert words[: len(path)] == path, example.group(1)
    _parse_only(words)


def _strings(tree):
    """Every string literal of a module except docstrings; f-string fields become ``1`` (a valid
    path, count or size)."""
    docs = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and n.body
        and isinstance(n.body[0], ast.Expr)
        and isinstance(n.body[0].value, ast.Constant)
    }
    inner = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
    for n in ast.walk(tree):
        if isinstance(n, ast.JoinedStr):
            yield "".join(v.value if isinstance(v, ast.Constant) else "1" for v in n.values)
        elif isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs | inner:
            yield n.value


def _hints_in_source():
    """Every backquoted ``megaray ...`` command in the strings of megaray/ (error messages, hints,
    help texts; not docstrings)."""
    found = []
    for py in sorted((REPO / "megaray").rglob("*.py")):
        for text in _strings(ast.parse(py.read_text())):
            for m in re.finditer(r"`(megaray [a-z][^`]*)`", text):
                found.append(pytest.param(m.group(1), id=f"{py.relative_to(REPO)}: {m.group(1)}"))
    return found


@pytest.mark.parametrize("hint", _hints_in_source())
def test_commands_named_in_messages_exist(hint):
    words = shlex.split(hint)[1:]
    if words and words[-1].endswith("..."):  # "megaray prepare audio ..." in prose: the command, not its options
        words = words[:-1]
    try:
        _parse_only(words)
    except DataError:  # a file the hint names is there when the hint is printed, not here
        return
    except Exception as e:  # click usage errors and the option checks' ConfigError
        if type(e).__name__ == "MissingParameter":  # a hint may leave required options to the reader
            return
        pytest.fail(f"`{hint}` is not a valid megaray command line: {e}")


def test_eval_and_generate_on_a_checkpoint_without_ray(tmp_path):
    """The success path of the inference commands: shards prepared by the CLI from real text
    (docs/*.md), a checkpoint holding a randomly initialised debug GPT and the shards'
    tokenizer; an untrained model's loss is close to ln(vocab)."""
    import json
    import math

    import torch

    from megaray.families import build_model, load_config
    from megaray.train.checkpoint import STATE_FILE, WEIGHTS_FILE

    shards = tmp_path / "docs-300"
    r = runner.invoke(
        app,
        [
            "prepare",
            "text",
            "--source",
            str(REPO / "docs"),
            "--out",
            str(shards),
            "--vocab-size",
            "300",
            "--val-fraction",
            "0.3",
        ],
    )
    assert r.exit_code == 0, r.output
    cfg = load_config(REPO / "configs" / "gpt_debug.yaml", ["model.vocab_size=300", f"data.shards={shards}"])
    ckpt = tmp_path / "run" / "step_00000001"
    ckpt.mkdir(parents=True)
    cfg.to_yaml(ckpt / "config.yaml")
    torch.manual_seed(0)
    torch.save(build_model(cfg.model).state_dict(), ckpt / WEIGHTS_FILE)
    (ckpt / "tokenizer.json").write_text((shards / "tokenizer.json").read_text())
    (ckpt / STATE_FILE).write_text(json.dumps({"step": 1}))

    args = ["eval", "--checkpoint", str(tmp_path / "run"), "--batch-size", "1", "--max-batches", "2"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "{" not in r.stdout and "ppl" in r.stdout  # key/value lines for people
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["step"] == 1 and out["split"] == "val" and out["tokens"] == 2 * cfg.model.block_size
    assert abs(out["loss"] - math.log(300)) < 0.5, out

    r = runner.invoke(app, ["generate", "--checkpoint", str(ckpt), "--prompt", "The model", "--max-new-tokens", "5"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("The model")
