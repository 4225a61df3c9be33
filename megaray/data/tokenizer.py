"""Byte-level BPE tokenizers with Hugging Face ``tokenizers``: train one, or load a ``tokenizer.json``.

A trained tokenizer is GPT-2 style: ``ByteLevel`` pre-tokenizer (no prefix space) and decoder, a
BPE model whose initial alphabet is all 256 byte symbols (so any text encodes, nothing maps to
``<unk>``), and one special token, :data:`EOS` (``<|endoftext|>``, id 0), appended after every
document by :func:`megaray.data.text.prepare_text`.

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


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 8192,
    *,
    min_frequency: int = 2,
    length: Optional[int] = None,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE on ``texts`` (streamed; the iterable is consumed once).

    Args:
        texts: documents.
        vocab_size: target size including the 256 byte symbols and :data:`EOS`. The result can be
            smaller when the corpus has fewer mergeable pairs (read ``get_vocab_size()``).
        min_frequency: a pair must occur this often to be merged.
        length: number of texts, for the progress display only.

    Raises:
        DataError: ``vocab_size`` below :data:`MIN_VOCAB`.
    """
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
