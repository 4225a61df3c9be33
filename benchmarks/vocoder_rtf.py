"""Vocoder inference speed on CPU: real-time factor and parameter count of every preset.

For each preset: ``--seconds`` of log-mel frames (random, in the range of real log-mels) through
``Vocoder.forward`` under ``torch.inference_mode`` (fp32, batch 1), ``--warmup`` untimed calls,
then the median of ``--repeats`` timed calls. ``x_real_time`` = audio seconds / wall seconds
(higher is faster; Vocos reports about 170x on a server CPU for its 13.5M-parameter model).
``x_real_time_per_cpu_second`` = audio seconds / process CPU seconds (all threads): unlike the
wall-clock figure it does not drop when other jobs share the machine.
Prints one JSON object::

    python benchmarks/vocoder_rtf.py --seconds 10 --threads 2

``--vs-vocos``: megaray's ``base`` preset against the ``vocos`` package's ``Vocos`` of the same
size (``charactr/vocos-mel-24khz``'s architecture: 100 mels, dim 512, ConvNeXt 1536 x 8, iSTFT
head n_fft 1024 / hop 256, built from its classes with random weights; nothing downloads), same
thread count, same log-mel input, timed alternately; prints both and ``ratio`` = megaray's
real-time factor / Vocos's (> 1: megaray is faster). Needs ``pip install -e .[bench]``::

    python benchmarks/vocoder_rtf.py --vs-vocos --seconds 10 --threads 2 --repeats 7
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
    p.add_argument("--vs-vocos", action="store_true", help="compare the base preset with vocos.Vocos (same size)")
    return p.parse_args(argv)


def time_calls(fn, mel, warmup: int, repeats: int, device: str):
    """Median wall and process-CPU seconds of ``fn(mel)`` over ``repeats`` calls after ``warmup``;
    returns ``(wall_s, cpu_s, output)``."""
    import torch

    times, cpu = [], []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn(mel)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
    return statistics.median(times), statistics.median(cpu), out


def vocos_like(cfg):
    """``vocos.Vocos`` with the architecture of megaray's VocoderConfig ``cfg`` (random weights)."""
    from vocos import Vocos
    from vocos.feature_extractors import MelSpectrogramFeatures
    from vocos.heads import ISTFTHead
    from vocos.models import VocosBackbone

    return Vocos(
        feature_extractor=MelSpectrogramFeatures(
            sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length, n_mels=cfg.n_mels, padding="center"
        ),
        backbone=VocosBackbone(
            input_channels=cfg.n_mels, dim=cfg.dim, intermediate_dim=cfg.intermediate_dim, num_layers=cfg.num_layers
        ),
        head=ISTFTHead(dim=cfg.dim, n_fft=cfg.n_fft, hop_length=cfg.hop_length, padding="center"),
    )


def versus_vocos(args) -> dict:
    """megaray ``base`` vs ``vocos.Vocos`` of the same size on one input, alternating repeats."""
    import torch

    from megaray.models.audio.config import VocoderConfig
    from megaray.models.audio.vocoder import Vocoder

    cfg = VocoderConfig.from_name("base")
    ours = Vocoder(cfg).eval().to(args.device)
    theirs = vocos_like(cfg).eval().to(args.device)
    frames = int(args.seconds * cfg.sample_rate) // cfg.hop_length + 1
    mel = (torch.randn(1, cfg.n_mels, frames) * 2 - 5).to(args.device)
    rows = {"megaray": [], "vocos": []}
    fns = {"megaray": lambda m: ours(m)[0], "vocos": theirs.decode}
    for _ in range(args.repeats):  # alternate, so load from other jobs hits both alike
        for name, fn in fns.items():
            rows[name].append(time_calls(fn, mel, args.warmup, 1, args.device))
    out = {}
    for name, model in (("megaray", ours), ("vocos", theirs)):
        wall = statistics.median(r[0] for r in rows[name])
        cpu = statistics.median(r[1] for r in rows[name])
        audio_s = rows[name][-1][2].shape[-1] / cfg.sample_rate
        params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("feature_extractor"))
        out[name] = {
            "params": params,
            "audio_seconds": round(audio_s, 3),
            "compute_seconds": round(wall, 4),
            "x_real_time": round(audio_s / wall, 1),
            "cpu_seconds": round(cpu, 4),
            "x_real_time_per_cpu_second": round(audio_s / cpu, 1),
        }
    import vocos

    return {
        "preset": "base",
        "vocos_version": getattr(vocos, "__version__", "0.1.0"),
        **out,
        "ratio": round(out["megaray"]["x_real_time"] / out["vocos"]["x_real_time"], 3),
        "ratio_per_cpu_second": round(
            out["megaray"]["x_real_time_per_cpu_second"] / out["vocos"]["x_real_time_per_cpu_second"], 3
        ),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from megaray.models.audio.config import VocoderConfig
    from megaray.models.audio.vocoder import Vocoder

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.vs_vocos:
        result = {
            "device": args.device,
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "load_average_1m": round(os.getloadavg()[0], 1),
            "torch": torch.__version__,
            **versus_vocos(args),
        }
        print(json.dumps(result, indent=2))
        return result
    rows = []
    for name in args.presets or list(VocoderConfig.PRESETS):
        cfg = VocoderConfig.from_name(name)
        model = Vocoder(cfg).eval().to(args.device)
        frames = int(args.seconds * cfg.sample_rate) // cfg.hop_length + 1
        mel = (torch.randn(1, cfg.n_mels, frames) * 2 - 5).to(args.device)
        med, cpu, (wave, _) = time_calls(model, mel, args.warmup, args.repeats, args.device)
        audio_s = wave.shape[-1] / cfg.sample_rate
        rows.append(
            {
                "preset": name,
                "params": model.num_parameters(),
                "head": cfg.head,
                "sample_rate": cfg.sample_rate,
                "audio_seconds": round(audio_s, 3),
                "compute_seconds": round(med, 4),
                "x_real_time": round(audio_s / med, 1),
                "cpu_seconds": round(cpu, 4),
                "x_real_time_per_cpu_second": round(audio_s / cpu, 1),
            }
        )
    result = {
        "device": args.device,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 1),
        "torch": torch.__version__,
        "presets": rows,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
