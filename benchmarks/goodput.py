"""Goodput of a short demo run, and resume time early vs late in an epoch.

Runs the README demo's model (configs/demo.yaml) shortened: ``--steps`` optimizer steps with an
evaluation every ``--eval-every`` and a batch size small enough that an epoch boundary falls
inside, on a local Ray cluster with 2 workers, tracking off. Then it measures resume: a run
checkpointed at 10% (and at 90%) of an epoch is re-run for one more step, and the time from
``fit`` to its first trained batch (``time/startup_s``) is compared, side by side (a ratio),
for the positioned stream (what ``megaray train`` does) and, as the baseline, the old replay
(one execution per epoch, consumed batches read again to reach the position).

Prints one JSON object::

    {"goodput": ..., "startup_s": ..., "eval_s_each": ..., "steps": ..., "epoch_steps": ...,
     "resume": {"positioned": {"10%": s, "90%": s, "ratio_90_over_10": r},
                "replay": {...}}}

    python benchmarks/goodput.py --steps 120 --eval-every 40     # ~10 min on 2 cores
    python benchmarks/goodput.py --steps 40 --eval-every 20 --no-resume   # quick look
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

    return load_config(REPO / "configs" / "demo.yaml", [
        f"name={name}", f"data.shards={shards}", f"scaling.storage_path={storage}", "tracking.enabled=false",
        f"train.max_steps={steps}", f"train.eval_every={eval_every}", f"train.checkpoint_every={ckpt_every}",
        f"train.log_every={max(1, eval_every // 2)}", f"data.batch_size={batch_size}", "train.warmup_steps=5",
    ])


def _resume_startup(shards: str, storage: str, at_step: int, batch_size: int, positioned: bool) -> float:
    """Train to ``at_step`` (checkpoint there), then re-run to ``at_step + 1``: the re-run's
    ``time/startup_s`` is what a resume at that position costs. ``positioned=False`` makes the
    LM task read one execution per epoch and replay to the position (the baseline)."""
    from megaray.tasks.lm import LMTask
    from megaray.train.launch import fit

    LMTask.positioned_stream = positioned  # decided on the driver, shipped to the workers in TaskInfo
    name = f"resume-{'positioned' if positioned else 'replay'}-{at_step}"
    fit(_cfg(shards, storage, name, at_step, at_step, batch_size, at_step), console=False)
    again = fit(_cfg(shards, storage, name, at_step + 1, at_step + 1, batch_size, at_step + 1), console=False)
    return float(again.metrics["time/startup_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--eval-every", type=int, default=40)
    ap.add_argument("--docs", type=int, default=1000,
                    help="stdlib documents in the corpus (1000: an epoch of ~75 steps at batch 4 x 2 workers)")
    ap.add_argument("--no-resume", action="store_true", help="skip the resume measurement")
    args = ap.parse_args()

    from megaray.data.text import load_manifest, num_windows, prepare_text
    from megaray.train.launch import ensure_ray, fit

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
        "steps": args.steps, "epoch_steps": epoch_steps, "batch_size": batch,
        "goodput": round(m["goodput"], 4), "startup_s": round(m["time/startup_s"], 2),
        "eval_s_each": round(m["time/eval_s"] / max(1, n_evals), 2), "wall_s": round(m["time/wall_s"], 1),
        "data_wait_s": round(m["time/data_wait_s"], 2), "checkpoint_s": round(m["time/checkpoint_s"], 2),
    }
    if not args.no_resume:
        early, late = max(1, epoch_steps // 10), max(2, epoch_steps * 9 // 10)
        out["resume_startup_s"] = {}
        for mode, positioned in (("positioned", True), ("replay", False)):
            r10 = _resume_startup(shards, storage, early, batch, positioned)
            r90 = _resume_startup(shards, storage, late, batch, positioned)
            out["resume_startup_s"][mode] = {f"10% (step {early})": round(r10, 2), f"90% (step {late})": round(r90, 2),
                                             "ratio_90_over_10": round(r90 / r10, 3)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
