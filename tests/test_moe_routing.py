"""Expert-choice routing (Zhou et al. 2022), dropped tokens, the Switch and ST-MoE z auxiliary losses,
and their per-step logging by LMTask."""

from __future__ import annotations

import math

import pytest
import torch

from megaray.models.common.moe import MoE, expert_capacity
from megaray.models.gpt import GPT, GPTConfig

TINY = dict(n_layer=2, n_head=4, n_embd=32, block_size=32, vocab_size=64, mlp="swiglu", bias=False)


def cfg(**kw) -> GPTConfig:
    return GPTConfig.from_name(None, **{**TINY, "n_experts": 4, **kw})


def _rows_seen(moe: MoE):
    """A forward hook on the grouped experts that records the ``(E, rows per expert, dim)`` shapes
    they are run on (all experts run at once: rows are padded to the largest group)."""
    seen = []
    handle = moe.experts.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    return seen, [handle]


@pytest.mark.parametrize("factor,B,T", [(1.0, 2, 10), (2.0, 3, 7), (0.5, 1, 16)])
def test_expert_choice_every_expert_takes_exactly_its_capacity(factor, B, T):
    torch.manual_seed(0)
    moe = MoE(cfg(moe_router="expert_choice", moe_capacity_factor=factor))
    seen, handles = _rows_seen(moe)
    moe(torch.randn(B, T, 32))
    k = math.ceil(B * T * factor / 4)
    assert expert_capacity(B * T, 4, factor) == k
    assert seen == [(4, k, 32)]  # every expert runs on exactly its k tokens, no padding
    assert moe.tokens_per_expert.tolist() == [k] * 4
    for h in handles:
        h.remove()


def test_expert_choice_output_and_dropped_tokens_match_a_direct_computation():
    torch.manual_seed(1)
    moe = MoE(cfg(moe_router="expert_choice", moe_capacity_factor=0.5))
    x = torch.randn(1, 16, 32)
    y = moe(x)
    xf = x[0]
    S = moe.router(xf).softmax(-1)  # (N, E)
    k = 2  # 16 * 0.5 / 4
    want = torch.zeros_like(xf)
    taken = torch.zeros(16, dtype=torch.bool)
    for e in range(4):
        top = S[:, e].argsort(descending=True)[:k]  # expert e picks its k highest-scoring tokens
        taken[top] = True
        want[top] += S[top, e, None] * moe.experts[e](xf[top])
    torch.testing.assert_close(y[0], want, atol=1e-6, rtol=1e-5)
    dropped = float((~taken).float().mean())
    assert dropped > 0  # 8 slots for 16 tokens: at least half are dropped
    assert moe.stats["moe_dropped_frac"].item() == pytest.approx(dropped)
    assert (y[0][~taken] == 0).all()  # a dropped token gets no feed-forward output


def test_expert_choice_gradients_reach_the_router_and_every_expert():
    torch.manual_seed(2)
    model = GPT(cfg(moe_router="expert_choice", moe_capacity_factor=1.0, moe_z_loss_coef=1e-3))
    idx = torch.randint(0, 64, (2, 16))
    _, loss = model(idx, idx)
    (loss + model.aux_loss).backward()
    for block in model.transformer.h:
        g = block.mlp.router.weight.grad
        assert g is not None and g.abs().sum() > 0
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.mlp.experts.parameters())


def test_expert_choice_balance_loss_is_flat_and_z_loss_matches_formula():
    torch.manual_seed(3)
    moe = MoE(cfg(moe_router="expert_choice", moe_aux_loss_coef=0.01, moe_z_loss_coef=0.1))
    x = torch.randn(2, 8, 32)
    moe(x)
    logits = moe.router(x.reshape(16, 32))
    z_direct = (torch.log(torch.exp(logits).sum(-1)) ** 2).mean()  # ST-MoE eq. 5
    assert moe.stats["moe_z_loss"].item() == pytest.approx(z_direct.item(), rel=1e-5)
    # experts are balanced by construction: f_i = 1/E, so the Switch loss is coef * sum_i P_i = coef
    assert moe.stats["moe_aux"].item() == pytest.approx(0.01, rel=1e-5)
    assert moe.aux_loss.item() == pytest.approx(0.01 + 0.1 * z_direct.item(), rel=1e-5)


def test_top_k_z_loss_and_zero_drop():
    torch.manual_seed(4)
    moe = MoE(cfg(moe_top_k=2, moe_z_loss_coef=0.5, moe_aux_loss_coef=0.0))
    seen, _ = _rows_seen(moe)
    x = torch.randn(2, 8, 32)
    moe(x)
    logits = moe.router(x.reshape(16, 32))
    z_direct = (torch.logsumexp(logits, -1) ** 2).mean()
    assert moe.aux_loss.item() == pytest.approx(0.5 * z_direct.item(), rel=1e-5)
    assert moe.stats["moe_dropped_frac"].item() == 0.0
    assert moe.tokens_per_expert.sum().item() == 16 * 2  # each token to exactly k experts
    assert seen[0][0] == 4 and seen[0][1] == int(moe.tokens_per_expert.max())  # padded to the largest group


def test_z_loss_gradient_shrinks_router_logits():
    """The z-loss alone pushes the router towards smaller logits (its purpose)."""
    torch.manual_seed(5)
    moe = MoE(cfg(moe_router="expert_choice", moe_aux_loss_coef=0.0, moe_z_loss_coef=1.0))
    x = torch.randn(2, 8, 32)
    opt = torch.optim.SGD(moe.router.parameters(), lr=0.5)
    moe(x)
    before = moe.stats["moe_z_loss"].item()
    for _ in range(5):
        opt.zero_grad()
        moe(x)
        moe.aux_loss.backward()
        opt.step()
    moe(x)
    assert moe.stats["moe_z_loss"].item() < before


def test_lm_task_logs_moe_metrics_per_step():
    from megaray.config import RunConfig
    from megaray.tasks.lm import LMTask

    torch.manual_seed(6)
    c = cfg(moe_router="expert_choice", moe_capacity_factor=0.5, moe_z_loss_coef=1e-3)
    task = LMTask(RunConfig(model=c))
    model = GPT(c)
    idx = torch.randint(0, 64, (2, 16))
    loss, metrics = task.loss(model, {"input_ids": idx, "targets": idx})
    assert {"ce", "moe_aux", "moe_z_loss", "moe_dropped_frac"} <= set(metrics)
    assert 0 < metrics["moe_dropped_frac"] < 1 and metrics["moe_z_loss"] > 0
    assert loss.item() == pytest.approx(metrics["ce"] + model.aux_loss.item(), rel=1e-6)


def test_config_rejects_unknown_router_and_bad_capacity():
    from megaray.errors import ConfigError

    for bad in (dict(moe_router="hash"), dict(moe_capacity_factor=0)):
        with pytest.raises((ConfigError, ValueError)):
            cfg(**bad)
    cfg(moe_router="expert_choice", moe_top_k=8)  # top_k is not a limit under expert choice
