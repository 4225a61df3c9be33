"""MoE experts: the per-expert Python loop vs the grouped ``bmm`` (:mod:`megaray.models.common.experts`).

One top-k MoE layer (:class:`megaray.models.common.moe.MoE`, GELU experts ``n_embd -> 4 n_embd ->
n_embd``) on ``--tokens`` random tokens, for each expert count in ``--experts``: the layer's own
grouped computation against the former loop over an ``nn.ModuleList`` of ``build_mlp`` experts
holding the same weights (each expert on its rows, ``index_add`` back; the loop of
``tests/test_moe_peer.py``), forward and forward + backward, best of ``--reps`` (the two sides
alternate) after one warm-up. Prints one JSON object; ``ratio`` is loop time / grouped time
(> 1: grouped faster)::

    python benchmarks/moe_experts.py --experts 8 16 64 --n-embd 256 --tokens 4096 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experts", type=int, nargs="+", default=[8, 16, 64], help="expert counts to measure")
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--tokens", type=int, default=4096, help="B*T tokens per forward")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (best is reported)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    return p.parse_args(argv)


def module_list(moe, cfg):
    """The former layout: one ``build_mlp`` module per expert, holding copies of the stacked weights."""
    import torch

    from megaray.models.common.mlp import build_mlp

    experts = torch.nn.ModuleList([build_mlp(cfg) for _ in range(moe.n_experts)])
    with torch.no_grad():
        for name, p in moe.experts.named_parameters():  # e.g. c_fc.weight (E, out, in)
            for e, ex in enumerate(experts):
                ex.get_parameter(name).copy_(p[e])
    return experts


def loop_forward(moe, experts, x):
    """The per-expert loop: expert ``e`` on the rows routed to it, weighted, ``index_add`` back."""
    import torch

    B, T, C = x.shape
    xf = x.reshape(B * T, C)
    probs = moe.router(xf).float().softmax(dim=-1)
    weight, chosen = probs.topk(moe.top_k, dim=-1)
    weight = weight / weight.sum(dim=-1, keepdim=True)
    out = torch.zeros_like(xf)
    for e in range(moe.n_experts):
        tok, slot = (chosen == e).nonzero(as_tuple=True)
        out = out.index_add(0, tok, experts[e](xf[tok]) * weight[tok, slot, None])
    return out.view(B, T, C)


def best_times(fns: dict, reps: int) -> dict:
    """Best wall time of each function; the functions alternate within every repetition, so a
    load change on a shared machine hits both sides alike."""
    for fn in fns.values():
        fn()  # warm-up
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def measure(n: int, args: argparse.Namespace) -> dict:
    """Loop and grouped timings for one MoE layer of ``n`` experts."""
    import torch

    from megaray.models.common.moe import MoE
    from megaray.models.gpt import GPTConfig

    cfg = GPTConfig.from_name(None, n_embd=args.n_embd, n_head=4, n_experts=n, moe_top_k=args.top_k, mlp="gelu")
    moe = MoE(cfg)
    experts = module_list(moe, cfg)
    x = torch.randn(1, args.tokens, args.n_embd, requires_grad=True)
    w = torch.randn_like(x)
    with torch.no_grad():
        torch.testing.assert_close(loop_forward(moe, experts, x), moe(x), rtol=1e-4, atol=1e-5)

    def step(f):
        moe.zero_grad(set_to_none=True)
        experts.zero_grad(set_to_none=True)
        (f() * w).sum().backward()

    with torch.no_grad():
        fwd = best_times({"loop": lambda: loop_forward(moe, experts, x), "grouped": lambda: moe(x)}, args.reps)
    train = best_times(
        {"loop": lambda: step(lambda: loop_forward(moe, experts, x)), "grouped": lambda: step(lambda: moe(x))},
        args.reps,
    )
    return {
        "experts": n,
        "max_rows_per_expert": int(moe.tokens_per_expert.max()),
        "forward_s": {k: round(v, 4) for k, v in fwd.items()},
        "forward_backward_s": {k: round(v, 4) for k, v in train.items()},
        "ratio_forward": round(fwd["loop"] / fwd["grouped"], 2),
        "ratio_forward_backward": round(train["loop"] / train["grouped"], 2),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [measure(n, args) for n in args.experts]
    out = {
        "benchmark": "moe_experts",
        "n_embd": args.n_embd,
        "hidden": 4 * args.n_embd,
        "tokens": args.tokens,
        "top_k": args.top_k,
        "threads": args.threads,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "results": rows,
    }
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
