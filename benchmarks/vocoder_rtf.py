"""Vocoder inference speed on CPU: real-time factor and parameter count of every preset.

For each preset: ``--seconds`` of log-mel frames (random, in the range of real log-mels) through
``Vocoder.forward`` under ``torch.inference_mode`` (fp32, batch 1), ``--warmup`` untimed calls,
then the median of ``--repeats`` timed calls. ``x_real_time`` = audio seconds / wall seconds
(higher is faster; Vocos reports about 170x on a server CPU for its 13.5M-parameter model).
``x_real_time_per_cpu_second`` = audio seconds / process CPU seconds (all threads): unlike the
wall-clock figure it does not drop when other jobs share the machine.
Prints one JSON object::

    python benchmarks/vocoder_rtf.py --seconds 10 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="*", default=None, help="default: all VocoderConfig presets")
    p.add_argument("--seconds", type=float, default=10.0, help="audio length per call")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch threads; default: torch's default")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from megaray.models.audio.config import VocoderConfig
    from megaray.models.audio.vocoder import Vocoder

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for name in args.presets or list(VocoderConfig.PRESETS):
        cfg = VocoderConfig.from_name(name)
        model = Vocoder(cfg).eval().to(args.device)
        frames = int(args.seconds * cfg.sample_rate) // cfg.hop_length + 1
        mel = (torch.randn(1, cfg.n_mels, frames) * 2 - 5).to(args.device)
        times, cpu = [], []
        with torch.inference_mode():
            for i in range(args.warmup + args.repeats):
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0, c0 = time.perf_counter(), time.process_time()
                wave, _ = model(mel)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                if i >= args.warmup:
                    times.append(time.perf_counter() - t0)
                    cpu.append(time.process_time() - c0)
        audio_s = wave.shape[-1] / cfg.sample_rate
        med = statistics.median(times)
        rows.append({"preset": name, "params": model.num_parameters(), "head": cfg.head,
                     "sample_rate": cfg.sample_rate, "audio_seconds": round(audio_s, 3),
                     "compute_seconds": round(med, 4), "x_real_time": round(audio_s / med, 1),
                     "cpu_seconds": round(statistics.median(cpu), 4),
                     "x_real_time_per_cpu_second": round(audio_s / statistics.median(cpu), 1)})
    result = {"device": args.device, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
              "load_average_1m": round(os.getloadavg()[0], 1),
              "torch": torch.__version__, "presets": rows}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
