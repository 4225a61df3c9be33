"""Text data: prepare token shards once (:func:`prepare_text`), then stream packed LM windows
through Ray Data (:func:`text_datasets`). See ``docs/data.md``.

Modules: :mod:`.documents` (reading sources, rejects), :mod:`.writer` (spool, shard writer),
:mod:`.prepare` (the prepare stages), :mod:`.datasets` (manifest checks, packing, mixtures),
:mod:`.raw` (raw text tokenized inside Ray Data), :mod:`.stream` (the positioned multi-epoch
train stream: constant-time resume), :mod:`.nanogpt` (nanoGPT's ``train.bin``/``val.bin`` imported
as shards).
"""

from megaray.data.splits import SPLITS, split_key, split_of
from megaray.data.text.datasets import (
    Packer,
    check_same_tokenizer,
    check_shards,
    equal_batches,
    load_manifest,
    manifest_tokenizer,
    num_windows,
    shard_paths,
    text_datasets,
    text_stream,
    unigram_entropy,
)
from megaray.data.text.documents import SUPPORTED_EXTENSIONS
from megaray.data.text.nanogpt import import_nanogpt_bin
from megaray.data.text.prepare import STDLIB, prepare_text, summarize
from megaray.data.text.raw import raw_text_dataset
from megaray.data.text.stream import StreamSpec
from megaray.data.text.writer import TOKENS_SCHEMA

__all__ = [
    "SPLITS",
    "STDLIB",
    "SUPPORTED_EXTENSIONS",
    "TOKENS_SCHEMA",
    "Packer",
    "check_same_tokenizer",
    "check_shards",
    "equal_batches",
    "import_nanogpt_bin",
    "load_manifest",
    "manifest_tokenizer",
    "num_windows",
    "prepare_text",
    "raw_text_dataset",
    "shard_paths",
    "split_key",
    "split_of",
    "summarize",
    "text_datasets",
    "text_stream",
    "unigram_entropy",
    "StreamSpec",
]
