"""A healthy job's console says only what matters: the stage lines, progress bars, the summary
and where the report is. Ray's own output (its libraries' logs, worker output, Tune's tables,
native core-worker lines) goes to RUN/logs/, and --verbose brings it back."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What a new user reads as something broken, or a worker's output: "(pid=...)" prefixes.
NOISE = re.compile(r"WARNING|ERROR|Traceback|/tmp/ray|[╭╰│├]|core_worker\.cc|Warning:|\(\w* ?pid=")

# The whole job on the built-in benchmark, small: a baseline and a method that generates
# (cluster, Ray Data actor pools for sampling and scoring, a Ray Train fit).
TINY_JOB = [
    "methods=[erm,vanilla]", "ray.num_cpus=2", "severities=[0.95]",
    "data.builtin.n_train=200", "data.builtin.n_val=40", "data.builtin.n_test=40",
    "generate.images_per_group=8", "generate.steps=2", "generate.rows_per_shard=8",
    "train.epochs=1", "train.pretrain_epochs=1", "train.num_workers=1",
]


def run_job(run_dir: Path, *extra: str, settings=TINY_JOB) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "jobs" / "full.py"), "--run-dir", str(run_dir), *extra]
    for item in settings:
        cmd += ["--set", item]
    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "FAIRSYNTH_VERBOSE", "RAY_AUTH_MODE")}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def console_of(done: subprocess.CompletedProcess) -> str:
    return done.stdout + done.stderr


def _check_quiet_run(run_dir: Path, done: subprocess.CompletedProcess) -> str:
    console = console_of(done)
    assert done.returncode == 0, console[-4000:]
    noisy = [line for line in re.split(r"[\r\n]", console) if NOISE.search(line)]
    assert not noisy, "\n".join(noisy[:20])
    assert re.search(r"\] severity-0\.95: train", console)
    # Train's epoch bar, drawn in its controller actor, is the driver's own bar on the console.
    assert re.search(r"^train erm, vanilla: 100%\|[^|]+\| 3/3 ", console, re.M)
    assert f"report: {run_dir}/report.html" in console
    (log,) = sorted((run_dir / "logs").glob("full-*.log"))
    assert f"log: {log} (Ray's own output" in console
    return log.read_text()


@pytest.mark.slow  # about 70 s on 2 idle cores
def test_a_healthy_tiny_job_prints_no_warnings_errors_or_ray_paths(tmp_path):
    run_dir = tmp_path / "run"
    log = _check_quiet_run(run_dir, run_job(run_dir))
    # What left the console is in the run's log, not lost: the job's own stage details and
    # Ray's native line about its actor pools' constructor arguments.
    assert "engine.stages.generate.stage: generate vanilla" in log
    assert "core_worker.cc" in log
    assert "Token authentication is enabled" in log  # what ray.init logs as it starts


def test_trains_ingest_options_keep_the_order_without_the_deprecated_option():
    import warnings

    from ray.data import DataContext

    from engine.stages.train.stage import _ordered_ingest

    DataContext.get_current()  # Ray Data's own deprecations, on first use, are not ours
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        options = _ordered_ingest()
    assert options.preserve_order
    assert not [w for w in caught if "exclude_resources" in str(w.message)], [str(w.message) for w in caught]


@pytest.mark.slow  # fine-tuning through Tune as well: about three minutes on 2 idle cores
def test_tunes_experiment_tables_go_to_the_log(tmp_path):
    run_dir = tmp_path / "run"
    settings = [*TINY_JOB, "methods=[lora]", "finetune.steps=4", "finetune.checkpoint_every=2"]
    log = _check_quiet_run(run_dir, run_job(run_dir, settings=settings))
    assert "Configuration for experiment" in log and "View detailed results here" in log


ROUTING_PROBE = textwrap.dedent("""
    import logging, os, sys, warnings
    sys.argv[0] = "probe"
    from engine import console
    logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")
    if not console.verbose_requested("--verbose" in sys.argv):
        console.route_to_run_log(sys.argv[1], "probe")
    os.write(2, b"[native] E core_worker.cc: a line from C++\\n")
    logging.getLogger("engine.demo").info("the job's own detail")
    logging.getLogger("engine.demo").warning("the job's own warning")
    warnings.warn("a library deprecation", DeprecationWarning, stacklevel=1)
    with console.ray_prints():
        print("| Configuration for experiment |")
    print("[ 1.0s] a stage line", flush=True)
    sys.stderr.write("a progress bar\\n")
    from ray._private import worker
    if not console.verbose_requested("--verbose" in sys.argv):
        console.route_ray_output()
    for node in ("a1", "b2"):  # two nodes lost: the console names the kind once
        address = {"a1": "10.0.0.2", "b2": "10.0.12.213"}[node]  # lengths differ, as on a real cluster
        message = ("The node with node id: " + node * 28 + " and address: " + address + " and node name: "
                   + address + " has been marked dead because the detector has missed too many heartbeats from"
                   + " it. This can happen when a raylet crashes unexpectedly.\\n  accessor.cc:475: node " + node)
        worker.print_to_stdstream({"lines": [message], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    sys.stdout.flush()
    console.finish()
""")


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_routing_sends_rays_output_to_the_log_and_verbose_keeps_it_on_the_console(tmp_path, verbose):
    run_dir = tmp_path / "run"
    args = [sys.executable, "-W", "always::DeprecationWarning", "-c", ROUTING_PROBE, str(run_dir)]
    done = subprocess.run([*args, *(["--verbose"] if verbose else [])], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    console = console_of(done)
    ours = ("the job's own warning", "a stage line", "a progress bar")
    rays = ("core_worker.cc", "a library deprecation", "Configuration for experiment", "the job's own detail",
            "accessor.cc:475: node a1")  # (Ray's console dedup may hold node b2's back)
    assert all(line in console for line in ours)
    if verbose:
        assert all(line in console for line in rays)
        assert not (run_dir / "logs").exists()
        return
    assert not [line for line in rays if line in console], console
    assert console.count("ray: The node with node id: ") == 1, console
    assert "a1" * 28 + " and address: 10.0.0.2 and node name" in console
    (log,) = (run_dir / "logs").glob("probe-*.log")
    assert all(line in log.read_text() for line in (*rays, "accessor.cc:475: node b2"))


def test_a_run_directory_the_log_cannot_be_written_to_is_one_line(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    cmd = [sys.executable, str(ROOT / "jobs" / "full.py"), "--run-dir", str(blocked / "run")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "cannot write the job's log" in done.stderr and "Traceback" not in done.stderr


def test_the_license_is_an_spdx_expression_that_setuptools_reads_without_warning(tmp_path):
    """pyproject's license as setuptools builds the package metadata (`pip install -e .`)."""
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, tmp_path / name)
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "__init__.py").write_text("")
    build = "from setuptools import build_meta; print(build_meta.prepare_metadata_for_build_wheel('meta'))"
    (tmp_path / "meta").mkdir()
    done = subprocess.run([sys.executable, "-W", "always", "-c", build], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Deprecat" not in done.stderr, done.stderr
    (metadata,) = (tmp_path / "meta").glob("*/METADATA")
    assert "License-Expression: Apache-2.0" in metadata.read_text()
