"""Typed configs: every shipped YAML loads; bad keys, types and combinations fail early and clearly."""

from pathlib import Path

import pytest

from megaray.config import ConfigError
from megaray.families import load_config

ROOT = Path(__file__).resolve().parent.parent
# run configs: configs/*.yaml and the ablation experiments (configs/ablation/, its reference/ scale)
RUN_CONFIGS = sorted([*(ROOT / "configs").glob("*.yaml"), *(ROOT / "configs" / "ablation").rglob("*.yaml")])


def test_configs_exist():
    assert len(RUN_CONFIGS) >= 3


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_shipped_run_config_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    out = tmp_path / "resolved.yaml"
    cfg.to_yaml(out)
    again = load_config(out)
    assert again == cfg
    assert again.model.preset == cfg.model.preset


def test_every_shipped_tune_config_loads():
    tune_dir = ROOT / "configs" / "tune"
    paths = sorted(tune_dir.glob("*.yaml")) if tune_dir.is_dir() else []
    if not paths:
        pytest.skip("no tune configs shipped yet")
    from megaray.tune.config import load_tune_config

    for p in paths:
        load_tune_config(p)


def _demo(**kw):
    return load_config(ROOT / "configs" / "demo.yaml", **kw)


def test_dotted_overrides_parse_yaml_scalars():
    cfg = _demo(overrides=["model.n_layer=2", "train.lr=3e-4", "train.zero_stage=3", "scaling.use_gpu=true"])
    assert cfg.model.n_layer == 2
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.zero_stage == 3
    assert cfg.scaling.use_gpu is True


def test_misspelled_key_names_path_and_closest_key():
    with pytest.raises(ConfigError) as e:
        _demo(overrides=["model.n_layr=3"])
    assert "model.n_layr" in str(e.value) and "'n_layer'" in str(e.value)
    with pytest.raises(ConfigError) as e:
        _demo(overrides=["train.warmup_step=3"])
    assert "train.warmup_step" in str(e.value) and "'warmup_steps'" in str(e.value)
    with pytest.raises(ConfigError) as e:
        _demo(overrides=["scalin.num_workers=3"])
    assert "scalin" in str(e.value) and "'scaling'" in str(e.value)


def test_wrong_type_names_key():
    with pytest.raises(ConfigError) as e:
        _demo(overrides=["train.max_steps=lots"])
    assert "train.max_steps" in str(e.value)
    with pytest.raises(ConfigError) as e:
        _demo(overrides=["train.zero_stage=4"])
    assert "train.zero_stage" in str(e.value)


def test_text_sample_keys_moved_from_tracking_to_eval():
    """``tracking.sample_prompt/sample_tokens`` live in the text families' ``eval:`` section now: the
    old key's error names the new one; the old defaults (an older run's config.yaml) still load."""
    cfg = _demo(overrides=["eval.sample_tokens=0", 'eval.sample_prompt="def "'])
    assert (cfg.eval.sample_tokens, cfg.eval.sample_prompt) == (0, "def ")
    assert (_demo().eval.sample_tokens, _demo().eval.sample_prompt) == (48, "The ")
    for key, value in (("sample_tokens", "0"), ("sample_prompt", "def")):
        with pytest.raises(ConfigError) as e:
            _demo(overrides=[f"tracking.{key}={value}"])
        assert f"tracking.{key} has moved to eval.{key}" in str(e.value)
    old = load_config({"model": {"preset": "debug"}, "tracking": {"sample_prompt": "The ", "sample_tokens": 48}})
    assert not hasattr(old.tracking, "sample_tokens") and old.eval.sample_tokens == 48
    with pytest.raises(ConfigError, match="ge|greater"):
        _demo(overrides=["eval.sample_tokens=-1"])


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["model.n_embd=250", "model.n_head=4"], "divisible by n_head"),
        (["model.attention=gqa", "model.n_head=4", "model.n_kv_heads=3"], "divisible by n_kv_heads"),
        (["model.attention=mla", "model.position=learned"], "rope"),
        (["model.n_experts=2", "model.moe_top_k=3"], "moe_top_k"),
        (["train.min_lr=1", "train.lr=0.1"], "min_lr"),
    ],
)
def test_impossible_combinations_fail(overrides, needle):
    with pytest.raises(ConfigError) as e:
        _demo(overrides=overrides)
    assert needle in str(e.value)


def test_unknown_family_and_preset():
    with pytest.raises(ConfigError, match="did you mean 'gpt'"):
        _demo(overrides=["model.family=gtp"])
    with pytest.raises(ConfigError, match="gpt2_small"):
        _demo(overrides=["model.preset=gpt2_smal"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


def test_flat_params_cover_every_section():
    flat = _demo().flat()
    assert flat["model.n_layer"] == 4
    assert flat["train.zero_stage"] == 2
    assert "scaling.resources_per_worker.CPU" in flat


def test_model_type_is_selected_from_the_config_as_in_the_seeds():
    """No `family`: several modalities build the multimodal model, `recurrent` the recurrent-depth
    model, anything else the causal GPT; each is described for the console and MLflow."""
    from megaray.families import describe_model

    def typed(model):
        return load_config({"model": model}).model

    multi = typed({"preset": "tiny", "modalities": ["text", "audio"]})
    assert multi.family == "multimodal" and multi.modalities == ["text", "audio"]
    assert describe_model(multi) == "multimodal (text, audio)"
    assert typed({"preset": "tiny", "modalities": ["image"]}).family == "multimodal"  # any non-text mode
    rec = typed({"preset": "tiny", "recurrent": True})
    assert rec.family == "recurrent" and describe_model(rec) == "recurrent (mean depth 4)"
    assert typed({"preset": "tiny", "recurrent_mean_thinking_steps": 3}).family == "recurrent"
    plain = typed({"preset": "debug"})
    assert plain.family == "gpt" and describe_model(plain) == "gpt"
    assert typed({"preset": "debug", "modalities": ["text"]}).family == "gpt"  # text alone is the GPT
    assert typed({"family": "recurrent", "preset": "tiny"}).family == "recurrent"  # an explicit family wins


def test_an_unknown_modality_names_it_and_the_valid_ones():
    with pytest.raises(
        ConfigError,
        match=r"model\.modalities: unknown modality 'vidoe'.*valid modalities: "
        r"text, audio, image",
    ):
        load_config({"model": {"modalities": ["text", "vidoe"]}})
    with pytest.raises(ConfigError, match="model.modalities: expected a non-empty list"):
        load_config({"model": {"modalities": "text"}})
    with pytest.raises(ConfigError, match="model.recurrent: expected true or false"):
        load_config({"model": {"recurrent": "yes"}})
