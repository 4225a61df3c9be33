"""``model.activation_checkpointing: true`` in every family: the gradients equal those without it.

For each family (tiny preset, fp32, training mode, the same seed before each run so noise and
dropout draws repeat): one forward + backward with checkpointing off and one with it on; every
parameter's gradient must agree within atol 1e-6, and ``torch.utils.checkpoint.checkpoint`` must
really have run (counted through the name each family's code calls) while training, and not in
eval mode.
"""

from __future__ import annotations

import importlib
from typing import Callable, Dict, Tuple

import pytest
import torch

from megaray import families as registry

Case = Tuple[Dict, Callable[[torch.nn.Module], torch.Tensor], str]


def _lm_loss(model) -> torch.Tensor:
    idx = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    _, loss = model(idx, idx)
    return loss + model.aux_loss


def _recurrent_loss(model) -> torch.Tensor:
    idx = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    _, loss = model(idx, idx, num_steps=3)  # 1 iteration without gradients, 2 with (backprop_depth 2)
    return loss


def _multimodal_loss(model) -> torch.Tensor:
    cfg, g = model.config, torch.Generator().manual_seed(1)
    T = 16
    tokens = torch.randint(0, cfg.vocab_size, (2, T), generator=g)
    start = torch.tensor([3, -1])  # row 0: a bidirectional image span at 3 (the diffusion head's mask)
    tokens[0, 2], tokens[0, 3 + cfg.image_tokens] = model.BOI, model.EOI
    image = torch.rand(2, cfg.image_channels, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    batch = dict(
        tokens=tokens,
        targets=torch.randint(0, cfg.vocab_size, (2, T), generator=g),
        image=image,
        image_start=start,
        task=torch.tensor([4, 0]),
    )
    return model(batch)["loss"]


def _dit_loss(model) -> torch.Tensor:
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    return model(x, torch.tensor([5, 50]), torch.tensor([1, 2])).square().mean()


def _vocoder_loss(model) -> torch.Tensor:
    mel = torch.randn(2, model.cfg.n_mels, 9, generator=torch.Generator().manual_seed(1))
    wave, spec = model(mel)
    return wave.square().mean() + spec.abs().mean()


def _audio_vae_loss(model) -> torch.Tensor:
    mel = torch.randn(2, model.cfg.n_mels, 8, generator=torch.Generator().manual_seed(1))
    recon, mu, logvar = model(mel, speaker_id=torch.tensor([0, 3]))
    return (recon - mel).abs().mean() + mu.square().mean() + logvar.exp().mean()


def _image_vae_loss(model) -> torch.Tensor:
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    recon, posterior = model(x)
    return (recon - x).abs().mean() + posterior.kl().mean() * 1e-3


_COMMON = "megaray.models.common.checkpointing"
#: family -> (model section, loss of one forward, the module whose ``checkpoint`` name the family calls)
CASES: Dict[str, Case] = {
    "gpt": (dict(family="gpt", preset="debug", dropout=0.1), _lm_loss, "megaray.models.gpt.model"),
    "recurrent": (dict(family="recurrent", preset="debug", dropout=0.1), _recurrent_loss, _COMMON),
    "mamba": (dict(family="mamba", preset="debug", d_intermediate=32), _lm_loss, _COMMON),
    "ngpt": (dict(family="ngpt", preset="debug"), _lm_loss, _COMMON),
    "multimodal": (
        dict(
            family="multimodal",
            preset="debug",
            modalities=["text", "image"],
            continuous_head="diffusion",
            diffusion_timesteps=50,
            diffusion_sample_steps=5,
        ),
        _multimodal_loss,
        "megaray.models.multimodal.model",
    ),
    "dit": (dict(family="dit", preset="tiny", class_dropout_prob=0.5), _dit_loss, "megaray.models.diffusion.dit"),
    "vocoder": (dict(family="vocoder", preset="tiny_lightheaded_freq_domain_vocoder"), _vocoder_loss, _COMMON),
    "audio_vae": (dict(family="audio_vae", preset="tiny"), _audio_vae_loss, _COMMON),
    "image_vae": (dict(family="image_vae", preset="tiny", resolution=16), _image_vae_loss, _COMMON),
}


def test_every_registered_family_is_covered():
    assert sorted(CASES) == sorted(registry.registry())


def _build(section: Dict, flag: bool) -> torch.nn.Module:
    section = dict(section)
    family, preset = section.pop("family"), section.pop("preset")
    cls = registry.config_class(family)
    cfg = cls.from_name(preset, activation_checkpointing=flag, **section)
    torch.manual_seed(0)
    return registry.build_model(cfg)


@pytest.mark.parametrize("family", list(CASES))
def test_activation_checkpointing_gives_the_same_gradients(family, monkeypatch):
    section, loss_of, where = CASES[family]
    module = importlib.import_module(where)
    calls = []
    real = module.checkpoint
    monkeypatch.setattr(module, "checkpoint", lambda *a, **k: calls.append(k) or real(*a, **k))
    grads, losses = [], []
    for flag in (False, True):
        model = _build(section, flag).train()
        assert any(getattr(m, "activation_checkpointing", None) is flag for m in model.modules())
        torch.manual_seed(1)  # the same noise / dropout / timestep draws in both runs
        loss = loss_of(model)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        if not flag:
            assert not calls, "checkpointed although activation_checkpointing is off"
    assert calls and all(k.get("use_reentrant") is False for k in calls), (
        "activation_checkpointing: nothing checkpointed"
    )
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=0)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=name)
    calls.clear()
    with torch.no_grad():
        loss_of(model.eval())  # evaluation never checkpoints
    assert not calls
