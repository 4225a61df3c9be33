"""The multimodal transformer (pure torch): attention masks by perturbation, per-modality losses,
generation shapes, an overfit of (caption, image) pairs, and config validation."""

from __future__ import annotations

import pytest
import torch

from megaray.errors import ConfigError
from megaray.families import build_model, build_run_config, spec
from megaray.models.multimodal.config import MultimodalConfig
from megaray.models.multimodal.model import MultimodalTransformer

HEADS = ["regression", "diffusion"]
EOT = 1


def _model(head: str, seed: int = 0, **kw) -> MultimodalTransformer:
    torch.manual_seed(seed)
    return MultimodalTransformer(MultimodalConfig.from_name("tiny", continuous_head=head, **kw)).eval()


def _row(model, kind: str, text, T: int):
    """One batch row in the API note's layouts: ``kind`` is ``image->text``, ``text->image``,
    ``audio->text``, ``text->audio`` or ``text``. Returns (tokens, targets, span start, task)."""
    cfg = model.config
    n_img, n_aud = cfg.image_tokens, cfg.audio_tokens
    if kind == "image->text":
        seq, start, task = [model.BOI] + [0] * n_img + [model.EOI] + list(text) + [EOT], 1, 3
    elif kind == "text->image":
        seq, start, task = list(text) + [model.BOI] + [0] * n_img + [model.EOI], len(text) + 1, 4
    elif kind == "audio->text":
        seq, start, task = [model.BOA] + [0] * n_aud + [model.EOA] + list(text) + [EOT], 1, 1
    elif kind == "text->audio":
        seq, start, task = list(text) + [model.BOA] + [0] * n_aud + [model.EOA], len(text) + 1, 2
    else:
        seq, start, task = list(text), -1, 0
    content = set(range(start, start + (n_img if "image" in kind else n_aud))) if start >= 0 else set()
    tokens = seq + [0] * (T - len(seq))
    targets = [-100] * T
    for t in range(len(seq) - 1):  # next token, never into or out of span content
        if t not in content and t + 1 not in content:
            targets[t] = seq[t + 1]
    return tokens, targets, start, task


def _batch(model, rows, images=None, audio=None, T: int = 48):
    """``rows``: list of (kind, text ids). Builds the batch dict of the API note."""
    cfg, B = model.config, len(rows)
    built = [_row(model, kind, text, T) for kind, text in rows]
    g = torch.Generator().manual_seed(1)
    if images is None:
        images = torch.rand(B, cfg.image_channels, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    img_start = [s if "image" in k else -1 for (k, _), (_, _, s, _) in zip(rows, built)]
    aud_start = [s if "audio" in k else -1 for (k, _), (_, _, s, _) in zip(rows, built)]
    return dict(
        tokens=torch.tensor([b[0] for b in built]),
        targets=torch.tensor([b[1] for b in built]),
        image=images,
        image_start=torch.tensor(img_start),
        task=torch.tensor([b[3] for b in built]),
        audio=audio if audio is not None else torch.randn(B, cfg.n_mels, cfg.audio_frames, generator=g),
        audio_start=torch.tensor(aud_start),
        audio_valid=torch.full((B,), cfg.audio_frames),
    )


def _hidden(model, batch, **kw):
    with torch.no_grad():
        return model.hidden(
            batch["tokens"], batch["audio"], batch["audio_start"], batch["image"], batch["image_start"], **kw
        )


# ----------------------------------------------------------------------------- attention masks


@pytest.mark.parametrize("head", HEADS)
def test_a_later_text_token_never_changes_an_earlier_output(head):
    model = _model(head)
    batch = _batch(model, [("text->image", [5, 6, 7, 8, 9, 10])])
    k = 4  # a caption token before the image span
    h0 = _hidden(model, batch)
    batch["tokens"][0, k] = 77
    h1 = _hidden(model, batch)
    changed = (h1 - h0).abs().amax(-1)[0]  # (T,)
    assert torch.equal(h0[0, :k], h1[0, :k])
    assert bool((changed[k : k + 30] > 0).all())  # the token itself, the image span and the rest see it


def _perturb_one_patch(model, batch, row: int, patch: int):
    """Change the pixels of one image patch; returns its sequence position."""
    cfg = model.config
    r, c = divmod(patch, cfg.image_grid)
    s = cfg.patch_size
    batch["image"][row, :, r * s : (r + 1) * s, c * s : (c + 1) * s] += 0.5
    return int(batch["image_start"][row]) + patch


def test_diffusion_span_token_sees_the_whole_span_and_nothing_after_it():
    model = _model("diffusion")
    batch = _batch(model, [("text->image", [5, 6, 7, 8])])
    t = torch.tensor([300])
    start, n = int(batch["image_start"][0]), model.config.image_tokens
    h0 = _hidden(model, batch, image_t=t)
    p = _perturb_one_patch(model, batch, 0, 5)
    h1 = _hidden(model, batch, image_t=t)
    changed = (h1 - h0).abs().amax(-1)[0] > 0
    assert not changed[:start].any()  # the caption and <|image|> before the span
    assert changed[start : start + n].all()  # every position of the span, before and after p
    assert changed[start + n : start + n + 5].all()  # <|/image|> and after
    # and a later text token does not reach back into the span
    h2 = _hidden(model, batch, image_t=t)
    batch["tokens"][0, start + n + 1] = 99
    h3 = _hidden(model, batch, image_t=t)
    assert torch.equal(h2[0, : start + n + 1], h3[0, : start + n + 1])
    assert p > start


def test_regression_image_span_is_causal():
    model = _model("regression")
    batch = _batch(model, [("text->image", [5, 6, 7, 8])])
    h0 = _hidden(model, batch)
    p = _perturb_one_patch(model, batch, 0, 5)
    h1 = _hidden(model, batch)
    changed = (h1 - h0).abs().amax(-1)[0] > 0
    assert not changed[:p].any()  # earlier patches do not see a later one
    assert changed[p : p + 10].all()


# ----------------------------------------------------------------------------- losses


@pytest.mark.parametrize("head", HEADS)
def test_losses_are_finite_and_present_per_modality(head):
    model = _model(head).train()
    rows = [
        ("text->image", [5, 6, 7]),
        ("image->text", [5, 6, 8]),
        ("text->audio", [9, 10]),
        ("audio->text", [9, 11]),
        ("text", list(range(20, 60))),
    ]
    out = model(_batch(model, rows))
    for name in ("text", "audio", "image"):
        assert torch.isfinite(out[f"loss/{name}"]) and out[f"loss/{name}"] > 0, name
    cfg = model.config
    # only the from-text rows carry span losses; the to-text rows' spans are conditions
    assert out["count/image"] == cfg.image_tokens and out["count/audio"] == cfg.audio_tokens
    expected = sum((torch.tensor(_row(model, k, t, 48)[1]) != -100).sum() for k, t in rows)
    assert out["count/text"] == expected
    total = out["loss/text"] + out["loss/audio"] + out["loss/image"]
    assert torch.allclose(out["loss"], total)
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("head", HEADS)
def test_a_batch_without_audio_has_zero_audio_loss_and_count(head):
    model = _model(head).train()
    out = model(_batch(model, [("text->image", [5, 6, 7]), ("text", [3, 4, 5, 6])]))
    assert float(out["loss/audio"]) == 0.0 and float(out["count/audio"]) == 0.0
    assert float(out["count/image"]) > 0 and torch.isfinite(out["loss"])


def test_audio_loss_ignores_frames_past_audio_valid():
    model = _model("regression").train()
    batch = _batch(model, [("text->audio", [9, 10])])
    batch["audio_valid"] = torch.tensor([model.config.audio_frames // 2])
    before = model(batch)["loss/audio"]
    batch["audio"][0, :, model.config.audio_frames // 2 :] += 100.0  # only invalid frames change
    assert torch.allclose(model(batch)["loss/audio"], before)
    assert model(batch)["count/audio"] == model.config.audio_tokens // 2


# ----------------------------------------------------------------------------- generation


@pytest.mark.parametrize("head", HEADS)
def test_generation_returns_finite_tensors_of_the_right_shapes(head):
    model = _model(head)
    cfg = model.config
    img = model.generate_image(torch.tensor([[5, 6, 7, model.BOI]]), generator=torch.Generator().manual_seed(0))
    aud = model.generate_audio(torch.tensor([[9, 10, model.BOA]]), generator=torch.Generator().manual_seed(0))
    assert img.shape == (1, cfg.image_channels, cfg.image_size, cfg.image_size) and img.dtype == torch.float32
    assert aud.shape == (1, cfg.n_mels, cfg.audio_frames) and aud.dtype == torch.float32
    assert torch.isfinite(img).all() and torch.isfinite(aud).all()
    prompt = torch.tensor([[model.BOI] + [0] * cfg.image_tokens + [model.EOI]])
    out = model.generate_text(prompt, 6, image=img, image_start=torch.tensor([1]))
    assert out.shape == (1, prompt.size(1) + 6) and out.dtype == torch.int64
    assert torch.equal(out[:, : prompt.size(1)], prompt) and int(out[:, prompt.size(1) :].max()) < cfg.vocab_size
    # the KV-cached tokens are the greedy argmax of a full forward over the generated sequence
    with torch.no_grad():
        logits = model.lm_head(model.hidden(out, image=img, image_start=torch.tensor([1])))[:, :, : cfg.vocab_size]
    assert torch.equal(logits[0, prompt.size(1) - 1 : -1].argmax(-1), out[0, prompt.size(1) :])
    first = int(out[0, prompt.size(1)])  # stop_id ends generation once produced
    stopped = model.generate_text(prompt, 6, image=img, image_start=torch.tensor([1]), stop_id=first)
    assert torch.equal(stopped, out[:, : prompt.size(1) + 1])
    with pytest.raises(ValueError, match="must end with"):
        model.generate_image(torch.tensor([[5, 6]]))


def test_regression_generation_matches_a_teacher_forced_forward():
    model = _model("regression")
    prompt = torch.tensor([[5, 6, 7, model.BOI]])
    img = model.generate_image(prompt)
    tokens = torch.cat([prompt, torch.zeros(1, model.config.image_tokens, dtype=torch.long)], dim=1)
    with torch.no_grad():
        h = model.hidden(tokens, image=img, image_start=torch.tensor([4]))
        pred = model.spans["image"].predict(h[:, 3:-1])  # h[p - 1] predicts patch p
    assert torch.allclose(model.patchify("image", img), pred, atol=1e-5)


# ----------------------------------------------------------------------------- overfit


COLOURS = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0], [1.0, 1.0, -1.0]])


@pytest.mark.parametrize("head", HEADS)
def test_a_tiny_model_overfits_caption_image_pairs(head):
    """4 captions ("a photo of <colour>") with solid-colour images, in both layouts: 150 Adam steps
    halve loss/text and loss/image (measured on the same draw of diffusion noise and timesteps),
    and the image generated from each caption is nearest to that caption's colour (not exact: the
    regression head's patch-by-patch generation drifts, e.g. red ends near (0.66, -1.21, -0.61))."""
    model = _model(head).train()
    cfg = model.config
    captions = [[10, 11, 12, 20 + i] for i in range(4)]
    rows = [("text->image", c) for c in captions] + [("image->text", c) for c in captions]
    images = COLOURS[[0, 1, 2, 3, 0, 1, 2, 3]][:, :, None, None].expand(-1, -1, cfg.image_size, cfg.image_size).clone()
    batch = _batch(model, rows, images=images, T=32)

    def measure():
        torch.manual_seed(123)
        with torch.no_grad():
            out = model(batch)
        return {k: float(out[k]) for k in ("loss/text", "loss/image")}

    first = measure()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = measure()
    assert last["loss/text"] < first["loss/text"] / 2, (first, last)
    assert last["loss/image"] < first["loss/image"] / 2, (first, last)
    for i, caption in enumerate(captions):  # each caption generates an image nearest to its own colour
        img = model.generate_image(torch.tensor([caption + [model.BOI]]), generator=torch.Generator().manual_seed(0))
        mean = img.mean(dim=(2, 3))  # (1, 3)
        assert int(torch.cdist(mean, COLOURS).argmin()) == i, (i, mean)


# ----------------------------------------------------------------------------- config


def test_an_unknown_modality_is_a_config_error_naming_it_and_the_valid_ones():
    with pytest.raises(ConfigError, match=r"model\.modalities.*'video'.*text, audio, image"):
        build_run_config({"model": {"family": "multimodal", "preset": "tiny", "modalities": ["text", "video"]}})


@pytest.mark.parametrize("preset", sorted(MultimodalConfig.PRESETS))
def test_presets_validate_and_the_longest_layout_must_fit_block_size(preset):
    cfg = MultimodalConfig.from_name(preset)
    longest = max(cfg.audio_tokens, cfg.image_tokens) + 2 + 2
    assert longest <= cfg.block_size
    assert cfg.special_ids()["<|/image|>"] == cfg.vocab_size + 3 and cfg.full_vocab_size == cfg.vocab_size + 4
    with pytest.raises(ConfigError, match="block_size"):
        MultimodalConfig.from_name(preset, block_size=longest - 1)
    MultimodalConfig.from_name(preset, block_size=longest)


def test_the_family_builds_from_yaml_and_names_its_task():
    run = build_run_config({"model": {"family": "multimodal", "preset": "tiny", "modalities": ["text", "audio"]}})
    model = build_model(run.model)
    assert isinstance(model, MultimodalTransformer) and set(model.spans) == {"audio"}
    assert spec("multimodal").task == "megaray.tasks.multimodal:MultimodalTask"
    with pytest.raises(ConfigError, match="multiple of audio_patch"):
        MultimodalConfig.from_name("tiny", audio_frames=30)


@pytest.mark.gpu
def test_bf16_training_step_and_generation_on_cuda_are_finite():
    model = _model("diffusion").cuda().train()
    rows = [("text->image", [5, 6, 7]), ("audio->text", [9, 11]), ("text", [3, 4, 5])]
    batch = {k: v.cuda() for k, v in _batch(model, rows).items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(batch)
    out["loss"].backward()
    assert all(torch.isfinite(out[k]) for k in ("loss", "loss/text", "loss/audio", "loss/image"))
    img = model.generate_image(torch.tensor([[5, 6, model.BOI]], device="cuda"))
    assert img.is_cuda and torch.isfinite(img).all()


def test_every_parameter_gets_a_gradient_when_a_batch_lacks_a_modality():
    """Ranks whose micro-batches hold different modalities must produce gradients for the same
    parameters (ZeRO's gradient buckets and gloo's all-reduce need equal sizes): a text-only batch
    gives every span adapter and head a (zero) gradient."""
    for head in ("regression", "diffusion"):
        model = MultimodalTransformer(MultimodalConfig.from_name("debug", continuous_head=head))
        T = model.config.block_size
        tokens = torch.randint(0, model.config.vocab_size, (2, T))
        batch = {
            "tokens": tokens,
            "targets": tokens.roll(-1, 1),
            "audio_start": torch.full((2,), -1),
            "image_start": torch.full((2,), -1),
        }
        model(batch)["loss"].backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert missing == [], (head, missing)
        span_grads = [p.grad for n, p in model.named_parameters() if n.startswith("spans.")]
        assert span_grads and all(float(g.abs().sum()) == 0 for g in span_grads)
