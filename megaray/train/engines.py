"""The DeepSpeed side of a run: config derived from :class:`megaray.config.RunConfig`, engines.

DeepSpeed owns the optimizer step, ZeRO partitioning (stages 0-3) and ZeRO-Offload, bf16 and fp16
(with its loss scaler), gradient accumulation, gradient clipping; any other DeepSpeed setting passes
through ``train.deepspeed`` (validated by DeepSpeed's config model on the driver); the LR schedule is :mod:`megaray.train.schedule` (linear warmup, cosine
decay to ``min_lr``), stepped and checkpointed by DeepSpeed. Each module of a task gets its own engine
with its own optimizer settings (``train.modules.<name>``). Reference: https://www.deepspeed.ai/docs/config-json/ and Ray's DeepSpeed example.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, Any, Dict, Iterable, Mapping, Tuple

import torch

from megaray.config import RunConfig
from megaray.errors import ConfigError
from megaray.train.schedule import warmup_cosine

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from megaray.tasks.base import Task

log = logging.getLogger("megaray.train")


def resolve_precision(requested: str, device: torch.device) -> str:
    """``"bf16"``, ``"fp16"`` or ``"fp32"`` for this device.

    ``auto`` is bf16 on CUDA devices that support it and fp32 elsewhere; the fp32 fallback is
    logged at WARNING so it is visible in the run log. Requesting ``bf16`` on CPU falls back too
    (DeepSpeed's CPU path trains in fp32), also logged. ``fp16`` (DeepSpeed's fp16 with its
    dynamic loss scaler) needs CUDA: DeepSpeed's CPU accelerator refuses it ("Type fp16 is not
    supported on your device"), so CPU falls back to fp32, logged.
    """
    if requested == "fp32":
        return "fp32"
    if requested == "fp16":
        if device.type == "cuda":
            return "fp16"
        log.warning("precision: fp16 unavailable (DeepSpeed's CPU accelerator has no fp16); training in fp32")
        return "fp32"
    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if bf16_ok:
        return "bf16"
    why = "CPU" if device.type != "cuda" else f"{torch.cuda.get_device_name(device)} lacks bf16"
    log.warning("precision: bf16 unavailable (%s); training in fp32 (requested %r)", why, requested)
    return "fp32"


#: DeepSpeed keys megaray derives from its own fields: ``train.deepspeed`` may not set them.
MANAGED = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "train.global_batch_size (the accumulation follows from it)",
    "gradient_clipping": "train.grad_clip",
    "zero_optimization.stage": "train.zero_stage",
    "bf16.enabled": "train.precision",
    "fp16.enabled": "train.precision",
    "optimizer": "train.lr / betas / weight_decay (megaray builds AdamW per module)",
    "scheduler": "train.warmup_steps / min_lr (megaray's warmup-cosine schedule)",
    "zero_optimization.offload_optimizer.device": "train.offload",
    "zero_optimization.offload_param.device": "train.offload",
}


def merge_user_config(ds: Dict[str, Any], user: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Deep-merge ``user`` (``train.deepspeed``) into the generated config ``ds`` in place and
    return it: mappings merge key by key, anything else replaces.

    Raises:
        ConfigError: ``user`` sets a key in :data:`MANAGED` (names it and the megaray field).
    """
    for key, value in user.items():
        path = f"{prefix}{key}"
        if path in MANAGED:
            raise ConfigError(f"train.deepspeed.{path}: megaray sets this from {MANAGED[path]}; set that instead")
        if isinstance(value, Mapping) and isinstance(ds.get(key), dict):
            merge_user_config(ds[key], value, path + ".")
        elif isinstance(value, Mapping):
            ds[key] = merge_user_config({}, value, path + ".")
        else:
            ds[key] = value
    return ds


class _Recorder(dict):
    """A dict that records which keys were looked up (to find the keys DeepSpeed never reads)."""

    def __init__(self, *args: Any, seen: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.seen = seen if seen is not None else set()

    def get(self, key: Any, *default: Any) -> Any:
        self.seen.add(key)
        return super().get(key, *default)

    def __getitem__(self, key: Any) -> Any:
        self.seen.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: Any) -> bool:
        self.seen.add(key)
        return super().__contains__(key)


def validate_deepspeed(cfg: RunConfig) -> Dict[str, Any]:
    """The run's DeepSpeed config as a worker would build it (at the largest world size, in the
    requested precision), checked by DeepSpeed's own config model (``DeepSpeedConfig``: pydantic
    sections that forbid unknown keys, its removed-key and sanity checks) and for top-level keys
    DeepSpeed never reads (a typo DeepSpeed would ignore). Run on the driver before any worker
    starts when ``train.deepspeed``, ``train.offload`` or fp16 is set.

    Raises:
        ConfigError: a managed key (:func:`merge_user_config`), a key DeepSpeed rejects or never
            reads (named, with the closest known key), or a value DeepSpeed refuses.
    """
    from megaray.config import suggest

    precision = cfg.train.precision if cfg.train.precision in ("bf16", "fp16") else "fp32"
    ds = deepspeed_config(cfg, precision)
    ds["zero_allow_untested_optimizer"] = True
    skip_cpu_op_builds() if not torch.cuda.is_available() else None
    from deepspeed.runtime.config import DeepSpeedConfig

    checked = _Recorder(ds)
    try:
        DeepSpeedConfig(checked)
    except Exception as e:  # DeepSpeedConfigError, pydantic ValidationError, AssertionError, ValueError
        errors = getattr(e, "errors", None)
        if callable(errors):  # pydantic: name the section's model, the key and the reason
            msg = "; ".join(
                f"{e.title}.{'.'.join(map(str, err['loc']))}: {err['msg']} (got {err.get('input')!r})"
                for err in errors()
            )
        else:
            msg = " ".join(str(e).split())
        raise ConfigError(f"train.deepspeed: DeepSpeed rejects the config: {msg[:600]}") from None
    unread = sorted(k for k in cfg.train.deepspeed if k not in checked.seen)
    if unread:
        known = sorted(k for k in checked.seen if isinstance(k, str))
        key = unread[0]
        raise ConfigError(
            f"train.deepspeed.{key}: not a DeepSpeed config key (DeepSpeed 0.19 would ignore it)"
            f"{suggest(key, known)}; see https://www.deepspeed.ai/docs/config-json/"
        )
    return ds


def deepspeed_config(cfg: RunConfig, precision: str) -> Dict[str, Any]:
    """The DeepSpeed JSON config for ``cfg`` (per engine; every module of a task shares it).

    Batch sizes: ``train_micro_batch_size_per_gpu`` = ``data.batch_size``,
    ``gradient_accumulation_steps`` = ``train.grad_accum_steps``; DeepSpeed derives
    ``train_batch_size`` from the world size. ``train.offload`` adds ZeRO-Offload's sections;
    ``train.deepspeed`` is merged last (:func:`merge_user_config`).

    Raises:
        ConfigError: ``train.deepspeed`` sets a key megaray manages.
    """
    t = cfg.train
    ds: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        # dynamic loss scaling (loss_scale 0) from 2^16, DeepSpeed's defaults, spelled out
        "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
        if precision == "fp16"
        else {"enabled": False},
        "steps_per_print": 10**9,  # megaray prints its own progress line
        "wall_clock_breakdown": False,
    }
    if t.zero_stage == 3:
        ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    if t.offload != "none":  # ZeRO-Offload (and, at stage 3, ZeRO-Infinity's CPU parameter offload)
        pin = torch.cuda.is_available()
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
        if t.offload == "all":
            ds["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": pin}
        # megaray's optimizer is torch's AdamW (DeepSpeed's CPUAdam needs a C++ build)
        ds["zero_force_ds_cpu_optimizer"] = False
    return merge_user_config(ds, t.deepspeed)


def build_engine(
    module: torch.nn.Module, param_groups: Iterable[dict], cfg: RunConfig, precision: str, name: str = "model"
) -> Tuple["DeepSpeedEngine", Dict[str, Any]]:
    """``deepspeed.initialize`` one module with AdamW (decay/no-decay groups) and the schedule.

    The module's optimizer settings are ``cfg.train.optim_for(name)``: ``train.modules.<name>``
    (lr, min_lr, betas, weight_decay) with unset fields from ``train.*``, so a GAN discriminator
    can have its own lr and betas. On CUDA the optimizer is DeepSpeed's fused AdamW (named in the
    config); elsewhere it is ``torch.optim.AdamW`` handed to DeepSpeed as a client optimizer
    (DeepSpeed's own CPU Adam needs a C++ build). ``train.grokfast`` attaches the Grokfast filter
    (:func:`megaray.train.grokfast.attach`); ``train.compile`` calls ``engine.compile()`` (DeepSpeed
    >= 0.14: ``torch.compile`` of the wrapped module, after ZeRO has set up its hooks). Returns
    ``(engine, ds_config)``.
    """
    deepspeed = import_deepspeed()
    ds = deepspeed_config(cfg, precision)
    groups = list(param_groups)
    opt = cfg.train.optim_for(name)
    betas = tuple(opt.betas)
    if torch.cuda.is_available():
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": opt.lr, "betas": list(betas), "weight_decay": opt.weight_decay},
        }
        optimizer = None
    else:
        ds["zero_allow_untested_optimizer"] = True
        optimizer = torch.optim.AdamW(groups, lr=opt.lr, betas=betas, weight_decay=opt.weight_decay)
    t = cfg.train
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        model_parameters=groups if optimizer is None else None,
        optimizer=optimizer,
        lr_scheduler=warmup_cosine(t.warmup_steps, t.max_steps, opt.min_lr / opt.lr),
        config=ds,
    )
    if t.grokfast is not None:  # filter gradients between backward and step (megaray.train.grokfast)
        from megaray.train.grokfast import attach

        attach(engine, t.grokfast.alpha, t.grokfast.lamb)
    if t.compile:  # nn.Module.compile in place: state_dict keys unchanged, checkpoints stay compatible
        engine.compile()
    return engine, ds


#: DeepSpeed's Muon optimizer module (deepspeed >= 0.18): ZeRO 1/2 import it in every gradient
#: reduction (``runtime/zero/stage_1_and_2.py``, ``average_tensor``) and in the optimizer check
#: (``runtime/zero/utils.py``, ``is_zero_supported_optimizer``)
MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"


def import_deepspeed() -> Any:
    """``import deepspeed`` for a training worker, without two imports megaray never uses that
    cost seconds of CPU in every worker's start-up, paid again by every restart of the group
    (``benchmarks/goodput.py``, BENCHMARKS.md "Start-up and restart"). Returns the module.

    * MLflow: ``deepspeed/autotuning/autotuner.py`` imports it when it can (``try: import mlflow``)
      for DeepSpeed's autotuner, which megaray does not run. While DeepSpeed imports, ``mlflow`` is
      unimportable (``sys.modules["mlflow"] = None``), so the autotuner takes it as not installed;
      megaray's own logging (rank 0, :mod:`megaray.train.mlflow`) imports MLflow as usual later.
      Skipped when MLflow is already imported.
    * ``torch.compile`` of DeepSpeed's Muon kernels: importing :data:`MUON_MODULE` decorates them
      with ``torch.compile``, which imports inductor's compiler (``torch._inductor.compile_fx``).
      Imported here with ``TORCHDYNAMO_DISABLE=1`` (read by ``torch/_dynamo/eval_frame.py``,
      ``_optimize``, when a function is decorated), the decorator leaves them plain functions.
      megaray's optimizer is AdamW (``train.deepspeed`` may not name another, :data:`MANAGED`), so
      they are never called; ``train.compile`` compiles the model as before (the variable is
      restored at once).

    Neither changes what is trained. A no-op once DeepSpeed is imported."""
    if "deepspeed" in sys.modules and MUON_MODULE in sys.modules:
        return sys.modules["deepspeed"]
    block = "mlflow" not in sys.modules
    if block:
        sys.modules["mlflow"] = None  # type: ignore[assignment]
    try:
        import deepspeed
    finally:
        if block and sys.modules.get("mlflow", 0) is None:
            del sys.modules["mlflow"]
    before = os.environ.get("TORCHDYNAMO_DISABLE")
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    try:
        __import__(MUON_MODULE)
    except ImportError:  # a DeepSpeed without Muon
        pass
    finally:
        if before is None:
            del os.environ["TORCHDYNAMO_DISABLE"]
        else:
            os.environ["TORCHDYNAMO_DISABLE"] = before
    return deepspeed


def skip_cpu_op_builds() -> None:
    """On a CPU-only worker, tell DeepSpeed that none of its C++ ops are available, before it
    first asks (``deepspeed.ops.__compatible_ops__``, probed lazily in ``deepspeed/ops/__init__.py``).

    Otherwise the first engine probes every op with compiler subprocesses and JIT-compiles the
    shared-memory all-reduce (``deepspeed_shm_comm``, ``deepspeed/comm/torch.py:build_shm_op``)
    with g++ in every fresh environment: tens of seconds per worker on a 2-core machine, for a
    kernel only DeepSpeed's inference all-reduce uses. megaray's CPU path needs none of them:
    gradients go through torch.distributed (gloo) and the optimizer is ``torch.optim.AdamW``."""
    import deepspeed.ops
    from deepspeed.ops.op_builder.all_ops import ALL_OPS

    if "__compatible_ops__" not in vars(deepspeed.ops):
        deepspeed.ops.__compatible_ops__ = dict.fromkeys(ALL_OPS, False)


def build_engines(
    task: "Task", modules: Mapping[str, torch.nn.Module], cfg: RunConfig, precision: str, device: torch.device
) -> Dict[str, "DeepSpeedEngine"]:
    """One DeepSpeed engine per trainable module of ``task`` (moved to ``device`` first), in the
    order the task returned them; groups from ``task.param_groups(name, module)``. The task sees
    each through :class:`megaray.tasks.base.Engine` (the part of DeepSpeed's surface it uses); the
    loop's parts use the rest (learning rate, gradient norm, checkpoints)."""
    import_deepspeed()  # before anything imports it: the lean import
    if device.type == "cpu":
        skip_cpu_op_builds()
    engines = {}
    for name, module in modules.items():
        module.to(device)
        engines[name], _ = build_engine(module, task.param_groups(name, module), cfg, precision, name)
    return engines
