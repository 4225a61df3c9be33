"""``megaray eval --task hellaswag``: HellaSwag accuracy of a trained text model, in process for a
small file and over Ray Data (an actor pool, each actor holding the model) for a large one, logged
to MLflow when a tracking URI is set. The scoring itself is :mod:`megaray.tasks.hellaswag`
(completion style, as llm.c's ``hellaswag.py``).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from megaray.tasks.hellaswag import Example, accuracy, read_hellaswag, score

#: files with more examples than this are scored over Ray Data
RAY_ABOVE = 2000


class HellaSwagScorer:
    """Ray Data ``map_batches`` actor: loads the checkpoint once, scores batches of examples.

    Batches hold ``line`` (int64) and ``example`` (JSON text of ``{"ctx", "endings", "label"}``
    token ids); the output adds ``label``, ``pred``, ``pred_norm`` and ``sum_loss`` /
    ``mean_loss`` ``(n, 4)`` float32."""

    def __init__(self, checkpoint: str, batch_examples: int):
        from megaray.inference.text import load_text_model

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_text_model(checkpoint, self.device)[0]
        self.batch_examples = batch_examples

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        examples = [Example(line=int(n), **json.loads(e)) for n, e in zip(batch["line"], batch["example"])]
        res = score(self.model, examples, self.device, self.batch_examples)
        return {
            "line": np.array([r["line"] for r in res]),
            "label": np.array([r["label"] for r in res]),
            "pred": np.array([r["pred"] for r in res]),
            "pred_norm": np.array([r["pred_norm"] for r in res]),
            "sum_loss": np.array([r["sum_loss"] for r in res], dtype=np.float32),
            "mean_loss": np.array([r["mean_loss"] for r in res], dtype=np.float32),
        }


def score_with_ray(
    checkpoint: str, examples: Sequence[Example], batch_examples: int = 8, concurrency: int = 2
) -> List[Dict[str, Any]]:
    """:func:`megaray.tasks.hellaswag.score` results over Ray Data: ``concurrency`` actors
    (one GPU each when CUDA is visible to the driver, else one CPU), results in file order."""
    import ray

    from megaray.train.launch import ensure_ray

    ensure_ray()
    rows = [
        {"line": ex.line, "example": json.dumps({"ctx": ex.ctx, "endings": ex.endings, "label": ex.label})}
        for ex in examples
    ]
    gpus = 1 if torch.cuda.is_available() else 0
    ds = ray.data.from_items(rows).map_batches(
        HellaSwagScorer,
        fn_constructor_kwargs={"checkpoint": checkpoint, "batch_examples": batch_examples},
        batch_size=batch_examples * 4,
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_gpus=gpus,
        num_cpus=1,
        batch_format="numpy",
    )
    out = [
        {
            "line": int(r["line"]),
            "label": int(r["label"]),
            "pred": int(r["pred"]),
            "pred_norm": int(r["pred_norm"]),
            "sum_loss": [float(x) for x in r["sum_loss"]],
            "mean_loss": [float(x) for x in r["mean_loss"]],
        }
        for r in ds.take_all()
    ]
    return sorted(out, key=lambda r: r["line"])


def evaluate_hellaswag(
    checkpoint: str,
    data: str,
    *,
    limit: Optional[int] = None,
    batch_examples: int = 8,
    ray_above: int = RAY_ABOVE,
    concurrency: int = 2,
    tracking_uri: Optional[str] = None,
    predictions: Optional[str] = None,
) -> Dict[str, Any]:
    """``acc`` / ``acc_norm`` of a checkpoint on a HellaSwag JSONL file.

    Args:
        checkpoint: checkpoint directory or run directory (its latest checkpoint).
        data: HellaSwag JSONL (``ctx``, ``endings``, ``label`` per line; the user's own copy).
        limit: the first N good examples only.
        ray_above: more examples than this are scored over Ray Data (``concurrency`` actors).
        tracking_uri: log params, metrics and the per-example predictions to a new MLflow run
            in the run's experiment (None: ``$MLFLOW_TRACKING_URI`` when set, else no logging).
        predictions: also write the per-example results (JSONL) here.

    Returns:
        ``{"checkpoint", "step", "task", "data", "examples", "acc", "acc_norm", "bad_lines",
        "bad", "truncated", "backend", "seconds", "mlflow_run_id"}``.

    Raises:
        CheckpointError: no complete text checkpoint. DataError: missing file or no usable line.
    """
    from tokenizers import Tokenizer

    from megaray.inference.text import load_text_model
    from megaray.train.checkpoint import read_state

    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, cfg, ckpt, tok = load_text_model(checkpoint, "cpu")
    found = read_hellaswag(data, Tokenizer.from_str(tok), cfg.model.block_size, limit)
    use_ray = len(found.examples) > ray_above
    if use_ray:  # each actor loads the checkpoint itself
        results = score_with_ray(str(ckpt), found.examples, batch_examples, concurrency)
    else:
        results = score(model.to(device), found.examples, device, batch_examples)
    acc = accuracy(results)
    out: Dict[str, Any] = {
        "checkpoint": str(ckpt),
        "step": (read_state(ckpt) or {}).get("step"),
        "task": "hellaswag",
        "data": os.path.abspath(data),
        "examples": len(results),
        "acc": round(acc["acc"], 5),
        "acc_norm": round(acc["acc_norm"], 5),
        "bad_lines": found.n_bad,
        "bad": {why: lines[:20] for why, lines in found.bad.items()},
        "truncated": found.truncated,
        "backend": "ray_data" if use_ray else "in_process",
        "seconds": round(time.perf_counter() - t0, 2),
    }
    text = "".join(json.dumps(r) + "\n" for r in results)
    if predictions:
        with open(predictions, "w") as f:
            f.write(text)
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    out["mlflow_run_id"] = _log(uri, cfg, out, text) if uri else None
    return out


def _log(uri: str, cfg: Any, out: Dict[str, Any], predictions: str) -> str:
    """A finished MLflow run ``<run name>/hellaswag`` in the run's experiment; returns its id."""
    from megaray.train import mlflow as tracking

    params = {
        k: out[k] for k in ("checkpoint", "step", "task", "data", "examples", "bad_lines", "truncated", "backend")
    }
    run_id = tracking.start_run(
        uri,
        cfg.tracking.experiment,
        run_key=f"eval:{out['checkpoint']}:{out['data']}@{time.time()}",
        run_name=f"{cfg.name}/hellaswag",
        params=params,
        tags={"megaray.eval.task": "hellaswag"},
    )
    rl = tracking.RunLogger(uri, run_id)
    rl.metrics({"hellaswag_acc": out["acc"], "hellaswag_acc_norm": out["acc_norm"]}, step=int(out["step"] or 0))
    rl.text(predictions, "hellaswag/predictions.jsonl")
    tracking.end_run(uri, run_id)
    return run_id
