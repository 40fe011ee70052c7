"""The run directory on object storage: the storage layer against an S3 server the test starts
on 127.0.0.1 (moto's, which speaks the real S3 protocol), the bad run_dir error line, and
the tiny job end to end on a two-node Ray cluster whose run directory is s3://."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from s3server import aws_env, free_port, moto_s3

from engine import storage
from engine.errors import FairsynthError
from engine.raylib import local_cluster
from engine.rundiff import comparable_metrics
from engine.runs import RunDir, atomic_write_json, read_json
from engine.storage import RemotePath

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "fairsynth-test"


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server on a free local port with one bucket; yields the AWS variables."""
    with moto_s3(BUCKET) as url:
        env = aws_env(url)
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield env
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def test_remote_path_names():
    path = RemotePath("s3://bucket//run/") / "synthetic/lora" / "part-1.parquet"
    assert str(path) == "s3://bucket/run/synthetic/lora/part-1.parquet"
    assert (path.name, path.stem, path.suffix) == ("part-1.parquet", "part-1", ".parquet")
    assert str(path.parent) == "s3://bucket/run/synthetic/lora"
    assert str(path.relative_to("s3://bucket/run")) == "synthetic/lora/part-1.parquet"
    assert storage.as_path("runs/x") == Path("runs/x")  # local runs keep pathlib
    assert isinstance(storage.as_path("s3://b/k"), RemotePath)


def test_s3_files_and_folders(s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    root = RemotePath(f"s3://{BUCKET}/unit")
    atomic_write_json(root / "a/b.json", {"x": 1})
    assert read_json(root / "a/b.json") == {"x": 1}
    assert (root / "a").is_dir() and (root / "a/b.json").is_file() and not (root / "nope").exists()
    storage.write_bytes(root / "a/part-1.parquet", b"1")
    storage.write_bytes(root / "a/part-0.parquet", b"0")
    storage.write_bytes(root / "a/_summary.json", b"{}")
    assert [p.name for p in (root / "a").glob("part-*.parquet")] == ["part-0.parquet", "part-1.parquet"]
    assert [p.name for p in root.iterdir()] == ["a"]
    (root / "a/part-1.parquet").unlink()
    (root / "a/part-1.parquet").unlink(missing_ok=True)
    assert [p.name for p in (root / "a").glob("part-*")] == ["part-0.parquet"]

    # A folder goes up and comes back byte for byte (a LoRA or UNet folder of a unit).
    local = tmp_path / "artifact"
    (local / "unet").mkdir(parents=True)
    (local / "unet/weights.safetensors").write_bytes(os.urandom(1000))
    (local / "unit.json").write_text("{}")
    storage.upload_folder(local, root / "units/g0")
    assert sorted(str(p.relative_to(root / "units/g0")) for p in (root / "units/g0").rglob("*")) == [
        "unet", "unet/weights.safetensors", "unit.json"
    ]
    copy = storage.local_copy(root / "units/g0")
    assert (copy / "unet/weights.safetensors").read_bytes() == (local / "unet/weights.safetensors").read_bytes()
    assert storage.local_copy(root / "units/g0") == copy  # cached on this node
    assert copy.is_relative_to(tmp_path / "cache")
    single = storage.local_copy(root / "units/g0/unit.json")
    assert single.name == "unit.json" and single.read_text() == "{}"

    with storage.atomic_directory(root / "units/g1") as folder:
        (folder / "x.txt").write_text("x")
    assert (root / "units/g1/x.txt").read_text() == "x"
    storage.delete(root / "units")
    assert not (root / "units").exists()


def test_run_dir_on_s3(s3_env):
    from engine.config import load_config

    run = RunDir(f"s3://{BUCKET}/prepared")
    assert run.is_remote and run.uri == f"s3://{BUCKET}/prepared"
    run.prepare(load_config(None, []))
    assert "run_dir" in (run / "config.yaml").read_text()
    run.mark_complete("data", "abc")
    assert run.is_complete("data", "abc") and not run.is_complete("data", "other")
    run.clear_marker("data")
    assert not run.is_complete("data", "abc")
    assert not [p for p in run.root.iterdir() if p.name.startswith("_probe")]  # the probe is gone


def test_bad_run_dir_fails_at_start_in_one_line(s3_env, tmp_path, monkeypatch):
    from engine.config import load_config

    cfg = load_config(None, [])
    with pytest.raises(FairsynthError, match=r"run_dir = 's3://no-such-bucket/run' cannot be written .*create the bucket"):
        RunDir("s3://no-such-bucket/run").prepare(cfg)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens
    with pytest.raises(FairsynthError, match=rf"run_dir = 's3://{BUCKET}/run' cannot be written .*AWS_ENDPOINT_URL"):
        RunDir(f"s3://{BUCKET}/run").prepare(cfg)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(FairsynthError, match="run_dir = .* cannot be created"):
        RunDir(blocker / "run").prepare(cfg)


def test_an_s3_run_directory_is_locked_with_a_conditional_write(s3_env):
    """If-None-Match takes the lock (one writer wins); If-Match takes over exactly the expired
    lock that was read."""
    import time

    from engine import runlock

    run_dir = f"s3://{BUCKET}/locked"
    lock = RemotePath(f"{run_dir}/{runlock.LOCK_NAME}")
    with runlock.hold_run_dir(run_dir):
        assert read_json(lock)["pid"] == os.getpid()
        with pytest.raises(FairsynthError, match=rf"run directory {run_dir} is in use by another job \(host "):
            runlock.acquire(run_dir)
    assert not lock.exists()

    now = time.time()
    expired = runlock.Holder("another-host", 4242, now - 7200, now - runlock.EXPIRES_S - 1, "theirs")
    lock.write_bytes(expired.encode())
    taken, me = runlock.acquire(run_dir)
    assert read_json(lock)["token"] == me.token
    assert not taken.create(b"another job")  # the lock exists: a second writer loses
    taken.delete()


def test_bad_run_dir_exit_code(s3_env):
    """The job exits with code 2 and one line naming run_dir before any stage starts."""
    env = {**os.environ, **s3_env, "RAY_ADDRESS": ""}
    proc = subprocess.run(
        [sys.executable, "jobs/full.py", "--run-dir", "s3://no-such-bucket/run"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "run_dir = 's3://no-such-bucket/run'" in lines[0]
    assert "] data" not in proc.stdout  # no stage ran


# The tiny job, small: a real-data method and a generative one (fine-tune, generate, filter,
# train), short everything. Both runs get the same config; only run_dir and Ray differ.
E2E_JOB = [
    "methods=[erm,lora]", "ray.dashboard=false",
    "data.builtin.n_train=400", "data.builtin.n_val=40", "data.builtin.n_test=40", "severities=[0.95]",
    "finetune.steps=12", "finetune.checkpoint_every=4",
    "generate.images_per_group=12", "generate.steps=4", "generate.rows_per_shard=4", "generate.batch_size=4",
    "train.epochs=1", "train.pretrain_epochs=1", "train.num_workers=1",
]
SHARD_COLUMNS = ["unit", "seed", "label", "attribute", "group", "cluster", "prompt", "negative_prompt",
                 "method", "base_model", "image", "score", "kept"]


def _run_job(run_dir: str, extra: list[str], env: dict, cwd: Path, log: Path) -> str:
    """Run jobs/full.py; its output goes to ``log`` (kept when the test fails or times out)."""
    cmd = [sys.executable, str(ROOT / "jobs" / "full.py"), "--run-dir", run_dir]
    for override in [*E2E_JOB, *extra]:
        cmd += ["--set", override]
    with open(log, "w") as out:
        code = subprocess.call(cmd, cwd=cwd, env={**env, "TQDM_DISABLE": "1"}, stdout=out,
                               stderr=subprocess.STDOUT, timeout=1200)
    text = log.read_text()
    assert code == 0, text[-5000:]
    return text


def _shards(run_dir: str):
    import pandas as pd

    folder = storage.as_path(run_dir) / "severity-0.95" / "synthetic" / "lora"
    paths = sorted(folder.glob("part-*.parquet"))
    assert paths, f"no shards in {folder}"
    frame = pd.concat([storage.read_parquet(p).to_pandas() for p in paths], ignore_index=True)
    return [p.name for p in paths], frame[SHARD_COLUMNS].sort_values(["unit", "seed"]).reset_index(drop=True)


def _metrics(run_dir: str, method: str) -> dict:
    return read_json(storage.as_path(run_dir) / "severity-0.95" / "train" / method / "metrics.json")


@pytest.mark.slow
@pytest.mark.timeout(2400)  # two whole jobs: 286 s and 257 s on a busy 2-core machine; room to spare
def test_tiny_job_on_s3_and_two_nodes_matches_a_local_run(s3_env, tmp_path, monkeypatch):
    """The whole job with run_dir=s3://... on a cluster of a 0-CPU head and two worker nodes:
    every remote actor, task and Train worker reads and writes the bucket; its shards and
    metrics equal a local run's of the same config."""
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "artifact-cache"))  # the nodes' download cache
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    local_dir = str(tmp_path / "local")
    _run_job(local_dir, ["ray.num_cpus=2"], env, ROOT, tmp_path / "local.log")

    remote_dir = f"s3://{BUCKET}/run"
    # The worker nodes inherit this process's environment, AWS variables included (set by
    # s3_env), as a real cluster's nodes have them from their own environment.
    with local_cluster(num_cpus=0, include_dashboard=False) as cluster:
        for _ in range(2):
            cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        # Run from an empty folder: a path that was meant for the bucket but taken as local
        # (s3:/...) would land there.
        workdir = tmp_path / "cwd"
        workdir.mkdir()
        out = _run_job(remote_dir, [f"ray.address={cluster.address}"], env, workdir, tmp_path / "s3.log")
    # The finished job's summary: its results table, and the report where the run lives.
    assert "| ERM |" in out and "| LoRA |" in out
    assert f"report: {remote_dir}/report.html" in out
    assert not list(workdir.iterdir()), "the job wrote into its working folder instead of the bucket"

    remote = storage.as_path(remote_dir)
    for name in ("results.json", "results.md", "report.html", "config.yaml", "grids/severity-0.95_lora.png",
                 "severity-0.95/finetune/lora/manifest.json", "severity-0.95/filter/lora/summary.json"):
        assert (remote / name).exists(), name
    manifest = read_json(remote / "severity-0.95/finetune/lora/manifest.json")
    trained = [u for u in manifest["units"] if u["artifact"]]
    assert trained and all((remote / "severity-0.95" / u["artifact"] / "unit.json").exists() for u in trained)
    assert list((remote / "severity-0.95/train/lora/tensorboard").glob("events.*"))
    # The sampler actors loaded the LoRA units from their nodes' download cache.
    assert {p.name.split("-", 1)[1] for p in (tmp_path / "artifact-cache").iterdir()} >= {
        Path(u["artifact"]).name for u in trained
    }

    local_names, local_rows = _shards(local_dir)
    remote_names, remote_rows = _shards(remote_dir)
    assert remote_names == local_names
    import pandas.testing as pdt

    # Same plan, same seeds, same deterministic sampler: the same rows, image bytes included,
    # and the same filter scores and choices.
    pdt.assert_frame_equal(remote_rows.drop(columns=["score"]), local_rows.drop(columns=["score"]))
    assert (remote_rows["score"] - local_rows["score"]).abs().max() < 1e-5

    # Metrics: training is seeded and ordered (engine/stages/train/data.py), so the same config gives
    # the same accuracies and losses wherever the worker runs; only clocks and paths differ.
    for method in ("erm", "lora"):
        local, remote_metrics = _metrics(local_dir, method), _metrics(remote_dir, method)
        # The job trains its methods in one fit, whose experiment is shared.
        assert remote_metrics["checkpoint_dir"].startswith(f"{remote_dir}/severity-0.95/train/ray/methods-")
        assert comparable_metrics(remote_metrics) == comparable_metrics(local), method


# Fields of a metrics.json that measure the machine or name where files went.
