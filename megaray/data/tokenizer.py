"""Tokenizers with Hugging Face ``tokenizers``: train one, or load a ``tokenizer.json``.

Two kinds (:data:`KINDS`). ``"bpe"`` (default) is GPT-2 style: ``ByteLevel`` pre-tokenizer (no prefix space) and decoder, a
BPE model whose initial alphabet is all 256 byte symbols (so any text encodes, nothing maps to
``<unk>``), and one special token, :data:`EOS` (``<|endoftext|>``, id 0), appended after every
document by :func:`megaray.data.text.prepare_text`.

``"unigram"`` is SentencePiece style (Kudo 2018, "Subword Regularization"; as SentencePiece's
``--model_type=unigram --byte_fallback``): a ``Metaspace`` pre-tokenizer (spaces become ``▁``, one
``▁`` prepended, as SentencePiece's ``add_dummy_prefix``), a unigram LM trained by
``UnigramTrainer``, then 256 byte pieces ``<0x00>``..``<0xFF>`` so characters unseen in training
encode as UTF-8 bytes instead of ``<unk>``; decoder ``ByteFallback`` + ``Metaspace``. Special tokens
:data:`EOS` (id 0) and ``<unk>`` (id 1). As with SentencePiece, leading spaces of a text are not
restored by decoding (the dummy prefix is stripped); every other text round-trips exactly.

A loaded tokenizer must contain :data:`EOS` in its vocabulary.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megaray.errors import DataError
from megaray.fs import is_uri, resolve

#: end-of-document token, appended after every document.
EOS = "<|endoftext|>"

#: smallest useful vocabulary: 256 byte symbols + EOS.
MIN_VOCAB = 257

#: tokenizer kinds :func:`train_tokenizer` trains
KINDS = ("bpe", "unigram")
_UNK = "<unk>"
#: unigram: pieces learned besides the 256 byte-fallback pieces, at least
_MIN_UNIGRAM_PIECES = 16


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 8192,
    *,
    min_frequency: int = 2,
    length: Optional[int] = None,
    show_progress: bool = False,
    kind: str = "bpe",
) -> Tokenizer:
    """Train a byte-level BPE (or, ``kind="unigram"``, a SentencePiece-style unigram) on ``texts``
    (streamed; the iterable is consumed once).

    Args:
        texts: documents.
        vocab_size: target size including the 256 byte symbols and :data:`EOS`. The result can be
            smaller when the corpus has fewer mergeable pairs (read ``get_vocab_size()``).
        min_frequency: a pair must occur this often to be merged (BPE only).
        length: number of texts, for the progress display only.
        kind: ``"bpe"`` or ``"unigram"`` (module docstring).

    Raises:
        DataError: unknown ``kind``; ``vocab_size`` below :data:`MIN_VOCAB` (unigram: below
            256 byte pieces + EOS + ``<unk>`` + 16 learned pieces).
    """
    if kind not in KINDS:
        raise DataError(f"tokenizer kind {kind!r} is not one of {', '.join(KINDS)}")
    if kind == "unigram":
        return _train_unigram(texts, vocab_size, length, show_progress)
    if vocab_size < MIN_VOCAB:
        raise DataError(f"vocab_size={vocab_size} is below the {MIN_VOCAB} byte symbols + EOS a byte-level BPE needs")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return tok


def _train_unigram(texts: Iterable[str], vocab_size: int, length: Optional[int], show_progress: bool) -> Tokenizer:
    """SentencePiece-style unigram with byte fallback (module docstring); ``vocab_size`` counts the
    256 byte pieces, which are appended after training with scores below every learned piece."""
    import json

    pieces = vocab_size - 256
    if pieces < 2 + _MIN_UNIGRAM_PIECES:
        raise DataError(
            f"vocab_size={vocab_size} is too small for a unigram tokenizer: need at least "
            f"{256 + 2 + _MIN_UNIGRAM_PIECES} (256 byte pieces, {EOS}, {_UNK} and 16 learned pieces)"
        )
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=pieces, special_tokens=[EOS, _UNK], unk_token=_UNK, show_progress=show_progress
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    trained = json.loads(tok.to_str())["model"]
    vocab = [(p, s) for p, s in trained["vocab"]]
    low = min(s for _, s in vocab) - 1.0
    vocab += [(f"<0x{b:02X}>", low) for b in range(256)]
    tok.model = models.Unigram(vocab, trained["unk_id"], True)
    tok.decoder = decoders.Sequence(
        [decoders.ByteFallback(), decoders.Metaspace(replacement="\u2581", prepend_scheme="always")]
    )
    return tok


def tokenizer_kind(tok: Tokenizer) -> str:
    """``"bpe"``, ``"unigram"``, or the lower-cased model type of another ``tokenizer.json``."""
    import json

    return str(json.loads(tok.to_str())["model"]["type"]).lower()


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a ``tokenizer.json`` from a local path or a URI (``s3://...``).

    Raises:
        DataError: missing or unparsable file, or no :data:`EOS` token; names the path.
    """
    path = str(path)
    try:
        if is_uri(path):
            fs, p = resolve(path)
            with fs.open_input_stream(p) as f:
                tok = Tokenizer.from_str(f.read().decode("utf-8"))
        else:
            if not os.path.isfile(path):
                raise DataError(f"tokenizer not found: {path}")
            tok = Tokenizer.from_file(path)
    except DataError:
        raise
    except Exception as e:  # tokenizers raises plain Exception on bad JSON
        raise DataError(f"cannot load tokenizer {path}: {e}") from None
    if tok.token_to_id(EOS) is None:
        raise DataError(f"tokenizer {path} has no {EOS!r} token; megaray appends it after every document")
    return tok


def eos_id(tok: Tokenizer) -> int:
    """Id of :data:`EOS` in ``tok`` (raises DataError when absent)."""
    i = tok.token_to_id(EOS)
    if i is None:
        raise DataError(f"tokenizer has no {EOS!r} token")
    return int(i)
