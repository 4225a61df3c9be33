"""Every model config field changes something it claims to (issue 20: no accepted-but-ignored setting).

For every registered family (:func:`megaray.families.registry`) and every field of its config class
(``family`` and ``preset`` aside), the walk derives perturbed values from the field's type
(:func:`candidates`), validates each through the family's ``from_name`` on its smallest preset
(:data:`PRESETS`), and looks for an observable change, in order (:meth:`FamilyProbe.probes`):

1. the state-dict signature (names, shapes, dtypes) of the task's ``build_modules()`` (so a
   discriminator counts);
2. the forward outputs on the baseline config's example input (train mode with a fixed RNG seed, and
   eval mode), modules built from the same seed and jittered by seeded noise (zero-initialised gates
   would hide the blocks); a model that refuses the baseline's input but runs on its own counts (the
   field shapes the input it accepts);
3. the task's loss on a fixed synthetic batch with a fixed RNG, and its gradients;
4. where the family has one, a GAN ``train_step`` with stand-in engines (adversarial settings),
   generation (exit criteria, sampling steps) or DDIM sampling (the input shape).

A field passes when a valid perturbation changes one of them (each other option of a ``Literal``
must, one at a time). A field only meaningful together with another is tested on top of the
overrides in :data:`CONTEXT` (``"field"`` or ``"field=value"``; a string there says the value is
refused by design, which the test checks). A field that by design changes no output (a kernel
choice, recomputation, a data-side setting) is listed in :data:`NO_OUTPUT_EFFECT` with its reason
and the test proving its effect; the test then checks that megaray code outside the config modules
reads it, that the walk really sees no effect, and that the cited test exists. A real ignored field
not fixed yet goes to :data:`IGNORED` (a strict xfail). See docs/models.md ("Every config field has
an effect").

CPU only, no Ray; about 20 s on 2 cores.
"""

from __future__ import annotations

import functools
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, List, Literal, Optional, Sequence, Tuple, Union

import pytest
import torch
from helpers import StandInEngine
from pydantic import ValidationError

from megaray import families
from megaray.config import ModelConfig, RunConfig
from megaray.errors import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore:At least one mel filterbank has all zero values")

REPO = Path(__file__).resolve().parents[1]
SKIP = ("family", "preset")
#: a CONTEXT value replaced by the path of a local VGG16 ``features`` state_dict of random weights
VGG = "<VGG>"

#: each family's smallest preset
PRESETS = {
    "gpt": "debug",
    "ngpt": "debug",
    "mamba": "debug",
    "recurrent": "debug",
    "multimodal": "debug",
    "dit": "tiny",
    "vocoder": "tiny_lightheaded_freq_domain_vocoder",
    "audio_vae": "tiny",
    "image_vae": "tiny",
}

_MLA = {"attention": "mla", "position": "rope"}
_MOE = {"n_experts": 4}
_MOE_FIELDS = [k for k in families.config_class("gpt").model_fields if k.startswith("moe_")]
_GPT_CONTEXT: Dict[str, Union[Dict[str, Any], str]] = {
    **{k: _MOE for k in _MOE_FIELDS},  # every MoE knob is walked with MoE blocks on (router specifics below)
    "n_kv_heads": {"attention": "gqa"},
    "attention=gqa": {"n_kv_heads": 1},
    "attention=mla": {"position": "rope"},
    "kv_lora_rank": _MLA,
    "q_lora_rank": _MLA,
    "qk_rope_head_dim": _MLA,
    "qk_nope_head_dim": _MLA,
    "v_head_dim": _MLA,
    "rope_theta": {"position": "rope"},
    "mlp_conv_kernel": {"mlp": "convmlp"},
    "mlp_groups": {"mlp": "shufflemlp"},
    "init=admin": {"norm_placement": "post"},
    "moe_capacity_factor": {**_MOE, "moe_router": "expert_choice"},
    "moe_peer_key_dim": {**_MOE, "moe_router": "peer"},
    "moe_peer_batchnorm": {**_MOE, "moe_router": "peer"},
    "moe_expert_parallel": "refused: only 1 (no expert parallelism) is supported; docs/models.md 'Expert parallelism'",
}
_ADV = {"adversarial": True}
#: fields (``"field"``) or options (``"field=value"``) only meaningful with other settings: the walk tests
#: them with these overrides applied to the baseline and the perturbed config alike. A string instead of
#: overrides: the value is refused by the family's validation on purpose (checked), with the reason.
CONTEXT: Dict[str, Dict[str, Union[Dict[str, Any], str]]] = {
    "gpt": _GPT_CONTEXT,
    "recurrent": {
        **_GPT_CONTEXT,
        "n_layer": "refused: derived (n_prelude + n_core + n_coda); any other value is an error",
        "n_experts": "refused: MoE blocks are not supported by family 'recurrent'",
        "init=admin": "refused: admin profiles a fixed stack of blocks; family 'recurrent' supports init 'gpt2'",
        "max_inference_steps": {"recurrent_exit_criteria": "fixed"},  # the cap, when no criterion exits first
        **{k: "refused: MoE settings without MoE blocks (not supported by family 'recurrent')" for k in _MOE_FIELDS},
    },
    "multimodal": {
        **_GPT_CONTEXT,
        "init=admin": "refused: admin's profiling pass runs on text alone; family 'multimodal' supports init 'gpt2'",
        **{
            k: {"continuous_head": "diffusion"}
            for k in ("diffusion_timesteps", "diffusion_schedule", "diffusion_prediction", "diffusion_sample_steps")
        },
    },
    "mamba": {
        **{k: _MOE for k in families.config_class("mamba").model_fields if k.startswith("moe_")},
        "mlp": {"d_intermediate": 32},
        "moe_capacity_factor": {**_MOE, "moe_router": "expert_choice"},
    },
    "dit": {"text_vocab_size": {"context_dim": 16}},
    "vocoder": {
        "split_hz": {"head": "splitband"},
        **{
            k: _ADV
            for k in (
                "adv_start_step",
                "adv_weight",
                "fm_weight",
                "mpd_periods",
                "mpd_channels",
                "mrd_resolutions",
                "mrd_channels",
            )
        },
    },
    "audio_vae": {"time_strides": {"down_time": 4}, "speaker_vector_dim": {"speaker_source": "vector"}},
    "image_vae": {
        "perceptual_weight": {"lpips_vgg_path": VGG},
        **{k: _ADV for k in ("adv_start_step", "adv_weight", "disc_layers", "disc_channels")},
    },
}

#: fields that by design change no output of the walk's probes: ``{family: {field: "reason; proven by
#: tests/test_x.py::test_y"}}``. Checked: megaray reads the field outside the config modules, and the named
#: test exists. Keep it as short as honesty allows.
_CKPT = (
    "recomputes each block in backward (same math); proven by "
    "tests/test_activation_checkpointing.py::test_activation_checkpointing_gives_the_same_gradients"
)
_GPT_KERNEL = (
    "attention kernel choice (same math); proven by tests/test_gpt_components.py::test_sdpa_matches_reference "
    "and tests/test_gpt_components.py::test_flash_backend_errors_clearly_on_cpu"
)
_SEGMENT = (
    "data side: the training crop length; proven by "
    "tests/test_audio_data.py::test_audio_datasets_give_fixed_shape_aligned_crops"
)
_ANALYSIS = (
    "data side: must equal the shards' analysis setting (the mels come from the shards) and renders "
    "Griffin-Lim eval audio; proven by tests/test_config_fields.py::test_data_side_fields_are_checked_against_the_shards"
)
NO_OUTPUT_EFFECT: Dict[str, Dict[str, str]] = {
    "gpt": {"attn_backend": _GPT_KERNEL, "activation_checkpointing": _CKPT},
    "recurrent": {"attn_backend": _GPT_KERNEL, "activation_checkpointing": _CKPT},
    "multimodal": {
        "attn_backend": _GPT_KERNEL,
        "activation_checkpointing": _CKPT,
        "mel_mean": "data side: audio spans are (log_mel - mel_mean) / mel_std (data layout, generation de-normalises); "
        "proven by tests/test_multimodal_train.py::test_mel_crops_are_normalised_and_padded",
        "mel_std": "as mel_mean; proven by tests/test_multimodal_train.py::test_mel_crops_are_normalised_and_padded",
    },
    "ngpt": {
        "attn_backend": "attention kernel choice (same math); proven by "
        "tests/test_config_fields.py::test_ngpt_attention_backends_agree_and_each_is_used",
        "activation_checkpointing": _CKPT,
        "block_size": "RoPE model: the longest sequence (training windows, generation's context window); proven by "
        "tests/test_ngpt.py::test_causal_and_cached_generation_equals_recomputation",
    },
    "mamba": {
        "block_size": "no position table: the training window length and generation's context window; proven by "
        "tests/test_mamba.py::test_state_cache_decoding_equals_full_recomputation",
        "chunk_size": "SSD chunking of the same scan (same math); proven by "
        "tests/test_mamba.py::test_model_is_causal_and_chunk_size_does_not_change_logits",
        "ssd_backend": "scan kernel choice (same math; mamba_ssm needs CUDA); proven by "
        "tests/test_mamba.py::test_mamba_ssm_kernel_agrees_with_the_pytorch_scan",
        "activation_checkpointing": _CKPT,
    },
    "dit": {
        "attn_backend": "attention kernel choice (same math); proven by "
        "tests/test_common_attention.py::test_self_attention_causal_flag",
        "activation_checkpointing": _CKPT,
    },
    "vocoder": {"segment_samples": _SEGMENT, "activation_checkpointing": _CKPT},
    "audio_vae": {
        "sample_rate": _ANALYSIS,
        "n_fft": _ANALYSIS,
        "hop_length": _ANALYSIS,
        "segment_samples": _SEGMENT,
        "activation_checkpointing": _CKPT,
    },
    "image_vae": {
        "activation_checkpointing": _CKPT,
        "resolution": "data side: the training crop size (checked against the shards' stored size); proven by "
        "tests/test_config_fields.py::test_data_side_fields_are_checked_against_the_shards",
        "scaling_factor": "scales the latents `megaray prepare image-latents` writes for a DiT; proven by "
        "tests/test_diffusion_train.py::test_image_latents_are_the_vaes_scaled_means_of_every_image",
        "lpips_vgg_path": "a file path: its effect is the VGG weights it loads for perceptual_weight; proven by "
        "tests/test_image_vae.py::test_perceptual_loss_reads_local_vgg_weights_and_names_a_missing_path",
    },
}

#: real accepted-but-ignored fields not fixed yet: ``{family: {field: reason}}`` (strict xfail)
IGNORED: Dict[str, Dict[str, str]] = {}


@functools.cache
def _vgg_path() -> str:
    """A random VGG16 ``features`` state_dict in a temporary folder (removed at exit), for perceptual_weight."""
    import atexit
    import shutil
    import tempfile

    from torchvision.models.vgg import cfgs, make_layers

    folder = tempfile.mkdtemp(prefix="megaray-fields-")
    atexit.register(shutil.rmtree, folder, True)
    with torch.device("meta"):
        features = make_layers(cfgs["D"])
    g = torch.Generator().manual_seed(0)
    path = f"{folder}/vgg16_features.pth"
    torch.save(
        {f"features.{k}": torch.randn(v.shape, generator=g) * 0.05 for k, v in features.state_dict().items()}, path
    )
    return path


# --------------------------------------------------------------------------- candidates


def _is_literal(tp: Any) -> bool:
    return typing.get_origin(tp) is Literal


def _scalar_alternatives(tp: Any, value: Any) -> List[Any]:
    """Alternatives to ``value`` for an int / float / str / list type (one group: any may show the effect)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is int:
        if value is None:
            return [1, 2, 4, 8, 16, 32, 64, 128, 3]
        return [value * 2, value + 1, value // 2, value - 1, 1, 2, 3, 4, 8, 16]
    if tp is float:
        if value is None:
            return [0.5, 0.1, 2.0, 1000.0]
        return [value * 2, value + 1, value / 2, 0.5, 0.1, 1.0, 0.9]
    if tp is str:
        return [] if value is None else [value + "_x"]
    if origin in (list, List):
        (inner,) = args or (Any,)
        if value is None:  # an unset list: a few small shapes of its element type
            if inner is int:
                return [[4], [2, 2], [4, 1], [2], [8], [2, 4], [3]]
            return []
        out: List[Any] = []
        if inner is int or typing.get_origin(inner) in (list, List):
            dbl = (lambda x: [2 * y for y in x]) if inner is not int else (lambda x: 2 * x)
            out += [list(reversed(value)), value[:-1], value + value[-1:], [dbl(x) for x in value]]
            if inner is int:
                out += [[x + 1 for x in value], [math.prod(value)]]
        elif _is_literal(inner):
            out += [[x for x in value if x != drop] for drop in value]
        return [v for v in out if v != value and v != []]
    return []


def candidates(tp: Any, value: Any) -> List[Tuple[str, List[Any]]]:
    """Groups of perturbed values of a field of type ``tp`` now holding ``value``: ``[(label, values)]``.
    Each group must show an effect with one of its values that validates: every other option of a
    ``Literal`` is a group of its own; numbers, lists and ``None`` share one group ("any")."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        return [("any", [not value])]
    if _is_literal(tp):
        return [(f"={o}", [o]) for o in args if o != value]
    if origin is Union:
        groups: List[Tuple[str, List[Any]]] = []
        rest: List[Any] = []
        for a in args:
            if a is type(None):
                if value is not None:
                    rest.append(None)
            elif _is_literal(a):
                groups += [(f"={o}", [o]) for o in typing.get_args(a) if o != value]
            else:
                rest += _scalar_alternatives(a, value if _fits(a, value) else None)
        return groups + ([("any", rest)] if rest else [])
    alts = _scalar_alternatives(tp, value)
    return [("any", alts)] if alts else []


def _fits(tp: Any, value: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (list, List):
        return isinstance(value, list)
    if _is_literal(tp):
        return value in typing.get_args(tp)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp) if isinstance(tp, type) else False


# --------------------------------------------------------------------------- comparing


def same(a: Any, b: Any) -> bool:
    """Whether two probe results are equal: tensors by shape, dtype and ``torch.allclose`` within float32
    rounding of the same math (another attention kernel differs by ~4e-7 here; a setting's effect is larger)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.is_floating_point():
            return torch.allclose(a, b, rtol=1e-5, atol=1e-5, equal_nan=True)
        return torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-5) or (math.isnan(a) and math.isnan(b))
    return a == b


# --------------------------------------------------------------------------- probes


#: ``(label, probe(cfg, input_cfg) -> result)``: ``cfg`` builds the modules, ``input_cfg`` the example input
Probe = Tuple[str, Callable[[RunConfig, RunConfig], Any]]


@dataclass
class FamilyProbe:
    """How the walk observes one family.

    Attributes:
        config_class: the family's ModelConfig subclass; preset: the preset every config starts from.
        build: ``RunConfig -> {name: module}``, called after ``torch.manual_seed(0)``.
        forward: ``(modules, input_cfg) -> outputs`` on the family's example input for ``input_cfg``.
        loss_batch: ``input_cfg -> batch`` for ``task.loss`` (None: no loss probe).
        task: ``RunConfig -> Task`` (None: no loss probe).
        extra: further probes ``(label, (modules, cfg, input_cfg, task) -> outputs)`` (GAN step, generation).
        context: the family's :data:`CONTEXT` entries.
    """

    family: str
    config_class: type
    preset: Optional[str]
    build: Callable[[RunConfig], Dict[str, torch.nn.Module]]
    forward: Callable[[Dict[str, torch.nn.Module], RunConfig], Any]
    loss_batch: Optional[Callable[[RunConfig], Dict[str, torch.Tensor]]] = None
    task: Optional[Callable[[RunConfig], Any]] = None
    extra: Sequence[Tuple[str, Callable[..., Any]]] = ()
    context: Dict[str, Any] = field(default_factory=dict)

    def run_config(self, overrides: Dict[str, Any]) -> RunConfig:
        """A RunConfig of this family (raises ConfigError when the overrides do not validate)."""
        overrides = {k: _vgg_path() if v == VGG else v for k, v in overrides.items()}
        return RunConfig(name="walk", model=self.config_class.from_name(self.preset, **overrides))

    def modules(self, cfg: RunConfig) -> Dict[str, torch.nn.Module]:
        """The task's modules built after ``torch.manual_seed(0)``, every parameter then jittered by seeded
        N(0, 0.02^2) noise: adaLN-Zero, ReZero and zero-initialised heads start as identities or zeros,
        which would hide every setting of the blocks behind them."""
        torch.manual_seed(0)
        mods = self.build(cfg)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for m in mods.values():
                for p in m.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
        return mods

    def probes(self) -> List[Probe]:
        def signature(cfg, input_cfg):
            return {
                name: sorted((k, tuple(v.shape), str(v.dtype)) for k, v in m.state_dict().items())
                for name, m in self.modules(cfg).items()
            }

        def forward(cfg, input_cfg):
            mods = self.modules(cfg)
            for m in mods.values():
                m.train()
            torch.manual_seed(1)
            train = self.forward(mods, input_cfg)
            for m in mods.values():
                m.eval()
            torch.manual_seed(1)
            with torch.no_grad():
                return train, self.forward(mods, input_cfg)

        out: List[Probe] = [
            ("state-dict signature of build_modules()", signature),
            ("forward outputs (train mode seed 1, eval mode)", forward),
        ]
        if self.task is not None and self.loss_batch is not None:

            def loss(cfg, input_cfg):
                mods, task = self.modules(cfg), self.task(cfg)
                batch = self.loss_batch(input_cfg)
                torch.manual_seed(2)
                value, metrics = task.loss(mods["model"], batch)
                value.backward()
                grads = {n: p.grad for n, p in mods["model"].named_parameters() if p.grad is not None}
                return value.detach(), metrics, grads

            out.append(("task.loss on a fixed batch (seed 2) and its gradients", loss))
        for label, fn in self.extra:
            out.append((label, functools.partial(_extra, self, fn)))
        return out


def _extra(fam: FamilyProbe, fn: Callable[..., Any], cfg: RunConfig, input_cfg: RunConfig) -> Any:
    mods = fam.modules(cfg)
    torch.manual_seed(3)
    return fn(mods, cfg, input_cfg, fam.task(cfg) if fam.task else None)


@dataclass
class Outcome:
    """The walk's verdict on one group of perturbations of one field."""

    field: str
    group: str
    ok: bool
    tried: List[str]
    detail: str = ""
    refused: bool = False  #: the group is refused on purpose (CONTEXT): ``ok`` means validation refuses it


class Baseline:
    """Probe results of one base config, computed lazily and kept."""

    def __init__(self, fam: FamilyProbe, overrides: Dict[str, Any]):
        self.overrides = dict(overrides)
        self.cfg = fam.run_config(overrides)
        self.probes = fam.probes()
        self._results: Dict[int, Any] = {}

    def result(self, i: int) -> Any:
        if i not in self._results:
            self._results[i] = self.probes[i][1](self.cfg, self.cfg)
        return self._results[i]


_BASELINES: Dict[Tuple[str, str], Baseline] = {}


def baseline(fam: FamilyProbe, overrides: Dict[str, Any]) -> Baseline:
    key = (fam.family, repr(sorted(overrides.items())))
    if key not in _BASELINES:
        _BASELINES[key] = Baseline(fam, overrides)
    return _BASELINES[key]


def _context(fam: FamilyProbe, name: str, label: str) -> Optional[Union[Dict[str, Any], str]]:
    if label.startswith("="):
        hit = fam.context.get(f"{name}{label}")
        if hit is not None:
            return hit
    return fam.context.get(name)


def effect(fam: FamilyProbe, base: Baseline, overrides: Dict[str, Any]) -> Tuple[Optional[bool], str]:
    """Whether the config of ``overrides`` differs from ``base`` in a probe: ``(True, probe)``,
    ``(False, probes compared)``, or ``(None, why)`` when it does not validate or a probe raises."""
    try:
        cfg = fam.run_config(overrides)
    except (ConfigError, ValidationError) as e:
        return None, f"invalid ({' '.join(str(e).split())[:200]})"
    for i, (label, probe) in enumerate(base.probes):
        try:
            got = probe(cfg, base.cfg)  # the baseline's example input
        except Exception as e:  # noqa: BLE001 - reported, never hidden
            first = f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
            try:  # a field that shapes the input the model accepts: it must run on its own input
                probe(cfg, cfg)
            except Exception as e2:  # noqa: BLE001
                return None, f"{label} raised {type(e2).__name__}: {' '.join(str(e2).split())[:200]}"
            return True, f"{label}: refuses the baseline's input ({first}), runs on its own"
        if not same(base.result(i), got):
            return True, label
    return False, "; ".join(label for label, _ in base.probes)


def walk_field(fam: FamilyProbe, name: str) -> List[Outcome]:
    """Every candidate group of field ``name`` of ``fam``: an :class:`Outcome` each.

    A group's context (:data:`CONTEXT`) applies to the baseline and the perturbed config alike; when
    the baseline's own value of the field does not validate with it (an option that needs another
    setting, e.g. ``attention=gqa`` with ``n_kv_heads: 2``), the baseline is the plain preset."""
    info = fam.config_class.model_fields[name]
    plain = fam.config_class.from_name(fam.preset)
    groups = candidates(info.annotation, getattr(plain, name))
    if not groups:
        return [
            Outcome(
                name,
                "any",
                False,
                [],
                f"no perturbation derived from type {info.annotation}; "
                "add a rule to candidates() or list the field in NO_OUTPUT_EFFECT",
            )
        ]
    outcomes = []
    for label, values in groups:
        ctx = _context(fam, name, label)
        if isinstance(ctx, str):  # refused on purpose: check it is
            values = [v for v in values if v != getattr(plain, name)]
            refused = all(_refused(fam, {name: v}) for v in values)
            outcomes.append(
                Outcome(
                    name,
                    label,
                    refused,
                    [repr(v) for v in values],
                    "" if refused else f"CONTEXT says refused ({ctx}) but a value validates",
                    refused=True,
                )
            )
            continue
        ctx = dict(ctx or {})
        try:
            base = baseline(fam, ctx)
        except (ConfigError, ValidationError):
            base = baseline(fam, {})
        current = getattr(base.cfg.model, name)
        tried, seen, ok = [], [], False
        for v in values:
            if v == current or v in seen:
                continue
            seen.append(v)
            verdict, why = effect(fam, base, {**ctx, name: v})
            tried.append(f"{v!r}: {why}")
            if verdict:
                ok = True
                break
        if not ok and all(": invalid (" in t for t in tried):
            detail = "no perturbation validates; register the setting that makes it valid in CONTEXT"
        elif not ok:
            detail = "no probe changed"
        else:
            detail = ""
        outcomes.append(Outcome(name, label, ok, tried, detail))
    return outcomes


def _refused(fam: FamilyProbe, overrides: Dict[str, Any]) -> bool:
    try:
        fam.config_class.from_name(fam.preset, **overrides)
    except (ConfigError, ValidationError):
        return True
    return False


# --------------------------------------------------------------------------- static checks


@functools.cache
def _sources() -> Dict[str, str]:
    """``{path: text}`` of megaray's modules, the config modules aside (megaray/config.py and every
    megaray/models/*/config.py): reading a field in a validator is not using it."""
    out = {}
    for p in sorted((REPO / "megaray").rglob("*.py")):
        rel = p.relative_to(REPO).as_posix()
        if rel == "megaray/config.py" or re.fullmatch(r"megaray/models/[^/]+/config\.py", rel):
            continue
        out[rel] = p.read_text()
    return out


def readers(name: str) -> List[str]:
    """megaray modules (config modules aside) that read ``name``: ``.name`` or ``"name"``/``'name'``."""
    pattern = re.compile(rf"\.{re.escape(name)}\b|[\"']{re.escape(name)}[\"']")
    return [path for path, text in _sources().items() if pattern.search(text)]


def test_exists(ref: str) -> bool:
    """Whether ``tests/x.py::test_y`` names a test function that exists."""
    path, _, func = ref.partition("::")
    p = REPO / path
    return (
        bool(func)
        and p.is_file()
        and re.search(rf"^\s*(async\s+)?def {re.escape(func)}\(", p.read_text(), re.M) is not None
    )


test_exists.__test__ = False  # a helper, not a test


# --------------------------------------------------------------------------- the families' inputs


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _lm_batch(cfg) -> Dict[str, torch.Tensor]:
    ids = torch.randint(0, 100, (2, 17), generator=_gen())  # every preset's vocabulary is larger
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}


def _lm_forward(mods, cfg):
    b = _lm_batch(cfg)
    return mods["model"](b["input_ids"], b["targets"])


def _recurrent_generate(mods, cfg, input_cfg, task):
    model = mods["model"].eval()
    out = model.generate(_lm_batch(input_cfg)["input_ids"][:, :4], 3, generator=_gen(3))
    return out, float(model.last_mean_steps)


def _mm_batch(cfg) -> Dict[str, torch.Tensor]:
    """Row 0: text -> audio span (task 2); row 1: text -> image span (task 4); a modality the
    config lacks becomes a text row. Next-token targets outside span content (-100 there)."""
    m = cfg.model
    ids = m.special_ids()
    T = max(m.audio_tokens if "audio" in m.modalities else 0, m.image_tokens if "image" in m.modalities else 0) + 4
    rows, starts, tasks = [], {"audio": [-1, -1], "image": [-1, -1]}, []
    for r, (name, opener, closer, n, task) in enumerate(
        (
            ("audio", ids["<|audio|>"], ids["<|/audio|>"], m.audio_tokens, 2),
            ("image", ids["<|image|>"], ids["<|/image|>"], m.image_tokens, 4),
        )
    ):
        if name in m.modalities:
            seq = [5 + r, opener] + [0] * n + [closer]
            starts[name][r] = 2
            content = set(range(2, 2 + n))
            tasks.append(task)
        else:
            seq, content = [5 + r, 6, 7, 8], set()
            tasks.append(0)
        tokens = seq + [0] * (T - len(seq))
        targets = [-100] * T
        for t in range(len(seq) - 1):
            if t not in content and t + 1 not in content:
                targets[t] = seq[t + 1]
        rows.append((tokens, targets))
    g = _gen()
    return dict(
        tokens=torch.tensor([r[0] for r in rows]),
        targets=torch.tensor([r[1] for r in rows]),
        audio=torch.randn(2, m.n_mels, m.audio_frames, generator=g),
        audio_start=torch.tensor(starts["audio"]),
        audio_valid=torch.full((2,), m.audio_frames),
        image=torch.rand(2, m.image_channels, m.image_size, m.image_size, generator=g) * 2 - 1,
        image_start=torch.tensor(starts["image"]),
        task=torch.tensor(tasks),
    )


def _mm_forward(mods, cfg):
    return mods["model"](_mm_batch(cfg))


def _mm_generate(mods, cfg, input_cfg, task):
    model, out = mods["model"], []
    if "image" in cfg.model.modalities:
        out.append(model.generate_image(torch.tensor([[5, model.BOI]]), generator=_gen(3)))
    if "audio" in cfg.model.modalities:
        out.append(model.generate_audio(torch.tensor([[5, model.BOA]]), generator=_gen(3)))
    out.append(model.generate_text(torch.tensor([[5, 6]]), 3, generator=_gen(3)))
    return out


def _dit_inputs(cfg) -> Dict[str, Any]:
    m, g = cfg.model, _gen()
    H, W = m.grid_input
    out: Dict[str, Any] = {"x": torch.randn(2, m.in_channels, H, W, generator=g)}
    if m.num_classes:
        out["y"] = torch.tensor([0, 1]) % m.num_classes
    if m.context_dim and m.text_vocab_size:
        out["text_ids"] = torch.randint(1, min(m.text_vocab_size, 50), (2, 5), generator=g)
        out["text_mask"] = torch.ones(2, 5, dtype=torch.bool)
    elif m.context_dim:
        out["context"] = torch.randn(2, 5, m.context_dim, generator=g)
    return out


def _dit_forward(mods, cfg):
    b = _dit_inputs(cfg)
    ctx = b.get("text_ids", b.get("context"))
    return mods["model"](b["x"], torch.tensor([1, 3]), y=b.get("y"), context=ctx, context_mask=b.get("text_mask"))


def _dit_batch(cfg):
    return {k: v for k, v in _dit_inputs(cfg).items() if k != "context"}  # the task embeds text itself


def _dit_sample(mods, cfg, input_cfg, task):
    """Two DDIM steps from seeded noise of the configured input shape (what ``megaray sample`` draws)."""
    from megaray.tasks.diffusion import sample

    cond = {"y": [0, 1 % cfg.model.num_classes]} if cfg.model.num_classes else {"texts": ["ab", "cd"]}
    return sample(task, mods["model"].eval(), 2, cond, scale=1.5, steps=2, seed=3)


def _audio(n: int = 4096) -> torch.Tensor:
    """Two voiced-speech-like clips ``(2, n)`` at 16 kHz (harmonics of a vibrato f0, noise)."""
    g, t = _gen(), torch.arange(n) / 16000
    f0 = 140 + 30 * torch.sin(2 * math.pi * 3 * t)
    phase = 2 * math.pi * torch.cumsum(f0, 0) / 16000
    y = sum(torch.sin(k * phase) / k for k in range(1, 12)) * (0.5 + 0.5 * torch.sin(2 * math.pi * 2 * t).abs())
    y = torch.stack([y, y.roll(700)]) + 0.02 * torch.randn(2, n, generator=g)
    return 0.9 * y / y.abs().max()


def _vocoder_batch(cfg):
    """Audio and its log-mel by the analysis settings of ``cfg`` (what the shards would hold)."""
    from megaray.models.common.dsp import MelFeatures

    m, y = cfg.model, _audio()
    mel = MelFeatures(m.sample_rate, m.n_fft, m.hop_length, m.n_mels, m.win_length, m.f_min, m.f_max)(y)
    return {"audio": y, "mel": mel, "speaker_id": torch.tensor([0, 1])}


def _vocoder_forward(mods, cfg):
    b = _vocoder_batch(cfg)
    out = [mods["model"](b["mel"])]
    if "disc" in mods:
        out.append(mods["disc"](b["audio"]))
    return out


def _gan_step(mods, cfg, input_cfg, task):
    batch = _vocoder_batch(input_cfg) if cfg.model.family == "vocoder" else _image_batch(input_cfg)
    return task.train_step({k: StandInEngine(v, optim=None) for k, v in mods.items()}, batch, 0)  # no update


def _audio_vae_batch(cfg):
    m, g = cfg.model, _gen()
    out = {"mel": torch.randn(2, m.n_mels, 32, generator=g) - 4.0}
    if m.speaker_source == "vector":
        out["speaker_vector"] = torch.randn(2, m.speaker_vector_dim, generator=g)
    else:
        out["speaker_id"] = torch.tensor([0, 3])
    return out


def _audio_vae_forward(mods, cfg):
    b = _audio_vae_batch(cfg)
    return mods["model"](b.pop("mel"), **b)


def _image_batch(cfg):
    x = torch.rand(2, cfg.model.in_channels, 16, 16, generator=_gen()) * 2 - 1
    return {"image": x, "label": torch.zeros(2, dtype=torch.int64)}


def _image_vae_forward(mods, cfg):
    x = _image_batch(cfg)["image"]
    recon, post = mods["model"](x)
    out = [recon, post.mean, post.logvar]
    if "disc" in mods:
        out.append(mods["disc"](x))
    return out


def _task_of(family: str) -> Callable[[RunConfig], Any]:
    return lambda cfg: families.task_class(family)(cfg)


def _build_of(family: str) -> Callable[[RunConfig], Dict[str, torch.nn.Module]]:
    return lambda cfg: families.task_class(family)(cfg).build_modules()


_LM = dict(forward=_lm_forward, loss_batch=_lm_batch)
_SHAPES: Dict[str, Dict[str, Any]] = {
    "gpt": _LM,
    "ngpt": _LM,
    "mamba": _LM,
    "recurrent": dict(_LM, extra=(("generate() (seed 3): tokens and mean depth", _recurrent_generate),)),
    "multimodal": dict(
        forward=_mm_forward, loss_batch=_mm_batch, extra=(("generate_image/audio/text (seed 3)", _mm_generate),)
    ),
    "dit": dict(
        forward=_dit_forward,
        loss_batch=_dit_batch,
        extra=(("sample(): 2 DDIM steps from seeded noise (seed 3)", _dit_sample),),
    ),
    "vocoder": dict(
        forward=_vocoder_forward,
        loss_batch=_vocoder_batch,
        extra=(("train_step at step 0 with stand-in engines (GAN terms)", _gan_step),),
    ),
    "audio_vae": dict(forward=_audio_vae_forward, loss_batch=_audio_vae_batch),
    "image_vae": dict(
        forward=_image_vae_forward,
        loss_batch=_image_batch,
        extra=(("train_step at step 0 with stand-in engines (GAN terms)", _gan_step),),
    ),
}


@functools.cache
def family_probe(family: str) -> FamilyProbe:
    return FamilyProbe(
        family=family,
        config_class=families.config_class(family),
        preset=PRESETS[family],
        build=_build_of(family),
        task=_task_of(family),
        context=CONTEXT.get(family, {}),
        **_SHAPES[family],
    )


def _fields() -> List[Tuple[str, str]]:
    out = []
    for family in sorted(families.registry()):
        cls = families.config_class(family)
        out += [(family, name) for name in cls.model_fields if name not in SKIP]
    return out


# --------------------------------------------------------------------------- the tests

FIELDS = _fields()


def _walk_ids(item: Tuple[str, str]) -> str:
    return f"{item[0]}.{item[1]}"


@pytest.mark.parametrize("family,name", FIELDS, ids=[_walk_ids(f) for f in FIELDS])
def test_every_config_field_changes_something(family, name, request):
    """Each field (each option of a Literal) changes a probe, or is in NO_OUTPUT_EFFECT (checked below)."""
    if name in NO_OUTPUT_EFFECT.get(family, {}):
        pytest.skip("in NO_OUTPUT_EFFECT: checked by test_no_output_effect_fields_are_read_and_proven")
    if name in IGNORED.get(family, {}):
        request.applymarker(pytest.mark.xfail(strict=True, reason=IGNORED[family][name]))
    bad = [o for o in walk_field(family_probe(family), name) if not o.ok]
    assert not bad, "\n".join(
        f"{family}.{name}{'' if o.group == 'any' else o.group}: {o.detail} (accepted but ignored?). Tried "
        f"(value: what happened):\n    "
        + "\n    ".join(o.tried or ["nothing"])
        + "\n  Make the setting take effect, refuse it in validation, or register it in CONTEXT / NO_OUTPUT_EFFECT "
        "(tests/test_config_fields.py; docs/models.md)"
        for o in bad
    )


@pytest.mark.parametrize("family", sorted(NO_OUTPUT_EFFECT))
def test_no_output_effect_fields_are_read_and_proven(family):
    """Every NO_OUTPUT_EFFECT entry names a real field that megaray reads outside the config modules, whose
    perturbations the walk really sees no effect of (else the entry is stale), and every test it cites exists."""
    cls = families.config_class(family)
    for name, reason in NO_OUTPUT_EFFECT[family].items():
        assert name in cls.model_fields, f"NO_OUTPUT_EFFECT[{family!r}] names {name!r}, not a field of {cls.__name__}"
        seen = [o for o in walk_field(family_probe(family), name) if o.ok and not o.refused]
        assert not seen, (
            f"{family}.{name} is in NO_OUTPUT_EFFECT but changes a probe ({seen[0].tried[-1]}): remove the entry"
        )
        assert readers(name), (
            f"{family}.{name} is in NO_OUTPUT_EFFECT ({reason}) but nothing in megaray/ outside "
            "the config modules reads it: an accepted-but-ignored setting"
        )
        refs = re.findall(r"tests/[\w/]+\.py::\w+", reason)
        assert refs, f"NO_OUTPUT_EFFECT[{family!r}][{name!r}] cites no test (tests/x.py::test_y): {reason}"
        for ref in refs:
            assert test_exists(ref), f"NO_OUTPUT_EFFECT[{family!r}][{name!r}] cites {ref}, which does not exist"


@pytest.mark.parametrize("family", sorted(PRESETS))
def test_probes_are_deterministic(family):
    """The same config gives the same probe results twice (else every field would seem to matter)."""
    fam = family_probe(family)
    first, second = Baseline(fam, {}), Baseline(fam, {})
    for i, (label, _) in enumerate(first.probes):
        assert same(first.result(i), second.result(i)), f"{family}: {label} differs between two identical runs"


def test_the_tables_name_real_families_and_fields():
    known = families.registry()
    for table in (CONTEXT, NO_OUTPUT_EFFECT, IGNORED):
        for family, entries in table.items():
            assert family in known, f"unknown family {family!r}"
            fields = families.config_class(family).model_fields
            for key in entries:
                assert key.partition("=")[0] in fields, f"{family}: {key!r} is not a field"
    assert sorted(PRESETS) == sorted(known), "every registered family needs a preset (and probes) here"


# --------------------------------------------------------------------------- the walker can fail


class _ToyConfig(ModelConfig):
    """A toy family: ``width`` shapes the network; ``unused_toy_knob`` is read by nothing."""

    PRESETS: ClassVar[Dict[str, Dict[str, Any]]] = {"toy": {}}
    family: Literal["toy"] = "toy"
    width: int = 4
    activation: Literal["relu", "tanh"] = "relu"
    unused_toy_knob: float = 1.0


def _toy_probe() -> FamilyProbe:
    def build(cfg):
        m = cfg.model
        return {
            "model": torch.nn.Sequential(
                torch.nn.Linear(3, m.width), torch.nn.ReLU() if m.activation == "relu" else torch.nn.Tanh()
            )
        }

    return FamilyProbe(
        family="toy",
        config_class=_ToyConfig,
        preset="toy",
        build=build,
        forward=lambda mods, input_cfg: mods["model"](torch.randn(2, 3, generator=_gen())),
    )


def test_the_walker_finds_a_field_that_nothing_reads():
    fam = _toy_probe()
    assert all(o.ok for o in walk_field(fam, "width") + walk_field(fam, "activation"))
    (out,) = walk_field(fam, "unused_toy_knob")
    assert not out.ok and out.detail == "no probe changed" and out.tried and all(": state-dict" in t for t in out.tried)
    assert not readers("unused_toy_knob")  # and the static check of NO_OUTPUT_EFFECT would refuse it
    assert readers("attn_backend") and not test_exists("tests/test_config_fields.py::test_no_such_test")


# --------------------------------------------------------------------------- proofs the tables cite


def test_ngpt_attention_backends_agree_and_each_is_used(monkeypatch):
    """nGPT's ``attn_backend`` picks its attention kernel: sdpa and the reference agree (same math)."""
    from megaray.models.ngpt import model as ngpt_model

    calls = []
    for name in ("sdpa_attention", "reference_attention"):  # the kernels, counted (bound at construction)
        real = getattr(ngpt_model, name)
        monkeypatch.setattr(
            ngpt_model, name, functools.partial(lambda r, n, *a, **k: calls.append(n) or r(*a, **k), real, name)
        )
    outs = {}
    for backend in ("sdpa", "reference"):
        calls.clear()
        torch.manual_seed(0)
        model = families.build_model(families.config_class("ngpt").from_name("debug", attn_backend=backend)).eval()
        with torch.no_grad():
            outs[backend] = model(torch.randint(0, 100, (2, 12), generator=_gen()))
        assert calls and set(calls) == {f"{backend}_attention"}
    torch.testing.assert_close(outs["sdpa"], outs["reference"], atol=1e-5, rtol=1e-5)


def test_data_side_fields_are_checked_against_the_shards(tmp_path):
    """The audio VAE's analysis settings and the image VAE's crop size must match the prepared shards
    (the ConfigError names the key and both values); no Ray."""
    from megaray.data.manifest import new_manifest, write_manifest
    from megaray.families import build_run_config

    audio = tmp_path / "speech"
    for split in ("train", "val"):
        (audio / split).mkdir(parents=True)
    write_manifest(
        str(audio),
        new_manifest(
            "audio",
            sample_rate=16000,
            n_mels=80,
            n_fft=512,
            hop_length=128,
            clips=2,
            speakers={},
            splits={"train": {"dir": "train", "clips": 1}, "val": {"dir": "val", "clips": 1}},
        ),
    )
    for key, value in (("sample_rate", 22050), ("n_fft", 1024), ("hop_length", 256)):
        seg = {"segment_samples": 8192} if key != "hop_length" else {}
        cfg = build_run_config(
            {"model": {"family": "audio_vae", "preset": "tiny", key: value, **seg}, "data": {"shards": str(audio)}}
        )
        with pytest.raises(ConfigError, match=rf"model.{key}: .*{key}={value} .*{key}="):
            families.task_class("audio_vae")(cfg).datasets()

    images = tmp_path / "images"
    for split in ("train", "val"):
        (images / split).mkdir(parents=True)
    write_manifest(
        str(images),
        new_manifest(
            "images", size=16, splits={"train": {"dir": "train", "images": 1}, "val": {"dir": "val", "images": 1}}
        ),
    )
    cfg = build_run_config(
        {"model": {"family": "image_vae", "preset": "tiny", "resolution": 32}, "data": {"shards": str(images)}}
    )
    with pytest.raises(ConfigError, match=r"model.resolution: 32 px crops .* prepared at 16"):
        families.task_class("image_vae")(cfg).datasets()
