"""The seeds' stabilisers, each a switch: ReZero residual gating, Admin initialisation, the Grokfast
EMA gradient filter (plain torch and real DeepSpeed engines, ZeRO 0 and 2), and ``train.compile``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from megaray.models.gpt import GPT, GPTConfig
from megaray.train.grokfast import GrokfastEMA

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(n_layer=3, n_head=4, n_embd=32, block_size=32, vocab_size=64)


def tiny(**kw) -> GPTConfig:
    return GPTConfig.from_name(None, **{**TINY, **kw})


def _block_io(model: GPT, idx: torch.Tensor):
    """(input, output) of every block in one forward."""
    io = []
    hooks = [b.register_forward_hook(lambda m, i, o: io.append((i[0], o))) for b in model.transformer.h]
    model(idx)
    for h in hooks:
        h.remove()
    return io


# ----------------------------------------------------------------------------- ReZero


def test_rezero_blocks_are_identity_at_init_and_learn_away_from_it():
    torch.manual_seed(0)
    idx = torch.randint(0, 64, (2, 16))
    model = GPT(tiny(residual="rezero", position="rope", norm="rmsnorm", mlp="swiglu"))
    for x, y in _block_io(model, idx):
        assert torch.equal(x, y)  # x + 0 * f(norm(x)) == x exactly
    plain = GPT(tiny(position="rope", norm="rmsnorm", mlp="swiglu"))
    assert not any(torch.equal(x, y) for x, y in _block_io(plain, idx))  # the switch is what does it
    _, loss = model(idx, idx)
    loss.backward()
    block = model.transformer.h[0]
    assert block.alpha_attn.grad.abs().item() > 0 and block.alpha_mlp.grad.abs().item() > 0
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert not torch.equal(*_block_io(model, idx)[0])


def test_rezero_needs_pre_norm():
    with pytest.raises(Exception, match="norm_placement"):
        tiny(residual="rezero", norm_placement="post")


# ----------------------------------------------------------------------------- Admin


def test_admin_omegas_follow_the_profiled_residual_variance():
    """omega_i = sqrt(Var[x_0] + sum_{j<i} Var[f_j(x_{j-1})]), recomputed here with hooks on the
    embedding dropout and on every attention / feed-forward branch of a pass with omega = 1."""
    torch.manual_seed(1)
    model = GPT(tiny(init="admin", norm_placement="post")).eval()
    got = [float(w) for b in model.transformer.h for w in (b.omega_attn.detach()[0], b.omega_mlp.detach()[0])]
    assert all(bool((b.omega_mlp == b.omega_mlp[0]).all()) for b in model.transformer.h)  # (C,), one value
    with torch.no_grad():
        for b in model.transformer.h:
            b.omega_attn.fill_(1.0), b.omega_mlp.fill_(1.0)
    var = []
    mods = [model.transformer.drop] + [m for b in model.transformer.h for m in (b.attn, b.mlp)]
    hooks = [m.register_forward_hook(lambda m, i, o: var.append(o.double().var().item())) for m in mods]
    gen = torch.Generator().manual_seed(0)
    model(torch.randint(0, 64, (2, 32), generator=gen))  # the default profiling batch
    for h in hooks:
        h.remove()
    want = [sum(var[: i + 1]) ** 0.5 for i in range(len(var) - 1)]
    assert got == pytest.approx(want, rel=1e-5)
    assert got == sorted(got) and got[-1] > got[0]  # the residual stream accumulates variance


def test_admin_changes_the_forward_and_needs_post_norm():
    torch.manual_seed(2)
    admin = GPT(tiny(init="admin", norm_placement="post"))
    torch.manual_seed(2)
    post = GPT(tiny(norm_placement="post"))
    idx = torch.randint(0, 64, (1, 8))
    assert (admin(idx) - post(idx)).abs().max() > 1e-3
    with pytest.raises(Exception, match="norm_placement"):
        tiny(init="admin")


# ----------------------------------------------------------------------------- Grokfast


def test_grokfast_update_differs_by_exactly_the_ema_term():
    """SGD steps on a tiny GPT with and without the filter: the filtered update minus the plain one
    is ``-lr * lamb * mu_t`` with ``mu_1 = g_1``, ``mu_t = alpha mu_{t-1} + (1 - alpha) g_t``."""
    torch.manual_seed(3)
    model = GPT(tiny())
    lr, alpha, lamb = 0.1, 0.9, 2.0
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    filt = GrokfastEMA(alpha, lamb)
    mu = {}
    for step in range(3):
        idx = torch.randint(0, 64, (2, 16))
        opt.zero_grad()
        model(idx, idx)[1].backward()
        raw = {n: p.grad.clone() for n, p in model.named_parameters()}
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        filt.apply(model)
        opt.step()
        for n, p in model.named_parameters():
            mu[n] = raw[n].clone() if step == 0 else alpha * mu[n] + (1 - alpha) * raw[n]
            plain_update = -lr * raw[n]
            torch.testing.assert_close(p.detach() - before[n] - plain_update, -lr * lamb * mu[n], atol=1e-6, rtol=1e-4)
    assert sum(float(m.abs().sum()) for m in mu.values()) > 0


def test_grokfast_config():
    from megaray.config import TrainConfig, validate
    from megaray.errors import ConfigError

    t = validate(TrainConfig, {"grokfast": {"alpha": 0.98, "lamb": 2.0}, "zero_stage": 2})
    assert t.grokfast.alpha == 0.98 and TrainConfig().grokfast is None and TrainConfig().compile is False
    with pytest.raises(ConfigError, match="zero_stage"):
        validate(TrainConfig, {"grokfast": {}, "zero_stage": 3}, "train")


_DS_SCRIPT = """
import os, json, copy, torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed
from megaray.models.gpt import GPT, GPTConfig
from megaray.train.grokfast import GrokfastEMA, attach
deepspeed.init_distributed(dist_backend="gloo")
out = {}
for stage in (0, 1, 2):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name(None, n_layer=2, n_head=4, n_embd=32, block_size=32, vocab_size=64))
    ref, plain = copy.deepcopy(model), copy.deepcopy(model)
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
          "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config=ds)
    attach(engine, 0.9, 2.0)
    filt, opt, opt_plain = GrokfastEMA(0.9, 2.0), torch.optim.SGD(ref.parameters(), lr=0.1), torch.optim.SGD(plain.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        idx = torch.randint(0, 64, (2, 16), generator=g)
        engine.backward(engine(idx, idx)[1]); engine.step()
        opt.zero_grad(); ref(idx, idx)[1].backward(); filt.apply(ref); opt.step()
        opt_plain.zero_grad(); plain(idx, idx)[1].backward(); opt_plain.step()
    diff = lambda a, b: max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))
    out[stage] = {"vs_filtered": diff(engine.module, ref), "vs_plain": diff(engine.module, plain),
                  "ema": len(engine.grokfast.ema)}
print("RESULT", json.dumps(out))
"""


@pytest.mark.slow
def test_grokfast_under_real_deepspeed_engines_zero0_1_2(tmp_path):
    """One process, gloo: the engine with the filter attached trains exactly like plain torch SGD
    with the filter applied by hand (ZeRO 0: ``param.grad``; ZeRO 1, 2: partitioned flat buffers),
    and differently from SGD without it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PORT=str(port), PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, "-c", _DS_SCRIPT], capture_output=True, text=True, timeout=400, env=env, cwd=str(tmp_path)
    )
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and line, r.stderr[-3000:]
    res = json.loads(line[0][len("RESULT ") :])
    for stage in ("0", "1", "2"):
        assert res[stage]["vs_filtered"] < 1e-5, res
        assert res[stage]["vs_plain"] > 1e-3, res
        assert res[stage]["ema"] > 0


# ----------------------------------------------------------------------------- compile


_COMPILE_SCRIPT = """
import os, json, copy, torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed
from megaray.families import build_model, build_run_config
from megaray.tasks.lm import LMTask
from megaray.train.engines import build_engine
cuda = torch.cuda.is_available()
dev = torch.device("cuda" if cuda else "cpu")
cfg = build_run_config({"model": {"family": "gpt", "preset": "debug", "n_layer": 1, "vocab_size": 64, "block_size": 16},
                        "data": {"batch_size": 2}, "scaling": {"num_workers": 1, "use_gpu": cuda},
                        "train": {"zero_stage": 2, "compile": True, "grokfast": {"alpha": 0.98, "lamb": 2.0},
                                  "warmup_steps": 0, "max_steps": 10}})
deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
torch.manual_seed(0)
model = build_model(cfg.model).to(dev)
eager = copy.deepcopy(model)
engine, _ = build_engine(model, LMTask(cfg).param_groups("model", model), cfg, "fp32")
idx = torch.randint(0, 64, (2, 16), device=dev)
loss = engine(idx, idx)[1]
want = eager(idx, idx)[1]
engine.backward(loss); engine.step()
print("RESULT", json.dumps({"compiled": bool(engine.is_compiled), "grokfast": len(engine.grokfast.ema),
                            "diff": abs(float(loss) - float(want)), "keys": list(engine.module.state_dict())[:1]}))
"""


@pytest.mark.gpu
def test_train_compile_and_grokfast_through_build_engine(tmp_path):
    """``train.compile`` compiles the engine's module in place (same loss as eager, same state_dict
    keys) and ``train.grokfast`` attaches the filter, through the real ``build_engine`` (ZeRO 2).
    GPU only: inductor on a CPU takes over a minute for this model."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PORT=str(port), PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, timeout=500, env=env, cwd=str(tmp_path)
    )
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and line, r.stderr[-3000:]
    res = json.loads(line[0][len("RESULT ") :])
    assert res["compiled"] and res["grokfast"] > 0 and res["diff"] < 1e-4
    assert res["keys"] == ["transformer.wte.weight"]
