"""``megaray export --format hf``: a trained GPT checkpoint as a Hugging Face model directory.

The directory holds ``config.json`` + ``generation_config.json``, ``model.safetensors`` (written
by ``save_pretrained``), and the run's tokenizer as ``tokenizer.json`` + ``tokenizer_config.json`` +
``special_tokens_map.json`` (through ``transformers.PreTrainedTokenizerFast``, ``<|endoftext|>`` as
its bos/eos/unk token), so
``AutoModelForCausalLM.from_pretrained(DIR)`` and ``AutoTokenizer.from_pretrained(DIR)`` load it
with nothing else installed. Weights go through :func:`megaray.models.gpt.convert.to_hf`: GPT-2
shaped configs become ``GPT2LMHeadModel``, Llama-shaped ones ``LlamaForCausalLM``; any other
config is refused, naming the fields that do not fit. Needs ``transformers`` and ``safetensors``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict

from megaray.data.tokenizer import EOS
from megaray.errors import ConfigError

FORMATS = ("hf",)


def export_checkpoint(
    checkpoint: str | os.PathLike, out: str | os.PathLike, fmt: str = "hf", overwrite: bool = False
) -> Dict[str, Any]:
    """Write ``checkpoint``'s model and tokenizer to ``out`` as a Hugging Face directory.

    Args:
        checkpoint: checkpoint directory or run directory (its latest checkpoint).
        out: a new (or empty) local directory; written in a sibling temporary directory and
            renamed into place, so a failed export leaves nothing behind.
        fmt: ``hf`` (the only format).
        overwrite: replace a non-empty ``out``.

    Returns:
        ``{"checkpoint", "out", "architecture", "files"}``.

    Raises:
        CheckpointError: no complete text checkpoint (names it).
        ConfigError: unknown format, a non-empty ``out``, a family other than ``gpt``, or a GPT
            config that neither GPT-2 nor Llama can express (names the fields).
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: supported formats are {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out {out} is not empty; choose a new directory or pass --overwrite")
    from megaray.inference.text import load_text_model

    model, cfg, ckpt, tokenizer_json = load_text_model(checkpoint, "cpu")
    if cfg.model.family != "gpt":
        raise ConfigError(
            f"{ckpt}: export --format hf supports the gpt family (GPT-2 or Llama shaped configs); "
            f"this checkpoint's family is {cfg.model.family!r}"
        )
    from megaray.models.gpt.convert import to_hf

    try:
        hf = to_hf(model)
    except ValueError as e:
        raise ConfigError(f"{ckpt}: cannot export to Hugging Face: {e}") from None
    tok = hf_tokenizer(tokenizer_json, cfg.model.block_size)
    hf.config.bos_token_id = hf.config.eos_token_id = tok.eos_token_id
    hf.generation_config.bos_token_id = hf.generation_config.eos_token_id = tok.eos_token_id
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        hf.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        _portable_tokenizer_files(tmp, tok)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "checkpoint": str(ckpt),
        "out": str(out.resolve()),
        "architecture": type(hf).__name__,
        "files": sorted(p.name for p in out.iterdir()),
    }


def hf_tokenizer(tokenizer_json: str, block_size: int):
    """A ``transformers.PreTrainedTokenizerFast`` around a megaray ``tokenizer.json`` (the same
    ``tokenizers`` model, so it encodes identically), with :data:`EOS` as bos/eos/unk token and
    ``model_max_length`` the model's context."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json),
        bos_token=EOS,
        eos_token=EOS,
        unk_token=EOS,
        model_max_length=block_size,
    )


def _portable_tokenizer_files(directory: Path, tok: Any) -> None:
    """transformers 5 names the class ``TokenizersBackend`` and keeps the special tokens in
    ``tokenizer_config.json`` only; name it ``PreTrainedTokenizerFast`` (its alias there, its
    class in transformers 4) and write ``special_tokens_map.json``, so both major versions load it."""
    cfg_path = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    special = {k: getattr(tok, k) for k in ("bos_token", "eos_token", "unk_token")}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
