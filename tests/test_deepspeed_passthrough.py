"""DeepSpeed, all of it: ``train.deepspeed`` merged into the generated config and validated by
DeepSpeed's own config model on the driver; ZeRO-Offload (optimizer; parameters at stage 3) trains
on CPU with the same losses as without it; fp16 falls back on CPU (DeepSpeed's CPU accelerator has
none); ``scaling.use_gpu: auto`` follows the cluster's resources."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO

from megaray.errors import ConfigError
from megaray.families import build_run_config


def _cfg(**train):
    return build_run_config({"model": {"family": "gpt", "preset": "debug"}, "train": train})


def test_pass_through_is_merged_under_megaray_settings():
    from megaray.train.engines import deepspeed_config

    ds = deepspeed_config(
        _cfg(
            zero_stage=3,
            offload="all",
            deepspeed={"zero_optimization": {"overlap_comm": True}, "comms_logger": {"enabled": True}},
        ),
        "fp32",
    )
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["overlap_comm"] is True and z["stage3_gather_16bit_weights_on_model_save"]
    assert z["offload_optimizer"]["device"] == z["offload_param"]["device"] == "cpu"
    assert ds["comms_logger"] == {"enabled": True} and ds["zero_force_ds_cpu_optimizer"] is False
    fp16 = deepspeed_config(_cfg(precision="fp16", deepspeed={"fp16": {"loss_scale_window": 500}}), "fp16")["fp16"]
    assert fp16 == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 500}


@pytest.mark.parametrize(
    "train, match",
    [
        (
            {"deepspeed": {"zero_optimisation": {"overlap_comm": True}}},
            r"train\.deepspeed\.zero_optimisation: not a DeepSpeed config key .*did you mean 'zero_optimization'",
        ),
        (
            {"deepspeed": {"zero_optimization": {"overlap_comms": True}}},
            r"DeepSpeedZeroConfig\.overlap_comms: Extra inputs",
        ),
        (
            {"deepspeed": {"zero_optimization": {"reduce_bucket_size": "lots"}}},
            r"reduce_bucket_size: Input should be a valid integer",
        ),
        ({"deepspeed": {"sparse_gradients": True}}, r"Sparse compression .* has been removed"),
        (
            {"deepspeed": {"gradient_clipping": 2.0}},
            r"train\.deepspeed\.gradient_clipping: megaray sets this from train\.grad_clip",
        ),
        (
            {"deepspeed": {"zero_optimization": {"stage": 1}}},
            r"zero_optimization\.stage: megaray sets this from train\.zero_stage",
        ),
        ({"deepspeed": {"optimizer": {"type": "Adam"}}}, r"train\.deepspeed\.optimizer: megaray sets this"),
    ],
)
def test_bad_deepspeed_settings_are_config_errors_naming_the_key(train, match):
    from megaray.train.engines import validate_deepspeed

    with pytest.raises(ConfigError, match=match):
        validate_deepspeed(_cfg(**train))


def test_offload_rules_are_checked_with_the_config():
    with pytest.raises(ConfigError, match="offload 'all' .* needs zero_stage 3"):
        _cfg(offload="all", zero_stage=2)
    with pytest.raises(ConfigError, match="offload needs ZeRO"):
        _cfg(offload="optimizer", zero_stage=0)


def test_a_bad_key_fails_megaray_train_before_anything_starts(tmp_path):
    """The CLI prints one ``error:`` line and exits 2 before Ray starts (no session folder)."""
    env = dict(os.environ, RAY_ADDRESS="", PATH=f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}")
    env.pop("RAY_ADDRESS")
    r = subprocess.run(
        [
            "megaray",
            "train",
            str(REPO / "configs" / "gpt_debug.yaml"),
            "--set",
            "train.deepspeed={zero_optimization: {overlap_comms: true}}",
            "--set",
            f"scaling.storage_path={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert (
        "error: train.deepspeed: DeepSpeed rejects the config: DeepSpeedZeroConfig.overlap_comms" in r.stderr + r.stdout
    )
    assert "device: " not in r.stdout and "Traceback" not in r.stderr  # stopped before Ray started (device line)


def test_use_gpu_auto_follows_the_cluster_resources():
    from megaray.train.device import choose_gpu

    assert choose_gpu("auto", {"CPU": 8.0}) == (False, "scaling.use_gpu auto: the cluster has no GPUs")
    use, why = choose_gpu("auto", {"CPU": 64.0, "GPU": 8.0})
    assert use and "8 GPU(s)" in why and "bf16" in why
    assert choose_gpu(False, {"GPU": 8.0})[0] is False and choose_gpu(True, {"CPU": 2.0})[0] is True
    assert _cfg().model_dump()  # default is auto
    assert build_run_config({"model": {"family": "gpt", "preset": "debug"}}).scaling.use_gpu == "auto"


def test_fp16_falls_back_to_fp32_on_cpu_with_a_warning(caplog):
    import torch

    from megaray.train.engines import resolve_precision

    with caplog.at_level("WARNING", logger="megaray.train"):
        assert resolve_precision("fp16", torch.device("cpu")) == "fp32"
    assert "fp16 unavailable (DeepSpeed's CPU accelerator has no fp16)" in caplog.text


@pytest.mark.slow
def test_zero_offload_trains_on_cpu_with_the_losses_of_a_run_without_it(tmp_path):
    """Real ``deepspeed.initialize`` engines (gloo, one process): the same GPT, batches and seed at
    ZeRO-2, ZeRO-2 + optimizer offload and ZeRO-3 + optimizer and parameter offload. Offload moves
    state, not math: the per-step losses agree to 1e-5."""
    script = textwrap.dedent(
        """
        import os, json, torch
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        import deepspeed
        from megaray.families import build_run_config
        from megaray import families
        from megaray.train.engines import build_engines
        deepspeed.init_distributed(dist_backend="gloo")
        out = {}
        for name, train in {"zero2": {"zero_stage": 2}, "zero2_offload": {"zero_stage": 2, "offload": "optimizer"},
                            "zero3_offload_all": {"zero_stage": 3, "offload": "all"}}.items():
            cfg = build_run_config({"model": {"family": "gpt", "preset": "debug", "vocab_size": 256, "block_size": 32},
                                    "data": {"batch_size": 4}, "train": {"max_steps": 5, "warmup_steps": 0, **train}})
            torch.manual_seed(0)
            task = families.task_class("gpt")(cfg)
            engines = build_engines(task, task.build_modules(), cfg, "fp32", torch.device("cpu"))
            eng = engines["model"]
            g = torch.Generator().manual_seed(1)
            losses = []
            for step in range(5):
                x = torch.randint(0, 256, (4, 33), generator=g)
                logits = eng(x[:, :-1])
                logits = logits[0] if isinstance(logits, tuple) else logits
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256).float(), x[:, 1:].reshape(-1))
                eng.backward(loss)
                eng.step()
                losses.append(float(loss))
            device = lambda c: str(getattr(c, "device", "none")).split(".")[-1]
            out[name] = {"losses": losses, "offload_optimizer": device(eng.zero_offload_optimizer()),
                         "offload_param": device(eng.zero_offload_param())}
        print("RESULT", json.dumps(out))
        """
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PORT=str(port), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env, cwd=str(tmp_path)
    )
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and line, r.stderr[-3000:]
    res = json.loads(line[0][len("RESULT ") :])
    base = res["zero2"]["losses"]
    assert base[-1] < base[0]  # it trains
    for name in ("zero2_offload", "zero3_offload_all"):
        assert res[name]["losses"] == pytest.approx(base, abs=1e-5), name
    assert res["zero2"]["offload_optimizer"] == "none" and res["zero2_offload"]["offload_optimizer"] == "cpu"
    assert res["zero3_offload_all"]["offload_optimizer"] == res["zero3_offload_all"]["offload_param"] == "cpu"


def test_the_workers_deepspeed_import_leaves_out_mlflow_and_the_muon_compile():
    """``import_deepspeed`` (a worker's start-up, benchmarks/goodput.py): DeepSpeed without MLflow
    (its autotuner's optional import) and with its Muon kernels left uncompiled (no inductor import);
    the dynamo switch is restored and MLflow stays importable. A fresh interpreter: nothing imported
    before. The losses it trains are the golden ones (tests/test_golden_losses.py)."""
    script = textwrap.dedent(
        """
        import os, sys
        from megaray.train.engines import import_deepspeed
        import_deepspeed()
        import deepspeed.runtime.zero.muon.original_muon as muon
        print("RESULT", "mlflow" in sys.modules, "torch._inductor.compile_fx" in sys.modules,
              hasattr(muon.zeropower_via_newtonschulz5, "_torchdynamo_orig_callable"),
              os.environ.get("TORCHDYNAMO_DISABLE"))
        import mlflow  # noqa: F401
        """
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=str(REPO))
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and line, r.stderr[-3000:]
    assert line[0].split()[1:] == ["False", "False", "False", "None"]
