"""Seconds to convert a ZeRO checkpoint into a universal one (megaray.train.universal.convert).

Builds a GPT preset (default ``gpt2_small``, ~124M parameters) as a 1-rank DeepSpeed engine on
CPU (gloo) through megaray's ``build_engine`` (torch AdamW, decay/no-decay groups), takes one
optimizer step on random tokens, saves it with ``engine.save_checkpoint(tag="model")``, times
:func:`megaray.train.universal.convert` (DeepSpeed's ``ds_to_universal``, in-process, serial by
default) and the universal load back into the engine. Prints one JSON object::

    python benchmarks/universal_conversion.py                      # gpt2_small, ZeRO 2
    python benchmarks/universal_conversion.py --preset debug --zero-stage 3

Needs about 3 GB of memory and 4 GB of disk (in a temporary folder, removed at the end) for
gpt2_small.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parent.parent


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2_small")
    ap.add_argument("--zero-stage", type=int, default=2, choices=[1, 2, 3])
    ap.add_argument("--seq", type=int, default=64, help="tokens of the one training step's sequence")
    ap.add_argument("--workers", type=int, default=1, help="ds_to_universal extract/merge processes")
    args = ap.parse_args()

    import torch
    import torch.distributed as dist

    from megaray import families
    from megaray.models.gpt.config import GPTConfig
    from megaray.train.engines import build_engine, skip_cpu_op_builds
    from megaray.train.universal import convert, load_engine_universal

    torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1"
    )
    dist.init_process_group("gloo", rank=0, world_size=1)
    skip_cpu_op_builds()

    cfg = families.load_config(
        REPO / "configs" / "gpt_debug.yaml",
        [f"train.zero_stage={args.zero_stage}", "scaling.num_workers=1", "data.batch_size=1"],
    )
    model_cfg = GPTConfig.from_name(args.preset)
    torch.manual_seed(0)
    model = families.build_model(model_cfg)
    params = sum(p.numel() for p in model.parameters())
    groups = families.task_class("gpt")(cfg).param_groups("model", model)
    engine, _ = build_engine(model, groups, cfg, "fp32")

    x = torch.randint(0, model_cfg.vocab_size, (1, args.seq + 1))
    _, loss = engine(x[:, :-1], x[:, 1:])
    engine.backward(loss)
    engine.step()

    work = Path(tempfile.mkdtemp(prefix="megaray-universal-bench-"))
    try:
        t0 = time.perf_counter()
        engine.save_checkpoint(str(work), tag="model")
        save_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        tag = convert(str(work), "model", workers=args.workers)
        convert_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        load_engine_universal(engine, str(work), "model")
        load_s = time.perf_counter() - t0
        print(
            json.dumps(
                {
                    "benchmark": "universal_conversion",
                    "preset": args.preset,
                    "params": params,
                    "zero_stage": args.zero_stage,
                    "world_size": 1,
                    "workers": args.workers,
                    "save_s": round(save_s, 2),
                    "convert_s": round(convert_s, 2),
                    "universal_load_s": round(load_s, 2),
                    "checkpoint_mb": round(_du(work / "model") / 2**20, 1),
                    "universal_mb": round(_du(work / tag) / 2**20, 1),
                    "global_steps_after_load": engine.global_steps,
                },
                indent=2,
            )
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
