"""Audio ingest throughput: Ray Data actor pool vs ``torch.utils.data.DataLoader``, same work.

Both sides run :func:`megaray.data.audio.process_clip` (read bytes, soundfile decode, mono,
``torchaudio.functional.resample`` to ``--sample-rate``, peak normalisation, log-mel) on the same
files (the list repeated ``--repeat`` times, so fixed start-up costs are amortised) with
``--workers`` processes (Ray: ``map_batches`` over a CPU actor pool of that size;
PyTorch: a DataLoader with that many workers). Nothing is written. Each side runs ``--passes``
times; the first pass includes starting the actors / worker processes, the best pass is the
steady-state figure. Prints one JSON object::

    python benchmarks/audio_ingest.py --clips 96 --repeat 8 --workers 2

Without ``--manifest`` it renders ``--clips`` sentences with espeak-ng (22.05 kHz) first, so
both sides also resample 22.05 -> 16 kHz.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--manifest", default=None, help="jsonl/csv manifest or folder; default: build an espeak-ng corpus")
    p.add_argument("--clips", type=int, default=96, help="clips to render when no --manifest")
    p.add_argument("--repeat", type=int, default=8, help="process the file list this many times per pass")
    p.add_argument("--workers", type=int, default=2, help="Ray actors / DataLoader workers")
    p.add_argument("--batch-size", type=int, default=8, help="clips per Ray map_batches call")
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--sample-rate", type=int, default=16000)
    p.add_argument("--n-mels", type=int, default=80)
    p.add_argument("--n-fft", type=int, default=1024)
    p.add_argument("--hop-length", type=int, default=256)
    return p.parse_args(argv)


class ClipDataset:
    """Map-style dataset doing :func:`process_clip` per file (one torch thread per worker)."""

    def __init__(self, records, settings):
        self.records, self.settings, self.features = records, settings, None

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        import torch

        from megaray.data import audio as A

        if self.features is None:
            torch.set_num_threads(1)
            self.features = A.mel_features(self.settings)
        r = self.records[i]
        try:
            out = A.process_clip(A.read_bytes(r["path"]), self.settings, self.features, r["name"])
            return {"ok": True, **out}  # waveform + mel travel back, as Ray's rows do
        except A.RejectedClip as e:
            return {"ok": False, "reason": str(e)}


def run_dataloader(records, settings, workers):
    import torch

    loader = torch.utils.data.DataLoader(
        ClipDataset(records, settings), batch_size=None, num_workers=workers, collate_fn=lambda x: x
    )
    t0 = time.perf_counter()
    n = sum(1 for row in loader if row["ok"])
    return n, time.perf_counter() - t0


def run_ray(records, settings, workers, batch_size):
    from dataclasses import asdict

    import ray

    from megaray.data import audio as A

    t0 = time.perf_counter()
    ds = ray.data.from_items(records, override_num_blocks=max(1, min(len(records), 4 * workers))).map_batches(
        A.AudioPreprocessor,
        fn_constructor_kwargs={"settings": asdict(settings)},
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=1,
        batch_format="numpy",
    )
    n = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        n += int(sum(batch.column("ok").to_pylist()))
    return n, time.perf_counter() - t0


def main(argv=None) -> dict:
    args = parse_args(argv)
    import ray
    from ray.data import DataContext

    from megaray.data import audio as A
    from megaray.data.speech_corpus import build_speech_corpus

    tmp = tempfile.mkdtemp(prefix="megaray-ingest-")
    t0 = time.perf_counter()
    manifest = args.manifest or build_speech_corpus(os.path.join(tmp, "corpus"), n_clips=args.clips, include_alsa=False)
    build_s = time.perf_counter() - t0
    records = A.collect_sources(manifest) * args.repeat
    for r in records:
        r.update(split="train", speaker_id=0)
    settings = A.AudioPrepSettings(
        sample_rate=args.sample_rate, n_mels=args.n_mels, n_fft=args.n_fft, hop_length=args.hop_length
    )
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=max(4, args.workers + 2), include_dashboard=False, log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False

    result = {
        "clips": len(records),
        "files": len(records) // args.repeat,
        "workers": args.workers,
        "corpus_build_s": round(build_s, 2),
        "cpu_count": os.cpu_count(),
        "load_average_1m_at_start": round(os.getloadavg()[0], 1),
    }
    for name, fn in (
        ("ray_data", lambda: run_ray(records, settings, args.workers, args.batch_size)),
        ("dataloader", lambda: run_dataloader(records, settings, args.workers)),
    ):
        passes = []
        for _ in range(args.passes):
            n, s = fn()
            passes.append({"clips_ok": n, "seconds": round(s, 3), "clips_per_s": round(n / s, 2)})
        result[name] = {
            "passes": passes,
            "first_pass_clips_per_s": passes[0]["clips_per_s"],
            "best_clips_per_s": max(p["clips_per_s"] for p in passes),
        }
    result["load_average_1m_at_end"] = round(os.getloadavg()[0], 1)
    result["ray_over_dataloader_best"] = round(
        result["ray_data"]["best_clips_per_s"] / result["dataloader"]["best_clips_per_s"], 3
    )
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
