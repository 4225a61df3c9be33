"""Helpers shared by several test files (fixtures live in ``conftest.py``; these are plain functions).

- :class:`StandInEngine`: the :class:`~megaray.tasks.base.Engine` surface a task's ``train_step``
  uses, over a plain torch optimizer, so a task trains in-process without DeepSpeed or Ray.
- :func:`read_trace`: the JSON lines a run writes under ``MEGARAY_TRACE`` (one file per rank).
- :func:`crash_then_rerun`: a run that dies right after step ``at_step`` (``MEGARAY_FAULT_AT_STEP``),
  then the same command again, as a user would re-run it.
- :func:`ray_start` / :func:`ray_stop`: a Ray node started with ``ray start`` on free ports, and
  that cluster's processes stopped (never ``ray stop --force``: it kills every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import pytest
import torch


class StandInEngine:
    """What a task needs of a DeepSpeed engine: call it as the module, ``module``, ``backward(loss)``,
    ``step()`` (an optimizer step, then gradients cleared) and the step count (``steps``, also as
    DeepSpeed's ``global_steps`` for :meth:`~megaray.tasks.base.Task.global_step`).

    Args:
        module: the network.
        lr: the optimizer's learning rate.
        optim: the optimizer class (``torch.optim.AdamW``; ``torch.optim.SGD`` ...), or None for an
            engine whose ``step()`` only counts (the gradients stay for the test to read).
        params: parameters or param groups (a task's :meth:`~megaray.tasks.base.Task.param_groups`);
            default ``module.parameters()``.
        **kwargs: more optimizer arguments (``betas``, ``weight_decay``).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        lr: float = 1e-3,
        optim: Optional[Callable[..., torch.optim.Optimizer]] = torch.optim.AdamW,
        params: Any = None,
        **kwargs: Any,
    ):
        self.module, self.steps = module, 0
        self.opt = optim(module.parameters() if params is None else params, lr=lr, **kwargs) if optim else None

    @property
    def global_steps(self) -> int:
        return self.steps

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        self.steps += 1


def read_trace(prefix: Union[str, Path], *ranks: int) -> List[Dict[str, Any]]:
    """The records of ``MEGARAY_TRACE=prefix`` (``<prefix>.rank<r>``, one JSON object a line, one
    line per trained micro-batch) of ``ranks`` (default: rank 0) in rank order; a rank's missing
    file gives nothing, and a last line still being written (no closing ``}``) is skipped."""
    out: List[Dict[str, Any]] = []
    for rank in ranks or (0,):
        p = Path(f"{prefix}.rank{rank}")
        lines = p.read_text().splitlines() if p.is_file() else []
        out += [json.loads(line) for line in lines if line.endswith("}")]
    return out


def crash_then_rerun(monkeypatch: pytest.MonkeyPatch, cfg: Any, trace: Path, at_step: int, rerun: Any = None) -> Any:
    """Train ``cfg`` with ``MEGARAY_TRACE=trace`` and ``MEGARAY_FAULT_AT_STEP=at_step`` (the run must
    end in the injected failure right after that step, checkpoint written), then train ``rerun``
    (default ``cfg``: the same command again) without the fault: the re-run's ``fit`` result.
    ``MEGARAY_TRACE`` stays set (both attempts append to the same trace)."""
    from megaray.train.launch import fit

    monkeypatch.setenv("MEGARAY_TRACE", str(trace))
    monkeypatch.setenv("MEGARAY_FAULT_AT_STEP", str(at_step))
    with pytest.raises(Exception, match="injected failure"):
        fit(cfg)
    monkeypatch.delenv("MEGARAY_FAULT_AT_STEP")
    return fit(cfg if rerun is None else rerun)


def ray_start(bin_dir: Path, *args: str, env: Dict[str, str]) -> None:
    """``ray start ARGS`` (``bin_dir``: the venv's ``bin``) with free ports for the dashboard agent,
    metrics and runtime-env agent, so several Ray nodes can run on one machine (their defaults
    collide), in ``env``.

    Raises:
        AssertionError: ``ray start`` failed (its output in the message).
    """
    from conftest import free_port

    agent_http, agent_grpc, metrics, rt_agent = (free_port() for _ in range(4))
    start = subprocess.run(
        [
            str(bin_dir / "ray"),
            "start",
            *args,
            f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={rt_agent}",
            "--disable-usage-stats",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert start.returncode == 0, start.stdout + start.stderr


def ray_stop(gcs_port: int) -> None:
    """Kill the processes of the cluster whose GCS listens on ``gcs_port`` (their command lines
    name the port), and only those: other clusters on the machine live on."""
    import psutil

    me = os.getpid()
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.info["pid"] != me and (
            f":{gcs_port}" in cmd or f"--gcs_server_port={gcs_port}" in cmd or f"--port={gcs_port}" in cmd
        ):
            try:
                p.kill()
            except psutil.Error:
                pass
