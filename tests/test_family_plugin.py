"""A model family added from outside megaray: everything defined in this file (a tiny network, its
``ModelConfig``, a ``Task``, its own run-config section with a path field) and joined to megaray by
one ``families.register(...)`` call, with no edit to ``config.py``, ``launch.py`` or
``families.py`` (docs/architecture.md, "Adding a family"). In-process: no Ray.
"""

from __future__ import annotations

import ast
import pickle
from pathlib import Path
from typing import Any, Dict, Literal, Mapping, Tuple

import pytest
import torch
from helpers import StandInEngine
from pydantic import Field

from megaray import families
from megaray.config import ConfigError, ModelConfig, OptionalPath, RunConfig, StrictConfig
from megaray.families import FamilySpec, describe_model, load_config
from megaray.tasks.base import Task

ROOT = Path(__file__).resolve().parent.parent / "megaray"


class ToyConfig(ModelConfig):
    """The toy family's model section: ``model: {family: toy, preset: tiny}``."""

    PRESETS = {"tiny": {"width": 4}}
    family: Literal["toy"] = "toy"
    width: int = Field(8, gt=0, description="hidden units")


class ToyNet(torch.nn.Module):
    """``(B, 2) float -> (B, 1) float``: one hidden tanh layer."""

    def __init__(self, config: ToyConfig):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(2, config.width), torch.nn.Tanh(), torch.nn.Linear(config.width, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ToySection(StrictConfig):
    """The toy family's own run section (``toy:``), with a path field resolved on the driver."""

    targets: OptionalPath = Field(None, description="a file of regression targets (local path or URI)")
    scale: float = Field(1.0, gt=0, description="output scale of the loss")


class ToyTask(Task):
    """Regression of ``y`` from ``x``, the prediction scaled by ``toy.scale`` (read from the section)."""

    def loss(self, model: Any, batch: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, float]]:
        loss = torch.nn.functional.mse_loss(model(batch["x"]) * self.cfg.toy.scale, batch["y"])
        return loss, {"mse": float(loss.detach())}


def claims(model_raw: Dict[str, Any]) -> bool:
    """Without ``family``: a model section with ``width`` is the toy's."""
    return "width" in model_raw


def describe(config: ToyConfig) -> str:
    return f"toy (width {config.width})"


@pytest.fixture
def toy(monkeypatch):
    """The toy family registered for one test (the registry restored afterwards)."""
    monkeypatch.setattr(families, "_REGISTRY", dict(families.registry()))
    me = __name__
    families.register(
        FamilySpec(
            family="toy",
            config=f"{me}:ToyConfig",
            build=f"{me}:ToyNet",
            task=f"{me}:ToyTask",
            sections=(("toy", f"{me}:ToySection"),),
            claims=f"{me}:claims",
            describe=f"{me}:describe",
            priority=50,
        )
    )


def test_a_family_from_a_test_loads_from_yaml_with_its_section_and_its_path_resolved(toy, tmp_path, monkeypatch):
    from megaray.train.launch import resolve_paths

    path = tmp_path / "toy.yaml"
    path.write_text("model: {family: toy, preset: tiny}\ntoy: {targets: data/targets.csv, scale: 2.0}\n")
    cfg = load_config(path)
    assert isinstance(cfg.model, ToyConfig) and cfg.model.width == 4 and describe_model(cfg.model) == "toy (width 4)"
    assert isinstance(cfg.toy, ToySection) and cfg.toy.scale == 2.0
    assert pickle.loads(pickle.dumps(cfg)) == cfg  # travels to Ray Train workers and Tune trials
    assert load_config(cfg.model_dump(mode="json")) == cfg  # the saved config.yaml loads back
    monkeypatch.chdir(tmp_path)
    out = resolve_paths(cfg)
    assert out.toy.targets == str(tmp_path / "data" / "targets.csv") and cfg.toy.targets == "data/targets.csv"
    assert resolve_paths(load_config(path, ["toy.targets=s3://bucket/t.csv"])).toy.targets == "s3://bucket/t.csv"
    absent = load_config({"model": {"width": 3}})  # no family: the toy's claims hook picks it
    assert absent.model.family == "toy" and absent.toy == ToySection()  # an absent section: its defaults


def test_the_sections_keys_are_checked_and_belong_to_their_family(toy, tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("model: {family: toy}\ntoy: {scal: 2.0}\n")
    with pytest.raises(ConfigError, match=r"toy.scal: unknown key; did you mean 'scale'\? \(set in .*typo.yaml\)"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"toy.scale: Input should be greater than 0"):
        load_config({"model": {"family": "toy"}, "toy": {"scale": 0}})
    with pytest.raises(ConfigError, match=r"toy: the section of family toy, not of 'gpt'.*valid keys"):
        load_config({"model": {"family": "gpt", "preset": "debug"}, "toy": {"scale": 2.0}})
    with pytest.raises(ConfigError, match=r"diffusion: the section of family dit, not of 'toy'"):
        load_config({"model": {"family": "toy"}, "diffusion": {"sample_steps": 3}})
    with pytest.raises(ConfigError, match=r"tyo: unknown key; did you mean 'toy'\?"):
        load_config({"model": {"family": "toy"}, "tyo": {}})
    # a config.yaml saved by an older megaray held every section: another family's defaults are dropped
    old = load_config({"model": {"family": "gpt", "preset": "debug"}, "toy": {"scale": 1.0}})
    assert not hasattr(old, "toy") and old.eval.hellaswag is None


def test_the_toy_task_trains_a_step_with_a_plain_engine(toy):
    cfg = load_config({"model": {"family": "toy", "preset": "tiny"}, "toy": {"scale": 2.0}})
    task = families.task_class("toy")(cfg)
    model = task.build_modules()["model"]
    assert isinstance(model, ToyNet)
    torch.manual_seed(0)
    batch = {"x": torch.randn(16, 2), "y": torch.randn(16, 1)}
    engines = {"model": StandInEngine(model, lr=0.1, optim=torch.optim.SGD)}
    first = task.train_step(engines, batch, 0)
    for step in range(1, 5):
        last = task.train_step(engines, batch, step)
    assert set(first) == {"loss", "mse"} and last["loss"] < first["loss"]


def test_the_core_names_no_family_and_no_family_setting():
    """What the toy needed no edit to: config.py, families.py and launch.py name no family, and
    the run config's own keys hold no family section."""
    known = set(families.registry())
    for rel in ("config.py", "families.py", "train/launch.py"):
        strings = {n.value for n in ast.walk(ast.parse((ROOT / rel).read_text())) if isinstance(n, ast.Constant)}
        assert not strings & known, f"megaray/{rel} names a family: {sorted(strings & known)}"
    assert not {"diffusion", "eval", "generation"} & set(RunConfig.model_fields)


def test_a_checkpoint_path_takes_a_registry_uri_and_a_path_becomes_absolute(tmp_path, monkeypatch):
    """``train.init_from`` and the diffusion section's frozen networks are typed ``CheckpointPath``: a
    ``models:/`` URI becomes its checkpoint."""
    import megaray.weights
    from megaray.train.launch import resolve_paths

    monkeypatch.setattr(megaray.weights, "model_checkpoint", lambda uri, tracking: f"/store/{uri[len('models:/') :]}")
    monkeypatch.chdir(tmp_path)
    cfg = load_config({"model": {"family": "gpt", "preset": "debug"}, "train": {"init_from": "models:/lm/3"}})
    assert resolve_paths(cfg).train.init_from == "/store/lm/3"
    cfg = load_config({"model": {"family": "gpt", "preset": "debug"}, "train": {"init_from": "runs/a"}})
    assert resolve_paths(cfg).train.init_from == str(tmp_path / "runs" / "a")
    dit = {"model": {"family": "dit", "preset": "small_dit"}}
    cfg = load_config({**dit, "diffusion": {"vae_checkpoint": "models:/vae@champion", "vocoder_checkpoint": "voc"}})
    out = resolve_paths(cfg)
    assert (out.diffusion.vae_checkpoint, out.diffusion.vocoder_checkpoint) == (
        "/store/vae@champion",
        str(tmp_path / "voc"),
    )
