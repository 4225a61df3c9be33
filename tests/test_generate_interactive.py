"""``megaray generate``: the run's ``generation:`` section gives the defaults of unset flags, and
``--interactive`` answers each stdin line with the model loaded once (a real subprocess, piped stdin)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from typer.testing import CliRunner

from megaray.cli import app
from megaray.families import build_model, load_config
from megaray.inference.generate import generate_text, interactive

runner = CliRunner()
GENERATION = [
    "generation.prompt=Return the",
    "generation.max_new_tokens=6",
    "generation.temperature=0.7",
    "generation.top_k=5",
    "generation.seed=3",
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A randomly initialised debug GPT checkpoint (config.yaml with a generation: section, weights,
    state, the shards' tokenizer.json), laid out as training saves it; no Ray."""
    from megaray.data.text import prepare_text
    from megaray.train.checkpoint import STATE_FILE, WEIGHTS_FILE

    root = tmp_path_factory.mktemp("generate")
    prepare_text(
        [str(REPO / "docs")], str(root / "shards"), vocab_size=300, val_fraction=0.3, progress=False, verbose=False
    )
    cfg = load_config(REPO / "configs" / "gpt_debug.yaml", ["model.vocab_size=300", *GENERATION])
    out = root / "run" / "step_00000001"
    out.mkdir(parents=True)
    cfg.to_yaml(out / "config.yaml")
    torch.manual_seed(0)
    torch.save(build_model(cfg.model).state_dict(), out / WEIGHTS_FILE)
    (out / "tokenizer.json").write_text((root / "shards" / "tokenizer.json").read_text())
    (out / STATE_FILE).write_text(json.dumps({"step": 1}))
    return out


def test_generation_section_gives_the_defaults(ckpt):
    explicit = generate_text(ckpt, "Return the", max_new_tokens=6, temperature=0.7, top_k=5, top_p=None, seed=3)
    assert generate_text(ckpt) == explicit  # every setting from the saved generation: section
    r = runner.invoke(app, ["generate", "--checkpoint", str(ckpt.parent)])
    assert r.exit_code == 0, r.output
    assert r.output == explicit + "\n"
    r = runner.invoke(app, ["generate", "--checkpoint", str(ckpt), "--prompt", "The value", "--temperature", "0"])
    assert r.exit_code == 0, r.output  # a given flag wins; the others stay the run's
    assert r.output == generate_text(ckpt, "The value", 6, 0.0, 5, None, 3) + "\n"


def test_interactive_loads_once_and_answers_each_line(ckpt, monkeypatch):
    import megaray.inference.text as text

    loads = []
    real = text.load_text_model
    monkeypatch.setattr(text, "load_text_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    r = runner.invoke(
        app,
        ["generate", "--checkpoint", str(ckpt), "--interactive", "--max-new-tokens", "4"],
        input="Return the\nThe value\n:q\nnever read\n",
    )
    assert r.exit_code == 0, r.output
    want = [generate_text(ckpt, p, max_new_tokens=4) for p in ("Return the", "The value")]
    assert r.output == "".join(w + "\n\n" for w in want)
    assert len(loads) == 1 + 2  # the loop loaded the model once (the other two: the comparisons above)
    out = io.StringIO()  # on a terminal: a "> " before each read; an empty line ends
    assert interactive(lambda s: s.upper(), io.StringIO("ab\n\ncd\n"), out, show_prompt=True) == 1
    assert out.getvalue() == "> AB\n\n> "


def test_interactive_in_a_subprocess_with_piped_stdin(ckpt):
    script = Path(sys.executable).parent / "megaray"
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "megaray.cli"]
    p = subprocess.run(
        cmd + ["generate", "--checkpoint", str(ckpt.parent), "--interactive"],
        input="Return the\nIf\n",
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout == "".join(generate_text(ckpt, s) + "\n\n" for s in ("Return the", "If"))  # ends at EOF
    assert "> " not in p.stdout and "loaded" not in p.stderr  # no prompt or banner when stdin is a pipe
