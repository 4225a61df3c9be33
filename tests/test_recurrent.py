"""Recurrent-depth transformer (Geiping et al. 2025, "Huginn"): depth sampling shared by ranks,
truncated backprop, exit criteria, FLOPs that follow depth, and a 2-worker Ray Train run."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import REPO

from megaray.errors import ConfigError
from megaray.families import build_model, load_config
from megaray.models.gpt.flops import flops_per_token as gpt_flops
from megaray.models.gpt.sampling import generate
from megaray.models.recurrent import RecurrentConfig, RecurrentGPT, sample_depth


def _tiny(**kw) -> RecurrentGPT:
    return RecurrentGPT(RecurrentConfig.from_name("tiny", **kw))


def test_loss_is_finite_for_one_and_many_iterations_and_the_yaml_builds_the_family():
    cfg = load_config(REPO / "configs" / "recurrent_tiny.yaml")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    assert isinstance(model, RecurrentGPT) and cfg.model.n_layer == 4
    idx = torch.randint(0, 512, (2, 24))
    for r in (1, 16):
        logits, loss = model(idx, idx, num_steps=r)
        assert logits.shape == (2, 24, 512) and torch.isfinite(loss) and model.last_num_steps == r
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        assert model.adapter.weight.grad is not None and model.prelude[0].attn.c_attn.weight.grad is not None
        model.zero_grad()
    # no look-ahead: changing later tokens leaves earlier logits alone (eval: deterministic s_0)
    model.eval()
    changed = idx.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 512
    assert torch.allclose(model(changed)[:, :12], model(idx)[:, :12], atol=1e-5)
    # the GPT sampler (megaray generate, LMTask samples) runs through the recompute cache
    cached = generate(model, idx[:, :4], 70, temperature=0)  # crosses block_size 64: re-prefill
    assert cached.shape == (2, 74) and torch.equal(
        cached, generate(model, idx[:, :4], 70, temperature=0, use_cache=False)
    )
    with pytest.raises(ConfigError, match=r"n_layer is derived"):
        load_config(REPO / "configs" / "recurrent_tiny.yaml", ["model.n_layer=9"])


def test_two_ranks_sample_the_same_depth_at_a_step_and_depths_vary_with_the_step():
    torch.manual_seed(1)
    rank0 = _tiny()
    torch.manual_seed(2)
    rank1 = _tiny()  # another process: other weights, other global RNG state
    idx = torch.randint(0, 512, (1, 8))
    depths = []
    for step in range(12):
        for m in (rank0, rank1):
            m.set_step(step)
            m(idx, idx)
        assert rank0.last_num_steps == rank1.last_num_steps == sample_depth(rank0.config, step)
        depths.append(rank0.last_num_steps)
    assert len(set(depths)) > 2, depths
    draws = [sample_depth(rank0.config, s) for s in range(4000)]
    assert min(draws) >= 1 and abs(sum(draws) / len(draws) - 4.0) < 0.15  # E[r] = r_bar
    fixed = RecurrentConfig.from_name("tiny", recurrent_sampling="fixed")
    assert {sample_depth(fixed, s) for s in range(50)} == {4}
    assert rank0.eval()(idx) is not None and rank0.last_num_steps == 4  # evaluation: the mean depth


@pytest.mark.parametrize("depth, grads_from_s0", [(2, False), (None, True)])
def test_truncated_backprop_leaves_no_gradient_through_early_iterations(depth, grads_from_s0):
    torch.manual_seed(0)
    model = _tiny(backprop_depth=depth)
    s0 = {}

    def leaf_state(e):  # a leaf s_0 we can ask for its gradient
        s0["t"] = torch.randn_like(e).requires_grad_(True)
        return s0["t"]

    model.init_state = leaf_state
    tracked = []
    model.core[0].register_forward_hook(lambda m, i, out: tracked.append(out.requires_grad))
    idx = torch.randint(0, 512, (2, 10))
    model(idx, idx, num_steps=5)[1].backward()
    if depth is None:
        assert tracked == [True] * 5
    else:
        assert tracked == [False, False, False, True, True]  # only the last k=2 iterations build a graph
    assert (s0["t"].grad is not None) == grads_from_s0


def _converged(model: RecurrentGPT) -> RecurrentGPT:
    """A core whose update is zero: ``adapter([s; e]) = e`` and every core block the identity,
    so ``s_i = e`` for every ``i >= 1``."""
    C = model.config.n_embd
    with torch.no_grad():
        model.adapter.weight.copy_(torch.cat([torch.zeros(C, C), torch.eye(C)], dim=1))
        for block in model.core:
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
    return model.eval()


@pytest.mark.parametrize("criterion", ["kl", "state_delta"])
def test_exit_criterion_stops_early_on_a_converged_state(criterion):
    torch.manual_seed(0)
    idx = torch.randint(0, 512, (3, 10))
    model = _converged(_tiny(max_inference_steps=8))
    logits, steps = model.iterate_until_exit(idx, criterion, threshold=1e-6)
    assert steps.tolist() == [2, 2, 2]  # s_1 = s_2: the first comparison that can pass
    assert torch.allclose(logits, model(idx, num_steps=2)[:, -1], atol=1e-5)
    out = model.generate(idx[:, :4], 3, temperature=0, criterion=criterion, threshold=1e-6)
    assert out.shape == (3, 7) and model.last_mean_steps == 2.0
    # the same criterion on an untrained (not converged) core runs to the cap; "fixed" always does
    fresh = _tiny(max_inference_steps=8).eval()
    assert fresh.iterate_until_exit(idx, criterion, threshold=1e-12)[1].tolist() == [8, 8, 8]
    assert model.iterate_until_exit(idx, "fixed")[1].tolist() == [8, 8, 8]


def test_flops_follow_depth_and_match_the_gpt_count_at_depth_one():
    model = _tiny(backprop_depth=2)
    cfg = model.config
    assert model.flops_per_token(1) == pytest.approx(gpt_flops(cfg, model.num_params(), None))
    f = [model.flops_per_token(r) for r in (1, 2, 3, 4, 8)]
    assert all(a < b for a, b in zip(f, f[1:]))
    with_grad, forward_only = f[1] - f[0], f[2] - f[1]  # iteration 2 is backpropagated, 3 is not
    assert with_grad == pytest.approx(3 * forward_only)
    assert f[4] - f[3] == pytest.approx(4 * forward_only)
    full = _tiny(backprop_depth=None)
    assert full.flops_per_token(8) - full.flops_per_token(4) == pytest.approx(4 * with_grad)


@pytest.mark.slow
def test_two_workers_train_with_the_same_sampled_depth_per_step(ray_cluster, text_shards, tmp_path):
    """configs/recurrent_tiny.yaml under Ray Train + DeepSpeed (2 CPU workers): every step logs
    ``num_steps`` = the depth sampled for that step (equal on both ranks, else the mean over ranks
    would differ), the loss falls, and the eval sample is decoded with the exit criterion."""
    from mlflow.tracking import MlflowClient

    from megaray.train.launch import fit

    steps, db = 6, tmp_path / "mlflow.db"
    cfg = load_config(
        REPO / "configs" / "recurrent_tiny.yaml",
        [
            "name=recurrent-e2e",
            f"data.shards={text_shards}",
            f"scaling.storage_path={tmp_path / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{db}",
            f"train.max_steps={steps}",
            "train.log_every=1",
            "train.warmup_steps=0",
            f"train.eval_every={steps}",
            f"train.checkpoint_every={steps}",
            "data.num_val_batches=2",
            "eval.sample_tokens=6",
        ],
    )
    result = fit(cfg)
    assert result.metrics["step"] == steps
    client = MlflowClient(f"sqlite:///{db}")

    def history(key):
        return {m.step: m.value for m in client.get_metric_history(result.mlflow_run_id, key)}

    depth = history("num_steps")
    # the metrics logged at step s come from train_step(step=s - 1)
    assert depth == {s: float(sample_depth(cfg.model, s - 1)) for s in range(1, steps + 1)}, depth
    loss = history("loss")
    assert loss[steps] < loss[1], loss
    assert result.metrics["val_loss"] < math.log(512)
    assert "sample" in {a.path for a in client.list_artifacts(result.mlflow_run_id)}
    # `megaray generate` on the checkpoint samples with the exit criterion and reports the depth used
    from megaray.inference.generate import generate_text

    out = generate_text(result.checkpoint, "def ", max_new_tokens=8, temperature=0, seed=0)
    text, _, report = out.rpartition("\n")
    assert text.startswith("def ")
    mean = float(re.fullmatch(r"\[mean core iterations per token: ([0-9.]+)\]", report).group(1))
    assert 1.0 <= mean <= cfg.model.max_inference_steps
