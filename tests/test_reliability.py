"""Faults across stages.

- A worker node of a local multi-node Ray (``ray.cluster_utils.Cluster``) dies in the middle
  of the generate stage: the stage still writes every planned (unit, seed) row exactly once.
- ``jobs/full.py`` gets SIGTERM in the middle of the generate stage: it exits 130 without
  marking the stage complete, and the same command resumes, draws only the missing shards,
  and ends with the same fine-tuned weights, synthetic images, filter choices and
  classifier metrics (results.json, every accuracy and synthetic fidelity) as an
  uninterrupted run: training is seeded and ordered, so the same inputs give the same metrics.
  Nothing the job writes is world-writable, even under a umask of 0.
- ``jobs/full.py`` gets SIGTERM during DreamBooth fine-tuning, its progress bar drawn: it exits
  130, and the same command restores the Tune experiment and finishes the run.
- A run directory written by another config is refused, in one line, unless ``--force``.

A crashed fine-tuning trial, a lost training worker, a NaN loss and bad input are tested
beside their stages.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from engine.config import load_config
from engine.raylib import local_cluster
from engine.rundiff import unit_tensors
from engine.runs import RunDir

ROOT = Path(__file__).resolve().parents[1]
IMAGES_PER_GROUP = 10


def _node_hosting_most_work(cluster, candidates):
    """The worker node with the fewest free CPUs: the one a sampler actor sits on."""
    from ray._private.state import available_resources_per_node

    free = available_resources_per_node()
    return min(candidates, key=lambda node: free.get(node.node_id, {}).get("CPU", 0.0))


def test_a_worker_node_lost_during_generation_loses_and_repeats_no_row(tmp_path):
    import ray

    from engine.stages.data.stage import run_data_stage
    from engine.stages.finetune import run_finetune_stage
    from engine.stages.generate import run_generate_stage
    from engine.stages.generate.stage import build_plan

    if ray.is_initialized():
        ray.shutdown()
    # The head only runs the driver; two 2-CPU workers run the sampler actors (one whole CPU
    # each) and the writers, so losing a worker always takes a sampler with it.
    with local_cluster(num_cpus=0, include_dashboard=False) as cluster:
        workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
        cfg = load_config(None, [
            f"run_dir={tmp_path}",
            "data.severity=0.9", "data.builtin.n_train=200", "data.builtin.n_val=8", "data.builtin.n_test=8",
            f"generate.images_per_group={IMAGES_PER_GROUP}", "generate.steps=4", "generate.batch_size=2",
            "generate.rows_per_shard=2", "generate.num_actors=2", "generate.actor_num_cpus=1",
        ])
        run = RunDir(tmp_path)
        run.prepare(cfg)
        folder = tmp_path / "synthetic" / "vanilla"
        killed = {}

        def kill_a_worker_once_shards_land():
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and not killed:
                landed = list(folder.glob("part-*.parquet")) if folder.exists() else []
                if landed:
                    victim = _node_hosting_most_work(cluster, workers)
                    cluster.remove_node(victim, allow_graceful=False)
                    killed["shards_before"] = len(landed)
                    return
                time.sleep(0.05)

        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        run_data_stage(cfg, run)
        run_finetune_stage(cfg, run, "vanilla")  # base-model units: nothing to train
        plan = build_plan(cfg, run, "vanilla")
        killer = threading.Thread(target=kill_a_worker_once_shards_land, daemon=True)
        killer.start()
        summary = run_generate_stage(cfg, run, "vanilla")
        killer.join(timeout=5)

    assert killed, "no shard landed, so no node was removed"
    assert 0 < killed["shards_before"] < plan.n_shards, "the node must die mid-way through the stage"
    table = pq.read_table(folder, ignore_prefixes=[".", "_", "README"]).to_pandas()  # not the dataset card
    assert summary["images"] == len(plan.rows) == 4 * IMAGES_PER_GROUP
    assert len(table) == len(plan.rows)  # nothing lost, nothing written twice
    assert not table.duplicated(["unit", "seed"]).any()
    planned = set(zip(plan.rows["unit"], plan.rows["seed"], strict=True))
    assert set(zip(table["unit"], table["seed"], strict=True)) == planned
    assert sorted(p.name for p in folder.glob("part-*.parquet")) == sorted(plan.shard_names)
    assert not list(folder.glob("*.tmp*")), "a half-written shard was left behind"


# A whole job small enough to run three times: one LoRA method, short fine-tuning and training.
SMALL_JOB = [
    "methods=[lora]", "ray.num_cpus=2", "ray.dashboard=false",
    "data.builtin.n_train=400", "data.builtin.n_val=40", "data.builtin.n_test=40", "severities=[0.95]",
    "finetune.steps=12", "finetune.checkpoint_every=4",
    "generate.images_per_group=12", "generate.steps=4", "generate.rows_per_shard=4", "generate.batch_size=4",
    "train.epochs=1", "train.pretrain_epochs=1", "train.num_workers=1",
]


def _job(run_dir: Path) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "jobs" / "full.py"), "--run-dir", str(run_dir)]
    for override in SMALL_JOB:
        cmd += ["--set", override]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    # A permissive umask, as on a careless shared machine: the job must still write nothing
    # world-writable.
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: os.umask(0))


def _finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _synthetic(run_dir: Path):
    folder = run_dir / "severity-0.95" / "synthetic" / "lora"
    table = pq.read_table(folder, ignore_prefixes=[".", "_", "README"]).to_pandas().sort_values(["unit", "seed"]).reset_index(drop=True)
    return table[["unit", "seed", "prompt", "image", "score", "kept"]]


def _weights(run_dir: Path) -> dict[str, dict]:
    return unit_tensors(run_dir / "severity-0.95" / "finetune" / "lora" / "units")


def _metrics(run_dir: Path) -> list[dict]:
    """results.json without its timings."""
    rows = json.loads((run_dir / "results.json").read_text())
    return [{k: v for k, v in row.items() if k != "stage_seconds"} for row in rows]


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[f].keys() == b[f].keys() and all(np.array_equal(a[f][k], b[f][k]) for k in a[f]) for f in a
    )


def _stop_when(proc, ready, what: str, poll: float, grace: float) -> str:
    """SIGTERM a running job once ``ready()``; it must stop cleanly (130, not a SIGABRT) and
    say how to resume. Returns its output."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None and not ready():
        time.sleep(poll)
    assert proc.poll() is None, f"the job ended before {what}"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=grace)
    assert proc.returncode == 130, out[-4000:]
    assert "interrupted: re-run the same command to resume" in out
    return out


@pytest.mark.slow
def test_sigterm_mid_generation_then_rerun_resumes_and_matches_an_uninterrupted_run(tmp_path):
    _finish(_job(tmp_path / "whole"))

    interrupted = tmp_path / "interrupted"
    shards = interrupted / "severity-0.95" / "synthetic" / "lora"
    _stop_when(_job(interrupted), lambda: list(shards.glob("part-*.parquet")), "any shard landed", 0.05, 120)
    landed = len(list(shards.glob("part-*.parquet")))
    assert landed and not (shards / "_COMPLETE.json").exists()
    assert not (interrupted / "results.json").exists()

    _finish(_job(interrupted))
    # Shards that landed before the signal were kept; only the missing ones were drawn.
    summary = json.loads((shards / "_summary.json").read_text())
    assert summary["shards_written"] == summary["shards"] - landed
    assert _weights(interrupted) and _same_weights(_weights(interrupted), _weights(tmp_path / "whole"))
    resumed, whole = _synthetic(interrupted), _synthetic(tmp_path / "whole")
    assert len(resumed) == 4 * 12 and resumed.equals(whole)  # same pixels, scores and choices
    assert (interrupted / "results.json").exists() and (interrupted / "plots").is_dir()
    assert _metrics(interrupted) == _metrics(tmp_path / "whole")
    writable = [p for p in interrupted.rglob("*") if not p.is_symlink() and p.stat().st_mode & 0o002]
    assert not writable, f"world-writable: {writable[:3]}"


@pytest.mark.slow
def test_sigterm_during_dreambooth_fine_tuning_then_the_same_command_finishes_the_run(tmp_path):
    """With the fine-tuning bar drawn (as on a user's console), the Tuner saved in the
    experiment could not be restored: a live tqdm bar travelled in its pickle."""
    command = [sys.executable, str(ROOT / "jobs" / "full.py"), "--run-dir", str(tmp_path)]
    for override in [*SMALL_JOB, "methods=[dreambooth]", "finetune.steps=24", "finetune.num_class_images=4"]:
        command += ["--set", override]
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    tune_dir = tmp_path / "severity-0.95" / "finetune" / "dreambooth" / "tune"

    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = _stop_when(proc, lambda: list(tune_dir.glob("*/*/checkpoint_*")), "a fine-tuning trial checkpointed", 0.2, 180)
    assert "finetune dreambooth:" in out  # the bar was drawn, so it was there to be pickled
    assert not (tmp_path / "results.json").exists()

    resumed = _finish(subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True))
    assert "resuming the fine-tuning experiment" in resumed and "Traceback" not in resumed
    units = tmp_path / "severity-0.95" / "finetune" / "dreambooth" / "units"
    records = [json.loads(p.read_text()) for p in sorted(units.glob("*/unit.json"))]
    assert len(records) == 4 and all(r["steps"] == 24 for r in records)
    assert max(r["resumed_at"] for r in records) > 0  # a trial went on from its checkpoint
    assert json.loads((tmp_path / "results.json").read_text())


def test_a_run_directory_of_another_config_is_refused_in_one_line_unless_forced(tmp_path):
    RunDir(tmp_path).prepare(load_config(None, ["data.builtin.n_train=400"]))
    before = (tmp_path / "config.yaml").read_bytes()
    out = subprocess.run(
        [sys.executable, "jobs/cluster.py", "--run-dir", str(tmp_path), "--set", "data.builtin.n_train=300"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: run directory") and "(changed: data)" in last and "--force" in last
    assert (tmp_path / "config.yaml").read_bytes() == before  # the earlier run's config is untouched
    RunDir(tmp_path).prepare(load_config(None, ["data.builtin.n_train=300"]), force=True)
    assert "n_train: 300" in (tmp_path / "config.yaml").read_text()


@pytest.fixture(autouse=True)
def _no_ray_left_running():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


def test_a_driver_side_step_is_started_again_when_a_node_dies_under_it(caplog, monkeypatch):
    from ray import exceptions as rex

    from engine.raylib import lost_with_a_node, retry_node_loss

    calls = []

    def listing():
        calls.append(1)
        if len(calls) < 3:
            try:
                raise rex.ActorDiedError()  # a footer-reading actor gone with its node
            except rex.ActorDiedError as died:
                raise RuntimeError("ListFiles failed") from died
        return "listed"

    monkeypatch.setattr("engine.raylib.NODE_LOSS_PAUSES_S", (0.0,))
    assert retry_node_loss("reading the shards", listing) == "listed" and len(calls) == 3
    assert sum("a Ray node died under it" in r.getMessage() for r in caplog.records) == 2
    assert lost_with_a_node(rex.NodeDiedError("node gone"))
    assert not lost_with_a_node(ValueError("a bug")), "only a lost node is retried"

    def bug():
        calls.append(1)
        raise ValueError("a bug")

    calls.clear()
    with pytest.raises(ValueError):
        retry_node_loss("a step", bug)
    assert len(calls) == 1

    def always_lost():
        calls.append(1)
        raise rex.WorkerCrashedError()

    calls.clear()
    with pytest.raises(rex.WorkerCrashedError):
        retry_node_loss("a step", always_lost, attempts=3)
    assert len(calls) == 3  # bounded


def test_a_node_loss_whose_error_could_not_be_unpickled_is_still_recognised():
    from ray import exceptions as rex

    from engine.raylib import lost_with_a_node

    listing = rex.UnserializableException("ray.exceptions.RayTaskError: ray::ListFiles()\n"
                                          "ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing "
                                          "this task.\nThe actor died because its node has died. Node Id: ab12")
    assert lost_with_a_node(listing)
    assert not lost_with_a_node(rex.UnserializableException("ValueError: a bug in a task"))
