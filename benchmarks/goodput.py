"""Goodput of a short demo run: time in optimizer steps, start-up, evaluations, data wait.

Runs the README demo's model (configs/demo.yaml) shortened: ``--steps`` optimizer steps with an
evaluation every ``--eval-every`` and a batch size small enough that an epoch boundary falls
inside, on a local Ray cluster with 2 workers, tracking off. (Resume start-up early vs late in an
epoch, on local and ``s3://`` storage: ``benchmarks/resume_time.py``.)

Prints one JSON object::

    {"goodput": ..., "startup_s": ..., "eval_s_each": ..., "steps": ..., "epoch_steps": ..., ...}

    python benchmarks/goodput.py --steps 120 --eval-every 40
    python benchmarks/goodput.py --steps 40 --eval-every 20       # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parent.parent


def _cfg(shards: str, storage: str, name: str, steps: int, eval_every: int, batch_size: int, ckpt_every: int):
    from megaray.families import load_config

    return load_config(
        REPO / "configs" / "demo.yaml",
        [
            f"name={name}",
            f"data.shards={shards}",
            f"scaling.storage_path={storage}",
            "tracking.enabled=false",
            f"train.max_steps={steps}",
            f"train.eval_every={eval_every}",
            f"train.checkpoint_every={ckpt_every}",
            f"train.log_every={max(1, eval_every // 2)}",
            f"data.batch_size={batch_size}",
            "train.warmup_steps=5",
        ],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--eval-every", type=int, default=40)
    ap.add_argument(
        "--docs",
        type=int,
        default=1000,
        help="stdlib documents in the corpus (1000: an epoch of ~75 steps at batch 4 x 2 workers)",
    )
    args = ap.parse_args()

    from megaray.data.text import load_manifest, num_windows, prepare_text
    from megaray.train.launch import ensure_ray, fit
    from megaray.train.reporter import GOODPUT, time_key

    storage = tempfile.mkdtemp(prefix="megaray-goodput-")
    shards = f"{storage}/data"
    prepare_text(["stdlib"], shards, vocab_size=4096, val_fraction=0.1, stdlib_max_docs=args.docs)
    ensure_ray()
    batch = 4
    cfg = _cfg(shards, storage, "goodput", args.steps, args.eval_every, batch, args.steps)
    epoch_steps = num_windows(load_manifest(shards), cfg.model.block_size) // (cfg.scaling.num_workers * batch)
    result = fit(cfg, console=False)
    m = result.metrics
    n_evals = args.steps // args.eval_every
    out = {
        "steps": args.steps,
        "epoch_steps": epoch_steps,
        "batch_size": batch,
        "goodput": round(m[GOODPUT], 4),
        "startup_s": round(m[time_key("startup")], 2),
        "eval_s_each": round(m[time_key("eval")] / max(1, n_evals), 2),
        "wall_s": round(m[time_key("wall")], 1),
        "data_wait_s": round(m[time_key("data_wait")], 2),
        "checkpoint_s": round(m[time_key("checkpoint")], 2),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
