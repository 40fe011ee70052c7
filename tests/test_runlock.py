"""One run directory, one job: a second job refuses in one line naming the holder; a holder
that died leaves a lock that expires (or, on its own host, is seen dead at once); --force
takes a live one over. The S3 lock is tested beside the other storage tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine import runlock
from engine.errors import FairsynthError

ROOT = Path(__file__).resolve().parents[1]
HOLD = ("import sys, time; from engine.runlock import hold_until_exit; hold_until_exit(sys.argv[1]); "
        "print('held', flush=True); time.sleep(float(sys.argv[2]))")


def _holder(run_dir: Path, seconds: float = 120) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), str(seconds)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _lock(run_dir: Path) -> dict:
    return json.loads((run_dir / runlock.LOCK_NAME).read_text())


def test_a_job_on_a_held_run_directory_refuses_in_one_line_naming_the_holder(tmp_path):
    holder = _holder(tmp_path)
    try:
        out = subprocess.run([sys.executable, "jobs/cluster.py", "--run-dir", str(tmp_path)], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    started = time.strftime("%Y-%m-%d %H:%M", time.localtime(_lock(tmp_path)["started"]))
    assert line.startswith(f"error: run directory {tmp_path} is in use by another job")
    assert f"host {socket.gethostname()}, process {holder.pid}, started {started}" in line
    assert "--force" in line
    assert not (tmp_path / "cluster").exists() and not (tmp_path / "config.yaml").exists()


def test_a_holder_killed_on_this_host_leaves_a_lock_the_next_job_takes(tmp_path):
    holder = _holder(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert _lock(tmp_path)["pid"] == holder.pid  # SIGKILL: nothing released it
    with runlock.hold_run_dir(str(tmp_path)):
        assert _lock(tmp_path)["pid"] == os.getpid()
    assert not (tmp_path / runlock.LOCK_NAME).exists()


def test_a_holder_that_exits_releases_the_lock(tmp_path):
    holder = _holder(tmp_path, seconds=0)
    assert holder.wait(timeout=60) == 0
    assert not (tmp_path / runlock.LOCK_NAME).exists()


def _plant(run_dir: Path, renewed_ago: float) -> None:
    """A lock held by a job on another host, renewed ``renewed_ago`` seconds ago."""
    now = time.time()
    held = runlock.Holder("another-host", 4242, now - 3600, now - renewed_ago, "theirs")
    (run_dir / runlock.LOCK_NAME).write_bytes(held.encode())


def test_a_lock_from_another_host_holds_until_it_expires_and_force_takes_it(tmp_path):
    _plant(tmp_path, renewed_ago=10)
    with pytest.raises(FairsynthError, match=r"in use by another job \(host another-host, process 4242, started "):
        runlock.acquire(str(tmp_path))
    assert _lock(tmp_path)["token"] == "theirs"

    with runlock.hold_run_dir(str(tmp_path), force=True):
        assert _lock(tmp_path)["pid"] == os.getpid()

    _plant(tmp_path, renewed_ago=runlock.EXPIRES_S + 1)
    with runlock.hold_run_dir(str(tmp_path)):
        assert _lock(tmp_path)["pid"] == os.getpid()


def test_a_damaged_lock_is_refused_unless_forced(tmp_path):
    (tmp_path / runlock.LOCK_NAME).write_text("{half")
    with pytest.raises(FairsynthError, match="not a fairsynth lock; if no job runs there, pass --force"):
        runlock.acquire(str(tmp_path))
    with runlock.hold_run_dir(str(tmp_path), force=True):
        assert _lock(tmp_path)["pid"] == os.getpid()


def test_the_holder_renews_its_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "RENEW_S", 0.05)
    with runlock.hold_run_dir(str(tmp_path)):
        first = _lock(tmp_path)["renewed"]
        deadline = time.monotonic() + 30
        while _lock(tmp_path)["renewed"] == first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _lock(tmp_path)["renewed"] > first
