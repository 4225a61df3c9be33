"""Command output for people by default, one JSON document on stdout with ``--json`` (issue 23), and
CLI errors that name CLI flags, not Python keyword arguments.

Fast: the text prepare runs on a tiny corpus without Ray; no checkpoint is trained.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from conftest import REPO
from typer.testing import CliRunner

from megaray.cli import app
from megaray.cli.output import describe, emit, json_stdout

runner = CliRunner()

#: every command that has a result to print (before issue 23 they printed JSON unasked)
RESULT_COMMANDS = [
    ("prepare", "text"),
    ("prepare", "bin"),
    ("prepare", "sft"),
    ("prepare", "audio"),
    ("prepare", "audio-latents"),
    ("prepare", "images"),
    ("prepare", "image-latents"),
    ("eval",),
    ("generate",),
    ("vocode",),
    ("sample",),
    ("export",),
    ("config",),
]


@pytest.fixture()
def corpus(tmp_path) -> Path:
    """40 small text files: enough for a 300-token BPE and a val split."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(40):
        text = " ".join(words[(i * 7 + j) % len(words)] + str(j % 5) for j in range(60))
        (folder / f"doc{i:02d}.txt").write_text(f"Document {i}. {text}\n")
    return folder


def _prepare(corpus: Path, out: Path, *extra: str):
    args = ["prepare", "text", "--source", str(corpus), "--out", str(out), "--vocab-size", "300"]
    return runner.invoke(app, [*args, "--val-fraction", "0.3", *extra])


def test_every_result_command_takes_json_and_prints_no_json_itself():
    group = typer.main.get_command(app)
    for path in RESULT_COMMANDS:
        cmd = group
        for name in path:
            cmd = cmd.commands[name]
        opts = {o for p in cmd.params for o in p.opts}
        assert "--json" in opts, path
        help_text = next(p.help for p in cmd.params if "--json" in p.opts)
        assert "JSON" in help_text and "stdout" in help_text, (path, help_text)
    # one home for JSON output: no command module writes JSON itself
    for module in (REPO / "megaray" / "cli").glob("*.py"):
        if module.name != "output.py":
            assert "json.dumps" not in module.read_text(), module


def test_prepare_prints_its_summary_and_json_only_when_asked(corpus, tmp_path):
    r = _prepare(corpus, tmp_path / "plain")
    assert r.exit_code == 0, r.output
    assert "prepared text -> " in r.stdout and f"manifest: {tmp_path / 'plain'}/manifest.json" in r.stdout
    assert '"splits"' not in r.stdout and "{" not in r.stdout.splitlines()[-1]

    r = _prepare(corpus, tmp_path / "json", "--json")
    assert r.exit_code == 0, r.output
    manifest = json.loads(r.stdout)  # stdout is the JSON and nothing else
    assert manifest["kind"] == "text" and manifest["splits"]["val"]["documents"] > 0
    assert "rejected_examples" not in manifest
    assert "prepared text -> " in r.stderr  # the summary still reaches the person, on stderr


def test_a_refused_out_folder_names_the_cli_flag_and_the_api_its_keyword(corpus, tmp_path):
    from megaray.errors import DataError
    from megaray.fs import check_target

    out = tmp_path / "out"
    assert _prepare(corpus, out).exit_code == 0
    r = _prepare(corpus, out)
    assert r.exit_code == 2 and "already holds prepared data" in r.output and "pass --overwrite" in r.output
    assert "overwrite=True" not in r.output
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("x")
    r = _prepare(corpus, tmp_path / "busy")
    assert r.exit_code == 2 and "not an empty folder; pass --overwrite" in r.output, r.output
    with pytest.raises(DataError, match=r"already holds prepared data .*; pass overwrite=True to replace it"):
        check_target(str(out), overwrite=False)


def test_prepare_text_val_fraction_zero_is_refused_as_a_flag():
    r = runner.invoke(app, ["prepare", "text", "--val-fraction", "0"])
    assert r.exit_code == 2 and "--val-fraction must be in (0, 1), got 0" in r.output
    assert "val_fraction" not in r.output


def test_config_json_is_the_resolved_config():
    r = runner.invoke(app, ["config", str(REPO / "configs" / "demo.yaml"), "--set", "model.n_layer=2", "--json"])
    assert r.exit_code == 0, r.output
    cfg = json.loads(r.stdout)
    assert cfg["model"]["n_layer"] == 2 and "train" in cfg


def test_generate_json_and_interactive_do_not_mix(tmp_path):
    r = runner.invoke(app, ["generate", "--checkpoint", str(tmp_path), "--interactive", "--json"])
    assert r.exit_code == 2 and "--json and --interactive" in r.output


def test_emit_and_json_stdout(capsys):
    with json_stdout(True):
        print("a summary line")
    emit({"loss": 6.037681234, "files": ["a.png", "b.png"], "bad_lines": {"not JSON": [3]}, "note": None}, True)
    out, err = capsys.readouterr()
    assert err == "a summary line\n"
    assert json.loads(out) == {
        "loss": 6.037681234,
        "files": ["a.png", "b.png"],
        "bad_lines": {"not JSON": [3]},
        "note": None,
    }

    with json_stdout(False):
        print("a summary line")
    emit({"loss": 6.037681234, "files": ["a.png", "b.png"], "bad_lines": {"not JSON": [3]}, "note": None}, False)
    out, err = capsys.readouterr()
    assert err == "" and out.splitlines() == [
        "a summary line",
        "loss       6.03768",
        "files      a.png, b.png",
        'bad_lines  {"not JSON": [3]}',
    ]
    assert describe({}) == ""
