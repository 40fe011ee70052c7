"""jobs/full.py as a real Ray job: a local head on 127.0.0.1 with token authentication, the
`ray job submit` client, and the results read back from the run directory."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """A token-authenticated head on loopback; stopped (by its own temp dir) afterwards."""
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    gcs_port, dashboard_port = _free_port(), _free_port()
    temp_dir = Path("/tmp") / f"fsray{secrets.token_hex(3)}"  # short: socket paths are limited
    start = subprocess.run(
        [
            RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--num-cpus=2",
            "--include-dashboard=true", f"--temp-dir={temp_dir}", "--disable-usage-stats",
        ],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        yield env, f"http://127.0.0.1:{dashboard_port}"
    finally:
        subprocess.run([RAY, "stop", "--force"], env={**env, "RAY_ADDRESS": f"127.0.0.1:{gcs_port}"},
                       capture_output=True, timeout=120)


def test_full_job_through_ray_job_submit(ray_head, tmp_path):
    env, address = ray_head
    run_dir = tmp_path / "run"
    submit = subprocess.run(
        [
            RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
            sys.executable, "jobs/full.py", "--run-dir", str(run_dir),
            "--set", "methods=[erm]",
            "--set", "train.epochs=1",
            "--set", "train.num_workers=1",
            "--set", "data.builtin.n_train=400",
            "--set", "data.builtin.n_test=200",
            "--set", "data.builtin.n_val=100",
        ],
        env=env, capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "succeeded" in submit.stdout.lower()
    rows = json.loads((run_dir / "results.json").read_text())
    assert [r["method"] for r in rows] == ["erm"]
    assert 0.0 <= rows[0]["test_worst_group"] <= rows[0]["test_average_group"] <= 1.0
    assert "| ERM |" in (run_dir / "results.md").read_text()


def test_submit_without_token_is_refused(ray_head):
    env, address = ray_head
    anonymous = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN",)}
    anonymous["RAY_AUTH_TOKEN_PATH"] = "/nonexistent-token"
    anonymous["HOME"] = "/tmp"  # no default token file either
    out = subprocess.run(
        [RAY, "job", "list", "--address", address], env=anonymous, capture_output=True, text=True, timeout=120
    )
    assert out.returncode != 0
