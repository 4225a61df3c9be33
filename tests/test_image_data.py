"""Image data: decoding awkward files, prepare_images (Ray Data) over a folder with bad files plus
a WebDataset tar and a parquet file, crops for training (exact resume), and the CLI.

One ``prepare_images`` run (module fixture ``messy``) proves the reject and conversion claims;
the crop tests read the session's ``image_shards`` (scikit-image's photographs at size 32).
"""

from __future__ import annotations

import glob
import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from megaray.cli import app
from megaray.data import image as I
from megaray.errors import DataError

SIZE = 16  # every test image has shorter side 16, so stored pixels are exact (no resize)
RNG = np.random.default_rng(0)
GREY = RNG.integers(0, 256, (16, 18), dtype=np.uint8)
DEEP = RNG.integers(0, 65536, (20, 16), dtype=np.uint16)
PALETTE_IDX = RNG.integers(0, 4, (16, 20), dtype=np.uint8)
PALETTE = [(0, 0, 0), (10, 200, 30), (200, 20, 90), (40, 60, 250)]
PALETTE_ALPHA = [0, 255, 255, 128]  # index 0 fully transparent, index 3 half


def _save(img, fmt, **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **kw)
    return out.getvalue()


def _palette_png() -> bytes:
    img = Image.fromarray(PALETTE_IDX, mode="P")
    img.putpalette([c for rgb in PALETTE for c in rgb])
    return _save(img, "PNG", transparency=bytes(PALETTE_ALPHA))


def _exif_jpeg() -> bytes:
    """Stored 32 wide x 16 high, top half red, bottom half blue, EXIF Orientation 6 (display
    rotated 90 degrees clockwise: 16 wide x 32 high, red on the right)."""
    a = np.zeros((16, 32, 3), np.uint8)
    a[:8] = (255, 0, 0)
    a[8:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(Image.fromarray(a), "JPEG", quality=95, exif=exif.tobytes())


FILES = {
    "photos/cmyk.jpg": lambda: _save(Image.new("CMYK", (24, 16), (0, 255, 255, 0)), "JPEG", quality=95),
    "photos/exif.jpg": _exif_jpeg,
    "photos/truncated.jpg": lambda: _save(Image.fromarray(RNG.integers(0, 256, (40, 30, 3), dtype=np.uint8)), "JPEG")[
        :400
    ],
    "scans/grey.png": lambda: _save(Image.fromarray(GREY), "PNG"),
    "scans/grey.txt": lambda: b"a grey square\n",
    "scans/deep16.png": lambda: _save(Image.fromarray(DEEP), "PNG"),
    "scans/palette.png": _palette_png,
    "scans/notes.png": lambda: b"these are my notes, not a picture\n",
    "README.md": lambda: b"# my images\n",
}


def expected_palette() -> np.ndarray:
    """Palette colours composited over white with their alpha (tRNS)."""
    rgb = np.array(PALETTE, np.float64)[PALETTE_IDX]
    alpha = np.array(PALETTE_ALPHA, np.float64)[PALETTE_IDX][..., None] / 255
    return rgb * alpha + 255 * (1 - alpha)


def _tar(members) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.fixture(scope="module")
def messy(ray_cluster, tmp_path_factory):
    """A folder with good and bad images (+ a truncated tar), a WebDataset tar and a parquet file
    (Hugging Face image structs), prepared in one run at size 16."""
    root = tmp_path_factory.mktemp("messy")
    folder = root / "folder"
    for rel, make in FILES.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(make())
    png = _save(Image.fromarray(GREY), "PNG")
    (folder / "photos" / "broken.tar").write_bytes(_tar([("a.png", png)])[: 512 + 40])
    tar = root / "shard-000.tar"
    tar.write_bytes(
        _tar(
            [
                ("000.png", png),
                ("000.cls", b"scans"),
                ("000.txt", b"grey again"),
                ("001.jpg", FILES["photos/cmyk.jpg"]()),
                ("001.json", b'{"label": "photos"}'),
                ("002.txt", b"a caption without an image"),
            ]
        )
    )
    table = pa.table(
        {
            "name": ["p0", "junk", "p2"],
            "label": ["faces", "faces", "photos"],
            "image": [
                {"bytes": png, "path": "p0.png"},
                {"bytes": b"\x00garbage", "path": "junk.png"},
                {"bytes": FILES["photos/exif.jpg"](), "path": "p2.jpg"},
            ],
        }
    )
    pq.write_table(table, root / "faces.parquet")
    out = root / "out"
    man = I.prepare_images(
        [str(folder), str(tar), str(root / "faces.parquet")],
        str(out),
        size=SIZE,
        val_fraction=0.25,
        concurrency=2,
        verbose=False,
    )
    rows = {}
    for path in glob.glob(str(out / "*" / "*.parquet")):
        for r in pq.read_table(path).to_pylist():
            r["array"] = np.frombuffer(r["pixels"], np.uint8).reshape(r["height"], r["width"], 3)
            rows[r["name"]] = r
    return {"manifest": man, "rows": rows, "out": str(out), "folder": folder}


def test_prepare_keeps_usable_images_and_names_the_rest(messy):
    man, rows = messy["manifest"], messy["rows"]
    assert man["kind"] == "images" and man["size"] == SIZE
    assert set(rows) == {
        "photos/cmyk.jpg",
        "photos/exif.jpg",
        "scans/grey.png",
        "scans/deep16.png",
        "scans/palette.png",
        "shard-000.tar/000",
        "shard-000.tar/001",
        "faces.parquet#p0",
        "faces.parquet#p2",
    }
    assert man["images"] == 9 and man["splits"]["train"]["images"] + man["splits"]["val"]["images"] == 9
    assert man["splits"]["val"]["images"] >= 1
    by = man["rejected"]["by_reason"]
    counts = {k: v["count"] for k, v in by.items()}
    assert counts == {
        "truncated": 1,
        "not_an_image": 2,
        "unsupported_file": 1,
        "unreadable_tar": 1,
        "no_image_in_sample": 1,
    }
    assert man["rejected"]["total"] == 6
    assert by["truncated"]["examples"][0].startswith("photos/truncated.jpg: truncated")
    assert {e.split(":")[0] for e in by["not_an_image"]["examples"]} == {"scans/notes.png", "faces.parquet#junk"}
    assert by["unsupported_file"]["examples"][0].startswith(str(messy["folder"] / "README.md"))
    assert by["unreadable_tar"]["examples"][0].startswith("photos/broken.tar")
    assert by["no_image_in_sample"]["examples"][0].startswith("shard-000.tar/002")
    # labels: sub-folder names, the tar's .cls / .json members, the parquet label column
    assert man["labels"] == {"faces": 0, "photos": 1, "scans": 2}
    assert {n: r["label"] for n, r in rows.items() if "tar" in n or "#" in n} == {
        "shard-000.tar/000": "scans",
        "shard-000.tar/001": "photos",
        "faces.parquet#p0": "faces",
        "faces.parquet#p2": "photos",
    }
    assert all(man["labels"][r["label"]] == r["label_id"] for r in rows.values())
    assert rows["scans/grey.png"]["caption"] == "a grey square" and rows["shard-000.tar/000"]["caption"] == "grey again"
    assert man["captions"] == 2


def test_prepare_converts_every_mode_to_the_right_rgb(messy):
    rows = messy["rows"]
    grey = rows["scans/grey.png"]["array"]
    assert grey.shape == (16, 18, 3) and (grey == GREY[..., None]).all()
    deep = rows["scans/deep16.png"]["array"]  # 16-bit scaled by 255/65535, not clipped at 255
    assert deep.shape == (20, 16, 3)
    assert (deep == np.rint(DEEP * (255 / 65535)).astype(np.uint8)[..., None]).all()
    palette = rows["scans/palette.png"]["array"].astype(np.float64)
    assert np.abs(palette - expected_palette()).max() <= 1
    assert (rows["scans/palette.png"]["array"][PALETTE_IDX == 0] == 255).all()  # transparent -> white
    cmyk = rows["photos/cmyk.jpg"]["array"].astype(int)  # C=0 M=Y=255 K=0 is red
    assert cmyk.shape == (16, 24, 3) and np.abs(cmyk - [255, 0, 0]).max() <= 3
    for name in ("photos/exif.jpg", "faces.parquet#p2"):  # EXIF orientation applied: portrait, red on the right
        rot = rows[name]["array"].astype(int)
        assert rot.shape == (32, 16, 3)
        assert np.abs(rot[:, 10:] - [255, 0, 0]).max() <= 12 and np.abs(rot[:, :6] - [0, 0, 255]).max() <= 12


def test_decode_rejects_and_resizes_without_ray():
    s = I.ImagePrepSettings(size=8)
    png = bytearray(_save(Image.fromarray(RNG.integers(0, 256, (40, 40, 3), dtype=np.uint8)), "PNG"))
    png[200:260] = bytes(60)  # a corrupt IDAT chunk: the header parses, the pixel data does not
    for data, code in ((b"", "empty_file"), (bytes(png), "undecodable"), (b"hello", "not_an_image")):
        with pytest.raises(I.RejectedImage) as e:
            I.process_image(data, s)
        assert e.value.code == code
    big = _save(Image.fromarray(RNG.integers(0, 256, (300, 200, 3), dtype=np.uint8)), "JPEG")
    assert I.process_image(big, s).shape == (12, 8, 3)  # shorter side 8, 300:200 kept
    with pytest.raises(I.RejectedImage) as e:
        I.process_image(big, I.ImagePrepSettings(size=8, max_pixels=1000))
    assert e.value.code == "too_large"
    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    assert (I.process_image(_save(rgba, "PNG"), I.ImagePrepSettings(size=10)) == 255).all()


def test_empty_or_missing_source_is_a_data_error_naming_it(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty.*" + str(tmp_path / "empty")):
        I.prepare_images(str(tmp_path / "empty"), str(tmp_path / "out"), verbose=False)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("x")
    with pytest.raises(DataError, match="no images .*" + str(tmp_path / "docs")):
        I.prepare_images(str(tmp_path / "docs"), str(tmp_path / "out"), verbose=False)
    with pytest.raises(DataError, match="source not found: " + str(tmp_path / "nope")):
        I.prepare_images(str(tmp_path / "nope"), str(tmp_path / "out"), verbose=False)
    assert not (tmp_path / "out").exists()


def test_crop_box_is_a_function_of_seed_name_and_pass():
    boxes = [I.crop_box(3, "coffee", p, 32, 48, 24) for p in range(8)]
    assert boxes == [I.crop_box(3, "coffee", p, 32, 48, 24) for p in range(8)]
    assert len(set(boxes)) > 4 and {b[2] for b in boxes} == {True, False}
    assert all(0 <= t <= 8 and 0 <= left <= 24 for t, left, _ in boxes)
    assert I.crop_box(3, "coffee", 0, 32, 48, 24) != I.crop_box(4, "coffee", 0, 32, 48, 24)
    assert I.center_box(32, 48, 24) == (4, 12)


def test_skimage_set_batches_crops_and_exact_resume(image_shards):
    man = I.read_manifest(image_shards)
    assert man["size"] == 32 and {"astronaut", "coffee", "chelsea", "rocket", "retina", "lfw_face"} <= set(
        man["labels"]
    )
    assert man["rejected"]["total"] == 0 and man["splits"]["val"]["images"] > 0
    n_train, n_val = man["splits"]["train"]["images"], man["splits"]["val"]["images"]
    ds = I.image_datasets(image_shards, 24, seed=1, passes=2)
    for d in ds.values():
        d.context.execution_options.preserve_order = True  # as megaray.train.launch sets it
    batch = next(iter(ds["train"].iter_torch_batches(batch_size=16)))
    assert batch["image"].shape == (16, 3, 24, 24) and str(batch["image"].dtype) == "torch.float32"
    assert batch["label"].shape == (16,) and str(batch["label"].dtype) == "torch.int64"
    assert float(batch["image"].min()) >= -1 and float(batch["image"].max()) <= 1

    first, second = ds["train"].take_all(), ds["train"].take_all()
    assert len(first) == 2 * n_train
    assert all(np.array_equal(a["image"], b["image"]) and a["label"] == b["label"] for a, b in zip(first, second))
    pass0, pass1 = first[:n_train], first[n_train:]
    assert [r["label"] for r in pass0] == [r["label"] for r in pass1]
    differ = sum(not np.array_equal(a["image"], b["image"]) for a, b in zip(pass0, pass1))
    assert differ > 0.8 * n_train  # a new crop (and flip) of nearly every image on the second pass
    v1, v2 = ds["val"].take_all(), ds["val"].take_all()
    assert len(v1) == n_val and all(np.array_equal(a["image"], b["image"]) for a, b in zip(v1, v2))

    ex = I.load_examples(image_shards, "val", n=3)
    assert I.load_examples(image_shards, "val", n=1, size=24)[0]["image"].shape == (3, 24, 24)
    assert len(ex) == 3 and ex[0]["image"].shape == (3, 32, 32) and ex[0]["image"].dtype == np.float32
    assert -1 <= ex[0]["image"].min() and ex[0]["image"].max() <= 1 and ex[0]["label"] in man["labels"].values()
    centre = I.image_datasets(image_shards, 32, crop="center")["val"].take(1)[0]["image"]
    assert np.array_equal(centre, ex[0]["image"])  # val = centre crop, no flip, same pixels as load_examples
    with pytest.raises(DataError, match="crop size 40"):
        I.image_datasets(image_shards, 40)


runner = CliRunner()


def test_cli_help_and_errors_before_ray(monkeypatch, tmp_path):
    import megaray.train.launch as launch

    r = runner.invoke(app, ["prepare", "images", "--help"])
    assert r.exit_code == 0 and "--size" in r.output and "skimage" in r.output

    def boom(*a, **k):
        raise AssertionError("the command started Ray before reporting the error")

    monkeypatch.setattr(launch, "ensure_ray", boom)
    (tmp_path / "empty").mkdir()
    for src, needle in ((tmp_path / "empty", "source folder is empty"), (tmp_path / "nope", "source not found")):
        r = runner.invoke(app, ["prepare", "images", "--source", str(src), "--out", str(tmp_path / "out")])
        assert r.exit_code == 2, (r.output, r.exception)
        assert "error: " in r.output and needle in r.output and str(src) in r.output
    r = runner.invoke(app, ["prepare", "images", "--size", "0"])
    assert r.exit_code == 2 and "--size must be >= 1, got 0" in r.output


def test_a_crash_mid_write_keeps_the_previous_set(messy, monkeypatch):
    import megaray.data.image.prepare as P

    before = sorted(glob.glob(messy["out"] + "/**", recursive=True))
    manifest = open(messy["out"] + "/manifest.json").read()

    def crash(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(P, "write_manifest", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        I.prepare_images(
            str(messy["folder"] / "scans"), messy["out"], size=SIZE, overwrite=True, concurrency=2, verbose=False
        )
    assert sorted(glob.glob(messy["out"] + "/**", recursive=True)) == before
    assert open(messy["out"] + "/manifest.json").read() == manifest
    assert json.loads(manifest)["images"] == 9
