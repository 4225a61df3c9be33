"""Hugging Face ``datasets`` sources (``--source hf:...``) for the three prepares, and ``megaray prepare --list``.

Every dataset here is built locally with ``datasets`` (no hub: there is no network): real text
(standard-library docstrings), real speech (espeak-ng clips with their sentences and voices) and
real photographs (scikit-image's bundled ones, with hand-written captions), each written with
``save_to_disk`` and as parquet, then prepared through ``hf:`` sources. The text set then trains
a few steps (one Ray Train worker, the gpt ``debug`` preset), proving the shards are ordinary ones.
"""

from __future__ import annotations

import io
import json
import math
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from megaray.cli import app
from megaray.data import hf as H
from megaray.errors import DataError

datasets = pytest.importorskip("datasets")
runner = CliRunner()


def _table(path: str) -> "H.HFTable":
    return H.HFTable(f"hf:{path}")


# ----------------------------------------------------------------------------- grammar


@pytest.mark.parametrize(
    "source, name, config, split, local",
    [
        ("hf:wikitext", "wikitext", None, None, False),
        ("hf:wikitext:wikitext-2-raw-v1@train", "wikitext", "wikitext-2-raw-v1", "train", False),
        (
            "hf:openslr/librispeech_asr:clean@train.clean.100",
            "openslr/librispeech_asr",
            "clean",
            "train.clean.100",
            False,
        ),
        ("hf:HuggingFaceFW/fineweb-edu@train", "HuggingFaceFW/fineweb-edu", None, "train", False),
        ("hf:./data/speech@validation", "./data/speech", None, "validation", True),
        ("hf:/abs/ds", "/abs/ds", None, None, True),
        ("hf:~/ds@test", "~/ds", None, "test", True),
        ("hf:data/*.parquet", "data/*.parquet", None, None, True),
        ("hf:shards/part-0.parquet@train", "shards/part-0.parquet", None, "train", True),
    ],
)
def test_the_grammar_parses_hub_names_and_local_paths(source, name, config, split, local):
    spec = H.parse_hf(source)
    assert (spec.name, spec.config, spec.split, spec.local) == (name, config, split, local)


def test_row_ids_are_stable_names_not_paths(tmp_path, monkeypatch):
    assert H.parse_hf("hf:wikitext:wikitext-2-raw-v1@train").ident == "wikitext:wikitext-2-raw-v1"
    assert H.parse_hf(f"hf:{tmp_path}/speech/@train").ident == "speech"
    assert H.parse_hf(f"hf:{tmp_path}/pq/*.parquet").ident == "pq"
    # an existing path is a path as a whole, even with an @ in it
    odd = tmp_path / "a@b.parquet"
    odd.write_bytes(b"")
    spec = H.parse_hf(f"hf:{odd}")
    assert spec.local and spec.split is None and spec.name == str(odd)
    # a name that exists here is local, as load_dataset itself treats it
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    assert H.parse_hf("hf:mine@train").local


@pytest.mark.parametrize(
    "source, message",
    [
        ("hf:", "empty Hugging Face source"),
        ("hf:bad name!", "cannot parse 'hf:bad name!': expected hf:NAME[:CONFIG][@SPLIT]"),
        ("hf:a:b:c", "cannot parse"),
        ("stdlib", "not a Hugging Face source"),
    ],
)
def test_grammar_errors_show_the_grammar(source, message):
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        H.parse_hf(source)


def test_missing_local_datasets_fail_before_any_work(tmp_path):
    from megaray.cli.options import require_local_sources

    with pytest.raises(DataError, match="local Hugging Face dataset not found: ./nope"):
        H.check_hf_source("hf:./nope@train")
    with pytest.raises(DataError, match="local Hugging Face dataset not found"):
        require_local_sources([f"hf:{tmp_path}/*.parquet"], hf=True)
    require_local_sources(["hf:wikitext@train"], hf=True)  # hub names are checked when loaded
    with pytest.raises(DataError, match="source not found: hf:wikitext"):  # a command without hf: support
        require_local_sources(["hf:wikitext"])
    r = runner.invoke(app, ["prepare", "images", "--source", "hf:./nope", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "error: local Hugging Face dataset not found: ./nope" in r.output


def test_a_hub_name_is_streamed_and_a_failure_says_what_to_do(monkeypatch):
    calls = []

    def offline(*args, **kwargs):
        calls.append((args, kwargs))
        raise ConnectionError("huggingface.co unreachable")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        DataError,
        match=r"cannot load hf:wikitext:wikitext-2-raw-v1@train from the Hugging Face Hub: "
        r"ConnectionError: .*build it locally with save_to_disk",
    ):
        H.HFTable("hf:wikitext:wikitext-2-raw-v1@train")
    assert calls == [(("wikitext", "wikitext-2-raw-v1"), {"split": "train", "streaming": True})]


def test_without_datasets_the_error_names_the_extra(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(DataError, match=r"pip install 'megaray\[hf\]'"):
        H.HFTable(f"hf:{tmp_path}/x.parquet")


# ----------------------------------------------------------------------------- splits and columns


def test_splits_default_to_train_and_unknown_ones_are_named(tmp_path):
    ds = datasets.Dataset.from_dict({"text": ["a", "b"]})
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    datasets.DatasetDict({"dev": ds, "test": ds}).save_to_disk(str(tmp_path / "nodefault"))
    ds.save_to_disk(str(tmp_path / "one"))
    assert _table(f"{tmp_path}/dd").split == "train"
    assert _table(f"{tmp_path}/dd@test").split == "test"
    assert _table(f"{tmp_path}/one").display == f"hf:{tmp_path}/one@train"
    with pytest.raises(DataError, match="no split 'validation'; splits: train, test"):
        _table(f"{tmp_path}/dd@validation")
    with pytest.raises(DataError, match="several splits and none is 'train'; add @SPLIT, one of: dev, test"):
        _table(f"{tmp_path}/nodefault")
    with pytest.raises(DataError, match=r"has one split \('train'\), not 'test'"):
        _table(f"{tmp_path}/one@test")


def _saved(tmp_path, name, data, cast=None) -> str:
    """A one-split save_to_disk folder; ``cast``: column -> feature (Audio/Image/ClassLabel), applied
    after building (encoding an Audio value would need torchcodec; casting stored bytes does not)."""
    ds = datasets.Dataset.from_dict(data)
    for column, feature in (cast or {}).items():
        ds = ds.cast_column(column, feature)
    ds.save_to_disk(str(tmp_path / name))
    return f"{tmp_path}/{name}"


def test_text_column_detection_and_its_errors(tmp_path, capsys):
    t = _table(_saved(tmp_path, "named", {"title": ["x"], "content": ["y"], "n": [1]}))
    said = []
    assert H.choose_columns(t, "text", say=said.append) == {"text": "content"}
    assert said == [f"hf:{tmp_path}/named@train : text from column 'content' (detected)"]
    t = _table(_saved(tmp_path, "only", {"body": ["x"], "n": [1]}))
    assert H.choose_columns(t, "text") == {"text": "body"}
    t = _table(_saved(tmp_path, "two", {"title": ["x"], "body": ["y"], "n": [1]}))
    with pytest.raises(
        DataError,
        match=r"several columns could hold the text \(title, body\); pass --text-column NAME "
        r"\(columns: title \(string\), body \(string\), n \(int64\)\)",
    ):
        H.choose_columns(t, "text")
    assert H.choose_columns(t, "text", H.HFColumns(text="title"), said.append) == {"text": "title"}
    assert said[-1].endswith("text from column 'title' (given)")
    with pytest.raises(DataError, match=r"--text-column 'nope': no such column \(columns: title \(string\)"):
        H.choose_columns(t, "text", H.HFColumns(text="nope"))
    with pytest.raises(DataError, match=r"--text-column 'n' is int64, which cannot hold the text"):
        H.choose_columns(t, "text", H.HFColumns(text="n"))
    t = _table(_saved(tmp_path, "none", {"n": [1], "x": [0.5]}))
    with pytest.raises(
        DataError,
        match=r"no column holds the text; pass --text-column NAME \(columns: n \(int64\), "
        r"x \(float64\)\)",
    ):
        H.choose_columns(t, "text")


def test_audio_and_image_column_detection(tmp_path):
    audio = datasets.Audio()
    t = _table(
        _saved(
            tmp_path,
            "a",
            {
                "file": ["x.wav"],
                "clip": [{"bytes": b"RIFF", "path": None}],
                "normalized_text": ["hi"],
                "client_id": [7],
            },
            {"clip": audio},
        )
    )
    said = []
    assert H.choose_columns(t, "audio", say=said.append) == {
        "audio": "clip",
        "transcript": "normalized_text",
        "speaker": "client_id",
    }
    assert said[0].endswith(
        ": audio from column 'clip' (detected), transcript from 'normalized_text' (detected), "
        "speaker from 'client_id' (detected)"
    )
    t = _table(_saved(tmp_path, "arr", {"speech": [{"array": [0.0, 0.1], "sampling_rate": 16000}], "id": ["u1"]}))
    assert H.choose_columns(t, "audio") == {"audio": "speech", "transcript": None, "speaker": None}
    with pytest.raises(DataError, match=r"no column holds the audio; pass --audio-column NAME \(columns: id "):
        H.choose_columns(_table(_saved(tmp_path, "txt", {"id": ["u1"]})), "audio")
    labels = datasets.ClassLabel(names=["cat", "dog"])
    t = _table(
        _saved(
            tmp_path,
            "img",
            {"picture": [{"bytes": b"\x89PNG", "path": None}], "label": [1], "txt": ["a cat"]},
            {"picture": datasets.Image(), "label": labels},
        )
    )
    assert H.choose_columns(t, "images") == {"image": "picture", "caption": "txt", "label": "label"}
    assert t.class_names("label") == ["cat", "dog"]
    with pytest.raises(
        DataError,
        match=r"no column holds the image; pass --image-column NAME \(columns: label "
        r"\(ClassLabel\(cat, dog\)\)",
    ):
        H.choose_columns(_table(_saved(tmp_path, "lbl", {"label": [0]}, {"label": labels})), "images")


def test_cell_conversions():
    import soundfile as sf

    wave = np.sin(np.linspace(0, 100, 800, dtype=np.float32)) * 0.5
    data, path = H.audio_bytes({"array": wave.tolist(), "sampling_rate": 8000})
    back, sr = sf.read(io.BytesIO(data), dtype="float32")
    assert path == "" and sr == 8000 and np.array_equal(back, wave)  # float32 WAV: lossless
    stereo, _ = H.audio_bytes({"array": np.stack([wave, -wave]), "sampling_rate": 8000})  # (C, L) as datasets gives
    assert sf.read(io.BytesIO(stereo))[0].shape == (800, 2)
    assert H.audio_bytes({"bytes": None, "path": "/x/a.flac"}) == (b"", "/x/a.flac")
    assert H.audio_bytes(None) == (b"", "")
    png, why = H.image_bytes(np.zeros((4, 5, 3), np.uint8))
    assert png.startswith(b"\x89PNG") and why == ""
    assert H.image_bytes(None) == (None, "null image")
    assert H.image_bytes({"bytes": None, "path": "/nope.png"})[1].startswith("file not found")
    assert H.cell_text(["", " first caption ", "second"]) == "first caption"
    assert H.cell_name(1, ["cat", "dog"]) == "dog" and H.cell_name(None, None) == ""


def test_prepare_list_prints_every_prepare_command_and_its_sources():
    from megaray.cli.app import prepare_app
    from megaray.data.catalog import SOURCES

    r = runner.invoke(app, ["prepare", "--list"])
    assert r.exit_code == 0, r.output
    commands = {c.name for c in prepare_app.registered_commands}
    assert commands <= set(SOURCES), f"commands missing from megaray/data/catalog.py: {commands - set(SOURCES)}"
    for command in SOURCES:
        assert f"prepare {command}\n" in r.output
    for spelling in (
        "stdlib",
        "espeak",
        "skimage",
        "s3://",
        "hf:NAME[:CONFIG][@SPLIT]",
        "hf:./PATH[@SPLIT]",
        "LIBRISPEECH FOLDER",
        "train.bin",
    ):
        assert spelling in r.output


# ----------------------------------------------------------------------------- text end to end


@pytest.fixture(scope="module")
def docstrings():
    from megaray.data.stdlib import iter_stdlib_docstrings

    docs = []
    for _, text in iter_stdlib_docstrings():
        docs.append(text)
        if len(docs) == 240:
            return docs


@pytest.mark.slow
def test_text_from_save_to_disk_and_parquet_trains(docstrings, tmp_path, ray_cluster, capsys):
    """save_to_disk DatasetDict (column detected by name, bad rows counted by row id) -> prepare ->
    4 optimizer steps; and a parquet glob through the CLI with --text-column."""
    from conftest import REPO

    from megaray.data.text import prepare_text
    from megaray.families import load_config
    from megaray.train.launch import fit

    rows = docstrings + [None, "   ", "nul\x00inside", docstrings[0]]  # empty, empty, binary, duplicate
    ds = datasets.Dataset.from_dict({"title": [f"doc {i}" for i in range(len(rows))], "text": rows})
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(3))}).save_to_disk(str(tmp_path / "docs"))
    out = tmp_path / "shards"
    m = prepare_text([f"hf:{tmp_path}/docs@train"], str(out), vocab_size=260, val_fraction=0.1, progress=False)
    assert f"hf:{tmp_path}/docs@train : text from column 'text' (detected)" in capsys.readouterr().out
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == len(docstrings)
    assert m["files"]["by_extension"] == {"hf": 1}
    by = m["rejected"]["by_reason"]
    n = len(docstrings)
    assert by["empty"] == {"count": 2, "examples": [f"hf:docs/train/{n}", f"hf:docs/train/{n + 1}"]}
    assert by["binary"]["examples"] == [f"hf:docs/train/{n + 2}"] and by["duplicate"]["count"] == 1

    pq_dir = tmp_path / "pq"
    pq_dir.mkdir()
    datasets.Dataset.from_dict({"id": list(range(40)), "body": docstrings[:40]}).to_parquet(str(pq_dir / "a.parquet"))
    r = runner.invoke(
        app,
        [
            "prepare",
            "text",
            "--source",
            f"hf:{pq_dir}/*.parquet",
            "--text-column",
            "body",
            "--vocab-size",
            "260",
            "--val-fraction",
            "0.1",
            "--out",
            str(tmp_path / "pq-shards"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert f"hf:{pq_dir}/*.parquet@train : text from column 'body' (given)" in r.output
    assert json.loads((tmp_path / "pq-shards" / "manifest.json").read_text())["sources"] == [f"hf:{pq_dir}/*.parquet"]

    cfg = load_config(
        REPO / "configs" / "gpt_debug.yaml",
        [
            "name=hf-text",
            f"data.shards={out}",
            "scaling.num_workers=1",
            f"scaling.storage_path={tmp_path / 'runs'}",
            "train.max_steps=4",
            "train.eval_every=4",
            "train.checkpoint_every=4",
            "train.log_every=2",
            "tracking.enabled=false",
        ],
    )
    result = fit(cfg)
    assert result.metrics["step"] == 4
    assert math.isfinite(result.metrics["loss"]) and math.isfinite(result.metrics["val_loss"])


# ----------------------------------------------------------------------------- audio


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """6 espeak-ng clips: ``[(wav bytes, sentence, voice)]``."""
    from megaray.data.speech_corpus import build_speech_corpus

    root = tmp_path_factory.mktemp("hf-speech")
    manifest = build_speech_corpus(str(root / "raw"), n_clips=6, include_alsa=False)
    rows = [json.loads(line) for line in open(manifest)]
    return [
        (open(os.path.join(os.path.dirname(manifest), r["path"]), "rb").read(), r["text"], r["speaker"]) for r in rows
    ]


def test_audio_with_transcripts_from_save_to_disk_and_decoded_arrays_in_parquet(speech, tmp_path, ray_local, capsys):
    import soundfile as sf

    from megaray.data.audio import prepare_audio

    n = len(speech)
    # 1. save_to_disk, an Audio column of the wav bytes (+ a null and a corrupt row), sentence, speaker_id
    cells = [{"bytes": b, "path": None} for b, _, _ in speech] + [None, {"bytes": b"RIFF not really", "path": None}]
    ds = datasets.Dataset.from_dict(
        {
            "audio": cells,
            "sentence": [t for _, t, _ in speech] + ["", ""],
            "speaker_id": [s for _, _, s in speech] + ["x", "x"],
        }
    )
    ds.cast_column("audio", datasets.Audio()).save_to_disk(str(tmp_path / "speech-disk"))
    # 2. parquet with decoded arrays ({array, sampling_rate}, as datasets decodes them), transcription, speaker
    arrays = [sf.read(io.BytesIO(b), dtype="float32") for b, _, _ in speech]
    (tmp_path / "speech-pq").mkdir()
    datasets.Dataset.from_dict(
        {
            "speech": [{"array": a.tolist(), "sampling_rate": sr} for a, sr in arrays],
            "transcription": [t for _, t, _ in speech],
            "speaker": [s for _, _, s in speech],
        }
    ).to_parquet(str(tmp_path / "speech-pq" / "train-00000-of-00001.parquet"))

    out = tmp_path / "shards"
    m = prepare_audio(
        [f"hf:{tmp_path}/speech-disk", f"hf:{tmp_path}/speech-pq@train"],
        str(out),
        n_mels=40,
        n_fft=512,
        hop_length=128,
        val_fraction=0.25,
        concurrency=2,
        batch_size=4,
    )
    said = capsys.readouterr().out
    assert (
        "speech-disk@train : audio from column 'audio' (detected), transcript from 'sentence' (detected), "
        "speaker from 'speaker_id' (detected)"
    ) in said
    assert (
        "speech-pq@train : audio from column 'speech' (detected), transcript from 'transcription' (detected), "
        "speaker from 'speaker' (detected)"
    ) in said
    assert m["clips"] == 2 * n
    by = m["rejected"]["by_reason"]
    assert by["empty_file"]["examples"] == [f"hf:speech-disk/train/{n}: empty file (0 bytes)"]
    assert by["unreadable"]["examples"][0].startswith(f"hf:speech-disk/train/{n + 1}: unreadable")
    assert sorted(m["speakers"]) == sorted({s for _, _, s in speech})  # the corrupt rows' speaker 'x' claims no id

    rows = {r["name"]: r for split in ("train", "val") for r in pq.read_table(str(out / split)).to_pylist()}
    for i, (_, text, voice) in enumerate(speech):
        disk, arr = rows[f"hf:speech-disk/train/{i}"], rows[f"hf:speech-pq/train/{i}"]
        assert disk["text"] == arr["text"] == text and disk["speaker"] == arr["speaker"] == voice
        # the same clip, once as stored wav bytes and once as a decoded array: the same training waveform
        assert np.allclose(disk["waveform"], arr["waveform"], atol=1e-6)


# ----------------------------------------------------------------------------- images


PHOTOS = {  # skimage.data name -> (label, caption)
    "astronaut": ("person", "an astronaut in a white suit in front of the American flag"),
    "coffee": ("food", "a cup of coffee on a saucer with a spoon"),
    "chelsea": ("animal", "an orange tabby cat looking to the left"),
    "rocket": ("vehicle", "a rocket on its launch pad"),
    "motorcycle_left": ("vehicle", "a motorcycle seen from its left side"),
}
LABELS = ["animal", "food", "person", "vehicle"]


def test_images_with_captions_and_class_labels(tmp_path, ray_local, capsys):
    from megaray.data.image import prepare_images
    from megaray.data.image.skimage import PHOTOS as FILES, data_dir

    photos = {}
    for k in PHOTOS:
        with open(os.path.join(data_dir(), FILES[k]), "rb") as f:
            photos[k] = f.read()
    features = datasets.Features(
        {"image": datasets.Image(), "caption": datasets.Value("string"), "label": datasets.ClassLabel(names=LABELS)}
    )
    images = [{"bytes": b, "path": None} for b in photos.values()]
    captions = [c for _, c in PHOTOS.values()]
    labels = [LABELS.index(lbl) for lbl, _ in PHOTOS.values()]
    ds = datasets.Dataset.from_dict(
        {
            "image": images + [None, {"bytes": b"GIF89a junk", "path": None}],
            "caption": captions + ["nothing", "junk"],
            "label": labels + [0, 0],
        },
        features=features,
    )
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "photos"))
    (tmp_path / "photos-pq").mkdir()
    datasets.Dataset.from_dict(
        {"jpg": images, "txt": captions, "cls": [lbl for lbl, _ in PHOTOS.values()]},
        features=datasets.Features(
            {"jpg": datasets.Image(), "txt": datasets.Value("string"), "cls": datasets.Value("string")}
        ),
    ).to_parquet(str(tmp_path / "photos-pq" / "part-0.parquet"))

    out = tmp_path / "shards"
    m = prepare_images(
        [f"hf:{tmp_path}/photos", f"hf:{tmp_path}/photos-pq/*.parquet"],
        str(out),
        size=32,
        val_fraction=0.2,
        concurrency=2,
    )
    said = capsys.readouterr().out
    assert (
        "photos@train : image from column 'image' (detected), caption from 'caption' (detected), label from "
        "'label' (detected)" in said
    )
    assert (
        "*.parquet@train : image from column 'jpg' (detected), caption from 'txt' (detected), label from 'cls' "
        "(detected)" in said
    )
    n = len(PHOTOS)
    assert m["splits"]["train"]["images"] + m["splits"]["val"]["images"] == 2 * n
    by = m["rejected"]["by_reason"]
    assert by["empty_file"]["examples"] == [f"hf:photos/train/{n}: null image"]
    assert by["not_an_image"]["examples"][0].startswith(f"hf:photos/train/{n + 1}")
    assert sorted(m["labels"]) == LABELS
    rows = {r["name"]: r for split in ("train", "val") for r in pq.read_table(str(out / split)).to_pylist()}
    for i, (label, caption) in enumerate(PHOTOS.values()):
        for name in (f"hf:photos/train/{i}", f"hf:photos-pq/train/{i}"):
            assert rows[name]["caption"] == caption and rows[name]["label"] == label
            assert min(rows[name]["height"], rows[name]["width"]) == 32
