"""Log and error lines carry no credentials: URI passwords, secret query parameters and the
values of secret environment variables become ***."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

JOB = """
import logging
from engine.cli import run_job
from engine.errors import FairsynthError

def main():
    log = logging.getLogger("engine.tracking")
    log.info("logged to MLflow run 1 (%s)", "https://alice:uri-pass-5d1e@mlflow.example.com/?token=query-tok-77b2")
    log.warning("storage said %s", "signature mismatch for aws-secret-93f0c2ab")
    try:
        raise OSError("connection refused, token ray-token-c4e81a09")
    except OSError:
        log.exception("a stage failed")
    raise FairsynthError("cannot reach s3://bob:err-pass-0a9f@bucket/run: check MLFLOW_TRACKING_TOKEN mlflow-tok-6b2d4e11")

run_job(main)
"""


def test_a_job_writes_no_secret_to_its_log_or_error_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FAIRSYNTH_LOG": "INFO",
           "AWS_SECRET_ACCESS_KEY": "aws-secret-93f0c2ab", "MLFLOW_TRACKING_TOKEN": "mlflow-tok-6b2d4e11",
           "RAY_AUTH_TOKEN": "ray-token-c4e81a09"}
    done = subprocess.run([sys.executable, "-c", JOB], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "logged to MLflow run 1 (https://alice:***@mlflow.example.com/?token=***)" in output
    assert "Traceback" in output and "a stage failed" in output  # the lines are there, only masked
    assert done.stderr.strip().splitlines()[-1] == (
        "error: cannot reach s3://bob:***@bucket/run: check MLFLOW_TRACKING_TOKEN ***")
    for secret in ("uri-pass-5d1e", "query-tok-77b2", "aws-secret-93f0c2ab", "ray-token-c4e81a09",
                   "err-pass-0a9f", "mlflow-tok-6b2d4e11"):
        assert secret not in output, secret
