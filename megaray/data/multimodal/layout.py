"""What one multimodal training row is: the five sequence layouts, and span content from shard rows.

Every source of ``data.sources`` is a prepared folder whose manifest says its kind: ``text``
(``megaray prepare text``: documents as token lists), ``audio`` (``megaray prepare audio``:
log-mels with transcripts), ``audio_latents`` (``megaray prepare audio-latents``: audio-VAE
latents with transcripts), ``images`` (``megaray prepare images``: pixels with a label and maybe
a caption) or ``image_latents`` (``megaray prepare image-latents``: image-VAE latents with a
label). One row of a source becomes one sequence of ``block_size`` positions:

==================  ===========================================================  ================
task (``task``)     sequence                                                     trained on
==================  ===========================================================  ================
0 text LM           ``doc tokens ...`` (its first ``block_size + 1`` tokens)     every next token
1 audio -> text     ``<|audio|> [audio] <|/audio|> transcript <eot>``            transcript, eot
2 text -> audio     ``transcript <|audio|> [audio] <|/audio|>``                  transcript,
                                                                                 ``<|audio|>``, audio
3 image -> text     ``<|image|> [image] <|/image|> caption <eot>``               caption, eot
4 text -> image     ``caption <|image|> [image] <|/image|>``                     caption,
                                                                                 ``<|image|>``, image
==================  ===========================================================  ================

``targets[t]`` is the id at ``t + 1`` where that position is trained on, else -100; content
positions (a span's patches, token id 0) and the position just before a span never carry a text
target, so the closing boundary is never predicted (spans have a fixed length: a generator
appends it). Text that does not fit is truncated; padding is token 0 / target -100. A speech or
image row is a to-text or a from-text example by a seeded coin (:data:`P_GENERATE` for
from-text). Captions are the row's caption, else :data:`CAPTION_TEMPLATE` with its label.

Audio content is ``(log_mel - mel_mean) / mel_std`` cropped (train: a seeded offset; val: from
the start) or zero-padded to ``audio_frames`` (``audio_valid`` counts the real frames). Image
content is the centred square of the stored image, resized (box halvings, then bicubic) to
``image_size``, as ``x / 127.5 - 1`` in [-1, 1].

Latent sources hold content the model takes as it is stored. An audio-latent row
(``latent_shape`` ``[C, n_mels / down_freq, F']``, the whole clip's posterior mean) becomes
``(C * n_mels / down_freq, F')`` frames (channel-major: ``model.n_mels`` is that product and
``audio_frames`` counts latent frames), cropped or padded as a log-mel is, without
``mel_mean`` / ``mel_std`` normalisation. An image-latent row is ``scaling_factor * z`` ``(C, h,
w)`` as stored (no [-1, 1] scaling; ``model.image_channels`` = C, ``image_size`` = h = w); its
caption is :data:`CAPTION_TEMPLATE` with the label's name (latent shards keep no captions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from megaray.models.multimodal.config import SpanLengths

#: probability that a speech / image row is a from-text (generation) example
P_GENERATE = 0.5
#: caption of an image row without one
CAPTION_TEMPLATE = "a photo of {label}"
TEXT_LM, AUDIO_TO_TEXT, TEXT_TO_AUDIO, IMAGE_TO_TEXT, TEXT_TO_IMAGE = range(5)
#: names of the ``task`` ids, for logging
TASKS = ("text_lm", "audio_to_text", "text_to_audio", "image_to_text", "text_to_image")
#: manifest kind -> modality
MODALITY = {"text": "text", "audio": "audio", "audio_latents": "audio", "images": "image", "image_latents": "image"}
#: columns read per manifest kind
COLUMNS = {
    "text": ["tokens"],
    "audio": ["mel", "n_frames", "text"],
    "audio_latents": ["latent", "latent_shape", "text"],
    "images": ["pixels", "height", "width", "label", "caption"],
    "image_latents": ["latent", "label"],
}
IGNORE = -100


@dataclass(frozen=True)
class Layout(SpanLengths):
    """Geometry of one sequence: from the model config (:meth:`from_model`) and the tokenizer.

    ``vocab_size`` is the text vocabulary; the boundary ids follow it (``<|audio|>`` =
    ``vocab_size``, ``<|/audio|>``, ``<|image|>``, ``<|/image|>``)."""

    block_size: int
    vocab_size: int
    eot_id: int
    n_mels: int = 80
    audio_frames: int = 32
    audio_patch: int = 4
    image_size: int = 16
    image_channels: int = 3
    patch_size: int = 4
    mel_mean: float = 0.0
    mel_std: float = 1.0

    @classmethod
    def from_model(cls, model: Any, eot_id: int) -> "Layout":
        keys = [f for f in cls.__dataclass_fields__ if f not in ("eot_id",)]
        return cls(eot_id=eot_id, **{k: getattr(model, k) for k in keys})

    @property
    def boa(self) -> int:
        return self.vocab_size

    @property
    def eoa(self) -> int:
        return self.vocab_size + 1

    @property
    def boi(self) -> int:
        return self.vocab_size + 2

    @property
    def eoi(self) -> int:
        return self.vocab_size + 3


def span_prompt(name: str, L: Layout) -> List[int]:
    """The start of a to-text row (tasks 1 and 3): ``<|name|> [0] * N <|/name|>`` ids for ``name``
    ``"audio"`` or ``"image"``; the span's content starts at position 1."""
    n = L.audio_tokens if name == "audio" else L.image_tokens
    bo, eo = (L.boa, L.eoa) if name == "audio" else (L.boi, L.eoi)
    return [bo] + [0] * n + [eo]


def sequence(task: int, text: Sequence[int], L: Layout) -> Tuple[np.ndarray, np.ndarray, int]:
    """One row's ``(tokens (T,) int64, targets (T,) int64, span_start)`` for ``task`` (module
    docstring). ``text``: the document (task 0, EOS included) or the transcript / caption ids
    (without eot). ``span_start``: first content position, -1 for text LM."""
    T = L.block_size
    tokens, targets = np.zeros(T, np.int64), np.full(T, IGNORE, np.int64)
    if task == TEXT_LM:
        w = np.asarray(text[: T + 1], np.int64)
        tokens[: min(len(w), T)] = w[:T]
        targets[: max(0, len(w) - 1)] = w[1:]
        return tokens, targets, -1
    audio = task in (AUDIO_TO_TEXT, TEXT_TO_AUDIO)
    n = L.audio_tokens if audio else L.image_tokens
    bo, eo = (L.boa, L.eoa) if audio else (L.boi, L.eoi)
    if task in (AUDIO_TO_TEXT, IMAGE_TO_TEXT):  # span, then the text and eot: loss on text + eot
        words = list(text[: max(0, T - n - 3)]) + [L.eot_id]
        seq = [bo] + [0] * n + [eo] + words
        tokens[: len(seq)] = seq
        first = n + 1  # position of the closing boundary: it predicts the first text token
        targets[first : first + len(words)] = words
        return tokens, targets, 1
    words = list(text[: max(0, T - n - 2)])  # text, then the span: loss on the text and <|open|>
    seq = words + [bo] + [0] * n + [eo]
    tokens[: len(seq)] = seq
    targets[: len(words)] = seq[1 : len(words) + 1]
    return tokens, targets, len(words) + 1


def crop_frames(x: np.ndarray, frames: int, rng: Optional[np.random.Generator]) -> Tuple[np.ndarray, int]:
    """``(C, frames)`` float32 crop of frames ``x`` ``(C, F)`` and its valid frames: offset
    uniform in ``[0, F - frames]`` from ``rng`` (None: from the start); shorter inputs are
    zero-padded."""
    F = x.shape[1]
    start = int(rng.integers(0, F - frames + 1)) if rng is not None and F > frames else 0
    piece = x[:, start : start + frames]
    out = np.zeros((x.shape[0], frames), np.float32)
    out[:, : piece.shape[1]] = piece
    return out, int(piece.shape[1])


def crop_mel(mel: np.ndarray, L: Layout, rng: Optional[np.random.Generator]) -> Tuple[np.ndarray, int]:
    """Normalised ``(n_mels, audio_frames)`` crop of a log-mel ``(n_mels, F)`` and its valid
    frames (:func:`crop_frames`); the padding stays zero after normalisation."""
    out, valid = crop_frames(mel, L.audio_frames, rng)
    out[:, :valid] = (out[:, :valid] - L.mel_mean) / L.mel_std
    return out, valid


def audio_latent_frames(latent: Sequence[float], shape: Sequence[int]) -> np.ndarray:
    """An audio-latent row (``latent`` flat, ``latent_shape`` ``[C, bands, F']``) as frames
    ``(C * bands, F')`` float32, channel-major (the model's ``n_mels`` is ``C * bands``)."""
    c, bands, frames = (int(v) for v in shape)
    return np.asarray(latent, np.float32).reshape(c * bands, frames)


def square_image(pixels: bytes, height: int, width: int, size: int) -> np.ndarray:
    """A stored image's centred square, resized to ``size`` (box halvings, then bicubic, as the
    prepare step), as float32 ``(3, size, size)`` in [-1, 1]."""
    from megaray.data.image.datasets import center_box

    side = min(height, width)
    top, left = center_box(height, width, side)
    hwc = np.frombuffer(pixels, np.uint8).reshape(height, width, 3)[top : top + side, left : left + side]
    if side != size:
        from PIL import Image

        from megaray.data.image.decode import resize_shorter

        hwc = np.asarray(resize_shorter(Image.fromarray(np.ascontiguousarray(hwc)), size))
    return hwc.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0
