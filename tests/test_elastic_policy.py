"""megaray's elastic scaling policy (megaray.train.ray_compat.CheckpointSizedElasticPolicy): Ray Train
V2's ElasticScalingPolicy until the run has a checkpoint, then held at the checkpoint's world size.

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

from megaray.train.ray_compat import CheckpointSizedElasticPolicy


def _policy(run_dir, fit: int, cls=CheckpointSizedElasticPolicy):
    """A policy for ``num_workers=(1, 3)`` that sees a reservation for ``fit`` workers."""
    config = ScalingConfig(num_workers=(1, 3), resources_per_worker={"CPU": 1}, elastic_resize_monitor_interval_s=0)
    policy = cls(config, str(run_dir)) if cls is CheckpointSizedElasticPolicy else cls(config)
    policy.requested = []
    policy._maybe_send_resource_request = lambda: policy.requested.append(policy._get_num_workers_for_resource_request())
    policy._get_reserved_resources = lambda: {"node-a": {"CPU": float(fit)}}
    return policy


def _checkpoint(run_dir, step: int, world: int) -> None:
    d = run_dir / f"step_{step:08d}"
    d.mkdir(parents=True)
    for r in range(world):
        (d / f"rng_rank{r}.pt").write_bytes(b"")
    (d / "megaray.json").write_text(json.dumps({"step": step, "world_size": world}))


def _running(n: int):
    return SimpleNamespace(num_workers=n, start_time=float("-inf"))


def test_before_the_first_checkpoint_it_is_rays_elastic_policy(tmp_path):
    ours, rays = _policy(tmp_path, fit=3), _policy(tmp_path, fit=3, cls=ElasticScalingPolicy)
    for policy in (ours, rays):
        assert policy.make_decision_for_non_running_worker_group() == ResizeDecision(3, {"CPU": 1.0})
        assert policy.make_decision_for_running_worker_group(_running(1), None) == ResizeDecision(3, {"CPU": 1.0})
    assert ours.requested == rays.requested == [3, 3]  # the autoscaler is asked for max


def test_after_a_checkpoint_the_run_keeps_its_world_size(tmp_path):
    _checkpoint(tmp_path, 10, world=2)
    policy = _policy(tmp_path, fit=3)
    # running with 2: three fit now, Ray's policy would restart with 3 (and the resume would fail)
    assert isinstance(policy.make_decision_for_running_worker_group(_running(2), None), NoopDecision)
    assert _policy(tmp_path, fit=3, cls=ElasticScalingPolicy).make_decision_for_running_worker_group(
        _running(2), None) == ResizeDecision(3, {"CPU": 1.0})
    # a failed group restarts with the checkpoint's 2, not the 3 that fit
    assert policy.make_decision_for_non_running_worker_group() == ResizeDecision(2, {"CPU": 1.0})
    assert policy.requested[-1] == 2  # and the autoscaler is asked for 2


def test_a_failed_group_waits_for_the_checkpoints_world_size(tmp_path):
    _checkpoint(tmp_path, 10, world=2)
    policy = _policy(tmp_path, fit=1)
    assert isinstance(policy.make_decision_for_non_running_worker_group(), NoopDecision)  # 1 fits, 2 needed


def test_the_checkpoint_is_looked_for_until_found(tmp_path):
    policy = _policy(tmp_path, fit=3)
    assert policy.held_world() is None
    _checkpoint(tmp_path, 5, world=1)
    assert policy.held_world() == 1
    assert isinstance(policy.make_decision_for_running_worker_group(_running(1), None), NoopDecision)
