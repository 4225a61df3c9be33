"""Resume start-up early vs late in a long epoch, on local storage and on ``s3://`` (moto), side by side.

A language-model run reads one positioned train stream: a resume starts reading at the row group
that holds the shuffle block of its checkpoint's cursor (``megaray.data.text.stream.start_at``),
so its start-up should not grow with the position in the epoch. This measures it: a text corpus
of many row groups (the stdlib docstrings, ``prepare_text(rows_per_group=...)``), a run trained
and checkpointed at 10% of its epoch and another at 90%, then each re-run for one more step; the
re-run's ``system/time_startup_s`` (``fit`` start to its first trained micro-batch: Ray Train's worker
group, DeepSpeed, checkpoint restore, the stream's first batch) is the resume's cost. The same on
local storage (shards and checkpoints in a temporary folder) and on ``s3://`` storage: a moto S3
server on 127.0.0.1, the shards prepared straight into its bucket, checkpoints uploaded there by
Ray Train (the AWS environment is set before Ray starts, so every worker reads it).

``--shuffle-block`` (windows) is smaller than this corpus's epoch on purpose: with the default
(65,536 windows, one block per epoch here) both resumes read the same block from the epoch's
first row group, which would hide a seek that depends on the position; a block of ~1/12 of the
epoch stands in for a long epoch of many blocks. ``--repeats`` resumes each run again (one more
step each time, same block) and keeps the median. The bar: ``ratio_90_over_10`` <= 1.2 per storage.
Prints one JSON object::

    OMP_NUM_THREADS=1 python benchmarks/resume_time.py                       # local and s3, ~6 min on 2 cores
    OMP_NUM_THREADS=1 python benchmarks/resume_time.py --storage local --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parent.parent
BUCKET = "megaray-bench"
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def start_moto() -> object:
    """A moto S3 server on loopback with one bucket; the AWS environment points at it (set here,
    before Ray starts: workers inherit the raylet's environment)."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update({**S3_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    return server


def config(shards: str, storage: str, name: str, steps: int, batch_size: int, shuffle_block: int):
    from megaray.families import load_config

    return load_config(
        REPO / "configs" / "gpt_debug.yaml",
        [
            f"name={name}",
            f"data.shards={shards}",
            f"scaling.storage_path={storage}",
            "scaling.num_workers=1",
            f"data.batch_size={batch_size}",
            f"data.shuffle_block={shuffle_block}",
            "data.num_val_batches=1",
            f"train.max_steps={steps}",
            f"train.eval_every={steps}",
            f"train.checkpoint_every={steps}",
            f"train.log_every={max(1, steps // 4)}",
            "train.warmup_steps=2",
            "train.zero_stage=0",
            "tracking.enabled=false",
        ],
    )


def train_to(shards: str, storage: str, name: str, at_step: int, batch_size: int, shuffle_block: int) -> None:
    """A fresh run of ``at_step`` steps, checkpointed at its last."""
    from megaray.train.launch import fit

    fit(config(shards, storage, name, at_step, batch_size, shuffle_block), console=False)


def resume_once(shards: str, storage: str, name: str, to_step: int, batch_size: int, shuffle_block: int) -> float:
    """Re-run ``name`` to ``to_step`` (one step past its latest checkpoint): its ``system/time_startup_s``."""
    from megaray.train.launch import fit
    from megaray.train.reporter import time_key

    result = fit(config(shards, storage, name, to_step, batch_size, shuffle_block), console=False)
    assert result.metrics["step"] == to_step, result.metrics
    return float(result.metrics[time_key("startup")])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--storage", nargs="+", choices=["local", "s3"], default=["local", "s3"])
    ap.add_argument("--docs", type=int, default=None, help="stdlib documents (default: all)")
    ap.add_argument("--rows-per-group", type=int, default=64, help="documents per parquet row group")
    ap.add_argument("--batch-size", type=int, default=32, help="windows per step (1 worker: the global batch)")
    ap.add_argument("--shuffle-block", type=int, default=1024, help="data.shuffle_block (windows)")
    ap.add_argument("--repeats", type=int, default=2, help="resumes per run (median)")
    args = ap.parse_args()

    import pyarrow.parquet as pq

    from megaray.data.text import load_manifest, num_windows, prepare_text, shard_paths
    from megaray.data.text.stream import StreamSpec, epoch_order, start_at
    from megaray.train.launch import ensure_ray

    server = start_moto() if "s3" in args.storage else None  # before Ray starts
    work = Path(tempfile.mkdtemp(prefix="megaray-resume-"))
    local = str(work / "data")
    prepare_text(
        ["stdlib"],
        local,
        vocab_size=512,
        rows_per_group=args.rows_per_group,
        stdlib_max_docs=args.docs,
        progress=False,
        verbose=False,
    )
    manifest = load_manifest(local)
    _, paths = shard_paths(local, manifest, "train")
    groups = sum(pq.ParquetFile(p).metadata.num_row_groups for p in paths)
    cfg = config(local, str(work), "probe", 1, args.batch_size, args.shuffle_block)
    T = cfg.model.block_size
    windows = num_windows(manifest, T)
    epoch_steps = windows // args.batch_size
    early, late = max(1, epoch_steps // 10), epoch_steps * 9 // 10
    where = {"local": (local, str(work / "runs"))}
    if server is not None:
        shards = f"s3://{BUCKET}/data"
        prepare_text(
            ["stdlib"],
            shards,
            tokenizer=f"{local}/{manifest['tokenizer']['path']}",
            rows_per_group=args.rows_per_group,
            stdlib_max_docs=args.docs,
            progress=False,
            verbose=False,
        )
        where["s3"] = (shards, f"s3://{BUCKET}/runs")

    # where each resume starts reading (the row group of its shuffle block; epoch 0's order)
    from megaray.data.text.datasets import _row_groups

    _, items = _row_groups(local, manifest, "train")
    spec = StreamSpec(
        block_size=T,
        global_batch=args.batch_size,
        per_epoch=epoch_steps * args.batch_size,
        seed=cfg.train.seed,
        chunk=-(-args.shuffle_block // args.batch_size) * args.batch_size,
    )
    order = [int(items[i]["values"]) for i in epoch_order(len(items), spec.seed, 0, True)]
    starts = {f"{p}%": start_at(order, spec, s * args.batch_size)[0] for p, s in ((10, early), (90, late))}

    ensure_ray()
    out = {
        "benchmark": "resume_time",
        "corpus": {
            "train_tokens": manifest["splits"]["train"]["tokens"],
            "row_groups": groups,
            "rows_per_group": args.rows_per_group,
            "windows_per_epoch": windows,
            "block_size": T,
            "global_batch": args.batch_size,
            "epoch_steps": epoch_steps,
            "shuffle_block_windows": spec.chunk,
            "blocks_per_epoch": -(-spec.per_epoch // spec.chunk),
            "first_row_group_read": starts,
        },
        "positions": {"10%": early, "90%": late},
        "repeats": args.repeats,
        "workers": 1,
        "startup_s": {},
    }
    try:
        for storage, (shards, runs) in where.items():
            for step in (early, late):
                train_to(shards, runs, f"at{step}", step, args.batch_size, args.shuffle_block)
            times = {early: [], late: []}
            for r in range(args.repeats):  # alternated, so drift on a shared machine hits both alike
                for step in (early, late):
                    times[step].append(
                        resume_once(shards, runs, f"at{step}", step + r + 1, args.batch_size, args.shuffle_block)
                    )
            t10, t90 = statistics.median(times[early]), statistics.median(times[late])
            out["startup_s"][storage] = {
                "10%": round(t10, 2),
                "90%": round(t90, 2),
                "ratio_90_over_10": round(t90 / t10, 3),
                "each": {"10%": [round(t, 2) for t in times[early]], "90%": [round(t, 2) for t in times[late]]},
            }
            print(json.dumps({storage: out["startup_s"][storage]}), flush=True)
    finally:
        if server is not None:
            server.stop()
    out["bar"] = 1.2
    out["within_bar"] = all(v["ratio_90_over_10"] <= 1.2 for v in out["startup_s"].values())
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
