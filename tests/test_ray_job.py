"""jobs/full.py as a real Ray job: a local head on 127.0.0.1 with token authentication, the
`ray job submit` client, and the results read back from the run directory."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine.raylib import free_port, ray_start_head_flags

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


@dataclass
class Head:
    """A Ray head this test started under ``ray start --block``, in a process group of its own."""

    process: subprocess.Popen
    gcs_address: str
    dashboard: str
    temp_dir: Path


def start_head(env: dict, log: Path, num_cpus: int = 2, dashboard: bool = True) -> Head:
    gcs_port, dashboard_port = free_port(), free_port()
    temp_dir = Path("/tmp") / f"fsray{secrets.token_hex(3)}"  # short: socket paths are limited
    process = subprocess.Popen(
        [
            RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", *ray_start_head_flags(gcs_port, dashboard_port),
            "--dashboard-host=127.0.0.1", f"--num-cpus={num_cpus}",
            f"--include-dashboard={str(dashboard).lower()}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
        ],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    head = Head(process, f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}", temp_dir)
    deadline = time.monotonic() + 180
    while "Ray runtime started" not in log.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            stop_head(head)
            raise AssertionError(f"ray start failed: {log.read_text()[-2000:]}")
        time.sleep(0.5)
    return head


def stop_head(head: Head) -> None:
    """Stop exactly this head: its process group, then the address record it left, so later
    Ray calls on this machine neither see it nor try to join it. Nothing else is signalled:
    another job's Ray, or a user's, keeps running."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.process.pid, signal.SIGTERM)  # ray start --block stops what it started
    try:
        # Its own processes are all in this group, so a head slow to stop cleanly (the
        # dashboard's shutdown takes half a minute on 2 cores) is killed after a short grace.
        head.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.process.pid, signal.SIGKILL)  # anything of this head still in its group
    for folder in (head.temp_dir, Path("/tmp/ray")):
        record = folder / "ray_current_cluster"
        with contextlib.suppress(OSError):
            if record.read_text().strip() == head.gcs_address:
                record.unlink()
    shutil.rmtree(head.temp_dir, ignore_errors=True)


def _answers(head: Head, env: dict) -> bool:
    probe = f"import ray; ray.init(address={head.gcs_address!r}); print(ray.cluster_resources().get('CPU'))"
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=180)
    return done.returncode == 0


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A token-authenticated head on loopback, stopped (exactly it) afterwards."""
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    head = start_head(env, tmp_path_factory.mktemp("ray_head") / "ray_start.log")
    try:
        yield env, head
    finally:
        stop_head(head)


def test_full_job_through_ray_job_submit(ray_head, tmp_path):
    env, head = ray_head
    run_dir = tmp_path / "run"
    submit = subprocess.run(
        [
            RAY, "job", "submit", "--address", head.dashboard, "--working-dir", str(ROOT), "--",
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
    assert [r["method"] for r in rows if r["method"] != "chance"] == ["erm"]
    assert 0.0 <= rows[-1]["test_worst_group"] <= rows[-1]["test_average_group"] <= 1.0
    assert "| ERM |" in (run_dir / "results.md").read_text()


def test_submit_without_token_is_refused(ray_head):
    env, head = ray_head
    anonymous = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN",)}
    anonymous["RAY_AUTH_TOKEN_PATH"] = "/nonexistent-token"
    anonymous["HOME"] = "/tmp"  # no default token file either
    out = subprocess.run(
        [RAY, "job", "list", "--address", head.dashboard], env=anonymous, capture_output=True, text=True, timeout=120
    )
    assert out.returncode != 0


def test_the_test_head_opens_no_port_at_rays_fixed_defaults(ray_head):
    """Another Ray on the machine holds Ray's defaults (GCS 6379, dashboard 8265, dashboard
    agent 52365, Ray Client 10001); a head on one of them fails to start a part of itself."""
    env, head = ray_head
    fields = ["NodeManagerPort", "ObjectManagerPort", "MetricsExportPort", "MetricsAgentPort",
              "DashboardAgentListenPort", "RuntimeEnvAgentPort"]
    probe = (f"import json, ray; ray.init(address={head.gcs_address!r}); "
             f"print(json.dumps([int(ray.nodes()[0][f]) for f in {fields!r}]))")
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    ports = [*json.loads(done.stdout.strip().splitlines()[-1]), int(head.gcs_address.rsplit(":", 1)[1]),
             int(head.dashboard.rsplit(":", 1)[1])]
    assert all(ports) and not set(ports) & {6379, 8265, 52365, 10001}, ports


@pytest.mark.slow  # two more heads started and stopped: about two minutes on 2 cores
def test_stopping_a_test_head_leaves_another_ray_on_the_machine_alone(tmp_path):
    """A Ray someone else started (``ray start --head`` on other ports) still answers after a
    test head starts and stops, and no record of the test head is left for later Ray calls."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env.pop("RAY_ADDRESS", None)
    bystander = start_head(env, tmp_path / "bystander.log", num_cpus=1, dashboard=False)
    try:
        ours = start_head(env, tmp_path / "ours.log", num_cpus=1, dashboard=False)
        stop_head(ours)
        assert ours.process.poll() is not None
        assert _answers(bystander, env), "stopping the test's head stopped another Ray"
        host, port = ours.gcs_address.split(":")
        with socket.socket() as probe:
            assert probe.connect_ex((host, int(port))) != 0, "the test's head still listens"
        local = subprocess.run(
            [sys.executable, "-c", "import ray; ray.init(address='local', num_cpus=1, include_dashboard=False)"],
            env=env, capture_output=True, text=True, timeout=180,
        )
        assert local.returncode == 0, local.stderr[-2000:]
    finally:
        stop_head(bystander)
