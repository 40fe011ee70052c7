"""The chaos benchmark (benchmarks/chaos.py), small: the storage tests' config (ERM and LoRA) on
a 0-CPU head and three worker nodes, run_dir on a local S3 server. The job is stopped with
SIGTERM and with SIGKILL inside each stage and submitted again; then it runs while worker nodes
are removed and replaced about every 20 seconds and its driver is SIGKILLed twice. Every disturbed
run must end equal to the undisturbed one, with nothing half-written or counted twice."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(5400)
def test_the_job_survives_chaos_and_ends_equal_to_an_undisturbed_run(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "chaos.py"), "--methods", "erm,lora", "--driver-kills", "2",
               "--out", str(tmp_path)]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=5300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["problems"] == [], result["problems"]
    assert result["equal"]
    assert result["driver_kills"] == 2
    assert result["value"] >= 5, "too few node kills to say anything"  # about 20 s apart through the chaos run
    reference_stages = {line.split("] ", 1)[1].strip() for line in (tmp_path / "reference.log").read_text().splitlines()
                        if line.startswith("[") and "s] " in line}
    for stop in ("SIGTERM", "SIGKILL"):
        stopped_in = set(result["faults"][stop])
        # Every stage that lasts long enough to be stopped in was stopped in (data and the
        # report can end before the signal lands).
        assert {s for s in reference_stages if "finetune" in s or "generate" in s or "filter" in s or "train" in s} <= stopped_in, (
            stop, stopped_in)


def test_a_stop_that_lands_after_the_job_said_done_counts_as_finished():
    import importlib.util

    spec = importlib.util.spec_from_file_location("chaos", ROOT / "benchmarks" / "chaos.py")
    chaos = importlib.util.module_from_spec(spec)
    sys.modules["chaos"] = chaos  # dataclasses look their module up while the file runs
    spec.loader.exec_module(chaos)
    torn_down = chaos.Attempt(code=-15, output=["[  3.0s] report", "done in 136 s"])
    assert torn_down.finished()
    assert not chaos.Attempt(code=130, output=["[  3.0s] report", "interrupted: re-run the same command to resume"]).finished()
    assert chaos.Attempt(code=0).finished()
