"""``megaray generate``: continue a prompt with a trained text model, in one process, once or
in an interactive loop (:func:`interactive`, the model loaded once).

Sampling settings come from the flags given, else from the run's ``generation:`` section
(:class:`megaray.tasks.lm_config.GenerationConfig`, saved with every checkpoint in ``config.yaml``).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional, TextIO

import torch

from megaray.tasks.lm_config import GenerationConfig

#: lines that end :func:`interactive` (besides end of input)
QUIT = ("", ":q")
#: the prompt of a text model when neither ``--prompt`` nor ``generation.prompt`` gives one
DEFAULT_PROMPT = "The "


def sampling(generation: GenerationConfig, **given: Any) -> Dict[str, Any]:
    """The run's ``generation`` defaults with every setting in ``given`` that is not None on top:
    ``{"prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed"}`` (``top_k`` 0 -> None,
    i.e. no top-k cut)."""
    out = generation.model_dump()
    unknown = set(given) - set(out)
    if unknown:
        raise TypeError(f"unknown sampling settings: {sorted(unknown)}")
    out.update({k: v for k, v in given.items() if v is not None})
    out["top_k"] = out["top_k"] or None
    return out


def run_generation(checkpoint: str | os.PathLike) -> GenerationConfig:
    """The ``generation`` section of the run config saved with ``checkpoint`` (or a run
    directory's latest checkpoint); no weights read.

    Raises:
        CheckpointError: no complete checkpoint there (:func:`megaray.weights.resolve`).
    """
    from megaray.families import load_config
    from megaray.weights import resolve

    cfg = load_config(resolve(checkpoint) / "config.yaml")
    return getattr(cfg, "generation", None) or GenerationConfig()  # a family without one: the defaults


class TextGenerator:
    """A text checkpoint loaded once (CUDA when available, else CPU), sampled any number of times.

    Attributes:
        model: the network in eval mode. cfg: the run config saved with the checkpoint (its
            ``generation`` section gives the defaults). checkpoint: the checkpoint directory.

    Raises:
        CheckpointError: no complete checkpoint, corrupt weights, or not a text model's
            (see :func:`megaray.inference.text.load_text_model`).
    """

    def __init__(self, checkpoint: str | os.PathLike, device: Optional[str] = None):
        from tokenizers import Tokenizer

        from megaray.inference.text import load_text_model

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.cfg, self.checkpoint, tokenizer_json = load_text_model(checkpoint, device)
        self.tokenizer = Tokenizer.from_str(tokenizer_json)

    def settings(self, **given: Any) -> Dict[str, Any]:
        """:func:`sampling` over this run's ``generation`` section."""
        return sampling(self.cfg.generation, **given)

    def __call__(self, prompt: Optional[str] = None, **given: Any) -> str:
        """Prompt + continuation. ``prompt`` None = ``generation.prompt``, else ``"The "``;
        ``given``: sampling settings (None = the run's default), see :func:`sampling`.

        Sampling is :func:`megaray.tasks.lm.sample_text` (temperature 0 = greedy; top-k, then
        nucleus top-p after Holtzman et al. 2020), seeded with ``seed``. A recurrent-depth
        checkpoint samples with its exit criterion (:func:`megaray.tasks.recurrent.sample_recurrent`;
        ``top_p`` unused) and the text ends with a line ``[mean core iterations per token: X]``."""
        from megaray.tasks.lm import sample_text

        s = self.settings(prompt=prompt, **given)
        text = DEFAULT_PROMPT if s["prompt"] is None else s["prompt"]
        if self.cfg.model.family == "recurrent":  # each token's depth chosen by the exit criterion
            from megaray.tasks.recurrent import sample_recurrent

            out = sample_recurrent(
                self.model,
                self.tokenizer,
                text,
                s["max_new_tokens"],
                temperature=s["temperature"],
                top_k=s["top_k"],
                seed=s["seed"],
            )
            return f"{out}\n[mean core iterations per token: {self.model.last_mean_steps:.2f}]"
        return sample_text(
            self.model, self.tokenizer, text, s["max_new_tokens"], s["temperature"], s["top_k"], s["top_p"], s["seed"]
        )


def generate_text(
    checkpoint: str | os.PathLike,
    prompt: Optional[str] = None,
    max_new_tokens: Optional[int] = None,
    temperature: Optional[float] = None,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    seed: Optional[int] = None,
) -> str:
    """Load a text checkpoint and its tokenizer, sample with a KV cache; returns prompt + continuation.

    Every setting left None comes from the run's ``generation`` section (defaults: prompt
    ``"The "``, 64 tokens, temperature 0.8, top-k 40, no top-p, seed 0); ``top_k`` 0 = no top-k
    cut. See :class:`TextGenerator`.

    Raises:
        CheckpointError: no complete checkpoint, corrupt weights, or not a text model's
            (see :func:`megaray.inference.text.load_text_model`).
    """
    return TextGenerator(checkpoint)(
        prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed
    )


def interactive(complete: Callable[[str], str], lines: TextIO, out: TextIO, show_prompt: bool = False) -> int:
    """A prompt loop: read ``lines`` one line at a time, write ``complete(line)`` and an empty line
    to ``out`` for each. Ends at end of input, an empty line or ``:q``. ``show_prompt``: write
    ``"> "`` before each read (a terminal). Returns the number of prompts answered.

    ``complete`` is e.g. a :class:`TextGenerator` with fixed settings, so the model is loaded
    once; every prompt is sampled with the same seed, so a line gives what ``megaray generate
    --prompt LINE`` gives."""
    answered = 0
    while True:
        if show_prompt:
            out.write("> ")
            out.flush()
        line = lines.readline()
        if not line:  # end of input
            if show_prompt:
                out.write("\n")
            break
        text = line.rstrip("\r\n")
        if text.strip() in QUIT:
            break
        out.write(complete(text) + "\n\n")
        out.flush()
        answered += 1
    return answered
