"""megaray vs a minimal nanoGPT-style loop: the same model, recipe and token ids; val loss and step time.

Both sides train the same GPT (``megaray.families.build_model``, same init seed) on the token ids
of the same prepared stdlib corpus (``prepare_text(["stdlib"], vocab_size=1024)``):

* **megaray**: :func:`megaray.train.launch.fit` on ``configs/gpt_debug.yaml`` with overrides: one
  Ray Train worker, DeepSpeed ZeRO 0, fp32, the positioned train stream (row groups permuted per
  (seed, epoch), windows of ``block_size + 1`` tokens permuted inside blocks of
  ``data.shuffle_block`` windows: for this corpus one block per epoch, a full permutation),
  tracking to a temporary sqlite MLflow store.
* **reference**: a single-process PyTorch loop written here, nanoGPT's way: every batch is
  ``torch.randint(len(data) - block_size, (batch_size,))`` window starts drawn uniformly from
  the whole train token array (the train shards' tokens in file order, read with pyarrow);
  AdamW with the same param groups (decay on >=2-D weights only), betas and weight decay, lr
  ``megaray.train.schedule.lr_factor`` (linear warmup, cosine to ``min_lr``) set every step,
  gradient clipping at ``train.grad_clip``.

Both final models are scored by this script in the same way: mean cross-entropy over the same
fixed val windows (all non-overlapping ``block_size + 1``-token windows of the val split, or a
seeded subset with ``--val-windows N``); megaray's model is its final checkpoint
(``megaray.weights.load_for_inference``). The acceptance bar: megaray - reference <= 0.01 nats,
mean over the seeds, at 2,000 steps.

Step time: megaray's steady state is the wall clock between its second and last-but-one progress
report (MLflow metric timestamps: data wait, DeepSpeed step, logging and ``ray.train.report``
included; start-up, final eval and checkpoint left out); the reference's is its loop's wall clock
per step after ``--skip`` steps (batch sampling included). ``step_time_ratio`` = megaray /
reference (> 1: megaray slower). Prints one JSON object::

    OMP_NUM_THREADS=1 python benchmarks/vs_reference_loop.py --steps 200 --seeds 1   # ~3 min: it works
    OMP_NUM_THREADS=1 python benchmarks/vs_reference_loop.py --steps 2000 --seeds 2  # the figure
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parent.parent

#: the model and recipe both sides train (``configs/gpt_debug.yaml`` + these overrides)
RECIPE = [
    "model.n_layer=4",
    "model.n_head=4",
    "model.n_embd=128",
    "model.block_size=64",
    "model.vocab_size=1024",
    "model.bias=false",
    "model.tie_embeddings=true",
    "model.dropout=0.0",
    "data.batch_size=12",
    "train.lr=1e-3",
    "train.min_lr=1e-4",
    "train.warmup_steps=100",
    "train.betas=[0.9, 0.99]",
    "train.weight_decay=0.1",
    "train.grad_clip=1.0",
    "train.zero_stage=0",
    "train.precision=fp32",
    "scaling.num_workers=1",
]


def split_tokens(shards: str, split: str):
    """All token ids of ``split`` as one int64 array: the shards in manifest order, row groups in
    file order (each document's tokens end in EOS), read with pyarrow."""
    import numpy as np
    import pyarrow.parquet as pq

    from megaray.data.text import load_manifest, shard_paths

    filesystem, paths = shard_paths(shards, load_manifest(shards), split)
    parts = []
    for p in paths:
        col = pq.read_table(p, columns=["tokens"], filesystem=filesystem).column("tokens").combine_chunks()
        parts.append(col.flatten().to_numpy(zero_copy_only=False).astype(np.int64))
    return np.concatenate(parts)


def val_windows(tokens, block_size: int, limit: int, seed: int = 0):
    """``(x, y)`` int64 tensors of the non-overlapping ``block_size + 1``-token windows of ``tokens``
    (all of them, or a seeded subset of ``limit``)."""
    import numpy as np
    import torch

    n = len(tokens) // (block_size + 1)
    w = torch.from_numpy(tokens[: n * (block_size + 1)].reshape(n, block_size + 1).copy())
    if limit and limit < n:
        pick = np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))
        w = w[torch.from_numpy(pick)]
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def val_loss(model, x, y, batch: int = 64) -> float:
    """Mean cross-entropy (nats/token) of ``model`` over the windows ``x -> y``."""
    import torch

    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            _, loss = model(x[i : i + batch], y[i : i + batch])
            total += float(loss) * len(x[i : i + batch])
    return total / len(x)


def reference_loop(cfg, data, seed: int, skip: int):
    """nanoGPT's loop on the train token array ``data``; returns ``(model, seconds per step, L1 norm
    of the initial weights)``."""
    import torch

    from megaray import families
    from megaray.train.schedule import lr_factor

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch.manual_seed(seed)  # megaray's worker seeds torch with train.seed (+ rank 0) before building
    model = families.build_model(cfg.model)
    init_l1 = float(sum(p.detach().double().abs().sum() for p in model.parameters()))
    model.train()
    t = cfg.train
    groups = families.task_class(cfg.model.family)(cfg).param_groups("model", model)  # decay on >=2-D only
    opt = torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    data = torch.from_numpy(data)
    B, T = cfg.data.batch_size, cfg.model.block_size
    gen = torch.Generator().manual_seed(seed)
    t0 = None
    for step in range(t.max_steps):
        if step == skip:
            t0 = time.perf_counter()
        lr = t.lr * lr_factor(step, t.warmup_steps, t.max_steps, t.min_lr / t.lr)
        for g in opt.param_groups:
            g["lr"] = lr
        ix = torch.randint(len(data) - T, (B,), generator=gen)
        x = torch.stack([data[i : i + T] for i in ix])
        y = torch.stack([data[i + 1 : i + 1 + T] for i in ix])
        _, loss = model(x, y)
        loss.backward()
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, (time.perf_counter() - t0) / (t.max_steps - skip), init_l1


def megaray_run(cfg, trace: Path):
    """``fit`` ``cfg``; returns ``(final model, seconds per step in steady state, extras)``: the
    extras hold the run's own final metrics and the L1 norm of its initial weights (the worker's
    start line of ``MEGARAY_TRACE``, to check both sides start from the same weights)."""
    from mlflow.tracking import MlflowClient

    from megaray.train.launch import fit
    from megaray.weights import load_for_inference

    os.environ["MEGARAY_TRACE"] = str(trace)  # read by fit on the driver; a JSON line per micro-batch
    try:
        result = fit(cfg, console=False)
    finally:
        os.environ.pop("MEGARAY_TRACE", None)
    start = json.loads(Path(f"{trace}.starts.rank0").read_text().splitlines()[0])
    model, _, _ = load_for_inference(result.checkpoint)
    hist = sorted(
        MlflowClient(result.tracking_uri).get_metric_history(result.mlflow_run_id, "throughput"), key=lambda m: m.step
    )
    a, b = hist[1], hist[-2]
    step_s = ((b.timestamp - a.timestamp) / 1000.0) / (b.step - a.step)
    return (
        model,
        step_s,
        {
            "window_steps": [a.step, b.step],
            "val_loss_own_eval": result.metrics.get("val_loss"),
            "loss": result.metrics.get("loss"),
            "init_l1": start["weights_l1"]["model"],
        },
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seeds", type=int, default=2, help="runs per side, train.seed = --seed0 + i")
    ap.add_argument("--seed0", type=int, default=1337)
    ap.add_argument(
        "--val-windows", type=int, default=0, help="0: every non-overlapping val window; N: a seeded subset"
    )
    ap.add_argument("--skip", type=int, default=20, help="reference steps left out of its step time (warm-up)")
    ap.add_argument("--shards", default=None, help="prepared shards (default: prepare the stdlib corpus, vocab 1024)")
    args = ap.parse_args()

    from megaray.data.text import load_manifest, prepare_text
    from megaray.families import load_config
    from megaray.train.launch import ensure_ray

    work = Path(tempfile.mkdtemp(prefix="megaray-vsref-"))
    shards = args.shards or str(work / "shards")
    if not args.shards:
        prepare_text(["stdlib"], shards, vocab_size=1024, progress=False, verbose=False)
    manifest = load_manifest(shards)
    train, val = split_tokens(shards, "train"), split_tokens(shards, "val")

    def config(seed: int):
        every = args.steps
        return load_config(
            REPO / "configs" / "gpt_debug.yaml",
            RECIPE
            + [
                f"name=vsref-{seed}",
                f"data.shards={shards}",
                f"train.seed={seed}",
                f"train.max_steps={args.steps}",
                f"train.eval_every={every}",
                f"train.checkpoint_every={every}",
                f"train.log_every={max(1, args.steps // 20)}",
                f"scaling.storage_path={work / 'runs'}",
                f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}",
                "tracking.experiment=vs-reference",
                "eval.sample_tokens=0",
                "tracking.log_model=false",
                "tracking.system_metrics_interval_s=0",
            ],
        )

    cfg0 = config(args.seed0)
    T = cfg0.model.block_size
    vx, vy = val_windows(val, T, args.val_windows)
    windows = len(train) // (T + 1)
    ensure_ray()
    runs = []
    for i in range(args.seeds):
        seed = args.seed0 + i
        cfg = config(seed)
        ref_model, ref_step_s, ref_l1 = reference_loop(cfg, train, seed, min(args.skip, args.steps // 4))
        ref_loss = val_loss(ref_model, vx, vy)
        mr_model, mr_step_s, extra = megaray_run(cfg, work / f"trace-{seed}")
        mr_loss = val_loss(mr_model, vx, vy)
        runs.append(
            {
                "seed": seed,
                "megaray_val_loss": round(mr_loss, 4),
                "reference_val_loss": round(ref_loss, 4),
                "diff": round(mr_loss - ref_loss, 4),
                "megaray_step_ms": round(mr_step_s * 1e3, 2),
                "reference_step_ms": round(ref_step_s * 1e3, 2),
                "megaray_own_eval_val_loss": extra["val_loss_own_eval"],
                "megaray_final_train_loss": extra["loss"],
                "megaray_step_window": extra["window_steps"],
                "same_init_weights": abs(extra["init_l1"] - ref_l1) <= 1e-6 * ref_l1,
            }
        )
        print(json.dumps(runs[-1]), flush=True)
    m = {
        k: statistics.mean(r[k] for r in runs)
        for k in ("megaray_val_loss", "reference_val_loss", "megaray_step_ms", "reference_step_ms")
    }
    diff = m["megaray_val_loss"] - m["reference_val_loss"]
    model_keys = (
        "n_layer",
        "n_head",
        "n_embd",
        "block_size",
        "vocab_size",
        "bias",
        "tie_embeddings",
        "dropout",
        "position",
        "norm",
        "mlp",
        "attention",
    )
    t = cfg0.train
    print(
        json.dumps(
            {
                "benchmark": "vs_reference_loop",
                "model": {k: getattr(cfg0.model, k) for k in model_keys},
                "recipe": {
                    "batch_size": cfg0.data.batch_size,
                    "steps": args.steps,
                    "lr": t.lr,
                    "min_lr": t.min_lr,
                    "warmup_steps": t.warmup_steps,
                    "betas": t.betas,
                    "weight_decay": t.weight_decay,
                    "grad_clip": t.grad_clip,
                    "precision": t.precision,
                    "zero_stage": t.zero_stage,
                    "workers": 1,
                    "shuffle_block": cfg0.data.shuffle_block,
                },
                "data": {
                    "vocab": manifest["tokenizer"]["vocab_size"],
                    "train_tokens": int(len(train)),
                    "val_tokens": int(len(val)),
                    "train_windows_per_epoch": windows,
                    "epochs_trained": round(args.steps * cfg0.data.batch_size / windows, 2),
                    "val_windows_scored": int(len(vx)),
                    "val_window_tokens": T + 1,
                },
                "runs": runs,
                "megaray_val_loss_mean": round(m["megaray_val_loss"], 4),
                "reference_val_loss_mean": round(m["reference_val_loss"], 4),
                "diff_megaray_minus_reference": round(diff, 4),
                "bar_nats": 0.01,
                "within_bar": bool(diff <= 0.01),
                "megaray_step_ms_mean": round(m["megaray_step_ms"], 2),
                "reference_step_ms_mean": round(m["reference_step_ms"], 2),
                "step_time_ratio": round(m["megaray_step_ms"] / m["reference_step_ms"], 3),
                "unigram_entropy_val": manifest["splits"]["val"].get("unigram_entropy_nats"),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
