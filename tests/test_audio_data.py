"""Audio data: the espeak-ng speech corpus, prepare_audio (Ray Data) with bad files, crops for
training, latents, and the audio tasks' datasets / eval artifacts on real prepared shards.

One ``prepare_audio`` run (module fixture) feeds every Ray test; the corpus is 8 espeak-ng clips.
"""

from __future__ import annotations

import glob
import io
import json
import math
import os
import shutil
import struct

import numpy as np
import pytest
import soundfile as sf
import torch

from megaray.data import audio as A, speech_corpus as SC
from megaray.data.audio.datasets import _crop_batch
from megaray.data.splits import split_of
from megaray.errors import DataError
from megaray.inference.latents import encode_latents

HAVE_ESPEAK = shutil.which("espeak-ng") is not None
needs_espeak = pytest.mark.skipif(not HAVE_ESPEAK, reason="espeak-ng not installed (apt-get install espeak-ng)")
PREP = dict(sample_rate=16000, n_mels=80, n_fft=512, hop_length=128)  # matches the tiny presets
BAD = {"corrupt.wav", "empty.wav", "notes.wav", "silent.wav", "truncated.wav"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    if not HAVE_ESPEAK:
        pytest.skip("espeak-ng not installed (apt-get install espeak-ng)")
    out = tmp_path_factory.mktemp("corpus") / "speech"
    return SC.build_speech_corpus(str(out), n_clips=12, include_alsa=False)


def _rows(manifest_path):
    with open(manifest_path) as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------- corpus


@needs_espeak
def test_speech_corpus_is_espeak_speech_with_several_speakers(corpus):
    rows = _rows(corpus)
    assert len(rows) == 12
    speakers = {r["speaker"] for r in rows}
    assert len(speakers) >= 3, speakers
    base = os.path.dirname(corpus)
    for r in rows:
        assert r["text"] and r["text"][0].isupper() and r["text"][-1] in ".!?"
        wave, sr = sf.read(os.path.join(base, r["path"]))
        assert sr == 22050 and len(wave) / sr > 0.5  # espeak-ng's output rate; real speech length
        assert np.sqrt(np.mean(wave**2)) > 0.01
    assert len({r["text"] for r in rows}) == 12  # distinct sentences


def test_speech_corpus_without_espeak_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(SC.shutil, "which", lambda name: None)
    with pytest.raises(SC.EspeakMissing, match="apt-get install espeak-ng"):
        SC.build_speech_corpus(str(tmp_path / "c"), n_clips=2)


def test_stdlib_sentences_are_clean_english():
    sents = SC.stdlib_sentences(50)
    assert len(sents) == 50 and len(set(sents)) == 50
    for s in sents:
        assert 5 <= len(s.split()) <= 16 and not any(ch in s for ch in "()=_<>[]{}`0123456789")


# --------------------------------------------------------------------------- decoding (no Ray)


def _wav_bytes(x, sr, subtype="PCM_16"):
    b = io.BytesIO()
    sf.write(b, x, sr, format="WAV", subtype=subtype)
    return b.getvalue()


def test_decode_rejects_bad_files_with_reasons():
    good = _wav_bytes(0.3 * np.sin(np.arange(8000) / 5.0), 16000)
    with pytest.raises(A.RejectedClip, match="empty"):
        A.decode_audio(b"")
    with pytest.raises(A.RejectedClip, match="unreadable"):
        A.decode_audio(b"this is a text file\n" * 20)
    with pytest.raises(A.RejectedClip, match="truncated"):
        A.decode_audio(good[: len(good) // 2])
    with pytest.raises(A.RejectedClip, match="zero-length"):
        A.decode_audio(_wav_bytes(np.zeros(0, np.float32), 16000))
    wave, sr = A.decode_audio(good)
    assert sr == 16000 and wave.shape == (8000, 1)


def test_process_clip_resamples_normalises_and_checks_rate():
    settings = A.AudioPrepSettings(**PREP)
    feats = A.mel_features(settings)
    stereo = 0.1 * np.random.default_rng(0).standard_normal((22050, 2)).astype(np.float32)
    out = A.process_clip(_wav_bytes(stereo, 22050, "FLOAT"), settings, feats)
    assert out["waveform"].shape == (16000,) and out["duration"] == pytest.approx(1.0)
    assert np.abs(out["waveform"]).max() == pytest.approx(0.95, abs=1e-4)
    assert out["mel"].shape == (80, 16000 // 128 + 1)
    loud = A.process_clip(
        _wav_bytes(stereo, 22050, "FLOAT"), A.AudioPrepSettings(**PREP, normalize="loudness", target_lufs=-30), feats
    )
    import torchaudio.functional as AF

    assert float(AF.loudness(torch.from_numpy(loud["waveform"])[None], 16000)) == pytest.approx(-30, abs=1.0)
    with pytest.raises(A.RejectedClip, match="22050 Hz, required 16000"):
        A.process_clip(_wav_bytes(stereo, 22050), A.AudioPrepSettings(**PREP, input_sample_rate=16000), feats)
    with pytest.raises(A.RejectedClip, match="silent"):
        A.process_clip(_wav_bytes(np.zeros(16000, np.float32), 16000), settings, feats)


def test_crop_padding_uses_the_mel_log_floor():
    from megaray.models.common.dsp import LOG_FLOOR

    assert A.MEL_LOG_FLOOR == LOG_FLOOR
    batch = {
        "path": np.array(["a"]),
        "waveform": [np.ones(300, np.float32)],
        "mel": [np.zeros(80 * 3, np.float32)],
        "n_frames": np.array([3]),
        "speaker_id": np.array([2]),
    }
    out = _crop_batch(batch, segment=512, hop=128, n_mels=80, seed=0, train=True, with_vector=False)
    assert out["audio"].shape == (1, 512) and out["audio"][0, :300].sum() == 300 and out["audio"][0, 300:].sum() == 0
    assert (out["mel"][0, :, :3] == 0).all() and np.allclose(out["mel"][0, :, 3:], math.log(LOG_FLOOR))


def test_collect_sources_reads_jsonl_and_csv_manifests(tmp_path):
    (tmp_path / "a").mkdir()
    for n in ("x.wav", "y.flac"):
        sf.write(tmp_path / "a" / n, np.zeros(100, np.float32), 16000)
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": "a/x.wav", "text": "hi", "speaker": "s1"}) + "\n")
    (tmp_path / "m.csv").write_text("path,text,speaker\na/y.flac,hello there,s2\n")
    recs = A.collect_sources([str(tmp_path / "m.jsonl"), str(tmp_path / "m.csv")])
    assert [(r["path"], r["text"], r["speaker"]) for r in recs] == [
        (str(tmp_path / "a" / "x.wav"), "hi", "s1"),
        (str(tmp_path / "a" / "y.flac"), "hello there", "s2"),
    ]
    folder = A.collect_sources(str(tmp_path))  # folder: recursive, speaker = first sub-folder
    assert sorted(r["name"] for r in folder) == ["a/x.wav", "a/y.flac"] and {r["speaker"] for r in folder} == {"a"}
    with pytest.raises(DataError, match="audio source not found: .*missing"):
        A.collect_sources(str(tmp_path / "missing"))


def test_train_crops_are_a_function_of_seed_clip_and_pass():
    """No process state: the same (seed, clip, pass) always gives the same crop, another pass
    or seed another one; two calls (two executions of an epoch) agree exactly."""
    rng = np.random.default_rng(0)
    waves = [rng.standard_normal(4000 + 300 * i).astype(np.float32) for i in range(4)]
    batch = {
        "name": np.array([f"spk/c{i}.wav" for i in range(4)]),
        "waveform": waves,
        "mel": [np.zeros(80 * (len(w) // 128 + 1), np.float32) for w in waves],
        "n_frames": np.array([len(w) // 128 + 1 for w in waves]),
        "speaker_id": np.arange(4),
    }
    kw = dict(segment=1024, hop=128, n_mels=80, train=True, with_vector=False)
    first = _crop_batch(dict(batch, **{"pass": np.zeros(4, np.int64)}), seed=3, **kw)
    again = _crop_batch(dict(batch, **{"pass": np.zeros(4, np.int64)}), seed=3, **kw)
    np.testing.assert_array_equal(first["audio"], again["audio"])
    other_pass = _crop_batch(dict(batch, **{"pass": np.ones(4, np.int64)}), seed=3, **kw)
    other_seed = _crop_batch(dict(batch, **{"pass": np.zeros(4, np.int64)}), seed=4, **kw)
    assert not np.array_equal(first["audio"], other_pass["audio"])
    assert not np.array_equal(first["audio"], other_seed["audio"])
    for i, w in enumerate(waves):  # every crop is a hop-aligned piece of its clip
        start = A.crop_start(3, f"spk/c{i}.wav", 0, (len(w) - 1024) // 128, 128)
        assert start % 128 == 0
        np.testing.assert_array_equal(first["audio"][i], w[start : start + 1024])


# --------------------------------------------------------------------------- prepare (Ray)


@pytest.fixture(scope="module")
def prepared(ray_local, corpus, tmp_path_factory):
    """A folder of 8 good espeak clips in speaker sub-folders plus five bad files, prepared once."""
    root = tmp_path_factory.mktemp("raw")
    rows = _rows(corpus)[:8]
    for r in rows:
        d = root / r["speaker"]
        d.mkdir(exist_ok=True)
        shutil.copy(os.path.join(os.path.dirname(corpus), r["path"]), d / os.path.basename(r["path"]))
        (d / os.path.basename(r["path"])).with_suffix(".txt").write_text(r["text"])
    riff = b"RIFF" + struct.pack("<I", 1000) + b"WAVE" + os.urandom(200)  # header start, then garbage
    (root / "corrupt.wav").write_bytes(riff)
    (root / "empty.wav").write_bytes(b"")
    (root / "notes.wav").write_text("meeting notes, not audio\n" * 40)
    sf.write(root / "silent.wav", np.zeros(16000, np.float32), 16000)
    good = _wav_bytes(0.3 * np.sin(np.arange(16000) / 7.0), 16000)
    (root / "truncated.wav").write_bytes(good[: len(good) // 2])
    (root / "readme.md").write_text("not an audio extension: ignored")
    out = tmp_path_factory.mktemp("shards") / "speech"
    manifest = A.prepare_audio(str(root), str(out), val_fraction=0.25, concurrency=2, **PREP)
    assert manifest["format"] == "megaray" and manifest["kind"] == "audio"
    return {"root": root, "out": str(out), "manifest": manifest, "rows": rows}


def test_prepare_audio_keeps_good_clips_and_reports_bad_ones_by_name(prepared):
    man = prepared["manifest"]
    # one reject scheme: counted by reason code, each example "<name>: <detail>"
    by_reason = man["rejected"]["by_reason"]
    rejected = {
        e.split(": ", 1)[0]: (code, e.split(": ", 1)[1]) for code, v in by_reason.items() for e in v["examples"]
    }
    assert set(rejected) == BAD, rejected
    assert {k: v["count"] for k, v in by_reason.items()} == {
        "empty_file": 1,
        "unreadable": 2,
        "silent": 1,
        "truncated": 1,
    }
    assert rejected["empty.wav"][0] == "empty_file" and "empty" in rejected["empty.wav"][1]
    assert rejected["notes.wav"][0] == rejected["corrupt.wav"][0] == "unreadable"
    assert "BytesIO" not in rejected["notes.wav"][1]
    assert rejected["silent.wav"][0] == "silent" and rejected["truncated.wav"][0] == "truncated"
    assert "truncated" in rejected["truncated.wav"][1]
    assert man["clips"] == 8 and man["rejected"]["total"] == 5
    assert man["splits"]["train"]["clips"] + man["splits"]["val"]["clips"] == 8
    assert man["splits"]["val"]["clips"] >= 1
    assert 0 < man["hours"] < 0.05
    assert set(man["speakers"]) == {r["speaker"] for r in prepared["rows"]}
    on_disk = json.load(open(os.path.join(prepared["out"], "manifest.json")))
    assert on_disk["rejected"] == man["rejected"]
    assert not glob.glob(prepared["out"] + ".tmp-*")  # the temp dir was renamed into place


def test_prepared_shards_hold_resampled_waveforms_mels_text_and_speakers(prepared):
    import pyarrow.parquet as pq

    files = glob.glob(os.path.join(prepared["out"], "train", "*.parquet")) + glob.glob(
        os.path.join(prepared["out"], "val", "*.parquet")
    )
    table = pq.read_table(files[0])
    for col in ("waveform", "mel", "text", "speaker", "speaker_id", "duration", "n_frames"):
        assert col in table.column_names
    texts = {r["text"] for r in prepared["rows"]}
    for row in table.to_pylist():
        wave = np.asarray(row["waveform"], np.float32)
        assert row["text"] in texts
        assert row["speaker_id"] == prepared["manifest"]["speakers"][row["speaker"]]
        assert row["n_frames"] == len(wave) // 128 + 1 and len(row["mel"]) == 80 * row["n_frames"]
        assert row["duration"] == pytest.approx(len(wave) / 16000, rel=1e-5)
        assert np.abs(wave).max() == pytest.approx(0.95, abs=1e-3)
    with pytest.raises(DataError, match="already holds prepared data.*overwrite"):
        A.prepare_audio(str(prepared["root"]), prepared["out"], **PREP)
    # the split is a hash of each clip's name; at most one train clip is moved to fill an empty val
    val, train = _split_names(prepared["out"], "val"), _split_names(prepared["out"], "train")
    assert len(val) + len(train) == 8 and not set(val) & set(train)
    assert all(split_of(n, 0.25, 0) == "train" for n in train)
    assert len([n for n in val if split_of(n, 0.25, 0) != "val"]) <= 1


def _split_names(out, split):
    import pyarrow.parquet as pq

    return [
        n
        for f in glob.glob(os.path.join(out, split, "*.parquet"))
        for n in pq.read_table(f, columns=["name"]).column(0).to_pylist()
    ]


def test_prepare_audio_refuses_missing_sources_and_busy_folders_before_ray(tmp_path):
    import ray

    started = ray.is_initialized()
    with pytest.raises(DataError, match=f"audio source not found: {tmp_path / 'nope'}"):
        A.prepare_audio([str(tmp_path / "nope")], str(tmp_path / "out"), **PREP)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("user data")
    with pytest.raises(DataError, match="not an empty folder.*overwrite"):
        A.prepare_audio([str(tmp_path)], str(busy), **PREP)
    assert ray.is_initialized() == started and (busy / "keep.txt").read_text() == "user data"


def test_audio_datasets_give_fixed_shape_aligned_crops(prepared):
    from megaray.models.common.dsp import MelFeatures

    seg = 8192
    ds = A.audio_datasets(prepared["out"], segment_samples=seg, seed=0)
    batch = next(iter(ds["train"].iter_torch_batches(batch_size=4)))
    assert batch["audio"].shape == (4, seg) and batch["audio"].dtype == torch.float32
    assert batch["mel"].shape == (4, 80, seg // 128 + 1)
    assert batch["speaker_id"].dtype == torch.int64
    # the stored mel crop is the mel of the audio crop (interior frames; edges see outside context)
    mel = MelFeatures(16000, 512, 128, 80)(batch["audio"])
    torch.testing.assert_close(mel[..., 4:-4], batch["mel"][..., 4:-4], atol=1e-3, rtol=1e-3)
    # val crops are fixed: the hop-aligned centre crop of each clip
    val = {int(b["speaker_id"][0]): b["audio"][0] for b in ds["val"].iter_torch_batches(batch_size=1)}
    examples = A.load_examples(prepared["out"], "val", n=100)
    assert len(val) == len(examples) == prepared["manifest"]["splits"]["val"]["clips"]
    for ex in examples:
        start = ((len(ex["waveform"]) - seg) // 128 // 2) * 128
        torch.testing.assert_close(val[ex["speaker_id"]], torch.from_numpy(ex["waveform"][start : start + seg]))
    with pytest.raises(ValueError, match="multiple of hop_length"):
        A.audio_datasets(prepared["out"], segment_samples=1000)
    with pytest.raises(ValueError, match="n_mels"):
        A.audio_datasets(prepared["out"], segment_samples=seg, expect={"n_mels": 100})


def test_train_crops_repeat_exactly_across_executions(prepared):
    """Each execution of the train dataset (one per epoch in the loop) gives the same crops; the
    passes carried in the data give different crops of the same clips."""
    ds = A.audio_datasets(prepared["out"], segment_samples=4096, seed=5, crop_passes=2)["train"]

    def crops():
        return sorted(r["audio"].tobytes() for r in ds.take_all())

    first, second = crops(), crops()
    n_train = prepared["manifest"]["splits"]["train"]["clips"]
    assert len(first) == 2 * n_train and first == second
    assert len(set(first)) > n_train  # pass 1 cropped (some) clips elsewhere than pass 0


def test_encode_latents_writes_vae_latents(prepared, tmp_path):
    import pyarrow.parquet as pq

    from megaray.models.audio.config import AudioVAEConfig
    from megaray.models.audio.vae import AudioVAE

    cfg = AudioVAEConfig.from_name("tiny")
    man = encode_latents(prepared["out"], str(tmp_path / "lat"), AudioVAE(cfg), concurrency=1)
    assert man["kind"] == "audio_latents"
    wrong = AudioVAE(AudioVAEConfig.from_name("tiny", n_mels=64))
    with pytest.raises(DataError, match="n_mels=64.*n_mels=80"):
        encode_latents(prepared["out"], str(tmp_path / "lat2"), wrong, concurrency=1)
    assert man["clips"] == 8 and man["vae_config"]["latent_channels"] == 4
    rows = pq.read_table(glob.glob(str(tmp_path / "lat" / "train" / "*.parquet"))).to_pylist()
    for r in rows:
        c, f, t = r["latent_shape"]
        assert (c, f) == (4, 80 // 4) and len(r["latent"]) == c * f * t and r["text"]


# --------------------------------------------------------------------------- tasks on real shards


def _run_cfg(shards, model):
    from megaray.families import build_run_config

    return build_run_config(
        {"model": model, "data": {"shards": shards, "batch_size": 2}, "scaling": {"num_workers": 1}}
    )


def test_vocoder_task_datasets_eval_and_artifacts(prepared, tmp_path):
    from megaray.config import ConfigError
    from megaray.tasks.vocoder import VocoderTask

    cfg = _run_cfg(prepared["out"], {"family": "vocoder", "preset": "tiny_splitband_freq_domain_vocoder"})
    n_train = prepared["manifest"]["splits"]["train"]["clips"]
    cfg.train.max_steps = 2 * (n_train // 2) + 1  # a run of just over two passes over the clips
    task = VocoderTask(cfg)
    ds = task.datasets()
    # one epoch of the train dataset holds as many differently cropped passes as the run needs
    assert task.info.crop_passes == 3
    assert task.info.batches_per_epoch == 3 * n_train // 2 and task.info.val_batches >= 1
    assert ds["train"].count() == 3 * n_train
    model = task.build_modules()["model"]
    batch = next(iter(ds["val"].iter_torch_batches(batch_size=2)))
    metrics = task.eval_step({"model": model}, task.collate(batch, torch.device("cpu")))
    assert {"val_loss", "val_mel_l1", "val_mrstft"} <= set(metrics) and all(math.isfinite(v) for v in metrics.values())
    texts = task.eval_artifacts({"model": model}, str(tmp_path), step=7)
    wavs, pngs = sorted(glob.glob(str(tmp_path / "*.wav"))), sorted(glob.glob(str(tmp_path / "*.png")))
    assert len(wavs) == 2 * len(pngs) >= 2 and "clip0" in texts["audio_clips"]
    audio, sr = sf.read(wavs[-1])
    assert sr == 16000 and len(audio) > 1000
    assert open(pngs[0], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    bad = VocoderTask(_run_cfg(prepared["out"], {"family": "vocoder", "preset": "base"}))
    with pytest.raises(ConfigError, match="sample_rate"):
        bad.datasets()


def test_audio_vae_task_eval_artifacts(prepared, tmp_path):
    from megaray.tasks.audio_vae import AudioVAETask

    task = AudioVAETask(_run_cfg(prepared["out"], {"family": "audio_vae", "preset": "tiny"}))
    task.datasets()
    model = task.build_modules()["model"]
    task.eval_artifacts({"model": model}, str(tmp_path), step=0)
    assert glob.glob(str(tmp_path / "clip0_mel.png")) and glob.glob(str(tmp_path / "clip0_recon_griffinlim.wav"))
