"""The run sections of the text language-model families (gpt, mamba, ngpt, recurrent), contributed
through their ``FamilySpec.sections``: ``eval:`` (extra evaluations: HellaSwag, and the text
sampled at each evaluation) and ``generation:`` (the sampling defaults of ``megaray generate``;
the multimodal family contributes it too). A run of another family has neither key. Imports nothing heavier than
:mod:`megaray.config`, so ``megaray config`` stays torch-free.
"""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from megaray.config import OptionalPath, StrictConfig


class EvalConfig(StrictConfig):
    """Extra evaluations at every ``train.eval_every`` (text runs): HellaSwag, and a sample
    continuation of ``sample_prompt`` logged as a text artifact."""

    sample_prompt: str = Field(
        "The ", description="prompt continued at every evaluation (SFT runs: the user turn replied to)"
    )
    sample_tokens: int = Field(
        48, ge=0, description="tokens sampled at every evaluation (top-k 40, temperature 0.8); 0 = no sample"
    )
    hellaswag: OptionalPath = Field(
        None,
        description="HellaSwag JSONL (ctx, endings, label per line) scored at every evaluation "
        "(hellaswag_acc, hellaswag_acc_norm); None = off",
    )
    hellaswag_limit: Optional[int] = Field(None, gt=0, description="score only the first N examples; None = all")


class GenerationConfig(StrictConfig):
    """Sampling defaults of ``megaray generate --checkpoint RUN`` (read from the run's saved
    config); a flag given on the command line wins over each."""

    prompt: Optional[str] = Field(
        None, description="text to continue; None = 'The ' (multimodal checkpoints: the command's own default for --to)"
    )
    max_new_tokens: int = Field(64, gt=0, description="tokens to add (fewer if the end-of-text token comes)")
    temperature: float = Field(0.8, ge=0, description="0 = greedy")
    top_k: Optional[int] = Field(40, ge=0, description="sample among the k most likely tokens; None or 0 = all")
    top_p: Optional[float] = Field(None, gt=0, le=1, description="nucleus sampling; None = off")
    seed: int = Field(0, description="seed of the sampler")
