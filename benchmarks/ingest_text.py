"""Tokens/s of Ray Data's tokenize-and-pack pipeline vs a single-process ``encode_batch`` loop.

Both paths start from the same raw jsonl files (the stdlib docstring corpus, repeated
``--repeat`` times and written as ``--files`` files) and end with packed int64 windows of
``--block-size + 1`` tokens:

* baseline: one Python process reads the jsonl, ``tokenizer.encode_batch`` in chunks of
  ``--batch-size`` documents (HF tokenizers uses its own thread pool inside), appends EOS and packs
  with numpy;
* ray: :func:`megaray.data.text.raw_text_dataset` (``read_json`` -> ``map_batches`` with
  ``--concurrency`` tokenizer actors that tokenize and pack) consumed with ``iter_batches``.

For reference it also times :func:`~megaray.data.text.prepare_text` on the same files (with the
same tokenizer) and the training-time path over its shards (:func:`~megaray.data.text.text_datasets`:
``(shard, row group)`` items read with pyarrow in Ray tasks -> packer actor -> ``iter_batches``,
train split only), alternated with the previous read path (``ray.data.read_parquet`` -> the same
packer), so the row-group reader that names corrupt row groups can be compared with it.

The Ray timing starts after ``ray.init`` and includes planning, actor start-up and reading; it
is run ``--runs`` times (each execution starts fresh actors), alternating with the baseline so a
shared machine's changing load hits both alike; the best of each is compared. Prints one JSON
object. On a shared machine wall-clock figures follow other jobs' load (reported as the 1-minute
load average at start and end); ``tokens_per_cpu_s`` counts CPU seconds of the whole process tree
instead (baseline: this process; Ray: driver + GCS + raylet + workers + actors) and is the
load-insensitive cost figure.

    python benchmarks/ingest_text.py --repeat 4 --concurrency 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megaray.data.stdlib import build_stdlib_corpus  # noqa: E402
from megaray.data.tokenizer import eos_id, load_tokenizer, train_tokenizer  # noqa: E402


def write_raw(work: Path, repeat: int, n_files: int) -> list:
    corpus = build_stdlib_corpus(work / "corpus")
    texts = [
        json.loads(line)["text"]
        for name in ("train.jsonl", "val.jsonl")
        for line in (corpus / name).read_text().splitlines()
    ]
    texts = texts * repeat
    paths = []
    per = -(-len(texts) // n_files)
    for i in range(n_files):
        p = work / "raw" / f"part-{i:03d}.jsonl"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[i * per : (i + 1) * per]))
        paths.append(str(p))
    return paths


def baseline(paths: list, tok_path: str, block: int, batch_size: int) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    tok = load_tokenizer(tok_path)
    eos = eos_id(tok)
    window = block + 1
    carry = np.empty(0, np.int64)
    windows = tokens = chars = 0
    for p in paths:
        with open(p, encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f]
        for i in range(0, len(texts), batch_size):
            chunk = texts[i : i + batch_size]
            chars += sum(map(len, chunk))
            ids = [e.ids + [eos] for e in tok.encode_batch(chunk, add_special_tokens=False)]
            flat = np.fromiter((t for x in ids for t in x), dtype=np.int64)
            tokens += len(flat)
            stream = np.concatenate([carry, flat])
            n = len(stream) // window
            w = stream[: n * window].reshape(n, window)
            _x, _y = np.ascontiguousarray(w[:, :-1]), np.ascontiguousarray(w[:, 1:])
            carry = stream[n * window :]
            windows += n
    dt = time.perf_counter() - t0
    cpu = time.process_time() - c0
    return {
        "seconds": dt,
        "cpu_seconds": cpu,
        "tokens": tokens,
        "windows": windows,
        "chars": chars,
        "tokens_per_s": tokens / dt,
        "tokens_per_cpu_s": tokens / cpu,
    }


class TreeCPU:
    """CPU seconds used by this process and all its descendants (the local Ray cluster that
    ``ray.init`` started: GCS, raylet, workers, actors), sampled every ``period`` s so processes
    that exit mid-run still count (up to one period of their time can be missed)."""

    def __init__(self, period: float = 0.2):
        import psutil

        self.psutil, self.period = psutil, period
        self.seen: dict = {}
        self.start = self._sample()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _sample(self) -> dict:
        me = self.psutil.Process()
        out = {}
        for p in [me] + me.children(recursive=True):
            try:
                c = p.cpu_times()
                out[(p.pid, p.create_time())] = c.user + c.system  # children_* would double-count reaped workers
            except self.psutil.Error:
                pass
        self.seen.update(out)
        return out

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            self._sample()

    def stop(self) -> float:
        self._stop.set()
        self._t.join()
        self._sample()
        return sum(v - self.start.get(k, 0.0) for k, v in self.seen.items())


def ray_path(paths: list, tok_path: str, block: int, batch_size: int, concurrency: int) -> dict:
    from megaray.data.text import raw_text_dataset

    cpu = TreeCPU()
    t0 = time.perf_counter()
    ds = raw_text_dataset(paths, tok_path, block, concurrency=concurrency, batch_size=batch_size)
    windows = 0
    for b in ds.iter_batches(batch_size=256, batch_format="numpy"):
        windows += len(b["input_ids"])
    dt = time.perf_counter() - t0
    cpu_s = cpu.stop()
    tokens = windows * (block + 1)  # tokens delivered in windows (each actor drops < block+1 at its end)
    return {
        "seconds": dt,
        "cpu_seconds": cpu_s,
        "tokens": tokens,
        "windows": windows,
        "tokens_per_s": tokens / dt,
        "tokens_per_cpu_s": tokens / cpu_s,
    }


def shards_path(shards: str, block: int) -> dict:
    """Training-time path: prepared parquet shards -> read_parquet -> packer actor -> iter_batches."""
    from megaray.data.text import text_datasets

    cpu = TreeCPU()
    t0 = time.perf_counter()
    ds = text_datasets(shards, block_size=block, seed=0, shuffle_buffer=0)["train"]
    return _drain(ds, block, cpu, t0)


def _drain(ds, block: int, cpu: "TreeCPU", t0: float) -> dict:
    """Iterate ``ds`` to the end; wall and CPU seconds since ``t0`` and tokens per second."""
    windows = 0
    for b in ds.iter_batches(batch_size=256, batch_format="numpy"):
        windows += len(b["input_ids"])
    dt = time.perf_counter() - t0
    cpu_s = cpu.stop()
    tokens = windows * (block + 1)
    return {
        "seconds": dt,
        "cpu_seconds": cpu_s,
        "tokens": tokens,
        "windows": windows,
        "tokens_per_s": tokens / dt,
        "tokens_per_cpu_s": tokens / cpu_s,
    }


def shards_path_read_parquet(shards: str, block: int) -> dict:
    """The previous training read: ``ray.data.read_parquet`` of the shard files -> the same packer."""
    import ray
    from ray.data import ActorPoolStrategy

    from megaray.data.text import Packer, load_manifest, shard_paths

    cpu = TreeCPU()
    t0 = time.perf_counter()
    fs, paths = shard_paths(shards, load_manifest(shards), "train")
    ds = ray.data.read_parquet(paths, filesystem=fs, columns=["tokens"]).map_batches(
        Packer,
        fn_constructor_kwargs={"block_size": block},
        batch_format="pyarrow",
        batch_size=256,
        compute=ActorPoolStrategy(size=1),
        num_cpus=0.25,
    )
    return _drain(ds, block, cpu, t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=4, help="copies of the stdlib corpus")
    ap.add_argument("--files", type=int, default=8, help="jsonl files to spread the text over")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=256, help="documents per encode_batch / map_batches call")
    ap.add_argument("--concurrency", type=int, default=2, help="tokenizer actors in the Ray path")
    ap.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    ap.add_argument("--runs", type=int, default=2, help="Ray executions to time")
    ap.add_argument("--shards-only", action="store_true", help="time only the two shard read paths")
    args = ap.parse_args()

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    load0 = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        paths = write_raw(work, args.repeat, args.files)
        texts = (json.loads(line)["text"] for p in paths[: max(1, len(paths) // args.repeat)] for line in open(p))
        tok = train_tokenizer(texts, args.vocab_size)
        tok_path = str(work / "tokenizer.json")
        tok.save(tok_path)
        t = time.perf_counter()
        shards = str(work / "shards")
        from megaray.data.text import prepare_text

        man = prepare_text(paths, shards, tokenizer=tok_path, dedupe=False, progress=False, verbose=False)
        prep = {
            "seconds": time.perf_counter() - t,
            "tokens": man["splits"]["train"]["tokens"] + man["splits"]["val"]["tokens"],
        }
        prep["tokens_per_s"] = prep["tokens"] / prep["seconds"]

        import ray
        from ray.data import DataContext

        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        DataContext.get_current().enable_progress_bars = False
        # alternate the two paths so a shared machine's changing load hits both alike
        bases, runs, shard_runs, old_runs = [], [], [], []
        for _ in range(args.runs):
            if not args.shards_only:
                bases.append(baseline(paths, tok_path, args.block_size, args.batch_size))
                runs.append(ray_path(paths, tok_path, args.block_size, args.batch_size, args.concurrency))
            shard_runs.append(shards_path(shards, args.block_size))
            old_runs.append(shards_path_read_parquet(shards, args.block_size))
        ray.shutdown()

    def rounded(rs):
        return [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in rs]

    reads = {
        "shards_path_runs (train split only)": rounded(shard_runs),
        "read_parquet_path_runs (previous read, train split only)": rounded(old_runs),
        "shards_path_tokens_per_s_best": round(max(r["tokens_per_s"] for r in shard_runs)),
        "read_parquet_path_tokens_per_s_best": round(max(r["tokens_per_s"] for r in old_runs)),
        "ratio_row_group_reader_over_read_parquet": round(
            max(r["tokens_per_s"] for r in shard_runs) / max(r["tokens_per_s"] for r in old_runs), 3
        ),
        "ratio_per_cpu_s": round(
            max(r["tokens_per_cpu_s"] for r in shard_runs) / max(r["tokens_per_cpu_s"] for r in old_runs), 3
        ),
    }
    if args.shards_only:
        print(
            json.dumps(
                {
                    "benchmark": "ingest_text (shard reads)",
                    "args": vars(args),
                    "machine": {
                        "cpu_count": os.cpu_count(),
                        "load_avg_1m_start_end": [load0, round(os.getloadavg()[0], 2)],
                    },
                    **reads,
                },
                indent=2,
            )
        )
        return
    base = max(bases, key=lambda r: r["tokens_per_s"])
    best = max(runs, key=lambda r: r["tokens_per_s"])
    print(
        json.dumps(
            {
                "benchmark": "ingest_text",
                "machine": {
                    "cpu_count": os.cpu_count(),
                    "python": platform.python_version(),
                    "load_avg_1m_start_end": [load0, round(os.getloadavg()[0], 2)],
                },
                "args": vars(args),
                "text_mb": round(base["chars"] / 1e6, 2),
                "baseline_runs": [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in bases],
                "ray_data_runs": [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in runs],
                "prepare_text_single_process": {k: round(v, 3) for k, v in prep.items()},
                **reads,
                "ray_tokens_per_s_best": round(best["tokens_per_s"]),
                "baseline_tokens_per_s_best": round(base["tokens_per_s"]),
                "ratio_ray_over_baseline": round(best["tokens_per_s"] / base["tokens_per_s"], 3),
                # load-insensitive: CPU seconds of the whole process tree (Ray: driver + GCS + raylet + workers)
                "ray_tokens_per_cpu_s_best": round(max(r["tokens_per_cpu_s"] for r in runs)),
                "baseline_tokens_per_cpu_s_best": round(max(r["tokens_per_cpu_s"] for r in bases)),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
