"""Ablation grids: the named configs under configs/ablation/ each change one component of the
baseline, configs/tune/ablation.yaml runs the same changes as a grid, and a 2-experiment grid runs
on CPU and leaves its comparison artifacts (with HellaSwag accuracy) in the MLflow parent run."""

from __future__ import annotations

import json

import pytest
from conftest import REPO

from megaray.families import load_config
from megaray.tune.config import load_tune_config

ABLATION = REPO / "configs" / "ablation"
TUNE = REPO / "configs" / "tune" / "ablation.yaml"

#: each experiment's change to the baseline's model section (mla's decoupled RoPE keys need rope)
EXPECTED = {
    "baseline": {},
    "alibi": {"position": "alibi"},
    "rope": {"position": "rope"},
    "sine": {"position": "sinusoidal"},
    "mqa": {"attention": "mqa"},
    "gqa": {"attention": "gqa", "n_kv_heads": 2},
    "mla": {"attention": "mla", "position": "rope"},
    "rmsnorm": {"norm": "rmsnorm"},
    "geglu": {"mlp": "geglu"},
    "swiglu": {"mlp": "swiglu"},
    "silu": {"mlp": "silu"},
    "relu": {"mlp": "relu"},
}


def _model_diff(cfg, base):
    a, b = cfg.model.model_dump(mode="json"), base.model.model_dump(mode="json")
    return {k: v for k, v in a.items() if v != b[k]}


def test_every_ablation_config_changes_exactly_its_component():
    assert {p.stem for p in ABLATION.glob("*.yaml")} == set(EXPECTED)
    base = load_config(ABLATION / "baseline.yaml")
    assert (base.model.position, base.model.attention, base.model.norm, base.model.mlp) == (
        "learned",
        "mha",
        "layernorm",
        "gelu",
    )
    for name, change in EXPECTED.items():
        cfg = load_config(ABLATION / f"{name}.yaml")
        assert _model_diff(cfg, base) == change, name
        assert cfg.name == f"ablation-{name}"
        rest, base_rest = cfg.model_dump(mode="json"), base.model_dump(mode="json")
        for section in ("data", "train", "scaling", "tracking", "eval"):  # equal token budget and tracking
            assert rest[section] == base_rest[section], (name, section)


def test_tune_grid_is_the_ablation_configs():
    s = load_tune_config(TUNE, strict=True)
    assert s.base_path == str(ABLATION / "baseline.yaml")
    assert s.config.search.algorithm == "grid" and s.config.scheduler.type == "fifo"  # no early stop: equal budget
    grid = s.config.space["model"].grid
    assert sorted(map(json.dumps, grid)) == sorted(json.dumps(c) for c in EXPECTED.values())
    base = load_config(ABLATION / "baseline.yaml")
    for label, value in s.labels["model"].items():
        name = next(n for n, c in EXPECTED.items() if c == value)
        trial = s.trial_config({"model": label}, "abc_00001")
        assert trial.model == load_config(ABLATION / f"{name}.yaml").model, name
        assert _model_diff(trial, base) == EXPECTED[name]


REFERENCE = ABLATION / "reference"
REFERENCE_TUNE = REPO / "configs" / "tune" / "ablation_reference.yaml"
#: the reference-scale changes: 12 heads, so gqa keeps 4 KV heads; mla's sizes follow DeepSeek-V2's
#: ratios to the head dim 64 (d_c = 4 d_h, d_h^R = d_h / 2)
REFERENCE_EXPECTED = {
    **EXPECTED,
    "gqa": {"attention": "gqa", "n_kv_heads": 4},
    "mla": {"attention": "mla", "position": "rope", "kv_lora_rank": 256, "qk_rope_head_dim": 32},
}


def test_reference_ablations_are_the_baseline_plus_one_change():
    """configs/ablation/reference/: GPT-2 small at 0.5M-token batches for 19,073 steps; every file but
    the baseline is `base: baseline.yaml` with its one change, and loads to exactly that."""
    import yaml

    assert {p.stem for p in REFERENCE.glob("*.yaml")} == set(REFERENCE_EXPECTED)
    base = load_config(REFERENCE / "baseline.yaml")
    m, d, t, s = base.model, base.data, base.train, base.scaling
    assert (m.preset, m.n_layer, m.n_head, m.n_embd) == ("gpt2_small", 12, 12, 768)
    assert (m.block_size, m.vocab_size) == (1024, 50304)
    assert t.global_batch_size * m.block_size == 524288 and t.global_batch_size == d.batch_size * s.max_workers * 4
    assert (t.max_steps, t.eval_every, t.checkpoint_every, t.precision) == (19073, 250, 250, "bf16")
    assert base.eval.hellaswag and base.eval.sample_tokens > 0 and s.use_gpu is True and t.zero_stage in (1, 2)
    for name, change in REFERENCE_EXPECTED.items():
        raw = yaml.safe_load((REFERENCE / f"{name}.yaml").read_text())
        if name != "baseline":
            assert raw["base"] == "baseline.yaml" and set(raw) == {"base", "name", "model"}, name
        cfg = load_config(REFERENCE / f"{name}.yaml")
        assert _model_diff(cfg, base) == change, name
        assert cfg.name == f"ablation-ref-{name}"
        rest, base_rest = cfg.model_dump(mode="json"), base.model_dump(mode="json")
        for section in ("data", "train", "scaling", "tracking", "eval", "generation"):
            assert rest[section] == base_rest[section], (name, section)


def test_reference_tune_grid_is_the_reference_configs():
    s = load_tune_config(REFERENCE_TUNE, strict=True)
    assert s.base_path == str(REFERENCE / "baseline.yaml")
    assert s.config.search.algorithm == "grid" and s.config.scheduler.type == "fifo"
    assert (s.config.trial.num_workers, s.config.trial.use_gpu) == (8, True)
    base = load_config(REFERENCE / "baseline.yaml")
    grid = s.config.space["model"].grid
    assert sorted(map(json.dumps, grid)) == sorted(json.dumps(c) for c in REFERENCE_EXPECTED.values())
    for label, value in s.labels["model"].items():
        name = next(n for n, c in REFERENCE_EXPECTED.items() if c == value)
        trial = s.trial_config({"model": label}, "abc_00001")
        assert trial.model == load_config(REFERENCE / f"{name}.yaml").model, name
        assert trial.train == base.train and trial.data.batch_size == base.data.batch_size


HELLASWAG = [
    {"ctx": "Return the number of", "label": 0, "endings": ["items in the list.", "cats", "blue sky", "the of of"]},
    {
        "ctx": "If the argument is omitted,",
        "label": 1,
        "endings": ["the sun sets.", "None is used.", "return return", "a file is opened twice."],
    },
    {"ctx": "Raise ValueError when", "label": 2, "endings": ["the moon", "zebra", "the value is invalid.", "x"]},
]


def test_ablation_grid_runs_and_leaves_the_comparison(ray_cluster, text_shards, mlflow_server, tmp_path, monkeypatch):
    """Launched as a user does, ``megaray tune configs/tune/ablation.yaml --set ...`` (the CLI in
    this process; the search's result is read from the real ``run_search`` it calls). This is the
    suite's run of the ``megaray tune`` command (tests/test_docs_commands.py skips the README's
    search for it; tests/test_tune.py kills and resumes a search)."""
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    import megaray.tune.search as search
    from megaray.cli import app
    from megaray.inference.hellaswag import evaluate_hellaswag

    data = tmp_path / "hellaswag.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in HELLASWAG) + "{broken\n")
    results, real = [], search.run_search

    def run_search(*args, **kwargs):  # the real search; its result kept for the checks below
        results.append(real(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(search, "run_search", run_search)
    overrides = [
        "space.model={grid: [{}, {position: rope}]}",
        "model.n_layer=1",
        "model.n_embd=64",
        "model.block_size=32",
        "data.batch_size=4",
        "data.num_val_batches=2",
        "train.max_steps=4",
        "train.warmup_steps=1",
        "train.eval_every=2",
        "train.checkpoint_every=4",
        f"data.shards={text_shards}",
        f"eval.hellaswag={data}",
        f"tracking.tracking_uri={mlflow_server}",
        "tracking.experiment=ablation-test",
        f"storage_path={tmp_path / 'runs'}",
    ]
    r = CliRunner().invoke(app, ["tune", str(TUNE), *[a for o in overrides for a in ("--set", o)]])
    assert r.exit_code == 0, (r.output, r.exception)
    (result,) = results
    assert f"search {result.name}: 2 trials (2 completed, 0 stopped early, 0 failed)" in r.output
    assert f"best        trial {result.best.trial_id}" in r.output and result.table() in r.output
    assert [t.outcome for t in result.trials] == ["completed", "completed"]
    assert sorted(json.dumps(t.params["model"]) for t in result.trials) == ['{"position": "rope"}', "{}"]
    for t in result.trials:
        assert [s for s, _ in t.curve] == [2, 4]
        ((step, acc),) = t.evals["hellaswag_acc"][-1:]
        # the periodic evaluation of the final weights equals `megaray eval --task hellaswag` on its checkpoint
        offline = evaluate_hellaswag(t.checkpoint, str(data))
        assert step == 4 and offline["examples"] == 3 and offline["bad_lines"] == 1
        # (the offline result is rounded to 5 decimals; with 3 examples both are k/3)
        assert acc == pytest.approx(offline["acc"], abs=1e-5)
        assert t.evals["hellaswag_acc_norm"][-1][1] == pytest.approx(offline["acc_norm"], abs=1e-5)
    c = MlflowClient(mlflow_server)
    files = {f.path for f in c.list_artifacts(result.parent_run_id, "tune")}
    assert {"tune/trials.md", "tune/trials.csv", "tune/curves.png"} <= files
    table = c.download_artifacts(result.parent_run_id, "tune/trials.md", str(tmp_path))
    text = open(table).read()
    assert "val_loss (last)" in text and "hellaswag_acc" in text and "hellaswag_acc_norm" in text
    assert "(base)" in text and "position=rope" in text
    csv_text = open(c.download_artifacts(result.parent_run_id, "tune/trials.csv", str(tmp_path))).read()
    assert csv_text.splitlines()[0].startswith(
        "trial_id,outcome,last_step,val_loss_last,val_loss_best,hellaswag_acc_last,hellaswag_acc_norm_last"
    )
    png = open(c.download_artifacts(result.parent_run_id, "tune/curves.png", str(tmp_path)), "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
