"""megaray's elastic scaling policy (megaray.train.ray_compat.GlobalBatchElasticPolicy): Ray Train
V2's ElasticScalingPolicy restricted to the world sizes that divide the global batch, with growth of
a running group deferred to the run's next checkpoint.

No Ray cluster: the policy's two links to the AutoscalingCoordinator (the resource request and
the reserved resources it reads) are replaced by a fixed reservation, so each decision is the one
Ray's own code makes from it. The fake-cluster run is in test_cluster_autoscale.py.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

from ray.train import ScalingConfig
from ray.train.v2._internal.execution.scaling_policy import (
    ElasticScalingPolicy,
    NoopDecision,
    ResizeDecision,
)

from megaray.train.ray_compat import GlobalBatchElasticPolicy


def _policy(run_dir, fit: int, worlds=(1, 2, 3), cls=GlobalBatchElasticPolicy):
    """A policy for ``num_workers=(1, 3)`` that sees a reservation for ``fit`` workers."""
    config = ScalingConfig(num_workers=(1, 3), resources_per_worker={"CPU": 1}, elastic_resize_monitor_interval_s=0)
    policy = cls(config, str(run_dir), list(worlds)) if cls is GlobalBatchElasticPolicy else cls(config)
    policy.requested = []
    policy._maybe_send_resource_request = lambda: policy.requested.append(
        policy._get_num_workers_for_resource_request()
    )
    policy._get_reserved_resources = lambda: {"node-a": {"CPU": float(policy.fit)}}
    policy.fit = fit
    if cls is GlobalBatchElasticPolicy:
        policy.POLL_S = 0.0
    return policy


def _checkpoint(run_dir, step: int, world: int) -> None:
    d = run_dir / f"step_{step:08d}"
    d.mkdir(parents=True)
    for r in range(world):
        (d / f"rng_rank{r}.pt").write_bytes(b"")
    (d / "megaray.json").write_text(json.dumps({"step": step, "world_size": world}))


def _running(n: int):
    return SimpleNamespace(num_workers=n, start_time=float("-inf"))


def test_a_new_or_failed_group_starts_at_the_largest_allowed_size_that_fits(tmp_path):
    _checkpoint(tmp_path, 10, world=3)
    assert _policy(tmp_path, fit=3).make_decision_for_non_running_worker_group() == ResizeDecision(3, {"CPU": 1.0})
    # a lost node: 2 fit, the run goes on at 2 (the checkpoint was written by 3) without waiting
    assert _policy(tmp_path, fit=2).make_decision_for_non_running_worker_group() == ResizeDecision(2, {"CPU": 1.0})
    # 2 do not divide this global batch (e.g. 6 = micro-batch 2 x 3): it starts at 1 instead
    assert _policy(tmp_path, fit=2, worlds=(1, 3)).make_decision_for_non_running_worker_group() == ResizeDecision(
        1, {"CPU": 1.0}
    )
    assert isinstance(
        _policy(tmp_path, fit=1, worlds=(2, 3)).make_decision_for_non_running_worker_group(), NoopDecision
    )
    assert _policy(tmp_path, fit=3).requested == []  # (no decision asked yet)
    policy = _policy(tmp_path, fit=1)
    policy.make_decision_for_non_running_worker_group()
    assert policy.requested == [3]  # the autoscaler is asked for max


def test_growth_of_a_running_group_waits_for_the_next_checkpoint(tmp_path):
    _checkpoint(tmp_path, 10, world=1)
    ours, rays = _policy(tmp_path, fit=3), _policy(tmp_path, fit=3, cls=ElasticScalingPolicy)
    # Ray's policy restarts at once (losing every step since step 10); ours waits
    assert rays.make_decision_for_running_worker_group(_running(1), None) == ResizeDecision(3, {"CPU": 1.0})
    assert isinstance(ours.make_decision_for_running_worker_group(_running(1), None), NoopDecision)
    assert isinstance(ours.make_decision_for_running_worker_group(_running(1), None), NoopDecision)
    _checkpoint(tmp_path, 20, world=1)  # the next checkpoint is in storage: grow now, from it
    assert ours.make_decision_for_running_worker_group(_running(1), None) == ResizeDecision(3, {"CPU": 1.0})


def test_growth_goes_only_to_an_allowed_size(tmp_path):
    policy = _policy(tmp_path, fit=2, worlds=(1, 3))
    assert isinstance(policy.make_decision_for_running_worker_group(_running(1), None), NoopDecision)
    _checkpoint(tmp_path, 5, world=1)
    assert isinstance(policy.make_decision_for_running_worker_group(_running(1), None), NoopDecision)  # 2 not allowed
    policy.fit = 3
    policy.make_decision_for_running_worker_group(_running(1), None)  # decided: grow at the next checkpoint
    _checkpoint(tmp_path, 6, world=1)
    assert policy.make_decision_for_running_worker_group(_running(1), None) == ResizeDecision(3, {"CPU": 1.0})
