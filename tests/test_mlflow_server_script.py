"""launch/mlflow_server.sh: a real server on 127.0.0.1 by default that prints the URI to export; a warning when
bound to another interface."""
from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from pathlib import Path

from conftest import _stop, free_port

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "launch" / "mlflow_server.sh"


def test_the_script_serves_on_localhost_and_prints_the_uri_to_export(tmp_path):
    port = free_port()
    env = dict(os.environ, RELALIGN_MLFLOW_DIR=str(tmp_path / "store"), RELALIGN_MLFLOW_PORT=str(port))
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen(["bash", str(SCRIPT)], cwd=tmp_path, env=env, stdout=out, stderr=err,
                                start_new_session=True)
    try:
        deadline, healthy = time.monotonic() + 180, False
        while time.monotonic() < deadline and not healthy and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                    healthy = resp.status == 200
            except OSError:
                time.sleep(0.5)
        assert healthy, (tmp_path / "err").read_text()[-3000:]
    finally:
        _stop(proc)
    assert (tmp_path / "out").read_text().splitlines()[0] == f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{port}"
    assert (tmp_path / "store" / "mlflow.db").is_file() and "WARNING" not in (tmp_path / "err").read_text()


def test_binding_another_interface_warns(tmp_path):
    env = dict(os.environ, RELALIGN_MLFLOW_HOST="0.0.0.0", RELALIGN_MLFLOW_DIR=str(tmp_path))
    done = subprocess.run(["bash", str(SCRIPT), "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "WARNING: binding 0.0.0.0 exposes an unauthenticated server" in done.stderr
