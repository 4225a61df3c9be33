"""Shared fixtures: one local Ray cluster per session, a small prepared corpus, an MLflow server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster with more logical CPUs than cores (a Tune driver, Train workers and
    Ray Data tasks must be schedulable side by side on a 2-core machine)."""
    import ray

    from megaray.train.launch import ensure_ray

    ensure_ray(num_cpus=8)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_local():
    """For Ray Data tests: the running cluster if there is one, else a module-scoped 4-CPU one
    (fewer parallel tasks than the 8-CPU session cluster: measured ~40 s faster on 2 cores),
    with Ray Data's progress bars off."""
    import ray
    from ray.data import DataContext

    started = not ray.is_initialized()
    if started:
        for attempt in range(3):  # Ray waits a fixed 30 s for its raylet: an overloaded 2-core box can miss it
            try:
                ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
                break
            except Exception:
                ray.shutdown()
                if attempt == 2:
                    raise
    DataContext.get_current().enable_progress_bars = False
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def text_shards(tmp_path_factory):
    """The stdlib-docstring corpus (a deterministic subset) tokenized with a 512-token BPE."""
    from megaray.data.text import prepare_text

    out = tmp_path_factory.mktemp("data") / "stdlib-512"
    prepare_text(["stdlib"], str(out), vocab_size=512, stdlib_max_docs=3000)
    return str(out)


@pytest.fixture(scope="session")
def speech_corpus(tmp_path_factory):
    """12 espeak-ng clips (several voices, 22.05 kHz wav): the corpus ``manifest.jsonl`` path
    (rows ``{"path": "wavs/...", "text", "speaker"}``, paths relative to it)."""
    from megaray.data.speech_corpus import build_speech_corpus

    return build_speech_corpus(str(tmp_path_factory.mktemp("speech-raw") / "raw"), n_clips=12, include_alsa=False)


@pytest.fixture(scope="session")
def speech_shards(ray_cluster, speech_corpus, tmp_path_factory):
    """The 12 clips of ``speech_corpus`` prepared into 16 kHz shards: 80 mels, n_fft 512, hop 128."""
    from megaray.data.audio import prepare_audio

    root = tmp_path_factory.mktemp("speech")
    corpus = speech_corpus
    out = root / "shards"
    prepare_audio(
        [str(corpus)],
        str(out),
        sample_rate=16000,
        n_mels=80,
        n_fft=512,
        hop_length=128,
        val_fraction=0.25,
        concurrency=2,
        verbose=False,
    )
    return str(out)


@pytest.fixture(scope="session")
def image_shards(ray_cluster, tmp_path_factory):
    """scikit-image's bundled photographs (+ random crops, lfw faces) prepared at size 32
    (kind "images", label = image name): the prepared folder path."""
    from megaray.data.image import prepare_images

    out = tmp_path_factory.mktemp("images") / "skimage-32"
    prepare_images("skimage", str(out), size=32, val_fraction=0.1, seed=0, concurrency=2, verbose=False)
    return str(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` process on loopback; yields its tracking URI."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    uri = f"http://127.0.0.1:{port}"
    import urllib.request

    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
        try:
            urllib.request.urlopen(uri + "/health", timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        proc.kill()
        raise RuntimeError("mlflow server did not start in 120 s")
    yield uri
    proc.terminate()
    proc.wait(timeout=30)


REPO = Path(__file__).resolve().parent.parent
