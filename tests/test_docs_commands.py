"""The README's and docs' commands work as written, in the order written, on a fresh clone; and every
``megaray ...`` hint an error message prints names a command and options that exist.

``test_doc_commands_run_in_order`` copies the repository's files (``git ls-files``: tracked and
untracked-but-not-ignored, i.e. what a commit holds) into a temporary folder and runs every
command of every fenced block of README.md and docs/*.md there, file by file in :data:`ORDER`,
with the venv's ``megaray`` on PATH and no ``RAY_ADDRESS`` / ``MLFLOW_TRACKING_URI``. Prepared
data is shared between blocks and files as a reader following the docs would share it. The only
changes to the commands are the small overrides in :data:`OVERRIDES` (fewer steps, trials and
clips); commands that cannot run in a test are listed in :data:`SKIP`, each with its reason; the
documented error examples must fail exactly as documented (:data:`EXPECTED_ERRORS`). A command
identical to one that already ran (docs/tune.md repeats the README's search) runs once.

The commands form three independent journeys a reader can follow (:data:`LANES`: speech,
images, and text/everything else); each journey runs in order in its own copy of the clone, and
the three run side by side (most of a command's time is processes starting and waiting on each
other, which overlaps partly even on 2 cores). The heaviest journeys (a Tune search, the image
VAE -> latents -> DiT chain, the audio VAE) are skipped here because other tests run the same
commands or configs (see :data:`SKIP`): with them this test took 559 s of a CI run (2 cores).

A command is: every line of a ```bash block, and every line of an unlabelled block that starts
with ``$ `` or with a known program (``megaray``, ``make``, ``ray``, ...). A command this test
does not know how to treat fails the test (add it to a table with a reason).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import List, Tuple

import pytest

REPO = Path(__file__).resolve().parent.parent

#: files in the order a reader follows them (README, then its Documentation list); every
#: docs/*.md must be here.
ORDER = [
    "README.md",
    "docs/architecture.md",
    "docs/training.md",
    "docs/data.md",
    "docs/models.md",
    "docs/audio.md",
    "docs/diffusion.md",
    "docs/tune.md",
    "docs/cluster.md",
]

_TRAIN = "--set train.max_steps=4 --set train.eval_every=4 --set train.checkpoint_every=4 --set train.log_every=2"
_TUNE = (
    "--set search.num_samples=2 --set train.max_steps=4 --set train.eval_every=2 --set train.checkpoint_every=2 "
    "--set train.log_every=2 --set scheduler.max_t=4 --set scheduler.grace_period=2"
)

#: (regex on the command as written, appended arguments, why). The first match applies.
OVERRIDES: List[Tuple[str, str, str]] = [
    (r"^megaray train ", _TRAIN, "4 optimizer steps (one eval and one checkpoint at step 4) instead of hundreds"),
    (r"^megaray tune ", _TUNE, "2 trials of 4 steps (ASHA rungs at 2 and 4)"),
    (r"^megaray prepare audio ", "--clips 32", "32 espeak clips instead of 300 (enough for 2 workers x batch 8)"),
    (r"^megaray eval ", "--max-batches 2", "2 batches instead of 50"),
]

#: (regex on the command, reason it is not run here).
SKIP: List[Tuple[str, str]] = [
    (r"^make (demo|test)\b", "installs .venv and runs the demo / the whole suite: `make` is what runs this test"),
    (
        r"^ray start\b",
        "starts a long-lived cluster; `ray start` + `ray job submit` are covered by tests/test_zz_job_submit.py",
    ),
    (r"^(RAY_AUTH_MODE=token )?ray job submit\b", "covered by tests/test_zz_job_submit.py"),
    (r"^(\.venv/bin/)?mlflow ui\b", "starts a web server that never exits"),
    (r"^python benchmarks/", "benchmarks print measurements (BENCHMARKS.md); never asserted in tests"),
    (r"^python -m pytest\b", "runs part of this test suite"),
    (
        r"^MEGARAY_UPDATE_GOLDEN=1 ",
        "rewrites the stored golden losses on purpose; tests/test_golden_losses.py checks them",
    ),
    (r"^python -c \"from megaray.data.text import prepare_text", "the Python API; tests/test_data_text.py runs it"),
    (r"^megaray tune .*use_gpu=true", "needs 8 GPU workers and an s3:// bucket"),
    (
        r"^(?:[A-Z_]+=\S+ )*(?:ray (?:up|down|dashboard|exec|get-auth-token|job submit)|kubectl|helm|docker|ssh)\b",
        "needs a cloud account, a registry or a Kubernetes cluster (docs/cluster.md); tests/test_cluster_configs.py "
        "validates the configs offline",
    ),
    (
        r"^pip wheel --no-deps -w dist \.$",
        "builds the wheel that `ray up` installs on the cluster's nodes (docs/cluster.md)",
    ),
    (
        r"^megaray (train configs/mel_dit_tiny\.yaml|sample --checkpoint runs/mel-dit-tiny)\b",
        "the mel DiT path (configs/mel_dit_tiny.yaml on espeak clips, `megaray sample --text`) runs in "
        "tests/test_diffusion_train.py::test_mel_dit_trains_on_speech_and_logs_a_vocoded_wav; this test's minutes go "
        "to the image pipeline before it (CI has a 40-minute budget)",
    ),
    (
        r"^megaray tune configs/tune/transformer\.yaml\b",
        "the suite runs `megaray tune` in tests/test_ablation.py (the CLI, a 2-trial grid with HellaSwag, MLflow parent "
        "and child runs) and kills and resumes a search in tests/test_tune.py (`--resume`'s run_search(resume=True)); "
        "a third search here cost 2-7 minutes of CI's 40-minute budget",
    ),
    (
        r"^megaray train configs/audio_vae_small\.yaml\b",
        "the audio VAE trains through fit (what `megaray train` calls) in tests/test_audio_train_e2e.py (configs/audio_vae_75x8.yaml); "
        "this config loads in tests/test_docs_commands.py's hint check (CI has a 40-minute budget)",
    ),
    (
        r"^megaray (train configs/(image_vae_tiny|dit_tiny)\.yaml|prepare image-latents|sample --checkpoint runs/dit-tiny)\b",
        "the image journey after `prepare images` runs in tests/test_image_vae.py (configs/image_vae_tiny.yaml: 2 "
        "workers, GAN, crash and resume) and tests/test_diffusion_train.py (`megaray prepare image-latents`, "
        "configs/dit_tiny.yaml with crash and resume, `megaray sample --class`); running it again here cost 5-10 "
        "minutes of CI's 40-minute budget",
    ),
    (
        r"^megaray (train configs/multimodal_tiny\.yaml|generate --checkpoint runs/multimodal-tiny)\b",
        "the multimodal run (configs/multimodal_tiny.yaml, 2 workers, crash and resume) runs in "
        "tests/test_multimodal_train.py and `megaray generate` on multimodal checkpoints in "
        "tests/test_multimodal_generate.py (CI has a 40-minute budget)",
    ),
]

#: documented error examples: command -> (exit code, text the output must contain).
EXPECTED_ERRORS = {
    "megaray config configs/demo.yaml --set model.n_layr=3": (2, "model.n_layr: unknown key; did you mean 'n_layer'?"),
    "megaray generate --checkpoint runs/nope": (2, "error: checkpoint not found: runs/nope"),
}

#: (lane, regex on the command): the first match picks the journey a command belongs to; a
#: command matching none is in "text". A lane's commands share its folder and run in doc order.
LANES: List[Tuple[str, str]] = [
    ("images", r"images-32|image[_-]vae|image-latents|dit[_-]tiny|skimage|--class "),
    ("speech", r"speech|vocoder|vocode|audio|espeak|\.wav\b"),
]


def lane(cmd: str) -> str:
    """The journey (:data:`LANES`) a command belongs to."""
    return next((name for name, pat in LANES if re.search(pat, cmd)), "text")


PROGRAMS = ("megaray", "make", "ray", "mlflow", ".venv/bin/mlflow", "python", ".venv/bin/python", "espeak-ng")
ENV_PREFIX = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S* )+")  # VAR=value before a program


# ----------------------------------------------------------------------------- extraction


def doc_commands(path: Path) -> List[str]:
    """The commands of ``path``'s fenced blocks, in order (continuations joined, comments dropped)."""
    out: List[str] = []
    for m in re.finditer(r"^```(\w*)[^\n]*\n(.*?)^```", path.read_text(), re.S | re.M):
        lang, body = m.group(1), m.group(2)
        if lang not in ("", "bash", "sh", "shell", "console"):
            continue
        pending = ""
        for raw in body.splitlines():
            line = raw.rstrip()
            if pending:
                line, pending = pending + " " + line.strip(), ""
            elif line.startswith("$ "):
                line = line[2:]
            elif lang == "" and not ENV_PREFIX.sub("", line).startswith(tuple(p + " " for p in PROGRAMS)):
                continue  # output shown in an unlabelled block
            if line.endswith("\\"):
                pending = line[:-1].rstrip()
                continue
            cmd = _strip_comment(line).strip()
            if cmd and not cmd.startswith("#"):
                out.append(re.sub(r"\s+", " ", cmd))
    return out


def _strip_comment(line: str) -> str:
    """Drop a trailing ``# comment`` (a ``#`` after whitespace, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def plan() -> List[Tuple[str, str, str, str]]:
    """``[(doc, action, command as written, command to run)]`` over :data:`ORDER`; action is run,
    expect_error, unknown, or ``skip: <reason>``. A command identical to one run earlier (the same
    search in README.md and docs/tune.md) is run once: the second run would only find the first
    one's state."""
    steps, ran = [], {}
    for doc in ORDER:
        for cmd in doc_commands(REPO / doc):
            skip = next((why for pat, why in SKIP if re.search(pat, cmd)), None)
            if skip:
                steps.append((doc, f"skip: {skip}", cmd, ""))
            elif cmd in EXPECTED_ERRORS:
                steps.append((doc, "expect_error", cmd, cmd))
            elif cmd in ran:
                steps.append((doc, f"skip: the same command as in {ran[cmd]}, run above", cmd, ""))
            elif cmd.startswith(("megaray ", "espeak-ng ")):
                extra = next((args for pat, args, _ in OVERRIDES if re.search(pat, cmd)), "")
                steps.append((doc, "run", cmd, f"{cmd} {extra}".strip()))
                ran[cmd] = doc
            else:
                steps.append((doc, "unknown", cmd, ""))
    return steps


def test_every_doc_is_in_order_and_every_command_has_a_plan():
    """Cheap: each docs/*.md is listed, and every command is run, skipped with a reason, or a
    documented error (no command slips through untested)."""
    assert set(ORDER) == {"README.md", *(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md"))}
    unknown = [(doc, cmd) for doc, action, cmd, _ in plan() if action == "unknown"]
    assert not unknown, f"commands with no plan (add them to SKIP with a reason, or make them runnable): {unknown}"
    assert any(cmd.startswith("megaray train") for _, action, cmd, _ in plan() if action == "run")


# ----------------------------------------------------------------------------- running them


def _fresh_clone(dest: Path) -> Path:
    files = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


#: what a run's console must not show without --verbose (test_zz_job_submit checks --verbose brings it back)
NOISE = ("PlacementGroupCleaner", "FutureWarning", "Reporting training result", "TrainController")


def _run_lane(steps: List[Tuple[str, str, str, str]], clone: Path, env: dict) -> Tuple[List[str], List[str]]:
    """Run one journey's steps in order in ``clone``: ``(failures, report lines)``."""
    failures, report = [], []
    for doc, action, written, cmd in steps:
        t0 = time.time()
        p = subprocess.run(cmd, shell=True, cwd=clone, env=env, capture_output=True, text=True, timeout=900)
        out = p.stdout + p.stderr
        report.append(f"{doc}: {p.returncode} {time.time() - t0:5.0f} s  {cmd}")
        if action == "expect_error":
            rc, text = EXPECTED_ERRORS[written]
            ok = p.returncode == rc and text in out and "Traceback" not in out
        else:
            ok = p.returncode == 0
            if ok and re.match(r"megaray (train|finetune|demo)\b", cmd):
                # the console: a progress bar and megaray's lines; Ray's and the libraries' own
                # output stays in Ray's logs (without --verbose)
                noise = [n for n in NOISE if n in out]
                if noise or not re.search(r"^step \d+/\d+ \| loss", out, re.M):
                    failures.append(f"--- {doc}: `{written}` console has {noise or 'no progress bar'}:\n{out[-3000:]}")
        if not ok:
            failures.append(f"--- {doc}: `{written}` (ran `{cmd}`) exited {p.returncode}:\n{out[-3000:]}")
    return failures, report


def test_lanes_split_the_journeys():
    """Cheap: the speech, image and text commands land in their journeys."""
    assert lane("megaray prepare audio --source espeak --out data/speech-tiny") == "speech"
    assert lane("megaray vocode --checkpoint runs/vocoder-tiny --input in.wav --output out.wav") == "speech"
    assert lane("megaray train configs/dit_tiny.yaml") == "images"
    assert (
        lane("megaray prepare image-latents --vae-checkpoint runs/image-vae-tiny --source data/images-32") == "images"
    )
    assert lane("megaray train configs/gpt_debug.yaml") == "text"
    assert {lane(cmd) for _, action, cmd, _ in plan() if action == "run"} == {"speech", "images", "text"}


@pytest.mark.slow
def test_doc_commands_run_in_order(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MEGARAY_DEBUG")}
    env["PATH"] = f"{REPO / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION", "0.1")  # three local clusters at once
    lanes: dict = {}
    report = []
    for doc, action, written, cmd in plan():
        if action.startswith("skip"):
            report.append(f"{doc}: SKIP {written}  ({action[6:]})")
        else:
            lanes.setdefault(lane(written), []).append((doc, action, written, cmd))
    t_all = time.time()
    with ThreadPoolExecutor(len(lanes)) as pool:
        futures = {
            name: pool.submit(_run_lane, steps, _fresh_clone(tmp_path / name), env) for name, steps in lanes.items()
        }
        results = {name: f.result() for name, f in futures.items()}
    failures = [f for name in results for f in results[name][0]]
    for name, (_, lines) in results.items():
        report += [f"[{name}] {line}" for line in lines]
    print(f"\n{time.time() - t_all:.0f} s in all\n" + "\n".join(report))
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------- hints in error messages


HINT = re.compile(
    r"megaray (?:prepare (?:text|audio-latents|audio)|train|tune|eval|generate|vocode|config|demo)(?=[\s`\"']|$)"
    r"[^`\"'\n)]*"
)


def _hints() -> List[Tuple[str, str]]:
    found = []
    for path in sorted((REPO / "megaray").rglob("*.py")):
        for m in HINT.finditer(path.read_text()):
            found.append((str(path.relative_to(REPO)), m.group(0).strip()))
    return found


def _command_problems(root, hint: str) -> List[str]:
    """What is wrong with ``hint`` (``megaray <command> [args] [--option value ...]``) for the CLI
    ``root``: an unknown command, or arguments its parser rejects (unknown option, extra
    positional words such as ``SOURCES... OUT_DIR`` for a command that takes options only).
    ``{placeholder}`` values (also one cut off at a quote) count as ``1``, ``...`` marks elided arguments, and a missing
    required option or option value is allowed (a hint may leave one out, or name an option), and so is
    an example input file that does not exist here (``--audio hello.wav``)."""
    hint = re.split(r"\s{2,}", hint.strip())[0]  # docstring tables: command, then prose
    if "|" in hint:  # `megaray prepare text | audio | audio-latents`: a list of commands
        return [why for sub in hint.split("|") for why in _command_problems(root, "megaray prepare " + sub.split()[-1])]
    words = [re.sub(r"\{[^}]*\}?", "1", w) for w in shlex.split(hint)[1:] if w != "..."]  # "{cfg[" cut at a quote
    cmd, path = root, []
    while words and hasattr(cmd, "commands") and words[0] in cmd.commands:
        path.append(words[0])
        cmd = cmd.commands[words.pop(0)]
    if hasattr(cmd, "commands"):
        return [f"no command {' '.join(words[:1]) or '(missing)'} under `{' '.join(['megaray', *path])}`"]
    try:
        cmd.make_context(" ".join(["megaray", *path]), list(words))
    except Exception as e:  # click's UsageError / BadParameter (typer vendors click: no stable import path)
        msg = e.format_message() if hasattr(e, "format_message") else str(e)
        if (
            not msg.startswith(("Missing option", "Missing argument", "Missing parameter"))
            and not msg.endswith("requires an argument.")
            and ": file not found: " not in msg
        ):  # value cut at a quote, a mention of the option, an example file
            return [msg]
    return []


def test_every_hint_names_a_command_and_options_that_exist():
    """Every ``megaray <command> --option`` written in megaray/ (hints in error messages, docstrings),
    and the prepare command each shipped config's task names for missing data, is a command of
    the CLI with options that command has."""
    import typer

    from megaray import families
    from megaray.cli import app

    root = typer.main.get_command(app)
    hints = _hints()
    assert any("megaray prepare text" in h for _, h in hints)  # the extraction finds the data hints
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = families.load_config(path)
        cmd = families.task_class(cfg.model.family)(cfg).prepare_command(cfg.data.shards)
        hints += [(f"prepare_command of {path.name}", cmd)] if cmd else []
    assert any("--vocab-size 512" in h for _, h in hints)
    bad = [f"{where}: `{hint}`: {why}" for where, hint in hints for why in _command_problems(root, hint)]
    assert not bad, "\n".join(bad)
