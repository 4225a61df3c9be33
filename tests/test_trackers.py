"""Trackers beside MLflow: the fan-out (fake writers), TensorBoard and W&B (offline) writers read back
by their own readers, the run's console in ``log.txt``, and one 1-worker run that logs the same
scalars to MLflow, TensorBoard and W&B."""

from __future__ import annotations

import io
import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from megaray.errors import ConfigError
from megaray.train.console import _Bar, keep_console
from megaray.train.trackers import MLflowTracker, TensorBoardTracker, Trackers, WandbTracker, prepare


class Fake:
    """A Tracker that records its calls."""

    def __init__(self, fail_close: bool = False):
        self.calls, self.fail_close = [], fail_close

    def log_metrics(self, step, values):
        self.calls.append(("metrics", step, dict(values)))

    def log_image(self, key, path, step):
        self.calls.append(("image", key, Path(path).name, step))

    def log_audio(self, key, path, step):
        self.calls.append(("audio", key, Path(path).name, step))

    def log_text(self, key, text, step):
        self.calls.append(("text", key, text, step))

    def log_params(self, params):
        self.calls.append(("params", dict(params)))

    def close(self):
        self.calls.append(("close",))
        if self.fail_close:
            raise OSError("disk full")


def _media(folder: Path) -> None:
    """``samples.png`` (RGB 8x12), ``sub/clip0.wav`` (0.1 s of 440 Hz at 8 kHz), ``notes.json``."""
    import soundfile as sf
    from PIL import Image

    (folder / "sub").mkdir(parents=True)
    Image.fromarray(np.arange(8 * 12 * 3, dtype=np.uint8).reshape(8, 12, 3)).save(folder / "samples.png")
    sf.write(folder / "sub" / "clip0.wav", 0.5 * np.sin(np.arange(800) * 2 * math.pi * 440 / 8000), 8000)
    (folder / "notes.json").write_text("{}")


def test_trackers_fan_out_every_call_and_route_eval_files_by_kind(tmp_path):
    a, b = Fake(), Fake(fail_close=True)
    trackers = Trackers([a, b])
    trackers.log_params({"model.n_layer": 2})
    trackers.log_metrics(3, {"loss": 2.5, "lr": None, "grad_norm": float("nan"), "mfu": float("inf")})
    trackers.log_metrics(4, {"loss": float("nan")})  # nothing finite: no call
    _media(tmp_path / "eval")
    rest = trackers.log_folder(str(tmp_path / "eval"), 10)
    trackers.log_text("sample", "The cat", 10)
    with pytest.raises(OSError, match="disk full"):
        trackers.close()  # every tracker is closed, then the first error is raised
    want = [
        ("params", {"model.n_layer": 2}),
        ("metrics", 3, {"loss": 2.5}),
        ("image", "eval/samples", "samples.png", 10),
        ("audio", "eval/sub/clip0", "clip0.wav", 10),
        ("text", "sample", "The cat", 10),
        ("close",),
    ]
    assert a.calls == want and b.calls == want
    assert [Path(p).name for p in rest] == ["notes.json"]  # only MLflow keeps other files
    assert not Trackers() and not trackers  # closed: empty


def test_mlflow_tracker_keeps_the_artifact_layout():
    class Logger:
        enabled = True

        def __init__(self):
            self.calls = []

        def metrics(self, values, step):
            self.calls.append(("metrics", step, values))

        def artifact(self, path, artifact_path):
            self.calls.append(("artifact", path, artifact_path))

        def text(self, text, artifact_file):
            self.calls.append(("text", text, artifact_file))

    logger = Logger()
    t = MLflowTracker(logger)
    t.log_metrics(5, {"loss": 1.0})
    t.log_image("eval/samples", "/x/samples.png", 10)
    t.log_audio("eval/sub/clip0", "/x/sub/clip0.wav", 10)
    t.log_text("sample", "hi", 10)
    t.log_params({"a": 1})
    assert logger.calls == [
        ("metrics", 5, {"loss": 1.0}),
        ("artifact", "/x/samples.png", "eval/step_00000010"),
        ("artifact", "/x/sub/clip0.wav", "eval/step_00000010/sub"),
        ("text", "hi", "sample/step_00000010.txt"),
    ]


def test_a_missing_tracker_package_is_a_config_error_naming_the_pip_install(tmp_path, monkeypatch):
    import importlib.util

    from megaray.config import RunConfig

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = RunConfig.model_validate(
        {"model": {"family": "gpt", "preset": "debug"}, "tracking": {"wandb": {"project": "p", "mode": "offline"}}}
    )
    with pytest.raises(ConfigError, match=r"tracking.wandb: .*pip install wandb"):
        prepare(cfg, str(tmp_path / "run"))
    cfg.tracking.wandb.mode = "disabled"  # off: nothing needed
    assert prepare(cfg, str(tmp_path / "run")) == {}


def test_a_wandb_run_refused_for_credentials_is_a_config_error(tmp_path, monkeypatch):
    import wandb

    def refuse(**kwargs):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", refuse)
    with pytest.raises(ConfigError, match=r"tracking.wandb: W&B refused the run \(No API key.*mode=offline"):
        WandbTracker(project="p", run_id="x", name="n", mode="online", dir=str(tmp_path))


def test_prepare_keeps_one_wandb_id_per_run_and_mirrors_tensorboard_for_remote_storage(tmp_path):
    from megaray.config import RunConfig

    cfg = RunConfig.model_validate(
        {
            "name": "r1",
            "model": {"family": "gpt", "preset": "debug"},
            "tracking": {"tensorboard": True, "wandb": {"mode": "offline"}},
        }
    )
    local = prepare(cfg, str(tmp_path / "r1"))
    assert local["tensorboard"] == {"logdir": str(tmp_path / "r1" / "tensorboard"), "mirror": None}
    w = local["wandb"]
    assert (w["project"], w["name"], w["mode"], w["dir"]) == ("megaray", "r1", "offline", str(tmp_path / "r1"))
    assert (tmp_path / "r1" / "wandb-run-id").read_text().strip() == w["run_id"]
    assert prepare(cfg, str(tmp_path / "r1"))["wandb"]["run_id"] == w["run_id"]  # a re-run resumes it

    remote = (tmp_path / "bucket" / "r1").as_uri()  # file:// goes through the same pyarrow layer as s3://
    spec = prepare(cfg, remote)
    assert spec["tensorboard"]["mirror"] == remote + "/tensorboard" and spec["wandb"]["dir"] is None
    assert (tmp_path / "bucket" / "r1" / "wandb-run-id").is_file()
    tb = TensorBoardTracker(**{**spec["tensorboard"], "logdir": str(tmp_path / "tb-local")})
    tb.log_metrics(1, {"loss": 1.0})
    tb.close()
    assert [p.name for p in (tmp_path / "bucket" / "r1" / "tensorboard").iterdir()] == [
        p.name for p in (tmp_path / "tb-local").iterdir()
    ]


def test_tensorboard_and_wandb_hold_the_images_audio_and_texts(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _media(tmp_path / "eval")
    tb = TensorBoardTracker(str(tmp_path / "tb"))
    wb = WandbTracker(project="p", run_id="media1", name="media", mode="offline", dir=str(tmp_path / "wb"))
    trackers = Trackers([tb, wb])
    trackers.log_params({"model.n_layer": 2})
    trackers.log_metrics(10, {"loss": 1.5})
    trackers.log_folder(str(tmp_path / "eval"), 10)
    trackers.log_text("sample", "The <cat>", 10)
    trackers.close()

    ea = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "audio": 0, "tensors": 0})
    ea.Reload()
    (img,) = ea.Images("eval/samples")
    assert (img.step, img.width, img.height) == (10, 12, 8)
    (clip,) = ea.Audio("eval/sub/clip0")
    assert (clip.step, clip.sample_rate, clip.length_frames) == (10, 8000, 800)
    assert {"config/text_summary", "sample/text_summary"} <= set(ea.Tags()["tensors"])  # the text plugin's tags
    assert b"The <cat>" in ea.Tensors("sample/text_summary")[0].tensor_proto.string_val[0]

    (run,) = (tmp_path / "wb" / "wandb").glob("offline-run-*-media1")
    media = {p.relative_to(run / "files" / "media").parts[0] for p in (run / "files" / "media").rglob("*.*")}
    assert media == {"images", "audio", "html"}, media


# ---------------------------------------------------------------------------------------------- the console


def test_the_console_is_kept_in_log_txt_as_a_terminal_shows_it_across_restarts(tmp_path, capsys):
    run = tmp_path / "runs" / "r"
    logging.getLogger("megaray.test").addHandler(handler := logging.StreamHandler(sys.stderr))
    try:
        with keep_console(str(run)):
            print("device: CPU workers")
            # a tqdm bar: redrawn, cleared for a line written above it, closed with its last state
            sys.stdout.write("\rtrain 1/4 |#   |\r          \reval step 2: val_loss 3.0\n\rtrain 4/4 |####|\n")
            logging.getLogger("megaray.test").warning("a warning")
            with keep_console(str(run)) as inner:  # the same run again (the CLI around fit): nothing more
                assert inner is None
                print("inner line")
        with keep_console(str(run)):
            print("second attempt")
    finally:
        logging.getLogger("megaray.test").removeHandler(handler)
    with keep_console(str(run)):  # a handler made inside (Ray's, by ray.init) may keep its stream: harmless
        kept = sys.stdout
    kept.write("after the run\n")
    lines = (run / "log.txt").read_text().splitlines()
    assert lines[0].startswith("===== ") and " start: " in lines[0]
    assert lines[1:6] == [
        "device: CPU workers",
        "eval step 2: val_loss 3.0",
        "train 4/4 |####|",
        "a warning",
        "inner line",
    ]
    assert " restart: " in lines[6] and lines[7:] == ["second attempt", lines[8]] and " restart: " in lines[8]
    assert "device: CPU workers" in capsys.readouterr().out  # the terminal still gets everything

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    sys.stdout, real = Terminal(), sys.stdout
    try:  # on a terminal the bar is redrawn; log.txt gets one line per progress event and the bar's last state
        with keep_console(str(tmp_path / "tty")):
            bar = _Bar(4, "tokens", sys.stdout)
            for step in (2, 4):
                bar.progress({"step": step, "loss": 2.0 / step, "throughput": 10.0})
            bar.close()
    finally:
        sys.stdout = real
    lines = (tmp_path / "tty" / "log.txt").read_text().splitlines()
    assert [x.split(" | ")[:2] for x in lines[1:3]] == [["step 2/4", "loss 1.0000"], ["step 4/4", "loss 0.5000"]]
    assert len(lines) == 4 and lines[3].startswith("train 4/4 |##########|")

    fresh = (tmp_path / "bucket" / "refused").as_uri()  # a run refused before it made its folder: no trace
    with pytest.raises(ConfigError), keep_console(fresh):
        raise ConfigError("train.lr: must be > 0")
    assert not (tmp_path / "bucket" / "refused").exists()
    fresh_local = tmp_path / "runs" / "refused"
    with pytest.raises(ConfigError), keep_console(str(fresh_local)):
        raise ConfigError("train.lr: must be > 0")
    assert not fresh_local.exists()

    remote = (tmp_path / "bucket" / "r").as_uri()  # remote storage: written at the end, appended
    (tmp_path / "bucket" / "r" / "step_00000002").mkdir(parents=True)  # a run with a checkpoint, refused on restart
    for text in ("one", "two"):
        with pytest.raises(ConfigError), keep_console(remote):
            print(text)
            raise ConfigError("train.lr: must be > 0")  # the error that ends a run is its last line
    lines = (tmp_path / "bucket" / "r" / "log.txt").read_text().splitlines()
    assert [x for x in lines if not x.startswith("=====")] == [
        "one",
        "error: train.lr: must be > 0",
        "two",
        "error: train.lr: must be > 0",
    ]
    assert " restart: " in lines[3]


# ---------------------------------------------------------------------------------------------- one run


def _wandb_records(run_dir: Path) -> list:
    """Every record of an offline W&B run, read by W&B's own reader (``wandb leet inspect --json``)."""
    wandb = str(Path(sys.executable).with_name("wandb"))
    out = subprocess.run(
        [wandb, "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_one_run_logs_the_same_scalars_to_mlflow_tensorboard_and_wandb(ray_cluster, text_shards, tmp_path):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megaray.families import load_config
    from megaray.train.launch import fit

    cfg = load_config(
        REPO / "configs" / "gpt_debug.yaml",
        [
            "name=tracked",
            f"data.shards={text_shards}",
            f"scaling.storage_path={tmp_path / 'runs'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "scaling.num_workers=1",
            "train.max_steps=12",
            "train.log_every=3",
            "train.eval_every=12",
            "train.checkpoint_every=12",
            "eval.sample_tokens=8",
            "tracking.system_metrics_interval_s=0",
            "tracking.log_model=false",
            "tracking.log_checkpoints=false",
            "tracking.tensorboard=true",
            "tracking.wandb.project=megaray-test",
            "tracking.wandb.mode=offline",
        ],
    )
    result = fit(cfg)
    run_dir = Path(result.run_dir)

    client = MlflowClient(cfg.tracking.tracking_uri)
    keys = set(client.get_run(result.mlflow_run_id).data.metrics)
    mlflow = {k: {m.step: m.value for m in client.get_metric_history(result.mlflow_run_id, k)} for k in keys}
    assert {"loss", "lr", "grad_norm", "val_loss", "system/time_step_s", "tokens"} <= keys
    assert sorted(mlflow["loss"]) == [3, 6, 9, 12] and sorted(mlflow["val_loss"]) == [12]

    ea = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    assert set(ea.Tags()["scalars"]) == keys
    for k in keys:
        tb = {e.step: e.value for e in ea.Scalars(k)}
        assert tb.keys() == mlflow[k].keys(), k
        for step, v in mlflow[k].items():  # float32 in the event file
            assert tb[step] == pytest.approx(v, rel=1e-6, abs=1e-30), (k, step)

    run_id = (run_dir / "wandb-run-id").read_text().strip()
    (wb_dir,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}")
    records = _wandb_records(wb_dir)
    (head,) = [r["run"] for r in records if r["type"] == "run"]
    assert (head["display_name"], head["run_id"], head["project"]) == ("tracked", run_id, "megaray-test")
    config = {k: v for r in records if r["type"] == "config" for k, v in r["config"]["update"].items()}
    config.update(head.get("config", {}).get("update", {}))
    assert config["model.n_layer"] == cfg.model.n_layer  # the run config
    history = [r["history"] for r in records if r["type"] == "history"]
    wb, media = {}, {}
    for h in history:  # a media value is flattened into <key>._type, <key>.path, ...
        step, item = h["step"]["num"], h["item"]
        media.update({k[: -len("._type")]: (step, v) for k, v in item.items() if k.endswith("._type")})
        for k, v in item.items():
            if not k.startswith("_") and k.split(".")[0] not in media:
                wb.setdefault(k, {})[step] = v
    assert wb.keys() == keys
    for k in keys:
        assert wb[k].keys() == mlflow[k].keys(), k
        for step, v in mlflow[k].items():
            assert wb[k][step] == pytest.approx(v, rel=1e-9, abs=1e-30), (k, step)
    assert media == {"sample": (12, "html-file")}  # the eval text

    log = (run_dir / "log.txt").read_text()
    assert log.startswith("===== ") and " start: " in log.splitlines()[0]
    for line in (
        "device: CPU workers",
        "step 3/12 | loss",
        "step 12/12 | loss",
        "eval step 12: val_loss",
        "done: step 12",
    ):
        assert line in log, line
