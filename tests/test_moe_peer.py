"""PEER (He 2024), MH-MoE head routing (Wu et al. 2024), vectorised experts against the per-expert
loop, the expert-parallel refusal, and a 2-worker ZeRO-2 run of each new option."""

from __future__ import annotations

import math

import pytest
import torch

from megaray.errors import ConfigError
from megaray.models.common.experts import GroupedExperts
from megaray.models.common.moe import MoE, expert_capacity
from megaray.models.common.peer import PEER, product_key_topk
from megaray.models.gpt import GPT, GPTConfig

TINY = dict(n_layer=2, n_head=4, n_embd=32, block_size=32, vocab_size=64, mlp="swiglu", bias=False)


def cfg(**kw) -> GPTConfig:
    return GPTConfig.from_name(None, **{**TINY, **kw})


def peer_cfg(**kw) -> GPTConfig:
    return cfg(**{"n_experts": 64, "moe_router": "peer", "moe_top_k": 4, "moe_heads": 3, "moe_peer_key_dim": 12, **kw})


# ----------------------------------------------------------------------------- PEER


def _full_keys(sub_keys: torch.Tensor) -> torch.Tensor:
    """All N = n*n product keys ``[C_i; C'_j]`` at index ``i*n + j``: ``(N, d_key)``."""
    C, Cp = sub_keys[0], sub_keys[1]
    n = C.size(0)
    return torch.cat([C[:, None, :].expand(n, n, -1), Cp[None, :, :].expand(n, n, -1)], dim=-1).reshape(n * n, -1)


def test_product_key_topk_equals_brute_force_over_all_keys():
    torch.manual_seed(0)
    sub_keys = torch.randn(2, 8, 5)  # N = 64 keys of d_key = 10
    q = torch.randn(7, 3, 2, 5)  # 7 tokens, 3 heads
    scores, idx = product_key_topk(q, sub_keys, k=6)
    brute = q.reshape(7, 3, 10) @ _full_keys(sub_keys).t()  # (7, 3, 64): every key scored
    want_scores, want_idx = brute.topk(6, dim=-1)
    torch.testing.assert_close(scores, want_scores, rtol=1e-5, atol=1e-6)
    assert torch.equal(idx, want_idx)


def test_peer_output_equals_the_papers_sum_over_heads_and_retrieved_experts():
    torch.manual_seed(1)
    peer = PEER(peer_cfg(moe_peer_batchnorm=False, mlp="gelu"))
    x = torch.randn(2, 5, 32)
    y = peer(x)
    assert y.shape == (2, 5, 32) and peer.last_indices.shape == (10, 3, 4)
    xf = x.reshape(10, 32)
    q = peer.query(xf).view(10, 3, 12)  # (M, h, d_key)
    s, idx = (q @ _full_keys(peer.sub_keys).t()).topk(4, dim=-1)  # brute-force top-k over all 64 keys
    assert torch.equal(idx, peer.last_indices)
    g = s.softmax(-1)  # eq. 2 per head
    u, v = peer.down.weight[idx], peer.up.weight[idx]  # (M, h, k, C)
    want = (g[..., None] * peer.act((u * xf[:, None, None]).sum(-1))[..., None] * v).sum(dim=(1, 2))  # eq. 7
    torch.testing.assert_close(y.reshape(10, 32), want, rtol=1e-5, atol=1e-5)
    assert 0 < peer.stats["moe_expert_usage"].item() <= 10 * 12 / 64
    assert peer.stats["moe_expert_usage"].item() == pytest.approx(idx.unique().numel() / 64)


def test_peer_gradient_reaches_exactly_the_retrieved_experts():
    torch.manual_seed(2)
    peer = PEER(peer_cfg())
    x = torch.randn(1, 3, 32, requires_grad=True)
    (peer(x) * torch.randn(1, 3, 32)).sum().backward()
    used = torch.zeros(64, dtype=torch.bool)
    used[peer.last_indices.unique()] = True
    assert 0 < used.sum() < 64  # 3 tokens x 3 heads x 4 experts leave most of the 64 unused
    for table in (peer.down, peer.up):
        rows = table.weight.grad.abs().sum(-1)  # (N,)
        assert (rows[used] > 0).all() and (rows[~used] == 0).all()
    for p in (peer.query.weight, peer.sub_keys, peer.query_norm.weight, x):
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("bias,bn", [(False, True), (True, True), (False, False)])
def test_peer_parameter_count_matches_the_papers_formula(bias, bn):
    N, d, dk, h = 32 * 32, 64, 24, 4
    c = cfg(
        n_embd=d,
        n_experts=N,
        moe_router="peer",
        moe_top_k=16,
        moe_heads=h,
        moe_peer_key_dim=dk,
        bias=bias,
        moe_peer_batchnorm=bn,
    )
    peer = PEER(c)
    # He 2024 section 2: experts 2 N d; sub-keys 2 sets x sqrt(N) x d_key/2, shared by the heads;
    # h query networks d -> d_key (+ bias); query BatchNorm scale and shift per query feature
    want = 2 * N * d + 2 * math.isqrt(N) * (dk // 2) + h * d * dk + (h * dk if bias else 0) + (2 * h * dk if bn else 0)
    assert sum(p.numel() for p in peer.parameters()) == want
    assert peer.inactive_params() == (N - h * 16) * 2 * d  # h*k single-neuron experts per token
    model = GPT(c)
    assert model.num_params() - model.num_params(active=True) == c.n_layer * (N - h * 16) * 2 * d


def test_peer_eval_mode_routes_each_token_on_its_own():
    """Query BatchNorm uses batch statistics in training and running statistics in eval, so an
    eval forward of one sequence equals its slice of a batched forward (causal decoding works)."""
    torch.manual_seed(3)
    model = GPT(peer_cfg())
    idx = torch.randint(0, 64, (3, 12))
    model.train()
    model(idx, idx)  # updates the running statistics
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[1:2], model(idx[1:2]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model(idx[:, :6]), model(idx)[:, :6], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(n_experts=60), "perfect-square"),
        (dict(moe_top_k=9), "exceeds sqrt"),
        (dict(moe_peer_key_dim=11), "even"),
    ],
)
def test_peer_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        peer_cfg(**kw)


# ----------------------------------------------------------------------------- vectorised experts vs the loop


def loop_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The former Python loop over experts, one expert at a time (the reference for the grouped bmm)."""
    B, T, C = x.shape
    xf = x.reshape(B * T, C)
    if moe.heads > 1:
        xf = moe.head_proj(xf).reshape(B * T * moe.heads, C // moe.heads)
    probs = moe.router(xf).float().softmax(dim=-1)
    out = torch.zeros_like(xf)
    if moe.router_kind == "top_k":
        weight, chosen = probs.topk(moe.top_k, dim=-1)
        if moe.top_k > 1:
            weight = weight / weight.sum(dim=-1, keepdim=True)
        for e in range(moe.n_experts):
            tok, slot = (chosen == e).nonzero(as_tuple=True)
            out = out.index_add(0, tok, moe.experts[e](xf[tok]) * weight[tok, slot, None])
    else:
        k = expert_capacity(xf.size(0), moe.n_experts, moe.capacity_factor)
        gate, tok = probs.t().topk(k, dim=-1)
        for e in range(moe.n_experts):
            out = out.index_add(0, tok[e], moe.experts[e](xf[tok[e]]) * gate[e, :, None])
    if moe.heads > 1:
        out = moe.merge_proj(out.reshape(B * T, C))
    return out.view(B, T, C)


def _grads(moe: MoE, x: torch.Tensor, fn, w: torch.Tensor):
    moe.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    (y * w).sum().backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in moe.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "kw",
    [
        dict(moe_top_k=1),
        dict(moe_top_k=2),
        dict(moe_top_k=2, mlp="gelu", bias=True),
        dict(moe_router="expert_choice", moe_capacity_factor=1.5),
        dict(moe_top_k=2, moe_heads=4),
        dict(moe_router="expert_choice", moe_heads=2, mlp="gelu", bias=True),
    ],
    ids=["top1", "top2", "top2-gelu-bias", "expert-choice", "heads4", "ec-heads2-bias"],
)
def test_vectorised_experts_equal_the_loop_forward_and_gradients(kw):
    torch.manual_seed(4)
    moe = MoE(cfg(n_experts=6, **kw))
    with torch.no_grad():  # non-zero expert biases, so that a wrong bias slice would show
        for n, p in moe.named_parameters():
            if n.startswith("experts.") and n.endswith(".bias"):
                p.normal_(0, 0.1)
    x, w = torch.randn(3, 7, 32), torch.randn(3, 7, 32)
    y, gx, g = _grads(moe, x, moe, w)
    y_ref, gx_ref, g_ref = _grads(moe, x, lambda t: loop_reference(moe, t), w)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
    assert g.keys() == g_ref.keys() and any("experts" in n for n in g)
    for n in g:
        torch.testing.assert_close(g[n], g_ref[n], rtol=1e-5, atol=1e-5, msg=n)


def test_old_module_list_state_dict_loads_into_the_stacked_experts():
    torch.manual_seed(5)
    moe = MoE(cfg(n_experts=3, moe_top_k=2, mlp="gelu", bias=True))
    old = {}
    for k, v in moe.state_dict().items():  # experts.c_fc.weight (E, ...) -> experts.<e>.c_fc.weight
        if k.startswith("experts."):
            old.update({k.replace("experts.", f"experts.{e}.", 1): v[e].clone() for e in range(3)})
        else:
            old[k] = v.clone()
    fresh = MoE(cfg(n_experts=3, moe_top_k=2, mlp="gelu", bias=True))
    fresh.load_state_dict(old)
    x = torch.randn(2, 4, 32)
    torch.testing.assert_close(fresh(x), moe(x))
    assert isinstance(fresh.experts, GroupedExperts) and len(fresh.experts) == 3


# ----------------------------------------------------------------------------- MH-MoE head routing


def test_head_routing_splits_tokens_into_independently_routed_sub_tokens():
    torch.manual_seed(6)
    moe = MoE(cfg(n_experts=8, moe_top_k=1, moe_heads=4))
    assert moe.router.in_features == 8 and moe.experts.c_fc.weight.shape[-1] == 8  # d/h-wide experts
    x = torch.randn(2, 3, 32)
    assert moe(x).shape == (2, 3, 32)
    assert moe.tokens_per_expert.sum().item() == 2 * 3 * 4  # every sub-token to its own expert
    sub = moe.head_proj(x.reshape(6, 32)).reshape(24, 8)  # the 4 sub-tokens of each token, in order
    chosen = moe.router(sub).argmax(-1)
    assert torch.equal(torch.bincount(chosen, minlength=8), moe.tokens_per_expert.long())
    assert chosen.view(6, 4).unique(dim=1).size(1) > 1  # the sub-tokens of a token go to different experts


def test_head_routing_gradient_reaches_exactly_the_used_experts():
    torch.manual_seed(7)
    moe = MoE(cfg(n_experts=8, moe_top_k=1, moe_heads=2, moe_aux_loss_coef=0.0))
    x = torch.randn(1, 2, 32)
    (moe(x) * torch.randn(1, 2, 32)).sum().backward()
    used = moe.tokens_per_expert > 0
    assert 0 < used.sum() < 8  # 4 sub-tokens, 8 experts
    for p in moe.experts.parameters():
        per_expert = p.grad.flatten(1).abs().sum(-1)
        assert (per_expert[used] > 0).all() and (per_expert[~used] == 0).all()
    for p in (moe.router.weight, moe.head_proj.weight, moe.merge_proj.weight):
        assert p.grad.abs().sum() > 0


def test_head_routing_active_params_and_config_errors():
    model = GPT(cfg(n_experts=8, moe_top_k=2, moe_heads=2))
    per_expert = model.transformer.h[0].mlp.experts.params_per_expert
    assert per_expert == 3 * (32 // 2) * cfg().hidden_dim  # swiglu: gate, up, down of a d/h-wide expert
    assert model.num_params() - model.num_params(active=True) == 2 * (8 - 2 * 2) * per_expert
    with pytest.raises(ConfigError, match="moe_heads"):
        cfg(n_experts=4, moe_heads=3)


def test_expert_parallel_is_refused_at_config_time_with_the_reason():
    with pytest.raises(ConfigError, match=r"model\.moe_expert_parallel: needs .*every rank"):
        cfg(n_experts=4, moe_expert_parallel=2)
    assert cfg(n_experts=4, moe_expert_parallel=1).moe_expert_parallel == 1


# ----------------------------------------------------------------------------- 2 workers, ZeRO 2

OPTIONS = {
    "peer": ["model.n_experts=64", "model.moe_router=peer", "model.moe_top_k=4", "model.moe_heads=2"],
    "heads": ["model.n_experts=4", "model.moe_top_k=2", "model.moe_heads=4"],
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(OPTIONS))
def test_two_worker_zero2_run(ray_cluster, text_shards, tmp_path, kind):
    from conftest import REPO

    from megaray.families import load_config
    from megaray.train.checkpoint import load_for_inference
    from megaray.train.launch import fit

    cfg_ = load_config(
        REPO / "configs" / "gpt_debug.yaml",
        [
            f"name=moe-{kind}",
            f"data.shards={text_shards}",
            f"scaling.storage_path={tmp_path / 'runs'}",
            "tracking.enabled=false",
            "train.zero_stage=2",
            "train.max_steps=4",
            "train.eval_every=4",
            "train.checkpoint_every=4",
            "train.log_every=2",
            *OPTIONS[kind],
        ],
    )
    result = fit(cfg_)
    assert result.metrics["step"] == 4
    assert math.isfinite(result.metrics["loss"]) and math.isfinite(result.metrics["val_loss"])
    model, _, _ = load_for_inference(result.checkpoint)
    mlp = model.transformer.h[0].mlp
    assert isinstance(mlp, PEER) if kind == "peer" else (isinstance(mlp, MoE) and mlp.heads == 4)
    logits = model(torch.zeros(1, 8, dtype=torch.long))
    assert logits.shape == (1, 8, 512) and torch.isfinite(logits).all()
