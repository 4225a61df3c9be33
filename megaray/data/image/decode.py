"""Per-image processing: bytes -> Pillow decode -> EXIF orientation -> RGB -> shorter side ``size``.

Every check that turns a file into a reject raises :class:`RejectedImage` with a reason ``code``
(counted under that name in the manifest, :mod:`megaray.data.rejects`) and a human detail
(``str(e)``). Colour handling (:func:`to_rgb`):

* EXIF orientation is applied (``PIL.ImageOps.exif_transpose``), so a photo shot in portrait is
  stored in portrait;
* transparency (RGBA, LA, PA, a palette or grey/RGB image with a ``transparency`` entry) is
  composited "over" an opaque white background;
* CMYK goes through its embedded ICC profile to sRGB when it has one (littleCMS), else Pillow's
  plain CMYK -> RGB;
* 16-bit and 32-bit integer grey (modes ``I;16*``, ``I``) is scaled ``v * 255 / 65535``
  (Pillow's own ``convert("L")`` clips at 255 instead of scaling); float grey (``F``) is taken as
  [0, 1] when its maximum is <= 1, else as [0, 255];
* everything else (1-bit, grey, palette, YCbCr, ...) through ``Image.convert("RGB")``.

Resizing follows guided-diffusion's ``center_crop_arr`` (the DiT / ADM reference): halve with a
box filter while the shorter side is at least twice ``size``, then bicubic to exactly ``size``.
Large JPEGs are first decoded at a reduced DCT scale (``Image.draft``), never below the target.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

#: file extensions read as images (lower case, with the dot).
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_INT_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class RejectedImage(ValueError):
    """A source file that cannot become a training image: ``code`` names the reason
    (``empty_file``, ``not_an_image``, ``truncated``, ``undecodable``, ``too_large``,
    ``unsupported_mode``); ``str(e)`` gives the detail."""

    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code = code

    def __reduce__(self):
        return RejectedImage, (self.code, str(self))


@dataclass
class ImagePrepSettings:
    """What :func:`megaray.data.image.prepare_images` does to each image (recorded in the manifest).

    Attributes:
        size: stored shorter side in pixels (the longer side keeps the aspect ratio).
        max_pixels: images with more pixels than this are rejected (``too_large``) before
            decoding: Pillow's decompression-bomb guard.
    """

    size: int = 256
    max_pixels: int = 1 << 28


def open_image(data: bytes, max_pixels: int = 1 << 28, draft_size: Optional[int] = None):
    """Decode image bytes fully with Pillow (first frame of animations) and apply EXIF orientation.

    Args:
        data: the file's bytes.
        max_pixels: reject larger images (``too_large``).
        draft_size: when given and the image is a JPEG whose shorter side is at least twice this,
            decode at the smallest DCT scale that keeps the shorter side >= ``draft_size``.

    Returns:
        ``(image, (width, height))``: a loaded ``PIL.Image.Image`` in its own mode (see
        :func:`to_rgb`), possibly reduced by the draft, and the full-resolution size after
        orientation (what the aspect ratio of the resized image follows).

    Raises:
        RejectedImage: ``empty_file``, ``not_an_image`` (Pillow cannot identify it, e.g. a text
            file named ``.png``), ``too_large``, ``truncated``, ``undecodable``.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise RejectedImage("empty_file", "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise RejectedImage("too_large", f"too large: {w}x{h} pixels > max_pixels {max_pixels}")
            if draft_size and img.format == "JPEG" and min(w, h) >= 2 * draft_size:
                scale = draft_size / min(w, h)
                img.draft(img.mode, (math.ceil(w * scale), math.ceil(h * scale)))
            img.load()
    except UnidentifiedImageError:
        raise RejectedImage(
            "not_an_image", f"not an image Pillow can read ({len(data)} bytes, starts {data[:8]!r})"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise RejectedImage("too_large", f"too large: {e}"[:200]) from None
    except RejectedImage:
        raise
    except OSError as e:
        code = "truncated" if "truncated" in str(e).lower() else "undecodable"
        raise RejectedImage(code, f"{code}: {e}"[:200]) from None
    except Exception as e:  # SyntaxError (broken PNG chunks), ValueError, struct.error, ...
        raise RejectedImage("undecodable", f"undecodable: {type(e).__name__}: {e}"[:200]) from None
    before = img.size
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block: keep the pixels as stored
        pass
    return img, ((h, w) if img.size != before else (w, h))


def to_rgb(img):
    """Any Pillow image -> an 8-bit ``RGB`` image (rules in the module docstring).

    Raises:
        RejectedImage: ``unsupported_mode`` when Pillow has no conversion for the mode.
    """
    from PIL import Image

    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in _INT_GREY_MODES or mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if mode == "F":
            a = a * 255.0 if np.nanmax(a, initial=0.0) <= 1.0 else a
        else:
            a = a * (255.0 / 65535.0)
        grey = np.clip(np.rint(np.nan_to_num(a)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "CMYK":
        return _cmyk_to_rgb(img)
    try:
        if mode in _ALPHA_MODES or "transparency" in img.info:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise RejectedImage("unsupported_mode", f"unsupported mode {mode}: {e}"[:200]) from None


def _cmyk_to_rgb(img):
    """CMYK -> sRGB through the embedded ICC profile when there is one, else ``convert("RGB")``."""
    icc = img.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception:  # no littleCMS, or a broken profile: fall back to the plain conversion
            pass
    return img.convert("RGB")


def resize_shorter(img, size: int, full_size: Optional[Tuple[int, int]] = None):
    """Resize so the shorter side is exactly ``size`` pixels, aspect ratio kept (longer side
    rounded; the ratio of ``full_size`` ``(width, height)`` when given, i.e. of the image before a
    JPEG draft reduced it, else of ``img``). Downscaling: box-filter halvings while the shorter side is >= ``2 * size``, then
    bicubic (guided-diffusion's ``center_crop_arr``, without its crop). Upscaling: bicubic."""
    from PIL import Image

    w, h = full_size or img.size
    scale = size / min(w, h)
    new = (size, max(size, round(h * scale))) if w <= h else (max(size, round(w * scale)), size)
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    return img if img.size == new else img.resize(new, resample=Image.BICUBIC)


def process_image(data: bytes, settings: ImagePrepSettings) -> np.ndarray:
    """Decode, orient, convert and resize one file's bytes.

    Returns:
        uint8 ``(H, W, 3)`` RGB with ``min(H, W) == settings.size``.

    Raises:
        RejectedImage: see :func:`open_image` and :func:`to_rgb`.
    """
    img, full_size = open_image(data, settings.max_pixels, draft_size=settings.size)
    img = resize_shorter(to_rgb(img), settings.size, full_size)
    out = np.asarray(img, dtype=np.uint8)
    if out.ndim != 3 or out.shape[2] != 3:  # pragma: no cover - to_rgb guarantees RGB
        raise RejectedImage("unsupported_mode", f"decoded to shape {out.shape}, not (H, W, 3)")
    return out
