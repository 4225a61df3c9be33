"""Mamba-2 family: the SSD scan against the plain recurrence, causality, cached decoding, HF parity,
MoE feed-forward, and a 2-worker training run through Ray Train + DeepSpeed."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO

from megaray.errors import ConfigError
from megaray.models.mamba import Mamba, MambaConfig
from megaray.models.mamba.ssd import ssd_chunked, ssd_recurrent


def _ssd_inputs(dtype, b=2, t=37, h=4, p=8, g=2, n=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    return dict(
        x=r(b, t, h, p),
        dt=F.softplus(r(b, t, h) - 1),
        A=-torch.exp(r(h)),
        B=r(b, t, g, n),
        C=r(b, t, g, n),
        D=r(h),
        initial_state=r(b, h, p, n),
    )


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("chunk", [1, 5, 8, 37, 64])  # 5, 8: do not divide T = 37; 64 > T
def test_chunked_scan_equals_the_sequential_recurrence(dtype, tol, chunk):
    args = _ssd_inputs(dtype)
    y_ref, state_ref = ssd_recurrent(**args)
    y, state = ssd_chunked(chunk_size=chunk, **args)
    assert y.dtype == dtype
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(state, state_ref, rtol=tol, atol=tol)


def test_chunked_scan_gradients_equal_the_recurrence():
    grads = []
    for scan in (lambda **a: ssd_recurrent(**a), lambda **a: ssd_chunked(chunk_size=6, **a)):
        args = {k: v.clone().requires_grad_() for k, v in _ssd_inputs(torch.float64, t=20).items()}
        y, state = scan(**args)
        (y.square().sum() + state.sum()).backward()
        grads.append({k: v.grad for k, v in args.items()})
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-9, atol=1e-9, msg=k)


def _model(preset="debug", **overrides) -> Mamba:
    torch.manual_seed(0)
    return Mamba(MambaConfig.from_name(preset, **overrides)).eval()


@torch.no_grad()
def test_model_is_causal_and_chunk_size_does_not_change_logits():
    m = _model()  # chunk_size 8, T = 20: the last chunk is partial
    idx = torch.randint(0, m.config.vocab_size, (2, 20))
    logits = m(idx)
    t = 11
    changed = idx.clone()
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 1) % m.config.vocab_size
    other = m(changed)
    torch.testing.assert_close(other[:, : t + 1], logits[:, : t + 1], rtol=0, atol=1e-6)
    assert (other[:, t + 1 :] - logits[:, t + 1 :]).abs().max() > 1e-3  # later positions do see the change
    for chunk in (3, 64):
        m2 = Mamba(MambaConfig.from_name("debug", chunk_size=chunk)).eval()
        m2.load_state_dict(m.state_dict())
        torch.testing.assert_close(m2(idx), logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_state_cache_decoding_equals_full_recomputation():
    m = _model()
    idx = torch.randint(0, m.config.vocab_size, (2, 24))
    full = m(idx)
    cache = m.new_cache()
    steps = [m(idx[:, :9], cache=cache)] + [m(idx[:, i : i + 1], cache=cache) for i in range(9, 24)]
    assert len(cache[0]) == 24 and cache[0].ssm_state.shape == (2, m.config.n_heads, m.config.headdim, m.config.d_state)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    # greedy decoding past block_size (32): the cached run re-prefills its window as the uncached one crops
    prompt = idx[:, :5]
    cached = m.generate(prompt, 40, temperature=0.0)
    assert torch.equal(cached, m.generate(prompt, 40, temperature=0.0, use_cache=False))
    assert cached.shape == (2, 45)


def test_from_hf_mamba2_gives_equal_logits():
    transformers = pytest.importorskip("transformers")
    from megaray.models.mamba import from_hf

    hc = transformers.Mamba2Config(
        vocab_size=100,
        hidden_size=32,
        state_size=8,
        num_hidden_layers=2,
        expand=2,
        head_dim=8,
        num_heads=8,
        n_groups=2,
        chunk_size=8,
        conv_kernel=4,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    hf = transformers.Mamba2ForCausalLM(hc).eval()
    with torch.no_grad():  # move the parameters HF initialises to constants (D=1, norms=1) off them
        for name, p in hf.named_parameters():
            if name.endswith(("D", "norm.weight", "norm_f.weight", "dt_bias", "A_log")):
                p.add_(0.1 * torch.randn_like(p))
    ours = from_hf(hf)
    idx = torch.randint(0, 100, (2, 21))  # 21: not a multiple of chunk_size
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, rtol=1e-5, atol=1e-5)


def test_moe_feed_forward_adds_its_loss_and_trains_the_router():
    m = _model("debug", n_experts=4, moe_top_k=1).train()
    idx = torch.randint(0, m.config.vocab_size, (2, 16))
    _, loss = m(idx, idx)
    assert m.aux_loss.requires_grad and float(m.aux_loss.detach()) > 0
    assert set(m.moe_stats) == {"moe_aux", "moe_z_loss", "moe_dropped_frac"}  # what LMTask logs
    (loss + m.aux_loss).backward()
    router = m.backbone.layers[0].mlp.router.weight
    assert router.grad is not None and router.grad.abs().sum() > 0
    assert m.num_params(active=True) < m.num_params()
    assert m.flops_per_token() > 6 * m.num_params(active=True)


def test_config_rejects_inconsistent_sizes_and_has_a_130m_preset():
    with pytest.raises(ConfigError, match="headdim"):
        MambaConfig.from_name("debug", headdim=7)
    with pytest.raises(ConfigError, match="n_groups"):
        MambaConfig.from_name("debug", n_groups=3)
    with torch.device("meta"):
        m = Mamba(MambaConfig.from_name("mamba2_130m"))
    assert 128e6 < m.num_params() < 130e6  # state-spaces/mamba2-130m: 129.0M (tied embeddings)


@pytest.mark.gpu
def test_mamba_ssm_kernel_agrees_with_the_pytorch_scan():
    pytest.importorskip("mamba_ssm")
    from megaray.models.mamba.ssd import ssd_mamba_ssm

    args = {k: v.cuda() for k, v in _ssd_inputs(torch.float32, t=300, p=64, n=64).items()}
    y_ref, state_ref = ssd_chunked(chunk_size=64, **args)
    y, state = ssd_mamba_ssm(chunk_size=64, **args)
    torch.testing.assert_close(y, y_ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(state, state_ref, rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_mamba_trains_with_two_workers_and_samples(ray_cluster, text_shards, tmp_path):
    """configs/mamba_tiny.yaml under Ray Train + DeepSpeed ZeRO-2 (2 CPU workers): loss falls below the
    uniform baseline, and the eval sample is decoded through the recurrent cache."""
    from mlflow.tracking import MlflowClient

    from megaray.families import load_config
    from megaray.train.launch import fit

    db = tmp_path / "mlflow.db"
    cfg = load_config(
        REPO / "configs" / "mamba_tiny.yaml",
        [
            "name=mamba-e2e",
            f"data.shards={text_shards}",
            f"scaling.storage_path={tmp_path / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{db}",
            "train.max_steps=10",
            "train.lr=3e-3",
            "train.eval_every=10",
            "train.checkpoint_every=10",
            "train.log_every=5",
            "eval.sample_tokens=8",
        ],
    )
    result = fit(cfg)
    assert result.metrics["step"] == 10
    assert result.metrics["val_loss"] < math.log(512) - 0.3  # below a uniform guess over the vocabulary
    client = MlflowClient(f"sqlite:///{db}")
    loss = [m.value for m in sorted(client.get_metric_history(result.mlflow_run_id, "loss"), key=lambda m: m.step)]
    assert len(loss) == 2 and loss[1] < loss[0], loss
    assert "sample" in {a.path for a in client.list_artifacts(result.mlflow_run_id)}
