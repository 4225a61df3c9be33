"""The multimodal family's data and training: a weighted text / speech / image mixture laid out as
interleaved sequences, 2 Ray Train workers, per-modality losses in MLflow, exact resume after a crash.

The first tests use no corpus; the next ones read the session's test corpora (``text_shards``,
``speech_shards``, ``image_shards``; the last two are prepared with Ray) with pyarrow and call the
map function and the task's hooks directly; the end-to-end run is one crash and one re-run (each
claim checked on it: per-modality metrics in MLflow, artifacts, checkpoint files, resume at the next
unseen mixed batch with the same loss). Measured on the 2-core machine: about 76 s in all, 51 s of
it the end-to-end run. The latent-source test (image latents encoded with Ray, audio latents by the
same encoder in-process) adds 7 to 17 s; the overfit on four real photographs through the
map function (no Ray), 8 s.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from helpers import crash_then_rerun, read_trace

from megaray.data import multimodal as mm

L = mm.Layout(
    block_size=48,
    vocab_size=512,
    eot_id=0,
    n_mels=4,
    audio_frames=8,
    audio_patch=2,
    image_size=8,
    image_channels=3,
    patch_size=4,
    mel_mean=-2.0,
    mel_std=4.0,
)


def _within_sampling_error(hits: int, n: int, p: float) -> bool:
    return abs(hits / n - p) <= 3 * math.sqrt(p * (1 - p) / n)


def test_planned_items_hold_the_configured_proportions_and_repeat_per_seed_and_pass():
    sizes = [[1024, 1024, 894], [8, 7, 8, 8, 6], [8, 6, 6, 7, 5, 8]]  # text docs, clips, images per row group
    weights = [2.0, 1.0, 1.0]
    items = mm.plan_items(sizes, weights, seed=3, passes=2)
    per_pass = len(items) // 2
    assert abs(per_pass - sum(map(sum, sizes))) <= 1 and [it["pass"] for it in items] == [0] * per_pass + [1] * per_pass
    first = [it["source"] for it in items[:300]]
    for source, w in enumerate(weights):
        assert _within_sampling_error(first.count(source), 300, w / sum(weights)), (source, first.count(source))
    assert items == mm.plan_items(sizes, weights, seed=3, passes=2)  # a function of (seed, pass) only
    clips = [it["row"] for it in items if it["source"] == 1]
    assert sorted(clips[:37]) == list(range(37))  # every clip once before any repeats
    assert clips[:37] != [it["row"] for it in items[per_pass:] if it["source"] == 1][:37]  # new order per pass
    assert [it["index"] for it in items[:per_pass]] == list(range(per_pass))


@pytest.mark.parametrize("task", range(5))
def test_sequence_layouts_follow_the_api(task):
    text = list(range(10, 10 + 60))  # longer than fits: truncated
    tokens, targets, start = mm.sequence(task, text, L)
    T = L.block_size
    assert tokens.shape == targets.shape == (T,) and tokens.dtype == targets.dtype == np.int64
    if task == mm.TEXT_LM:
        assert start == -1 and list(tokens) == text[:T] and list(targets) == text[1 : T + 1]
        return
    audio = task in (mm.AUDIO_TO_TEXT, mm.TEXT_TO_AUDIO)
    n, bo, eo = (L.audio_tokens, L.boa, L.eoa) if audio else (L.image_tokens, L.boi, L.eoi)
    assert tokens[start - 1] == bo and tokens[start + n] == eo and not tokens[start : start + n].any()
    assert (targets[start - 1 : start + n] == -100).all()  # nothing predicted from or into the span
    trained = targets != -100
    assert (targets[trained] == tokens[1:][trained[:-1]]).all()  # targets are the next ids
    if task in (mm.AUDIO_TO_TEXT, mm.IMAGE_TO_TEXT):  # span first; text + eot trained
        assert start == 1 and tokens[T - 1] == L.eot_id and targets[T - 2] == L.eot_id
        assert list(tokens[start + n + 1 : T - 1]) == text[: T - n - 3] and trained.sum() == T - n - 2
    else:  # text first; the text and the opening boundary trained, the closing one is not
        assert start == T - n - 1 and list(tokens[: start - 1]) == text[: start - 1]
        assert targets[start - 2] == bo and trained.sum() == start - 1 and tokens[T - 1] == eo
    short, short_targets, _ = mm.sequence(task, [7, 8], L)
    used = n + 5 if task in (mm.AUDIO_TO_TEXT, mm.IMAGE_TO_TEXT) else n + 4  # 2 words, 2 boundaries (+ eot)
    assert not short[used:].any() and (short_targets[used - 1 :] == -100).all()  # padding: id 0, never a target


def test_per_modality_losses_are_weighted_by_their_counts_across_micro_batches():
    """Three micro-batches as the task reports them (the third has no image patch): the Meter's plain
    means of ``_sum`` and ``_count`` give, through ``ratio_metrics``, the mean over all patches."""
    from megaray.train.reporter import Meter, ratio_metrics

    meter = Meter()
    for loss, count in ((1.0, 10.0), (4.0, 30.0), (7.0, 0.0)):
        meter.add(
            {"loss/image_sum": loss * count, "loss/image_count": count, "loss/audio_sum": 0.0, "loss/audio_count": 0.0},
            data_s=0.0,
            total_s=1.0,
            units=1,
        )
    out = ratio_metrics(meter.summary(None, None, 1))
    assert out["loss/image"] == pytest.approx((1.0 * 10 + 4.0 * 30) / 40)
    assert "loss/audio" not in out and not {"loss/image_sum", "loss/image_count"} & set(out)  # the pair is used up


def test_mel_crops_are_normalised_and_padded():
    mel = np.arange(4 * 5, dtype=np.float32).reshape(4, 5)  # shorter than audio_frames (8)
    out, valid = mm.crop_mel(mel, L, np.random.default_rng(0))
    assert valid == 5 and np.allclose(out[:, :5], (mel - L.mel_mean) / L.mel_std) and not out[:, 5:].any()
    long = np.random.default_rng(1).normal(size=(4, 40)).astype(np.float32)
    a, _ = mm.crop_mel(long, L, np.random.default_rng([5, 0, 0, 9]))
    b, _ = mm.crop_mel(long, L, np.random.default_rng([5, 0, 0, 9]))
    starts = {int(np.argmin(np.abs(long[0] - (x[0, 0] * L.mel_std + L.mel_mean)))) for x in (a, b)}
    assert np.array_equal(a, b) and len(starts) == 1  # the seeded offset is reproducible


def test_a_corrupt_row_group_is_named_or_its_rows_skipped(text_shards, tmp_path):
    """data.on_corrupt for the mixture's reads (no Ray: the map function on a copy of the text shards
    whose row group 1 has flipped bytes inside a data page)."""
    import pyarrow.parquet as pq

    from megaray.errors import DataError

    bad = tmp_path / "bad"
    shutil.copytree(text_shards, bad)
    shard = sorted((bad / "train").glob("*.parquet"))[0]
    col = pq.ParquetFile(shard).metadata.row_group(1).column(0)
    raw = bytearray(shard.read_bytes())
    mid = col.data_page_offset + col.total_compressed_size // 2
    raw[mid : mid + 32] = bytes(b ^ 0xFF for b in raw[mid : mid + 32])
    shard.write_bytes(bytes(raw))
    src = mm.open_sources([type("S", (), {"shards": str(bad), "weight": 1.0})()])
    sizes = [[int(g["rows"]) for g in src[0].groups["train"]]]
    assert len(sizes[0]) >= 2
    items = mm.plan_items(sizes, [1.0], seed=0)
    batch = {k: np.array([it[k] for it in items]) for k in items[0]}
    kw = dict(
        sources=mm.read_specs(src, "train"),
        layout=L,
        tokenizer=str(bad / "tokenizer.json"),
        seed=0,
        split=0,
        train=True,
    )
    with pytest.raises(DataError, match=r"train/.*\.parquet: row group 1 is corrupt .*on_corrupt=skip"):
        mm.build_rows(batch, on_corrupt="error", **kw)
    rows = mm.build_rows(batch, on_corrupt="skip", **kw)
    assert len(rows["tokens"]) == sum(sizes[0]) - sizes[0][1] and (rows["task"] == mm.TEXT_LM).all()


def _rows(srcs, layout, tokenizer, items, *, split: int, seed: int):
    """``mm.build_rows`` over planned ``items`` of split 0 (train: random crops) or 1 (val)."""
    return mm.build_rows(
        {k: np.array([it[k] for it in items]) for k in items[0]},
        sources=mm.read_specs(srcs, "train" if split == 0 else "val"),
        layout=layout,
        tokenizer=tokenizer,
        seed=seed,
        split=split,
        train=split == 0,
        on_corrupt="error",
    )


def _cfg(text_shards, speech_shards, image_shards, tmp_path, *extra):
    from megaray.families import load_config

    sources = (
        f"[{{shards: {text_shards}, weight: 2}}, {{shards: {speech_shards}, weight: 1}}, "
        f"{{shards: {image_shards}, weight: 1}}]"
    )
    return load_config(
        REPO / "configs" / "multimodal_tiny.yaml",
        [
            f"data.sources={sources}",
            f"scaling.storage_path={tmp_path / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            *extra,
        ],
    )


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
def test_mixture_rows_from_real_shards_hold_every_task_in_proportion(text_shards, speech_shards, image_shards):
    """The map function of the train dataset on the test corpora (no Ray execution): 400 rows hold
    text : speech : images as 2 : 1 : 1, the to-text / from-text coin is fair, spans carry content."""
    from megaray.families import load_config
    from megaray.tasks.multimodal import MultimodalTask

    cfg = load_config(
        REPO / "configs" / "multimodal_tiny.yaml",
        [
            f"data.sources=[{{shards: {text_shards}, weight: 2}}, {{shards: {speech_shards}, weight: 1}}, "
            f"{{shards: {image_shards}, weight: 1}}]"
        ],
    )
    srcs = mm.open_sources(cfg.data.resolved_sources())
    tok, eot = MultimodalTask(cfg)._check_sources(srcs)
    layout = mm.Layout.from_model(cfg.model, eot)
    sizes = [[int(g["rows"]) for g in s.groups["train"]] for s in srcs]
    items = mm.plan_items(sizes, [2, 1, 1], seed=cfg.train.seed)[:400]
    rows = _rows(srcs, layout, tok, items, split=0, seed=1)
    task, n = rows["task"], len(items)
    assert _within_sampling_error(int((task == mm.TEXT_LM).sum()), n, 0.5)
    speech = np.isin(task, [mm.AUDIO_TO_TEXT, mm.TEXT_TO_AUDIO])
    assert _within_sampling_error(int(speech.sum()), n, 0.25)
    assert _within_sampling_error(int((task == mm.TEXT_TO_AUDIO).sum()), int(speech.sum()), mm.P_GENERATE)
    image = np.isin(task, [mm.IMAGE_TO_TEXT, mm.TEXT_TO_IMAGE])
    assert _within_sampling_error(int((task == mm.TEXT_TO_IMAGE).sum()), int(image.sum()), mm.P_GENERATE)
    assert ((rows["audio_start"] >= 0) == speech).all() and ((rows["image_start"] >= 0) == image).all()
    assert np.abs(rows["audio"][speech]).sum((1, 2)).min() > 0 and not rows["audio"][~speech].any()
    assert rows["image"][image].min() >= -1 and rows["image"][image].max() <= 1 and not rows["image"][~image].any()
    assert (rows["audio_valid"][speech] == layout.audio_frames).all()  # every test clip is longer than the crop
    for j in np.flatnonzero(speech | image):
        start = max(rows["audio_start"][j], rows["image_start"][j])
        span = layout.audio_tokens if speech[j] else layout.image_tokens
        assert (rows["targets"][j, start - 1 : start + span] == -100).all()
        assert not rows["tokens"][j, start : start + span].any()
    speech_audio = rows["audio"][speech]
    assert abs(float(speech_audio.mean())) < 0.5 and 0.3 < float(speech_audio.std()) < 2.0  # mel_mean/std fit


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
def test_task_hooks_with_the_diffusion_head(text_shards, speech_shards, image_shards, tmp_path):
    """Without Ray: a batch built from the test corpora through the task's loss (per-modality sums and
    counts, row counts per task) and backward, the eval artifacts (PNG image and mel plot, caption and
    transcription texts) and the checkpoint files, with the Transfusion diffusion head."""
    import torch

    from megaray import families
    from megaray.tasks.multimodal import MultimodalInfo, MultimodalTask, _side_info

    cfg = _cfg(
        text_shards,
        speech_shards,
        image_shards,
        tmp_path,
        "model.continuous_head=diffusion",
        "model.diffusion_sample_steps=4",
    )
    task = MultimodalTask(cfg)
    srcs = mm.open_sources(cfg.data.resolved_sources())
    tok, eot = task._check_sources(srcs)
    layout = mm.Layout.from_model(cfg.model, eot)
    task.info = MultimodalInfo(tokenizer_path=tok, eot_id=eot, **_side_info(srcs, layout))
    items = mm.plan_items([[int(g["rows"]) for g in s.groups["train"]] for s in srcs], [2, 1, 1], seed=0)[:32]
    rows = _rows(srcs, layout, tok, items, split=0, seed=0)
    batch = {k: torch.from_numpy(v) for k, v in rows.items()}
    torch.manual_seed(0)
    model = families.build_model(cfg.model)
    loss, metrics = task.loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and metrics["supervised/text"] == float((batch["targets"] != -100).sum())
    assert sum(metrics[f"rows/{name}"] for name in mm.TASKS) == 32 and metrics["rows/text_lm"] == 16
    assert metrics["supervised/image"] == layout.image_tokens * metrics["rows/text_to_image"] > 0
    assert all(metrics[f"loss/{m}_count"] == metrics[f"supervised/{m}"] for m in ("text", "audio", "image"))
    texts = task.eval_artifacts({"model": model}, str(tmp_path), step=1)
    assert (tmp_path / "image.png").stat().st_size > 0 and (tmp_path / "mel.png").stat().st_size > 0
    assert set(texts) == {"caption", "transcription"}
    files = task.checkpoint_files()
    meta = json.loads(files["multimodal.json"])
    assert meta["audio"]["sample_rate"] == 16000 and meta["labels"] and files["tokenizer.json"].startswith("{")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
def test_config_mismatches_with_the_shards_are_errors_that_say_what_to_set(text_shards, speech_shards, image_shards):
    from megaray.errors import ConfigError, DataError
    from megaray.families import load_config
    from megaray.tasks.multimodal import MultimodalTask

    def check(*overrides):
        cfg = load_config(
            REPO / "configs" / "multimodal_tiny.yaml",
            [
                f"data.sources=[{{shards: {text_shards}, weight: 2}}, {{shards: {speech_shards}, weight: 1}}, "
                f"{{shards: {image_shards}, weight: 1}}]",
                *overrides,
            ],
        )
        MultimodalTask(cfg).datasets()

    with pytest.raises(ConfigError, match=r"model.vocab_size \(600\) must equal .*tokenizer.json \(512\)"):
        check("model.vocab_size=600")
    with pytest.raises(ConfigError, match=r"model.image_size \(64\) exceeds the size 32 px .* --size 64"):
        check("model.image_size=64", "model.block_size=512")
    with pytest.raises(ConfigError, match=r"model.n_mels \(40\) differs from the n_mels \(80\)"):
        check("model.n_mels=40")
    with pytest.raises(ConfigError, match=r"holds audio data but model.modalities is \['text', 'image'\]"):
        check("model.modalities=[text, image]")
    with pytest.raises(DataError, match="prepared folder not found: /nonexistent"):
        check("data.sources=[{shards: /nonexistent, weight: 1}]")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
def test_two_workers_log_per_modality_losses_and_resume_at_the_next_mixed_batch(
    ray_cluster, text_shards, speech_shards, image_shards, tmp_path, monkeypatch
):
    """Crashed right after step 3 (checkpoint at 2) and re-run: the re-run starts reading at the
    checkpoint's cursor (no replay) and trains step 3 on the same batch with the same loss as the first attempt (which had not
    crashed yet), then goes on; MLflow holds loss/text, loss/audio, loss/image at every step and
    their validation means; the eval artifacts and the checkpoint's multimodal.json are written."""
    from mlflow.tracking import MlflowClient

    cfg = _cfg(
        text_shards,
        speech_shards,
        image_shards,
        tmp_path,
        "name=mm",
        "train.max_steps=4",
        "train.checkpoint_every=2",
        "train.eval_every=4",
        "train.log_every=1",
        "train.warmup_steps=1",
        "scaling.max_failures=0",
        "data.num_val_batches=2",
    )
    result = crash_then_rerun(monkeypatch, cfg, tmp_path / "trace", 3)
    assert result.metrics["step"] == 4

    for rank in (0, 1):
        got = read_trace(tmp_path / "trace", rank)
        assert [r["step"] for r in got] == [1, 2, 3, 3, 4]
        first, again = got[2], got[3]
        assert first["pid"] != again["pid"] and again["replayed"] == 0  # read from the cursor, nothing replayed
        G = cfg.data.batch_size * 2
        assert (again["epoch"], again["cursor"]) == (first["epoch"], first["cursor"]) == (0, 2 * G)
        assert again["ids"] == first["ids"]  # the same served positions
        assert again["fp"] == first["fp"]  # the next unseen mixed batch
        assert again["loss"] == pytest.approx(first["loss"], abs=1e-6, rel=1e-6)  # weights, optimizer, RNG restored
        assert len({r["fp"] for r in got}) == 4

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    rows = {}
    assert not [k for k in run.data.metrics if k.endswith(("_sum", "_count"))], run.data.metrics
    for key in ("loss/text", "loss/audio", "loss/image"):
        hist = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        counts = {
            m.step: m.value for m in client.get_metric_history(run.info.run_id, key.replace("loss/", "supervised/"))
        }
        assert sorted(counts) == [1, 2, 3, 4] and len(hist) >= 2, (key, hist, counts)
        assert sorted(hist) == [s for s in sorted(counts) if counts[s] > 0]  # logged whenever a batch trained on it
        assert all(0 < v < 50 for v in hist.values()) and 0 < run.data.metrics["val_" + key] < 50, key
    B = cfg.data.batch_size
    for name in mm.TASKS:
        rows[name] = sum(m.value for m in client.get_metric_history(run.info.run_id, f"rows/{name}"))
    assert sum(rows.values()) == pytest.approx(B * 5)  # 5 logged steps (step 3 twice) of B rows per rank, averaged
    assert all(rows[name] > 0 for name in mm.TASKS), rows  # every task occurs in the trained batches
    arts = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "eval/step_00000004")}
    assert {"image.png", "mel.png"} <= arts
    ckpt = Path(result.checkpoint)
    meta = json.loads((ckpt / "multimodal.json").read_text())
    assert meta["eot_id"] == 0 and meta["audio"]["hop_length"] == 128 and "astronaut" in meta["labels"]
    assert meta["caption_template"] == mm.CAPTION_TEMPLATE and (ckpt / "tokenizer.json").is_file()


def _random_checkpoint(path: Path, model_section: dict) -> Path:
    """A randomly initialised network of ``model_section`` saved as a one-step checkpoint (the layout
    :func:`megaray.weights.load_for_inference` reads), as tests/test_diffusion_train.py does."""
    import torch

    from megaray.families import build_model, build_run_config
    from megaray.train.checkpoint import STATE_FILE, WEIGHTS_FILE

    torch.manual_seed(0)
    cfg = build_run_config({"model": model_section})
    path.mkdir(parents=True)
    cfg.to_yaml(path / "config.yaml")
    torch.save(build_model(cfg.model).state_dict(), path / WEIGHTS_FILE)
    (path / STATE_FILE).write_text(json.dumps({"step": 1, "tokens": 0}))
    return path


def _audio_latents(speech_shards: str, out: Path, vae) -> str:
    """``speech_shards`` encoded into an ``audio_latents`` folder by the UDF and manifest keys of
    :func:`megaray.inference.latents.encode_latents`, in this process (its Ray read of the speech
    parquet costs ~40 s on the 2-core machine; the image latents below go through Ray)."""
    import pyarrow.parquet as pq

    from megaray.data.manifest import new_manifest, read_manifest, write_manifest
    from megaray.inference.latents import LatentEncoder

    man, encoder = read_manifest(speech_shards), LatentEncoder(lambda: vae, kind="audio")
    cols = ["path", "name", "text", "speaker", "speaker_id", "duration", "mel", "n_mels", "n_frames"]
    for split in ("train", "val"):
        table = pq.read_table(Path(speech_shards) / man["splits"][split]["dir"], columns=cols)
        batch = {c: np.asarray(table.column(c).to_pylist(), dtype=object) for c in cols}
        batch["split"] = np.asarray([split] * table.num_rows, dtype=object)
        (out / split).mkdir(parents=True)
        pq.write_table(encoder(batch).drop_columns(["split"]), out / split / "part-0.parquet")
    write_manifest(
        str(out),
        new_manifest(
            "audio_latents",
            source_shards=speech_shards,
            sample_rate=man["sample_rate"],
            n_mels=man["n_mels"],
            hop_length=man["hop_length"],
            speakers=man["speakers"],
            vae_config=vae.cfg.model_dump(mode="json"),
            splits={s: {"dir": s, "clips": man["splits"][s]["clips"]} for s in ("train", "val")},
            clips=man["clips"],
        ),
    )
    return str(out)


@pytest.fixture(scope="module")
def latent_sources(image_shards, speech_shards, tmp_path_factory):
    """The test images and clips encoded by random tiny VAEs: image latents 4 x 16 x 16 (f 2) by
    `megaray prepare image-latents`' function, naming their VAE checkpoint; audio latents 4 x 20
    bands x ceil(F / 2) frames (80 mels, 4x down in frequency, 2x in time)."""
    from megaray.inference.latents import encode_image_latents
    from megaray.weights import load_for_inference

    root = tmp_path_factory.mktemp("latents")
    vae = _random_checkpoint(root / "image-vae" / "step_00000001", {"family": "image_vae", "preset": "tiny"})
    audio_vae = _random_checkpoint(root / "audio-vae" / "step_00000001", {"family": "audio_vae", "preset": "tiny"})
    images = encode_image_latents(
        image_shards, str(root / "images"), load_for_inference(vae)[0], vae_checkpoint=str(vae), verbose=False
    )
    speech = _audio_latents(speech_shards, root / "speech", load_for_inference(audio_vae)[0])
    return {"images": images["out_dir"], "speech": speech, "vae": str(vae)}


def _file_order_rows(shards: str, columns):
    """A prepared split's rows in file order (the order the mixture's row indices count in)."""
    import pyarrow.parquet as pq

    from megaray.data.manifest import read_manifest
    from megaray.data.shards import split_files

    _, paths, _ = split_files(shards, read_manifest(shards), "val")
    return [row for p in paths for row in pq.read_table(p, columns=columns).to_pylist()]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
def test_latent_sources_feed_their_latents_and_name_the_vae(text_shards, image_shards, latent_sources, tmp_path):
    """Text + audio latents + image latents (configs/multimodal_latents_tiny.yaml's model): the
    validation rows' spans equal the shards' latents (image: as stored; audio: the clip's first
    audio_frames latent frames, channel-major, not normalised) with the label's / the transcript's
    text; multimodal.json names the VAE; image.png is decoded by it (32 px images, not 16-cell
    latents); config mismatches are ConfigErrors naming both values and what to set."""
    from PIL import Image

    from megaray.errors import ConfigError
    from megaray.families import build_model, load_config
    from megaray.tasks.multimodal import MultimodalInfo, MultimodalTask, _side_info

    def config(*extra, images=latent_sources["images"]):
        return load_config(
            REPO / "configs" / "multimodal_latents_tiny.yaml",
            [
                f"data.sources=[{{shards: {text_shards}, weight: 2}}, {{shards: {latent_sources['speech']}, weight: 1}}, "
                f"{{shards: {images}, weight: 1}}]",
                *extra,
            ],
        )

    cfg = config()
    task = MultimodalTask(cfg)
    srcs = mm.open_sources(cfg.data.resolved_sources())
    tok_path, eot = task._check_sources(srcs)
    layout = mm.Layout.from_model(cfg.model, eot)
    task.info = MultimodalInfo(
        tokenizer_path=tok_path,
        eot_id=eot,
        **_side_info(srcs, layout),
        sources=[{"shards": s.shards, "kind": s.kind} for s in srcs],
    )
    items = mm.plan_items([[int(g["rows"]) for g in s.groups["val"]] for s in srcs], [2, 1, 1], seed=0, split=1)
    rows = _rows(srcs, layout, tok_path, items, split=1, seed=0)
    tok = mm.cached_tokenizer(tok_path)
    clips = _file_order_rows(latent_sources["speech"], ["latent", "latent_shape", "text"])
    images = _file_order_rows(latent_sources["images"], ["latent", "label"])
    names = mm.label_names(srcs[2].manifest)
    seen = {1: set(), 2: set()}
    for j, it in enumerate(items):
        if it["source"] == 0:
            continue
        seen[it["source"]].add(it["row"])
        stored = (clips if it["source"] == 1 else images)[it["row"]]
        latent = np.asarray(stored["latent"], np.float32)
        if it["source"] == 1:
            c, bands, frames = stored["latent_shape"]
            assert (c * bands, rows["audio"].shape[1]) == (80, 80) and frames > layout.audio_frames
            assert np.array_equal(rows["audio"][j], latent.reshape(80, frames)[:, : layout.audio_frames])
            assert rows["audio_valid"][j] == layout.audio_frames and rows["audio_start"][j] >= 1
            text = stored["text"]
        else:
            assert rows["image"].shape[1:] == (4, 16, 16) and rows["image_start"][j] >= 1
            assert np.array_equal(rows["image"][j], latent.reshape(4, 16, 16))
            text = mm.CAPTION_TEMPLATE.format(label=names[stored["label"]])
        ids = tok.encode(text).ids
        assert any(list(rows["tokens"][j, k : k + len(ids)]) == ids for k in range(len(rows["tokens"][j])))
    planned = [sum(it["source"] == i for it in items) for i in (1, 2)]
    assert seen[1] == set(range(len(clips))) and len(seen[2]) == min(planned[1], len(images))  # no repeat early
    assert len(rows["tokens"]) == len(items)

    meta = json.loads(task.checkpoint_files()["multimodal.json"])
    assert meta["vae_checkpoint"] == latent_sources["vae"]
    assert meta["audio_latents"] == {"latent_channels": 4, "bands": 20, "down_time": 2}
    import torch

    torch.manual_seed(0)
    modules = {"model": build_model(cfg.model).eval(), **task.frozen_modules()}
    texts = task.eval_artifacts(modules, str(tmp_path), step=1)
    assert Image.open(tmp_path / "image.png").size == (2 * 33 + 1, 34)  # two decoded 32 px images, padding 1
    assert set(texts) == {"caption", "transcription"} and not (tmp_path / "mel.png").exists()

    for overrides, message in (
        (
            ["model.image_channels=3"],
            r"model.image_channels \(3\) differs from the latent_channels \(4\) of the "
            r"image latents .*; set model.image_channels=4",
        ),
        (
            ["model.image_size=8", "model.patch_size=2"],
            r"model.image_size \(8\) differs from the latent_size "
            r"\(16\) .*; set model.image_size=16",
        ),
        (
            ["model.n_mels=40"],
            r"model.n_mels \(40\) differs from the latent frame size .*= 80\); "
            r"set model.n_mels=80",
        ),
    ):
        bad = config(*overrides)
        with pytest.raises(ConfigError, match=message):
            MultimodalTask(bad)._check_sources(mm.open_sources(bad.data.resolved_sources()))
    mixed = config(images=image_shards)
    mixed_srcs = mm.open_sources(mixed.data.resolved_sources() + cfg.data.resolved_sources()[2:])
    with pytest.raises(ConfigError, match="the image sources mix the kinds image_latents and images"):
        MultimodalTask(mixed)._check_sources(mixed_srcs)


@pytest.mark.slow
def test_overfit_on_real_captioned_photographs_through_the_data_path(text_shards, image_shards):
    """The whole path without Ray: four scikit-image photographs with distinct names become
    image -> text and text -> image rows through the mixture's map function (real tokenizer,
    captions "a photo of <name>", centre crops at the model's size); the tiny model of
    configs/multimodal_tiny.yaml, trained on those 8 rows, halves loss/text and loss/image, and then
    captions each photograph with its own caption (greedy) and draws a finite image from it."""
    import torch

    from megaray import families
    from megaray.families import load_config
    from megaray.tasks.multimodal import MultimodalTask

    cfg = load_config(
        REPO / "configs" / "multimodal_tiny.yaml",
        [
            f"data.sources=[{{shards: {text_shards}, weight: 1}}, {{shards: {image_shards}, weight: 1}}]",
            "model.modalities=[text, image]",
        ],
    )
    srcs = mm.open_sources(cfg.data.resolved_sources())
    tok_path, eot = MultimodalTask(cfg)._check_sources(srcs)
    layout = mm.Layout.from_model(cfg.model, eot)
    labels = [r["label"] for r in _file_order_rows(image_shards, ["label"])]
    rows_of = {}
    for i, name in enumerate(labels):
        rows_of.setdefault(name, i)
    picked = list(rows_of.values())[:4]
    assert len(picked) == 4
    items = {
        "source": np.ones(4, np.int64),
        "row": np.array(picked),
        "pass": np.zeros(4, np.int64),
        "index": np.arange(4),
    }
    both = [
        mm.build_rows(
            items,
            sources=mm.read_specs(srcs, "val"),
            layout=layout,
            tokenizer=tok_path,
            seed=0,
            split=1,
            train=False,
            on_corrupt="error",
            p_generate=p,
        )
        for p in (0.0, 1.0)
    ]
    assert list(both[0]["task"]) == [mm.IMAGE_TO_TEXT] * 4 and list(both[1]["task"]) == [mm.TEXT_TO_IMAGE] * 4
    batch = {k: torch.from_numpy(np.concatenate([b[k] for b in both])) for k in both[0]}

    torch.manual_seed(0)
    model = families.build_model(cfg.model)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    with torch.no_grad():
        first = {k: float(v) for k, v in model(batch).items()}
    for _ in range(200):
        opt.zero_grad()
        model(batch)["loss"].backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        last = {k: float(v) for k, v in model(batch).items()}
    assert last["loss/text"] < first["loss/text"] / 2 and last["loss/image"] < first["loss/image"] / 2, (first, last)

    tok = mm.cached_tokenizer(tok_path)
    image_to_text = both[0]
    for j, row in enumerate(picked):
        caption = mm.CAPTION_TEMPLATE.format(label=labels[row])
        prompt = torch.tensor([[model.BOI] + [0] * layout.image_tokens + [model.EOI]])
        out = model.generate_text(
            prompt,
            12,
            image=torch.from_numpy(image_to_text["image"][j : j + 1]),
            image_start=torch.tensor([1]),
            temperature=0.0,
            stop_id=eot,
        )
        text = tok.decode([t for t in out[0, prompt.size(1) :].tolist() if t != eot])
        assert text.strip() == caption, (text, caption)
        drawn = model.generate_image(torch.tensor([tok.encode(caption).ids + [model.BOI]]))
        assert drawn.shape == (1, 3, layout.image_size, layout.image_size) and torch.isfinite(drawn).all()
