"""The embedded default image set: scikit-image's bundled photographs, random crops of each, and
its ``lfw_subset`` faces (``megaray prepare images --source skimage``).

Only files shipped inside the scikit-image wheel (``skimage.data.data_dir``) are used; images that
scikit-image fetches with ``pooch`` on first use (``brain``, ``eagle``, ``lily``, ``kidney``, ...)
are skipped, so the set is the same on every machine without a network. Synthetic images
(``checkerboard``, ``binary_blobs``, ``colorwheel``, ``logo``, ``horse``, ``shepp_logan_phantom``)
are left out: the set is photographs (and microscopy, astronomy, scanned pages).

* each photograph :data:`PHOTOS` (20 with scikit-image 0.26), read as its bundled PNG/JPEG bytes;
  label = its ``skimage.data`` name (``astronaut``, ``coffee``, ...), item name the same;
* :data:`CROPS` random square crops of each (side 40-80 % of the shorter side, position uniform,
  a pure function of the name and crop index), encoded as PNG; label = the photograph's name,
  item name ``<name>/crop<k>``;
* ``lfw_subset``: 100 faces (label ``lfw_face``) and 100 non-face background patches (label
  ``lfw_nonface``), 25 x 25 grey, from Labeled Faces in the Wild; item names
  ``lfw_subset/face_007``, ``lfw_subset/nonface_042``.
"""

from __future__ import annotations

import io
import os
import zlib
from typing import Any, Dict, List

import numpy as np

from megaray.data.image.records import item, unit

#: ``skimage.data`` name -> bundled file name (``cat`` is ``chelsea`` again, so it is not listed).
PHOTOS = {
    "astronaut": "astronaut.png",
    "brick": "brick.png",
    "camera": "camera.png",
    "cell": "cell.png",
    "chelsea": "chelsea.png",
    "clock": "clock_motion.png",
    "coffee": "coffee.png",
    "coins": "coins.png",
    "grass": "grass.png",
    "gravel": "gravel.png",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "immunohistochemistry": "ihc.png",
    "microaneurysms": "microaneurysms.png",
    "moon": "moon.png",
    "motorcycle_left": "motorcycle_left.png",
    "motorcycle_right": "motorcycle_right.png",
    "page": "page.png",
    "retina": "retina.jpg",
    "rocket": "rocket.jpg",
    "text": "text.png",
}
#: random crops per photograph.
CROPS = 4
LFW_FACES = 100  # lfw_subset: the first 100 of its 200 images are faces, the rest non-faces
LFW_FILE = "lfw_subset.npy"


def data_dir() -> str:
    """scikit-image's bundled data folder (inside the installed package)."""
    import skimage.data

    return skimage.data.data_dir


def skimage_units(crops: int = CROPS) -> List[Dict[str, Any]]:
    """Read units of the default set (see :func:`megaray.data.image.records.unit`), bundled files only.

    Raises:
        DataError: scikit-image is not installed, or none of its photographs are bundled.
    """
    from megaray.errors import DataError

    try:
        folder = data_dir()
    except ImportError:
        raise DataError("--source skimage needs scikit-image: pip install scikit-image") from None
    units = []
    for name, file in PHOTOS.items():
        path = os.path.join(folder, file)
        if not os.path.isfile(path):  # fetched with pooch in this scikit-image version: skip
            continue
        units.append(unit("skimage", path, name, name, index=-1))
        units += [unit("skimage", path, f"{name}/crop{k}", name, index=k) for k in range(crops)]
    if not units:
        raise DataError(f"no scikit-image photographs bundled in {folder}; pass --source FOLDER")
    lfw = os.path.join(folder, LFW_FILE)
    if os.path.isfile(lfw):
        n = len(np.load(lfw, mmap_mode="r"))
        for i in range(n):
            face = i < LFW_FACES
            name = f"lfw_subset/face_{i:03d}" if face else f"lfw_subset/nonface_{i - LFW_FACES:03d}"
            units.append(unit("lfw", lfw, name, "lfw_face" if face else "lfw_nonface", index=i))
    return units


def crop_window(name: str, k: int, width: int, height: int):
    """``(left, top, side)`` of crop ``k`` of photograph ``name``: side uniform in 40-80 % of the
    shorter side, position uniform; ``np.random.default_rng([crc32(name), k])``."""
    rng = np.random.default_rng([zlib.crc32(name.encode("utf-8")), k])
    side = max(1, int(rng.uniform(0.4, 0.8) * min(width, height)))
    left = int(rng.integers(0, width - side + 1))
    top = int(rng.integers(0, height - side + 1))
    return left, top, side


def skimage_item(u: Dict[str, Any]) -> Dict[str, Any]:
    """The item (bytes to decode) of one default-set unit: the bundled file, a PNG crop of it, or
    a PNG of one ``lfw_subset`` image."""
    from PIL import Image

    if u["kind"] == "lfw":
        face = np.load(u["uri"], mmap_mode="r")[u["index"]]
        face = np.asarray(face)
        face = face if face.dtype == np.uint8 else np.clip(np.rint(face * 255), 0, 255).astype(np.uint8)
        return item(u["name"], _png(Image.fromarray(face)), u["label"])
    with open(u["uri"], "rb") as f:
        data = f.read()
    if u["index"] < 0:
        return item(u["name"], data, u["label"])
    img = Image.open(io.BytesIO(data))
    img.load()
    left, top, side = crop_window(u["label"], u["index"], *img.size)
    return item(u["name"], _png(img.crop((left, top, left + side, top + side))), u["label"])


def _png(img) -> bytes:
    out = io.BytesIO()
    img.save(out, format="PNG", compress_level=1)
    return out.getvalue()
