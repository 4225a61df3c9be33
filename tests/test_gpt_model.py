"""GPT model API, parameter counts, activation checkpointing, generation/KV cache, FLOPs/MFU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megaray import families as registry
from megaray.models.gpt import GPT, GPTConfig, generate, model as model_mod
from megaray.models.gpt.flops import estimate_mfu, flops_per_token
from megaray.models.gpt.sampling import sample_next
from megaray.train.device import peak_flops

TINY = dict(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32, mlp_hidden=48)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def tiny(**kw) -> GPTConfig:
    return GPTConfig.from_name(None, **{**TINY, **kw})


def build(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(tiny(**kw)).eval()


# ----------------------------------------------------------------------------- API


def test_public_api_and_registry():
    cfg = GPTConfig.from_name("debug")
    m = registry.build_model(cfg)
    assert isinstance(m, GPT) and m.config is cfg
    idx = torch.randint(0, cfg.vocab_size, (3, 10))
    logits = m(idx)
    assert logits.shape == (3, 10, cfg.vocab_size) and logits.dtype == torch.float32


def test_loss_is_mean_cross_entropy_ignoring_minus_one():
    m = build()
    idx = torch.randint(0, 64, (2, 9))
    targets = torch.randint(0, 64, (2, 9))
    targets[0, :4] = -1
    logits, loss = m(idx, targets)
    keep = targets != -1
    want = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, want)
    assert m.aux_loss.item() == 0.0 and isinstance(m.aux_loss, torch.Tensor)


def test_gpt2_small_has_124M_parameters_on_meta():
    with torch.device("meta"):
        m = GPT(GPTConfig.from_name("gpt2_small", vocab_size=50257))
    assert m.num_params(non_embedding=False) == 124_439_808
    assert m.num_params(non_embedding=True) == 124_439_808 - 1024 * 768  # minus wpe, as nanoGPT
    assert next(m.parameters()).device.type == "meta"


def test_moe_active_params_and_flops():
    m = GPT(tiny(n_experts=4, moe_top_k=1))
    per_expert = sum(p.numel() for p in m.transformer.h[0].mlp.experts[0].parameters())
    assert m.num_params() - m.num_params(active=True) == 2 * 3 * per_expert
    assert m.flops_per_token() == flops_per_token(m.config, m.num_params(active=True))


def test_block_size_enforced():
    m = build(position="rope")
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, 33, dtype=torch.long))


def test_tiny_model_learns():
    torch.manual_seed(0)
    m = GPT(tiny(position="rope", norm="rmsnorm", mlp="swiglu"))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    idx = torch.randint(0, 64, (4, 16))
    first = None
    for _ in range(30):
        _, loss = m(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.5 * first


# ----------------------------------------------------------------------------- activation checkpointing


@pytest.mark.parametrize("kw", [dict(), dict(n_experts=4, attention="mla", position="rope")], ids=["dense", "moe-mla"])
def test_activation_checkpointing_same_grads(kw, monkeypatch):
    calls = []
    real = model_mod.checkpoint
    monkeypatch.setattr(model_mod, "checkpoint", lambda *a, **k: calls.append(k) or real(*a, **k))
    idx = torch.randint(0, 64, (2, 8))
    grads = []
    for flag in (False, True):
        m = build(**kw).train().set_activation_checkpointing(flag)
        _, loss = m(idx, idx)
        (loss + m.aux_loss).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    assert len(calls) == 2 and all(c["use_reentrant"] is False for c in calls)
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5, msg=n)
    m = build(activation_checkpointing=True)
    assert m.activation_checkpointing
    calls.clear()
    m.eval()(idx)  # not in training: no checkpointing
    assert not calls


# ----------------------------------------------------------------------------- generation


GEN_CASES = [
    pytest.param(dict(attention=a, position=p, **extra), id=f"{a}-{p}")
    for a, extra in [("mha", {}), ("gqa", dict(n_kv_heads=2)), ("mla", dict(kv_lora_rank=16, qk_rope_head_dim=4))]
    for p in ["rope", "alibi", "learned"]
    if not (a == "mla" and p != "rope")
]


@pytest.mark.parametrize("kw", GEN_CASES)
def test_kv_cache_generation_equals_no_cache_greedy(kw):
    m = build(**kw)
    idx = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # cached incremental logits equal full-sequence logits
        full = m(idx)
        cache = m.new_cache()
        steps = [m(idx[:, :3], cache=cache)] + [m(idx[:, t : t + 1], cache=cache) for t in range(3, 5)]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    a = generate(m, idx, 12, temperature=0, use_cache=True)
    b = generate(m, idx, 12, temperature=0, use_cache=False)
    assert a.shape == (2, 17) and a.dtype == torch.int64
    assert torch.equal(a, b)
    assert torch.equal(a[:, :5], idx)


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_generation_past_block_size_slides_window(pos):
    m = build(position=pos, block_size=8)
    idx = torch.randint(0, 64, (1, 6))
    a = m.generate(idx, 10, temperature=0, use_cache=True)
    b = m.generate(idx, 10, temperature=0, use_cache=False)
    assert a.shape == (1, 16) and torch.equal(a, b)


def test_sampling_options():
    m = build(position="rope")
    idx = torch.randint(0, 64, (2, 4))
    greedy = generate(m, idx, 6, temperature=0)
    assert torch.equal(generate(m, idx, 6, top_k=1), greedy)
    assert torch.equal(generate(m, idx, 6, top_p=1e-6), greedy)
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    s1 = generate(m, idx, 6, temperature=1.5, top_k=20, top_p=0.9, generator=g())
    s2 = generate(m, idx, 6, temperature=1.5, top_k=20, top_p=0.9, generator=g(), use_cache=False)
    assert torch.equal(s1, s2)
    assert not torch.equal(generate(m, idx, 30, temperature=2.0, generator=g()), generate(m, idx, 30, temperature=0))
    with pytest.raises(ValueError):
        sample_next(torch.zeros(1, 4), temperature=-1)


def test_top_k_top_p_masks():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, top_k=2, generator=g)) for _ in range(200)}
    assert draws == {0, 1}
    draws = {int(sample_next(logits, top_p=0.8, generator=g)) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 < 0.8, 0.5 + 0.3 >= 0.8
    draws = {int(sample_next(logits, top_p=0.81, generator=g)) for _ in range(300)}
    assert draws == {0, 1, 2}


def test_stop_token_and_mode_restored():
    m = build(position="rope").train()
    idx = torch.randint(0, 64, (2, 4))
    greedy = generate(m, idx, 8, temperature=0)
    stop = int(greedy[0, 5])  # the second generated token of row 0
    out = generate(m, idx, 8, temperature=0, stop_token=stop)
    assert m.training
    row0 = out[0, 4:].tolist()
    first = row0.index(stop)
    assert all(t == stop for t in row0[first:])
    if stop not in greedy[1, 4:].tolist():
        assert out.shape[1] == 12


# ----------------------------------------------------------------------------- FLOPs / MFU


def test_flops_per_token_palm_formula():
    cfg = GPTConfig.from_name("gpt2_small")
    n = 123_653_376
    assert flops_per_token(cfg, n) == 6 * n + 12 * 12 * 12 * 64 * 1024
    mla = tiny(attention="mla", position="rope", qk_rope_head_dim=4)
    assert flops_per_token(mla, 0) == 6 * 2 * 4 * 32 * (8 + 4 + 8)
    assert estimate_mfu(1e9, 1e5, 1e15) == pytest.approx(0.1)
    assert estimate_mfu(1e9, 1e5, None) is None


def test_peak_flops_lookup():
    assert peak_flops("cpu") is None and peak_flops(torch.device("cpu")) is None
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA L4") == 121e12
    assert peak_flops("NVIDIA L40S") == 362e12
    assert peak_flops("NVIDIA A10G") == 70e12
    assert peak_flops("Tesla V100-SXM2-16GB") == 125e12
    assert peak_flops("Some Future GPU") is None
    if not torch.cuda.is_available():
        assert peak_flops() is None


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@cuda
def test_bf16_cuda_forward_close_to_fp32():
    m = build(position="rope", attention="gqa", n_kv_heads=2).cuda()
    idx = torch.randint(0, 64, (2, 16), device="cuda")
    ref = m(idx)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, loss = m(idx, idx)
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)
    loss.backward()
    assert generate(m, idx[:, :4], 4, temperature=0).shape == (2, 8)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("attention", ["mha", "gqa", "mla"])
def test_flash_matches_sdpa_cuda(attention):
    pytest.importorskip("flash_attn")
    kw = dict(attention=attention, position="rope", n_kv_heads=2 if attention == "gqa" else None)
    ref = build(**kw, attn_backend="sdpa").cuda().bfloat16()
    fl = build(**kw, attn_backend="flash").cuda().bfloat16()
    fl.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 64, (2, 16), device="cuda")
    torch.testing.assert_close(fl(idx).float(), ref(idx).float(), atol=3e-2, rtol=3e-2)
    assert torch.equal(
        generate(fl, idx[:, :4], 6, temperature=0), generate(fl, idx[:, :4], 6, temperature=0, use_cache=False)
    )
