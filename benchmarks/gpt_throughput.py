"""Training throughput and MFU of a GPT preset: plain PyTorch, a DeepSpeed engine, ``megaray train``.

Both sides run the same model (same seed) for ``--steps`` timed steps of forward + backward +
AdamW after ``--warmup`` untimed ones, on random tokens; the DeepSpeed side wraps the model in
``deepspeed.initialize`` (world size 1, ZeRO stage ``--zero-stage``, AdamW from the DeepSpeed
config). Prints one JSON object::

    python benchmarks/gpt_throughput.py --preset debug --device cpu --steps 10

``--sides megaray`` adds megaray's own loop: :func:`megaray.train.launch.fit` with one Ray Train
worker (GPU when ``--device cuda``) on the prepared text shards ``--shards``, tracking off,
``2 x --steps`` optimizer steps; its tokens/s and MFU are the loop's own report over the last
``--steps`` steps (the first window holds Ray, engine and compile start-up). ``--attention`` and
``--compile`` take several values; every side runs each combination (``flash`` only where
flash-attn is importable) and the JSON lists them under ``runs``::

    python benchmarks/gpt_throughput.py --preset gpt2_small --precision bf16 --batch-size 16 \
        --sides torch deepspeed megaray --attention sdpa flash --compile off on --shards data/stdlib

``torch`` uses ``torch.autocast`` for bf16 (fp32 weights); DeepSpeed's ``bf16`` section keeps
bf16 weights with fp32 master copies, so the two bf16 numbers are not the same recipe. MFU uses
:func:`megaray.train.device.peak_flops` (None on CPU / unknown GPUs; pass ``--peak-flops``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import time

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="debug", help="GPTConfig preset (debug, gpt2_small, modern_small, ...)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence; default block_size")
    p.add_argument("--steps", type=int, default=10, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        default="fp32",
        help="fp16: autocast fp16 + GradScaler (torch side), DeepSpeed's fp16 with its loss scaler "
        "(deepspeed and megaray sides; CUDA only)",
    )
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=0)
    p.add_argument(
        "--offload",
        choices=["none", "optimizer", "all"],
        default="none",
        help="ZeRO-Offload to CPU (deepspeed and megaray sides; needs --zero-stage >= 1, all: 3)",
    )
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--peak-flops", type=float, default=None, help="device peak FLOP/s; default: lookup")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="GPTConfig overrides, e.g. n_layer=4")
    p.add_argument("--sides", nargs="+", choices=list(SIDES), default=["torch", "deepspeed"])
    p.add_argument(
        "--attention",
        nargs="+",
        choices=["auto", "sdpa", "flash", "reference"],
        default=None,
        help="model.attn_backend values to run (default: the preset's); flash is skipped where flash-attn is not importable",
    )
    p.add_argument("--compile", nargs="+", choices=["off", "on"], default=["off"], help="torch.compile off/on")
    p.add_argument(
        "--compile-sides",
        nargs="+",
        choices=list(SIDES),
        default=None,
        help="sides that also run compile=on (default: all)",
    )
    p.add_argument("--shards", default=None, help="prepared text shards for --sides megaray")
    p.add_argument("--runs-jsonl", default=None, help="also append each run, as it finishes, to this JSON-lines file")
    return p.parse_args(argv)


def _overrides(items):
    import yaml

    return {k: yaml.safe_load(v) for k, v in (i.split("=", 1) for i in items)}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time(step, args) -> dict:
    for _ in range(args.warmup):
        step()
    _sync(args.device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    _sync(args.device)
    dt = time.perf_counter() - t0
    return dict(step_ms=1000 * dt / args.steps, tokens_per_sec=args.steps * args.batch_size * args.seq_len / dt,
                final_loss=float(loss))  # fmt: skip


def _batch(args, vocab: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (args.batch_size, args.seq_len + 1), generator=g).to(args.device)
    return x[:, :-1], x[:, 1:]


def bench_torch(cfg, args, compiled: bool) -> dict:
    from megaray.models.gpt import GPT

    torch.manual_seed(0)
    model = GPT(cfg).to(args.device).train()
    if compiled:
        model.compile()  # in place: the fused optimizer below sees the same parameters
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=args.device == "cuda")  # fmt: skip
    x, y = _batch(args, cfg.vocab_size)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    amp = torch.autocast(args.device, dtype=half) if half is not None else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(args.device, enabled=args.precision == "fp16")

    def step():
        with amp:
            _, loss = model(x, y)
        scaler.scale(loss + model.aux_loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return _time(step, args)


def _init_dist(device: str) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")  # fmt: skip
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)


def bench_deepspeed(cfg, args, compiled: bool) -> dict:
    import deepspeed

    from megaray.models.gpt import GPT

    _init_dist(args.device)
    torch.manual_seed(0)
    model = GPT(cfg)
    ds_config = {
        "train_micro_batch_size_per_gpu": args.batch_size,
        "gradient_accumulation_steps": 1,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": args.lr, "betas": [0.9, 0.95], "weight_decay": 0.1, "torch_adam": args.device == "cpu"},
        },  # fmt: skip
        "zero_optimization": {"stage": args.zero_stage},
        "bf16": {"enabled": args.precision == "bf16"},
        "fp16": {"enabled": args.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if args.offload != "none":  # as megaray's train.offload: torch AdamW state in CPU memory
        ds_config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": args.device == "cuda"}
        if args.offload == "all":
            ds_config["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": args.device == "cuda"}
        ds_config["optimizer"]["params"]["torch_adam"] = True
        ds_config["zero_force_ds_cpu_optimizer"] = False
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    if compiled:
        engine.compile()  # what megaray's train.compile does
    x, y = _batch(args, cfg.vocab_size)
    x, y = x.to(engine.device), y.to(engine.device)

    def step():
        _, loss = engine(x, y)
        engine.backward(loss + engine.module.aux_loss)
        engine.step()
        return loss.detach()

    return dict(_time(step, args), zero_stage=args.zero_stage, offload=args.offload)


def bench_megaray(cfg, args, compiled: bool) -> dict:
    """``megaray train`` through Ray Train (one worker), tracking off; the loop's last report."""
    import tempfile

    from megaray.families import build_run_config
    from megaray.train.launch import fit

    if not args.shards:
        raise SystemExit("--sides megaray needs --shards (a `megaray prepare text` folder)")
    with tempfile.TemporaryDirectory() as storage:
        run = build_run_config(
            {
                "name": "bench",
                "model": {"family": "gpt", **cfg.model_dump(mode="json")},
                "data": {"shards": args.shards, "batch_size": args.batch_size, "num_val_batches": 1},
                "train": {
                    "max_steps": 2 * args.steps,
                    "log_every": args.steps,
                    "eval_every": 10**6,
                    "checkpoint_every": 10**6,
                    "warmup_steps": 0,
                    "lr": args.lr,
                    "zero_stage": args.zero_stage,
                    "precision": args.precision,
                    "compile": compiled,
                    "peak_flops": args.peak_flops,
                    "offload": args.offload,
                },
                "scaling": {
                    "num_workers": 1,
                    "use_gpu": args.device == "cuda",
                    "storage_path": storage,
                    "resources_per_worker": {"CPU": 1, **({"GPU": 1} if args.device == "cuda" else {})},
                },
                "tracking": {"enabled": False},
            }
        )
        t0 = time.perf_counter()
        m = fit(run).metrics
    rate = float(m["throughput"])
    return dict(
        step_ms=1000 * args.batch_size * args.seq_len / rate,
        tokens_per_sec=rate,
        final_loss=float(m["loss"]),
        wall_s=time.perf_counter() - t0,
        loop_mfu=m.get("mfu"),
        zero_stage=args.zero_stage,
        offload=args.offload,
    )


SIDES = {"torch": bench_torch, "deepspeed": bench_deepspeed, "megaray": bench_megaray}


@contextlib.contextmanager
def _stdout_to_stderr():
    """Send fd 1 to stderr (DeepSpeed and its op builds print there) so stdout is only the JSON."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    from megaray.models.gpt import GPT, GPTConfig
    from megaray.models.gpt.flops import estimate_mfu, flops_per_token
    from megaray.train.device import peak_flops

    cfg = GPTConfig.from_name(args.preset, **_overrides(args.set))
    args.seq_len = args.seq_len or cfg.block_size
    with torch.device("meta"):
        n_active = GPT(cfg).num_params(non_embedding=True, active=True)
    fpt = flops_per_token(cfg, n_active, seq_len=args.seq_len)
    peak = args.peak_flops or peak_flops(args.device)
    result = dict(
        preset=args.preset, device=args.device,
        device_name=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        precision=args.precision, batch_size=args.batch_size, seq_len=args.seq_len, steps=args.steps,
        n_params_non_embedding=n_active, flops_per_token=fpt, peak_flops=peak, torch_version=torch.__version__,
    )  # fmt: skip
    from megaray.models.common.attention import FLASH_AVAILABLE

    attentions = [a for a in (args.attention or [cfg.attn_backend]) if a != "flash" or FLASH_AVAILABLE]
    result["skipped"] = (
        ["attention=flash (flash-attn not importable)"]
        if len(attentions) < len(args.attention or [cfg.attn_backend])
        else []
    )
    runs = result["runs"] = []
    with _stdout_to_stderr():
        for attention in attentions:  # cheapest first: all sides at one setting, then the next setting
            for comp in args.compile:
                for side in args.sides:
                    if comp == "on" and args.compile_sides is not None and side not in args.compile_sides:
                        continue
                    run_cfg = cfg.model_copy(update={"attn_backend": attention})
                    t0 = time.perf_counter()
                    try:
                        r = SIDES[side](run_cfg, args, comp == "on")
                    except Exception as e:  # one failing combination must not lose the others' figures
                        r = {"error": f"{type(e).__name__}: {e}"[:500]}
                    r = {
                        "side": side,
                        "attention": attention,
                        "compile": comp,
                        "precision": args.precision,
                        **r,
                        "bench_wall_s": round(time.perf_counter() - t0, 1),
                    }
                    if "tokens_per_sec" in r:
                        r["mfu"] = estimate_mfu(fpt, r["tokens_per_sec"], peak)
                    runs.append(r)
                    if args.runs_jsonl:  # kept even if a later run hangs and the caller kills this one
                        with open(args.runs_jsonl, "a") as f:
                            f.write(json.dumps(r) + "\n")
    first = {}
    for r in runs:
        first.setdefault(r["side"], r)
    for side, r in first.items():
        result[side] = r
    if "tokens_per_sec" in first.get("torch", {}) and "tokens_per_sec" in first.get("deepspeed", {}):
        result["deepspeed_over_torch"] = first["deepspeed"]["tokens_per_sec"] / first["torch"]["tokens_per_sec"]
    if "tokens_per_sec" in first.get("deepspeed", {}) and "tokens_per_sec" in first.get("megaray", {}):
        result["megaray_over_deepspeed"] = first["megaray"]["tokens_per_sec"] / first["deepspeed"]["tokens_per_sec"]
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
