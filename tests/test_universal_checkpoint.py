"""Resuming a ZeRO checkpoint at another data-parallel world size (megaray.train.universal).

The multi-process part runs real DeepSpeed engines (megaray's ``build_engine``: torch AdamW with
decay/no-decay groups, warmup-cosine schedule, grad clipping) on a one-layer GPT over gloo, no
Ray. For ZeRO 0-3: 2 ranks train 3 steps on fixed global batches of 6 rows and save, then go on
for 3 more steps (the reference). The checkpoint is resumed on 1 rank (6 rows each) and on 3 ranks
(2 rows each), same global batches, and steps 4-6 must give the reference's losses and final
weights. A control run starts from the same step-3 weights with a fresh optimizer and schedule and
must NOT match: the comparison can fail.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO

from megaray.errors import CheckpointError
from megaray.train import universal
from megaray.train.universal import convert, needs_conversion, universal_tag

STAGES = (0, 1, 2, 3)
K = 3  # steps before the checkpoint, and after it
GLOBAL_ROWS = 6  # global batch rows (2 x 3, 1 x 6, 3 x 2)
TOL = 1e-4  # per-step loss
TOL_W = 2e-4  # final weights (Adam amplifies the reduction-order noise of 1e-7 in early steps)


# -- fast: no processes ------------------------------------------------------------------------


def test_tag_and_when_to_convert():
    assert universal_tag("model") == "model_universal"
    assert not needs_conversion(2, 2, 3)
    assert not needs_conversion(2, 3, 0)  # ZeRO 0: nothing is partitioned
    assert needs_conversion(2, 1, 1) and needs_conversion(4, 2, 3)


def test_convert_errors_name_the_folder(tmp_path):
    with pytest.raises(CheckpointError, match="model"):
        convert(str(tmp_path), "model")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mp_rank_00_model_states.pt").write_bytes(b"")  # a ZeRO-0 tag: no shards
    with pytest.raises(CheckpointError, match="only ZeRO stage >= 1"):
        convert(str(tmp_path), "model")


def test_a_crash_mid_conversion_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    from deepspeed.checkpoint import ds_to_universal

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")

    def crash(args):
        os.makedirs(os.path.join(args.output_folder, "zero", "w"))
        Path(args.output_folder, "zero", "w", "fp32.pt").write_bytes(b"half")
        raise AssertionError("disk full")

    monkeypatch.setattr(ds_to_universal, "main", crash)
    with pytest.raises(CheckpointError, match=r"model.*universal checkpoint conversion failed.*disk full"):
        convert(str(tmp_path), "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no model_universal, no temp folder

    calls = []

    def ok(args):
        calls.append(args)
        os.makedirs(os.path.join(args.output_folder, "zero"))
        Path(os.path.dirname(args.output_folder), "latest_universal").write_text("x")

    monkeypatch.setattr(ds_to_universal, "main", ok)
    assert convert(str(tmp_path), "model") == "model_universal"
    assert convert(str(tmp_path), "model") == "model_universal"  # cached: DeepSpeed ran once
    assert len(calls) == 1 and calls[0].num_extract_workers == 1 and calls[0].inject_missing_state
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model_universal"]  # latest_universal stayed in tmp
    assert (tmp_path / "model_universal" / universal.MARKER).is_file()


def test_load_engine_wants_a_complete_conversion(tmp_path):
    class Engine:  # only asked for its stage before anything is loaded
        def zero_optimization_stage(self):
            return 2

    (tmp_path / "model_universal").mkdir()  # no marker: a copy cut short, not convert()'s output
    with pytest.raises(CheckpointError, match="model_universal: not a complete universal checkpoint"):
        universal.load_engine(Engine(), str(tmp_path), "model_universal")


# -- slow: real engines over gloo --------------------------------------------------------------


def _cfg(stage: int, world: int):
    from megaray.families import load_config

    return load_config(
        REPO / "configs" / "gpt_debug.yaml",
        [
            "model.n_layer=1",
            "model.n_embd=32",
            "model.n_head=2",
            "model.vocab_size=64",
            "model.block_size=8",
            f"data.batch_size={GLOBAL_ROWS // world}",
            f"train.zero_stage={stage}",
            "train.max_steps=20",
            "train.warmup_steps=2",
            "train.lr=0.01",
            "train.min_lr=0.001",
            f"scaling.num_workers={world}",
        ],
    )


def _engine(stage: int, world: int, seed: int, weights=None):
    """megaray's engine for the tiny GPT; ZeRO 3 partitions every parameter (persistence
    threshold 0) so the partitioned-weight path is what is tested."""
    from megaray import families
    from megaray.train import engines

    cfg = _cfg(stage, world)
    torch.manual_seed(seed)
    model = families.build_model(cfg.model)
    if weights is not None:
        model.load_state_dict(weights)
    groups = families.task_class(cfg.model.family)(cfg).param_groups("model", model)
    base = engines.deepspeed_config

    def config(c, precision):
        ds = base(c, precision)
        if stage == 3:
            ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        return ds

    engines.deepspeed_config = config
    try:
        engine, _ = engines.build_engine(model, groups, cfg, "fp32")
    finally:
        engines.deepspeed_config = base
    return engine


def _bn_engine(stage: int, world: int, seed: int):
    """A GAN-discriminator-like module with BatchNorm (persistent running statistics)."""
    from megaray.train import engines

    torch.manual_seed(seed)
    nn = torch.nn
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))
    engine, _ = engines.build_engine(model, [{"params": list(model.parameters())}], _cfg(stage, world), "fp32", "disc")
    return engine


def _bn_buffers(engine, steps, rank: int, world: int):
    for step in steps:
        x = _batch(step, rank, world)[0].float()
        loss = engine(x).square().mean()
        engine.backward(loss)
        engine.step()
    return {n: b.clone() for n, b in engine.module.named_buffers()}


def _batch(step: int, rank: int, world: int):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randint(0, 64, (GLOBAL_ROWS, 9), generator=g)
    rows = slice(rank * GLOBAL_ROWS // world, (rank + 1) * GLOBAL_ROWS // world)
    return x[rows, :-1], x[rows, 1:]


def _train(engine, steps, rank: int, world: int):
    """One optimizer step per global batch; the global mean loss of each (all ranks together)."""
    losses = []
    for step in steps:
        x, y = _batch(step, rank, world)
        _, loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        torch.distributed.all_reduce(mean)
        losses.append(mean.item() / world)
    return losses


def _weights(engine):
    """The full fp32 state dict (gathered under ZeRO 3), on every rank."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        return {n: t.detach().clone() for n, t in engine.module.state_dict().items()}


def _groups(engine):
    opt = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
    return [{k: v for k, v in g.items() if k in ("lr", "weight_decay", "betas")} for g in opt.param_groups]


def _worker(rank: int, world: int, port: int, mode: str, root: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from megaray.train.engines import skip_cpu_op_builds

    skip_cpu_op_builds()
    out = {}
    for stage in STAGES:
        ckpt = os.path.join(root, f"zero{stage}")
        if mode == "reference":
            engine = _engine(stage, world, seed=0)
            _train(engine, range(1, K + 1), rank, world)
            engine.save_checkpoint(ckpt, tag="model", client_state={"megaray": {"step": K, "world_size": world}})
            w3, groups = _weights(engine), _groups(engine)
            res = {"groups": groups, "losses": _train(engine, range(K + 1, 2 * K + 1), rank, world)}
            if rank == 0:
                torch.save(w3, os.path.join(root, f"zero{stage}_w3.pt"))
            bn = _bn_engine(stage, world, seed=0)
            res["bn"] = _bn_buffers(bn, range(1, K + 1), rank, world)  # rank 0's: the saved ones
            bn.save_checkpoint(ckpt, tag="disc")
        else:
            if mode == "resume3":  # a copy without rank 0's conversion: ranks convert collectively
                ckpt = os.path.join(root, f"zero{stage}_copy")
            engine = _engine(stage, world, seed=123)  # another init: the weights must come from the checkpoint
            t0 = time.perf_counter()
            _, client = universal.load_engine_universal(engine, ckpt, "model")
            res = {
                "load_s": time.perf_counter() - t0,
                "global_steps": engine.global_steps,
                "client": client.get("megaray"),
                "groups": _groups(engine),
                "losses": _train(engine, range(K + 1, 2 * K + 1), rank, world),
            }
            bn = _bn_engine(stage, world, seed=123)
            if mode == "resume1" and stage:  # the other entry point: convert first, then load the tag
                universal.load_engine(bn, ckpt, universal.convert(ckpt, "disc"))
            else:
                universal.load_engine_universal(bn, ckpt, "disc")
            res["bn"] = _bn_buffers(bn, [], rank, world)
            marker = Path(ckpt, universal_tag("model"), universal.MARKER)
            if marker.is_file():
                res["convert_s"] = json.loads(marker.read_text())["seconds"]
            if mode == "resume1":  # the control: step-3 weights, fresh optimizer and schedule
                w3 = torch.load(os.path.join(root, f"zero{stage}_w3.pt"))
                fresh = _engine(stage, world, seed=123, weights=w3)
                res["fresh_losses"] = _train(fresh, range(K + 1, 2 * K + 1), rank, world)
                res["fresh_weights"] = _weights(fresh)
        res["weights"] = _weights(engine)
        out[stage] = res
    if rank == 0:
        torch.save(out, os.path.join(root, f"{mode}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


#: imported once by the fork server, so each worker starts without paying for torch + DeepSpeed
PRELOAD = [
    "torch",
    "torch._dynamo",
    "deepspeed",
    "deepspeed.runtime.zero.muon.muon_optimizer",
    "megaray.families",
    "megaray.models.gpt",
    "megaray.train.engines",
    "megaray.train.universal",
]


def _spawn(world: int, mode: str, root: Path) -> dict:
    """``world`` workers forked from a fork server (a clean single-threaded process, unlike
    pytest's, with :data:`PRELOAD` imported: about 5 s of imports per worker saved)."""
    import multiprocessing

    import torch.multiprocessing as mp
    from conftest import free_port  # noqa: E402

    multiprocessing.set_forkserver_preload(PRELOAD)  # ignored if a fork server already runs
    mp.start_processes(
        _worker, args=(world, free_port(), mode, str(root)), nprocs=world, join=True, start_method="forkserver"
    )
    return torch.load(root / f"{mode}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Reference on 2 ranks (saves after step 3); conversion timed here for the 1-rank resume;
    the 3-rank resume converts its own copy of each checkpoint inside the workers."""
    root = tmp_path_factory.mktemp("universal")
    t0 = time.perf_counter()
    ref = _spawn(2, "reference", root)
    for stage in STAGES:
        shutil.copytree(root / f"zero{stage}", root / f"zero{stage}_copy")
    convert_s = {}
    for stage in STAGES[1:]:
        t = time.perf_counter()
        convert(str(root / f"zero{stage}"), "model")
        convert_s[stage] = time.perf_counter() - t
    one = _spawn(1, "resume1", root)
    three = _spawn(3, "resume3", root)
    print(
        f"\nuniversal checkpoints: whole run {time.perf_counter() - t0:.1f}s; conversion (2 ranks -> universal) "
        + ", ".join(f"ZeRO {s}: {v:.2f}s" for s, v in convert_s.items())
    )
    return {"ref": ref, 1: one, 3: three, "root": root}


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES, ids=lambda s: f"zero{s}")
@pytest.mark.parametrize("world", [1, 3], ids=lambda w: f"{w}ranks")
def test_resume_at_another_world_size(runs, stage, world):
    ref, got = runs["ref"][stage], runs[world][stage]
    diffs = [abs(a - b) for a, b in zip(ref["losses"], got["losses"])]
    wdiff = max((ref["weights"][n] - w).abs().max().item() for n, w in got["weights"].items())
    conversion = f", conversion {got['convert_s']:.2f}s" if "convert_s" in got else ""
    print(
        f"\nZeRO {stage}, 2 -> {world} ranks: loss diffs {[f'{d:.1e}' for d in diffs]}, max weight diff "
        f"{wdiff:.1e}, load {got['load_s']:.2f}s{conversion}"
    )
    assert len(got["losses"]) == K and max(diffs) < TOL, (ref["losses"], got["losses"])
    assert wdiff < TOL_W
    assert got["global_steps"] == K
    assert got["client"] == {"step": K, "world_size": 2}  # client_state comes back from the universal copy
    # every group keeps its own hyperparameters (DeepSpeed's ZeRO-3 universal load copies group 0's)
    # and the LR of step 3 (a fresh schedule would be back in its warmup)
    assert [g["weight_decay"] for g in got["groups"]] == [g["weight_decay"] for g in ref["groups"]] == [0.1, 0.0]
    assert [g["lr"] for g in got["groups"]] == pytest.approx([g["lr"] for g in ref["groups"]], rel=1e-12)
    assert [tuple(g["betas"]) for g in got["groups"]] == [tuple(g["betas"]) for g in ref["groups"]]
    # persistent buffers (BatchNorm running statistics; DeepSpeed's universal load skips them)
    assert got["bn"]["1.num_batches_tracked"].item() == K
    for name, buf in ref["bn"].items():
        assert torch.equal(buf, got["bn"][name]), name
    if stage == 0:
        assert not (runs["root"] / f"zero{stage}" / "model_universal").exists()
    else:
        folder = runs["root"] / f"zero{stage}{'_copy' if world == 3 else ''}"
        assert (folder / "model_universal" / universal.MARKER).is_file()


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES, ids=lambda s: f"zero{s}")
def test_a_fresh_optimizer_would_not_match(runs, stage):
    """The control: same step-3 weights, fresh AdamW and schedule. Step 4 (same weights, same
    batch) matches, so the data and weights line up; steps 5-6 differ by far more than TOL."""
    ref, got = runs["ref"][stage], runs[1][stage]
    diffs = [abs(a - b) for a, b in zip(ref["losses"], got["fresh_losses"])]
    wdiff = max((ref["weights"][n] - w).abs().max().item() for n, w in got["fresh_weights"].items())
    print(f"\nZeRO {stage}, fresh optimizer: loss diffs {[f'{d:.1e}' for d in diffs]}, max weight diff {wdiff:.1e}")
    assert diffs[0] < TOL
    assert max(diffs[1:]) > 20 * TOL and wdiff > 10 * TOL_W
