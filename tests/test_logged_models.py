"""Every checkpoint an MLflow LoggedModel: one tiny 1-worker run (3 checkpoints, an evaluation at
each), then the models, their linked metrics, the best one as a query and as a registered version,
``megaray generate --checkpoint models:/...`` and the errors of bad model URIs."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import REPO
from typer.testing import CliRunner

from megaray.cli import app
from megaray.errors import CheckpointError
from megaray.families import load_config

REGISTERED = "megaray-logged-models-test"
runner = CliRunner()


@pytest.fixture(scope="module")
def run(ray_cluster, text_shards, tmp_path_factory):
    """6 steps of the debug GPT, a checkpoint and an evaluation every 2 steps, MLflow in SQLite;
    the best checkpoint registered as ``REGISTERED``."""
    from megaray.train.launch import fit

    tmp = tmp_path_factory.mktemp("logged-models")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = load_config(
        REPO / "configs" / "gpt_debug.yaml",
        [
            "name=logged",
            f"data.shards={text_shards}",
            f"scaling.storage_path={tmp / 'runs'}",
            "scaling.num_workers=1",
            "train.max_steps=6",
            "train.checkpoint_every=2",
            "train.eval_every=2",
            "train.log_every=2",
            "eval.sample_tokens=0",
            "tracking.system_metrics_interval_s=0",
            f"tracking.tracking_uri={uri}",
            f"tracking.register_model={REGISTERED}",
        ],
    )
    result = fit(cfg)
    return result, uri, cfg


def _models(client, run_id):
    exp = client.get_run(run_id).info.experiment_id
    return exp, client.search_logged_models(
        [exp], filter_string=f"source_run_id = '{run_id}' AND model_type = 'megaray-checkpoint'"
    )


@pytest.mark.slow
def test_every_checkpoint_is_a_logged_model_with_its_metrics(run):
    from mlflow.tracking import MlflowClient

    result, uri, _ = run
    client = MlflowClient(uri)
    _, models = _models(client, result.mlflow_run_id)
    by_step = {int(m.tags["megaray.step"]): m for m in models}
    assert sorted(by_step) == [2, 4, 6]
    for step, m in by_step.items():
        assert m.name == f"logged-step_{step:08d}" and m.source_run_id == result.mlflow_run_id
        ckpt = Path(m.tags["megaray.checkpoint"])
        assert ckpt == Path(result.run_dir) / f"step_{step:08d}"
        # scaling.num_to_keep (2) has deleted the first checkpoint; its model stays
        assert (ckpt / "megaray.json").is_file() == (step > 2)
        assert m.tags["megaray.family"] == "gpt" and m.tags["mlflow.model.isExternal"] == "true"
        assert m.params["checkpoint"] == str(ckpt)
        linked = {x.key: x for x in m.metrics}
        assert {"loss", "val_loss", "val_ppl", "tokens"} <= set(linked), sorted(linked)
        assert all(x.step == step for x in linked.values())
    # the run's own history keeps one point per step (the linked copies share its timestamps)
    for key in ("loss", "val_loss"):
        history = client.get_metric_history(result.mlflow_run_id, key)
        assert sorted(x.step for x in history) == [2, 4, 6], key
        for x in history:
            assert {(y.value, y.timestamp) for y in by_step[x.step].metrics if y.key == key} == {(x.value, x.timestamp)}
    # nothing uploaded: the models have no artifacts of their own
    assert all(not client.list_logged_model_artifacts(m.model_id) for m in models)


@pytest.mark.slow
def test_the_best_checkpoint_is_a_query_and_a_registered_version(run):
    import mlflow
    from mlflow.tracking import MlflowClient
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    result, uri, _ = run
    client = MlflowClient(uri)
    exp, models = _models(client, result.mlflow_run_id)
    val = {int(m.tags["megaray.step"]): next(x.value for x in m.metrics if x.key == "val_loss") for m in models}
    best_step = min(val, key=val.get)
    with _use_tracking_uri(uri):
        best = mlflow.search_logged_models(
            experiment_ids=[exp],
            filter_string=f"source_run_id = '{result.mlflow_run_id}'",
            order_by=[{"field_name": "metrics.val_loss", "ascending": True}],
            max_results=1,
            output_format="list",
        )[0]
    assert best.tags["megaray.step"] == str(best_step)
    versions = client.search_model_versions(f"name = '{REGISTERED}'")
    assert len(versions) == 1  # the best checkpoint only; the final pyfunc model is not registered
    v = versions[0]
    assert v.source == f"models:/{best.model_id}" and v.run_id == result.mlflow_run_id
    assert v.tags["megaray.metric"] == "val_loss" and float(v.tags["megaray.metric_value"]) == val[best_step]
    # registering again (a re-run of the finished run) adds no version
    from megaray.train.logged_models import register_best

    assert register_best(uri, result.mlflow_run_id, REGISTERED).version == v.version
    assert len(client.search_model_versions(f"name = '{REGISTERED}'")) == 1

    # maximising (tracking.register_metric: max:NAME) skips checkpoints that are gone
    from megaray.train.logged_models import best_model, parse_metric

    assert parse_metric("max:val_loss") == ("val_loss", False) and parse_metric("val_loss") == ("val_loss", True)
    kept = {s: v for s, v in val.items() if s > 2}
    worst = best_model(uri, result.mlflow_run_id, "val_loss", ascending=False)
    assert worst.tags["megaray.step"] == str(max(kept, key=kept.get))


@pytest.mark.slow
def test_generate_and_init_from_take_model_uris(run, monkeypatch):
    from mlflow.tracking import MlflowClient

    from megaray.train.launch import resolve_paths
    from megaray.weights import model_checkpoint, resolve

    result, uri, cfg = run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////nonexistent/mlflow.db")  # --tracking-uri overrides it
    client = MlflowClient(uri)
    _, models = _models(client, result.mlflow_run_id)
    m = next(m for m in models if m.tags["megaray.step"] == "4")
    args = ["--prompt", "The ", "--max-new-tokens", "6", "--temperature", "0"]
    direct = runner.invoke(app, ["generate", "--checkpoint", m.tags["megaray.checkpoint"], *args])
    assert direct.exit_code == 0, direct.output
    by_id = runner.invoke(app, ["generate", "--checkpoint", f"models:/{m.model_id}", "--tracking-uri", uri, *args])
    assert by_id.exit_code == 0, by_id.output
    assert by_id.output == direct.output
    version = client.search_model_versions(f"name = '{REGISTERED}'")[0]
    best_dir = client.get_logged_model(version.source.split("/")[-1]).tags["megaray.checkpoint"]
    registered = runner.invoke(
        app, ["generate", "--checkpoint", f"models:/{REGISTERED}/{version.version}", "--tracking-uri", uri, *args]
    )
    assert registered.exit_code == 0, registered.output
    assert registered.output == runner.invoke(app, ["generate", "--checkpoint", best_dir, *args]).output
    client.set_registered_model_alias(REGISTERED, "champion", version.version)
    for form in (f"models:/{REGISTERED}@champion", f"models:/{REGISTERED}/latest"):
        assert str(resolve(form, uri)) == best_dir

    # train.init_from: resolved on the driver, at the run's tracking URI, into the checkpoint
    fine = load_config(
        REPO / "configs" / "gpt_debug.yaml", [f"train.init_from=models:/{m.model_id}", f"tracking.tracking_uri={uri}"]
    )
    assert resolve_paths(fine).train.init_from == m.tags["megaray.checkpoint"]
    assert model_checkpoint(f"models:/{m.model_id}", uri) == m.tags["megaray.checkpoint"]


@pytest.mark.slow
def test_bad_model_uris_are_errors_naming_the_uri_and_what_to_do(run, tmp_path):
    from mlflow.entities import LoggedModelStatus
    from mlflow.tracking import MlflowClient

    from megaray.weights import model_checkpoint

    result, uri, _ = run
    cases = {
        "models:/": "no model named",
        "models:/m-0123456789abcdef": "not found (tracking URI",
        f"models:/{REGISTERED}/99": "not found",
        f"models:/{REGISTERED}/newest": "neither a version number",
        f"models:/{REGISTERED}@nosuchalias": "not found",
        "models:/no-such-model/1": "not found",
    }
    for bad, expected in cases.items():
        with pytest.raises(CheckpointError) as e:
            model_checkpoint(bad, uri)
        assert str(e.value).startswith(bad.rstrip("/")) and expected in str(e.value), str(e.value)
    with pytest.raises(CheckpointError, match="no MLflow database at .*pass --tracking-uri"):
        model_checkpoint("models:/m-1", f"sqlite:///{tmp_path / 'none.db'}")
    # a model that is not a megaray checkpoint, and one whose checkpoint is gone
    client = MlflowClient(uri)
    exp, models = _models(client, result.mlflow_run_id)
    other = client.create_logged_model(exp, name="not-megaray")
    client.finalize_logged_model(other.model_id, LoggedModelStatus.READY)
    with pytest.raises(CheckpointError, match="is not a megaray checkpoint"):
        model_checkpoint(f"models:/{other.model_id}", uri)
    gone = next(m for m in models if m.tags["megaray.step"] == "2")  # deleted by scaling.num_to_keep
    with pytest.raises(CheckpointError, match="no complete checkpoint any more .*num_to_keep"):
        model_checkpoint(f"models:/{gone.model_id}", uri)
    # through the CLI: one `error:` line, exit 2
    r = runner.invoke(app, ["generate", "--checkpoint", "models:/m-0123456789abcdef", "--tracking-uri", uri])
    assert r.exit_code == 2 and "error: models:/m-0123456789abcdef: not found" in r.output, r.output


def test_a_failing_tracking_store_is_a_warning_not_a_crash(caplog):
    """The hook runs inside the training loop: an MLflow failure must not end the run."""
    from megaray.train.logged_models import CheckpointModels

    class Broken:
        run_id = "r"

        class _client:  # noqa: N801 - stands in for an MlflowClient
            @staticmethod
            def get_run(run_id):
                raise ConnectionError("tracking server unreachable")

    hook = CheckpointModels(Broken(), "run", "gpt")
    with caplog.at_level(logging.WARNING, logger="megaray.tracking"):
        assert hook(2, "/runs/run/step_00000002", {"loss": 1.0}) is None
    assert "not registered as a LoggedModel" in caplog.text and "unreachable" in caplog.text
