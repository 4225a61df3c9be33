"""RecurrentTask: language modelling with the recurrent-depth transformer (family ``recurrent``).

Everything but the depth is :class:`~megaray.tasks.lm.LMTask` (text shards, the positioned
stream, evaluation, checkpoints). Before each micro-batch the task hands the model the optimizer
step (:meth:`~megaray.models.recurrent.model.RecurrentGPT.set_step`), so every rank samples the
same number of core iterations at the same step (DDP / ZeRO collectives then match) and the
micro-batches of one accumulated step share it; the step metrics carry ``num_steps``, the depth
used. Evaluation runs ``round(recurrent_mean_thinking_steps)`` iterations; text samples use the
model's exit criterion (:meth:`RecurrentGPT.generate`).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

import torch

from megaray.tasks.base import Engine, unwrap
from megaray.tasks.lm import LMTask, _tokenizer

#: steps whose sampled depths average into the FLOPs per token used for MFU
MFU_DEPTH_SAMPLES = 256


class RecurrentTask(LMTask):
    """:class:`LMTask` for the ``recurrent`` family: per-step depth, ``num_steps`` in the step
    metrics, MFU from the mean FLOPs per token over the sampled depths."""

    def train_step(
        self, engines: Mapping[str, Engine], batch: Mapping[str, torch.Tensor], step: int
    ) -> Dict[str, float]:
        model = unwrap(engines["model"])
        model.set_step(step)
        metrics = super().train_step(engines, batch, step)
        return {**metrics, "num_steps": float(model.last_num_steps)}

    def flops_per_unit(self, modules: Mapping[str, torch.nn.Module]) -> Optional[float]:
        """Training FLOPs per token averaged over the depths the sampler draws for steps
        ``0 .. MFU_DEPTH_SAMPLES - 1`` (the loop takes one number per run; the truncated
        backprop makes the cost non-linear in depth, so this is the mean cost, not the cost of
        the mean depth)."""
        model = unwrap(modules["model"])
        costs = [model.flops_per_token(model.sample_num_steps(s)) for s in range(MFU_DEPTH_SAMPLES)]
        return float(sum(costs) / len(costs))

    def predict(
        self, model: torch.nn.Module, files: Mapping[str, str], inputs: List[Any], params: Mapping[str, Any]
    ) -> List[Any]:
        tok = _tokenizer(files["tokenizer.json"])
        return [
            sample_recurrent(
                model,
                tok,
                str(p),
                int(params["max_new_tokens"]),
                temperature=float(params["temperature"]),
                top_k=int(params["top_k"]) or None,
            )
            for p in inputs
        ]

    def eval_artifacts(self, modules: Mapping[str, torch.nn.Module], out_dir: str, step: int) -> Dict[str, Any]:
        """A sample continuation of ``eval.sample_prompt`` (top-k 40, temperature 0.8, the
        exit criterion choosing each token's depth) and the mean iterations per token."""
        n = self.cfg.eval.sample_tokens
        if not n or not self.info.tokenizer_path:
            return {}
        model = unwrap(modules["model"])
        text = sample_recurrent(model, _tokenizer(self.info.tokenizer_path), self.cfg.eval.sample_prompt, n, seed=step)
        return {"sample": f"{text}\n[mean core iterations per token: {model.last_mean_steps:.2f}]"}


def sample_recurrent(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: Optional[int] = 40,
    seed: int = 0,
) -> str:
    """Decode ``max_new_tokens`` after ``prompt`` with :meth:`RecurrentGPT.generate`; returns
    prompt + text (``model.last_mean_steps`` then holds the mean iterations per token)."""
    model = unwrap(model)
    ids = tokenizer.encode(prompt).ids or [0]
    device = next(model.parameters()).device
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(
        idx,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        stop_token=tokenizer.token_to_id("<|endoftext|>"),
        generator=g,
    )
    return tokenizer.decode(out[0].tolist(), skip_special_tokens=True)
