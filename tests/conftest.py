"""Shared pytest fixtures. Each owner keeps their fixtures in a clearly marked block."""
from __future__ import annotations

# ==== MLflow server (owner: tracking) ===========================================================
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

MLFLOW_START_TIMEOUT_S = 180  # first start migrates a fresh sqlite db: ~8 s here when idle, more under load


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(uri: str, proc: subprocess.Popen, log_file: Path) -> None:
    deadline = time.monotonic() + MLFLOW_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n"
                               f"{log_file.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"mlflow server not healthy after {MLFLOW_START_TIMEOUT_S} s:\n"
                       f"{log_file.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    # The server runs uvicorn as a child process: signal the whole process group we created.
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """URI (http://127.0.0.1:PORT) of a real `mlflow server` (sqlite backend, proxied artifacts in a
    tmp dir) that lives for the whole test session. Its log: <tmp>/mlflow_server*/server.log."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log_file = root / "server.log"
    cmd = [sys.executable, "-m", "mlflow", "server",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts"),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # no job-runner processes
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    start = time.monotonic()
    try:
        _wait_healthy(uri, proc, log_file)
        (root / "startup_seconds.txt").write_text(f"{time.monotonic() - start:.2f}\n")
        yield uri
    finally:
        _stop(proc)
# ==== end MLflow server ==========================================================================


# ---------------------------------------------------------------- shared: model tests run on one thread
@pytest.fixture
def one_thread():
    """Tiny-model tests run on one torch thread (several jobs share the 2 cores; faster and steadier)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- shared: tiny synthetic training data
@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    """Synthetic shards (train 192 / val 12 / test 12 images, 32 px, 20 relation quadruples) + tokenizer, built
    once per session for the tests that start real training runs (test_training, test_ablation)."""
    from pipeline.data.synthetic import SyntheticConfig, ensure_synthetic_dataset
    from pipeline.data.tokenizer import SentencePieceTokenizer, iter_captions
    root = tmp_path_factory.mktemp("tiny_data")
    cfg = SyntheticConfig(train=192, val=12, test=12, image_size=32, shard_samples=24, captions_per_image=2,
                          attribute_captions=1, max_objects=2, large_frac=0.3, small_frac=0.2, relations=20)
    ensure_synthetic_dataset(root, cfg, progress=False)
    tok = root / "tok.model"
    SentencePieceTokenizer.train(iter_captions([str(root / "train")]), tok, 100)
    return {"root": root, "tokenizer": tok}
