"""``base: other.yaml`` in run configs (megaray.config.load_layered): deep merge, paths relative to
the including file, chains, cycles, ``--set`` last, unknown keys named with their file; the same
loader reads a tune config's base; ``megaray config`` prints the merged result."""

from __future__ import annotations

import textwrap

import pytest
import yaml
from typer.testing import CliRunner

from megaray.config import ConfigError, deep_merge, load_layered
from megaray.families import load_config


def _write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def chain(tmp_path):
    """common/root.yaml <- exp/mid.yaml <- exp/deeper/leaf.yaml, each base relative to its own folder."""
    _write(
        tmp_path / "common" / "root.yaml",
        """\
        name: root
        model: {family: gpt, preset: debug, n_layer: 3, vocab_size: 300}
        data: {shards: data/root, batch_size: 2}
        train: {max_steps: 50, betas: [0.9, 0.99], modules: {disc: {lr: 1.0e-4, weight_decay: 0.0}}}
        """,
    )
    _write(
        tmp_path / "exp" / "mid.yaml",
        """\
        base: ../common/root.yaml
        model: {n_embd: 128}
        train: {betas: [0.8, 0.9], modules: {disc: {lr: 2.0e-4}}}
        """,
    )
    return _write(
        tmp_path / "exp" / "deeper" / "leaf.yaml",
        """\
        base: ../mid.yaml
        name: leaf
        data: {shards: data/leaf}
        """,
    )


def test_chain_deep_merges_relative_to_each_including_file(chain, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path / "exp" / "deeper")  # paths resolve against the file, never the cwd
    cfg = load_config(chain)
    assert cfg.name == "leaf"  # scalar of the last file
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.vocab_size) == (3, 128, 300)  # mappings merge
    assert (cfg.data.shards, cfg.data.batch_size) == ("data/leaf", 2)
    assert cfg.train.betas == [0.8, 0.9]  # lists replace, never append
    assert cfg.train.max_steps == 50
    assert cfg.train.modules["disc"].lr == 2e-4 and cfg.train.modules["disc"].weight_decay == 0.0  # nested merge
    layered = load_layered(chain)
    assert layered.files == [str(tmp_path / "common" / "root.yaml"), str(tmp_path / "exp" / "mid.yaml"), str(chain)]
    assert "base" not in layered.raw
    assert layered.origins["model.n_layer"] == str(tmp_path / "common" / "root.yaml")
    assert layered.origins["model.n_embd"] == str(tmp_path / "exp" / "mid.yaml")


def test_merge_rules():
    base = {"a": {"x": 1, "y": [1, 2]}, "b": 1, "c": {"k": 1}}
    over = {"a": {"y": [3]}, "b": {"now": "a mapping"}, "c": None}
    assert deep_merge(base, over) == {"a": {"x": 1, "y": [3]}, "b": {"now": "a mapping"}, "c": None}
    assert base == {"a": {"x": 1, "y": [1, 2]}, "b": 1, "c": {"k": 1}}  # inputs unchanged


def test_set_overrides_apply_after_the_whole_chain(chain):
    cfg = load_config(chain, ["model.n_embd=64", "train.betas=[0.5, 0.6]", "name=from-set"])
    assert (cfg.model.n_embd, cfg.train.betas, cfg.name) == (64, [0.5, 0.6], "from-set")
    assert cfg.model.n_layer == 3


def test_cycle_is_an_error_naming_the_chain(tmp_path):
    a = _write(tmp_path / "a.yaml", "base: sub/b.yaml\nname: a\n")
    b = _write(tmp_path / "sub" / "b.yaml", "base: ../a.yaml\nname: b\n")
    with pytest.raises(ConfigError, match="cycle") as e:
        load_config(a)
    assert f"{a} -> {b} -> {a}" in str(e.value)
    me = _write(tmp_path / "self.yaml", "base: self.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(me)


def test_missing_or_bad_base_names_the_including_file(tmp_path):
    f = _write(tmp_path / "x.yaml", "base: nope.yaml\nmodel: {family: gpt}\n")
    with pytest.raises(ConfigError, match="nope.yaml not found") as e:
        load_config(f)
    assert str(f) in str(e.value)
    g = _write(tmp_path / "y.yaml", "base: [a.yaml, b.yaml]\n")
    with pytest.raises(ConfigError, match="base: expected the path"):
        load_config(g)


def test_unknown_key_after_the_merge_names_the_file_or_set(chain, tmp_path):
    bad = _write(tmp_path / "exp" / "typo.yaml", "base: mid.yaml\ntrain: {lr_max: 1.0}\n")
    with pytest.raises(ConfigError, match=r"train.lr_max: unknown key.*\(set in .*typo.yaml\)"):
        load_config(bad)
    bad_in_base = _write(tmp_path / "exp" / "mid.yaml", "base: ../common/root.yaml\nmodel: {n_layr: 2}\n")
    typo_in_the_middle = r"model.n_layr: unknown key; did you mean 'n_layer'\? \(set in .*mid.yaml\)"
    with pytest.raises(ConfigError, match=typo_in_the_middle):
        load_config(chain)
    _write(bad_in_base, "base: ../common/root.yaml\n")
    with pytest.raises(ConfigError, match=r"data.shardz: unknown key.*\(set by --set data.shardz=x\)"):
        load_config(chain, ["data.shardz=x"])


def test_tune_base_is_read_through_the_same_loader(chain, tmp_path):
    from megaray.tune.config import load_tune_config

    tune = _write(
        tmp_path / "tune" / "t.yaml",
        """\
        name: t
        base: ../exp/deeper/leaf.yaml
        overrides: {train.max_steps: 20}
        space: {train.lr: {grid: [1.0e-3, 2.0e-3]}}
        search: {algorithm: grid}
        """,
    )
    s = load_tune_config(tune, strict=True)
    assert (s.base.name, s.base.model.n_embd, s.base.train.betas, s.base.train.max_steps) == (
        "leaf",
        128,
        [0.8, 0.9],
        20,
    )
    _write(tmp_path / "exp" / "mid.yaml", "base: ../common/root.yaml\ntrain: {lr_maxx: 1}\n")
    with pytest.raises(ConfigError, match=r"train.lr_maxx: unknown key.*mid.yaml"):
        load_tune_config(tune, strict=True)


def test_megaray_config_prints_the_merged_result(chain):
    from megaray.cli import app

    r = CliRunner().invoke(app, ["config", str(chain), "--set", "train.lr=1e-3"])
    assert r.exit_code == 0, r.output
    shown = yaml.safe_load(r.output)
    assert "base" not in shown
    assert shown["name"] == "leaf" and shown["model"]["n_embd"] == 128 and shown["model"]["n_layer"] == 3
    assert shown["train"]["lr"] == 1e-3 and shown["train"]["betas"] == [0.8, 0.9]
