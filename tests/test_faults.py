"""Storage that fails and a disk that fills: the fault-injecting proxy in front of a local S3
server (moto's), the storage layer's bounded and logged retries, and the one line a job stops
with. The whole-job checks (10% injected errors, storage that stays down, a full tmpfs) are
slow tests."""

from __future__ import annotations

import errno
import http.client
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from faultproxy import FAULTS, FaultProxy
from s3server import aws_env, moto_s3

from engine import diskspace, storage
from engine.cli import run_job
from engine.diskspace import StageSpace, format_bytes
from engine.errors import FairsynthError, disk_full
from engine.storage import RemotePath, StorageError

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "fairsynth-faults"


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server on a free local port with one bucket; yields its URL."""
    with moto_s3(BUCKET) as url:
        yield url


@pytest.fixture
def through_proxy(s3_server, monkeypatch):
    """A FaultProxy in front of the S3 server, with the AWS variables pointing at it."""
    with FaultProxy(s3_server, error_rate=0.0, seed=1) as proxy:
        for key, value in aws_env(proxy.url).items():
            monkeypatch.setenv(key, value)
        yield proxy


def _get(url: str, path: str) -> int | str:
    """One plain HTTP GET: the status, or the name of the connection error."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except (ConnectionError, http.client.HTTPException) as exc:
        return type(exc).__name__
    finally:
        conn.close()


def test_the_proxy_fails_its_share_of_requests(s3_server):
    with FaultProxy(s3_server, error_rate=0.2, seed=3) as proxy:
        answers = [_get(proxy.url, f"/{BUCKET}") for _ in range(200)]
        stats = proxy.stats()
    assert stats["requests"] == 200 and all(stats[f] for f in FAULTS)
    assert 20 <= stats["injected"] <= 60  # 20% of 200, give or take the draw
    assert answers.count(200) == 200 - stats["injected"]
    assert answers.count(500) == stats["500"] and answers.count(503) == stats["503"]
    assert len([a for a in answers if isinstance(a, str)]) == stats["reset before"] + stats["reset after"]
    with FaultProxy(s3_server, error_rate=1.0) as proxy:
        assert all(_get(proxy.url, f"/{BUCKET}") != 200 for _ in range(20))
        proxy.set(0.0)
        assert _get(proxy.url, f"/{BUCKET}") == 200


def test_storage_rides_out_injected_errors(through_proxy, caplog):
    """At 10% injected errors every write, read and listing of the storage layer succeeds."""
    through_proxy.set(0.1)
    root = RemotePath(f"s3://{BUCKET}/flaky")
    payloads = {f"part-{i}.bin": os.urandom(2000 + i) for i in range(15)}
    with caplog.at_level(logging.WARNING, logger="engine.storage"):
        for name, data in payloads.items():
            storage.write_bytes(root / name, data)
        assert {p.name for p in root.glob("part-*.bin")} == set(payloads)
        assert all(storage.read_bytes(root / name) == data for name, data in payloads.items())
    stats = through_proxy.stats()
    assert stats["injected"] > 0, stats
    # Each retry the storage layer makes is one warning line naming the path.
    assert all("storage:" in r.message and f"s3://{BUCKET}/flaky" in r.message for r in caplog.records)


def test_retries_are_bounded_and_logged(monkeypatch, caplog):
    monkeypatch.setattr(storage, "RETRY_FIRST_PAUSE_S", 0.01)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("AWS Error SLOW_DOWN during PutObject operation: injected")
        return "done"

    with caplog.at_level(logging.WARNING, logger="engine.storage"):
        assert storage.retrying("write", "s3://b/k", flaky) == "done"
    assert len(calls) == 3 and len(caplog.records) == 2
    assert "write s3://b/k failed (AWS Error SLOW_DOWN" in caplog.records[0].message
    assert "retry 1 of 5" in caplog.records[0].message

    calls.clear()
    caplog.clear()
    always = lambda: calls.append(1) or (_ for _ in ()).throw(ConnectionResetError("Connection reset by peer"))  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="engine.storage"), \
            pytest.raises(StorageError, match=r"s3://b/k: read failed 6 times; last error: Connection reset"):
        storage.retrying("read", "s3://b/k", always)
    assert len(calls) == storage.RETRY_ATTEMPTS and len(caplog.records) == storage.RETRY_ATTEMPTS - 1

    # Not found, denied and bad requests are answers, not faults: no retry.
    for error in (FileNotFoundError("s3://b/k"), PermissionError("denied"),
                  OSError("AWS Error UNKNOWN (HTTP status 400) during PutObject")):
        calls.clear()
        with pytest.raises(type(error)):
            storage.retrying("read", "s3://b/k", lambda error=error: calls.append(1) or (_ for _ in ()).throw(error))
        assert len(calls) == 1


def test_storage_that_stays_down_fails_within_its_retries(through_proxy, monkeypatch, caplog):
    monkeypatch.setattr(storage, "RETRY_FIRST_PAUSE_S", 0.05)
    path = RemotePath(f"s3://{BUCKET}/down/x.json")
    through_proxy.set(1.0)
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="engine.storage"), pytest.raises(StorageError) as err:
        storage.write_bytes(path, b"{}")
    assert str(err.value).startswith(f"{path}: write failed {storage.RETRY_ATTEMPTS} times; last error: ")
    assert len(caplog.records) == storage.RETRY_ATTEMPTS - 1
    assert time.perf_counter() - start < 60
    through_proxy.set(0.0)
    storage.write_bytes(path, b"{}")  # back up: the same call works
    assert storage.read_bytes(path) == b"{}"


def _job_exit(main, capsys) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as stop:
        run_job(main)
    return stop.value.code, capsys.readouterr().err.strip().splitlines()


def test_a_full_disk_or_dead_storage_is_one_line_at_the_top(capsys):
    def full():
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/part-3.parquet")
        except OSError as exc:
            raise RuntimeError("a Ray task failed") from exc

    code, lines = _job_exit(full, capsys)
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("error: no space left on device writing /runs/x/part-3.parquet")

    def down():
        raise StorageError("s3://b/run/x.json: write failed 6 times; last error: curlCode: 7")

    code, lines = _job_exit(down, capsys)
    assert code == 2 and lines == [
        "error: s3://b/run/x.json: write failed 6 times; last error: curlCode: 7; "
        "run the same command again once the storage answers"]


def test_a_stage_on_a_full_disk_names_the_path_and_the_space_it_needs(tmp_path, caplog, monkeypatch):
    from engine.config import load_config

    cfg = load_config(None, ["methods=[erm,lora]", "severities=[0.95]", f"run_dir={tmp_path}"])
    space = StageSpace(cfg)
    need = 10 * shutil.disk_usage(tmp_path).free
    space._needs = {("0.95", "generate", "lora"): need}  # as the plan counts them
    with caplog.at_level(logging.WARNING, logger="engine.diskspace"):
        space.check(tmp_path, 0.95, "generate", "lora")
        space.check(tmp_path, 0.95, "filter", "lora")  # planned at 0 bytes: no line
        space.check("s3://bucket/run", 0.95, "generate", "lora")  # object storage: not checked
    assert len(caplog.records) == 1
    assert caplog.records[0].message.startswith(f"disk: stage generate lora needs about {format_bytes(need)} in {tmp_path}")

    # Ray passes a worker's error on wrapped; Tune only its text.
    for raised in (OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "part-1.parquet")),
                   RuntimeError("Trial failed: OSError: [Errno 28] No space left on device")):
        try:
            try:
                raise raised
            except Exception as inner:
                raise RuntimeError("the generate stage failed") from inner
        except RuntimeError as exc:
            line = str(space.stage_failure(exc, tmp_path, 0.95, "generate", "lora"))
        assert line.startswith("no space left on device writing ")
        assert f"run_dir = {str(tmp_path)!r}" in line and "stage generate lora needs about " in line
    assert disk_full(ValueError("a bug")) is None
    assert space.stage_failure(ValueError("a bug"), tmp_path, 0.95, "generate", "lora") is None
    # Any error of a stage on a disk that is full now is the full disk's (Tune, reading back
    # the error file a full disk left empty, raises EOFError).
    monkeypatch.setattr(diskspace, "free_bytes", lambda path: 4096)
    line = str(space.stage_failure(EOFError("Ran out of input"), tmp_path, 0.95, "finetune", "lora"))
    assert line.startswith(f"no space left on device writing {tmp_path} ") and "4.1 kB free now" in line


def test_a_stage_failure_on_dead_storage_names_run_dir(through_proxy, monkeypatch):
    monkeypatch.setattr(storage, "RETRY_FIRST_PAUSE_S", 0.05)
    from engine.config import load_config

    run_dir = f"s3://{BUCKET}/stage-down"
    space = StageSpace(load_config(None, ["methods=[erm]", f"run_dir={run_dir}"]))
    through_proxy.set(1.0)
    # An error that came through Ray Data or Tune, not the storage layer: the probe decides.
    failure = space.stage_failure(RuntimeError("a read task failed"), f"{run_dir}/severity-0.95", 0.95, "filter", "lora")
    assert isinstance(failure, FairsynthError)
    assert str(failure).startswith(f"run_dir = {run_dir!r}: the storage failed during stage filter lora (")
    through_proxy.set(0.0)
    assert space.stage_failure(RuntimeError("a bug"), f"{run_dir}/severity-0.95", 0.95, "filter", "lora") is None


def test_a_lock_whose_answer_was_lost_is_still_ours(tmp_path):
    """A conditional create that reached the storage but whose answer was lost (a reset after
    the write): the retry fails its condition, and the lock read back is this job's own."""
    from engine import runlock

    class AnswerLost:
        data = None

        def create(self, data: bytes) -> bool:
            self.data = data
            return False

        def read(self):
            return self.data, "etag"

    lock, me = runlock._take(AnswerLost(), runlock.Holder.this_process(), str(tmp_path), force=False)
    assert runlock.Holder.decode(lock.data).token == me.token


# --- the whole job (slow) ----------------------------------------------------------------------


def _job_command(run_dir: str) -> list[str]:
    from test_storage import E2E_JOB

    cmd = [sys.executable, str(ROOT / "jobs" / "full.py"), "--run-dir", run_dir]
    for override in [*E2E_JOB, "ray.num_cpus=2"]:
        cmd += ["--set", override]
    return cmd


def _job_env(endpoint: str | None, tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"TQDM_DISABLE": "1", storage.CACHE_ENV: str(tmp_path / "artifact-cache")})
    if endpoint:
        env.update(aws_env(endpoint))
    return env


def _run(run_dir: str, env: dict, log: Path, timeout: int = 1800) -> tuple[int, str, float]:
    """jobs/full.py on the small config: (exit code, its output, seconds)."""
    start = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.call(_job_command(run_dir), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                               timeout=timeout)
    return code, log.read_text(), time.perf_counter() - start


def _same_results(run_dir: str, reference: str) -> None:
    """The same shards (names, rows, image bytes, filter choices) and metrics as ``reference``."""
    import pandas.testing as pdt
    from test_storage import _metrics, _shards

    from engine.rundiff import comparable_metrics

    names, rows = _shards(run_dir)
    ref_names, ref_rows = _shards(reference)
    assert names == ref_names
    pdt.assert_frame_equal(rows.drop(columns=["score"]), ref_rows.drop(columns=["score"]))
    assert (rows["score"] - ref_rows["score"]).abs().max() < 1e-5
    for method in ("erm", "lora"):
        assert comparable_metrics(_metrics(run_dir, method)) == comparable_metrics(_metrics(reference, method)), method


def _retry_lines(run_dir: str, out: str) -> int:
    """Retries logged by the driver (``out``) and by Ray's workers (the run's log of Ray's output)."""
    logs = [p.read_text() for p in (storage.as_path(run_dir) / "logs").glob("*.log")]
    return sum(text.count("storage: ") for text in [out, *logs])


@pytest.fixture(scope="module")
def clean_s3_run(s3_server, tmp_path_factory):
    """The small job with run_dir on the S3 server, no faults: the reference."""
    tmp = tmp_path_factory.mktemp("clean")
    run_dir = f"s3://{BUCKET}/clean"
    code, out, seconds = _run(run_dir, _job_env(s3_server, tmp), tmp / "clean.log")
    assert code == 0, out[-5000:]
    print(f"clean run: {seconds:.0f} s")
    return run_dir


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_the_job_at_10_percent_storage_errors_matches_a_clean_run(s3_server, clean_s3_run, tmp_path, monkeypatch):
    """Every request to the run directory's storage has a 10% chance to fail (a 500, a 503, a
    reset before or after the server saw it); the job finishes with the clean run's results."""
    for key, value in aws_env(s3_server).items():  # this process reads both runs directly
        monkeypatch.setenv(key, value)
    run_dir = f"s3://{BUCKET}/faulty"
    with FaultProxy(s3_server, error_rate=0.1, seed=0) as proxy:
        code, out, seconds = _run(run_dir, _job_env(proxy.url, tmp_path), tmp_path / "faulty.log")
        stats = proxy.stats()
    assert code == 0, out[-5000:]
    print(f"10% injected: {stats}, {_retry_lines(run_dir, out)} retries logged, {seconds:.0f} s")
    assert stats["injected"] > 50, stats
    _same_results(run_dir, clean_s3_run)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_storage_that_stays_down_stops_the_job_in_one_line_and_it_resumes(s3_server, clean_s3_run, tmp_path,
                                                                          monkeypatch):
    """The storage goes down once generation starts: the job stops with exit code 2 and one
    line naming run_dir, no traceback; the same command, once the storage is back, finishes
    with the clean run's results."""
    for key, value in aws_env(s3_server).items():
        monkeypatch.setenv(key, value)
    run_dir = f"s3://{BUCKET}/outage"
    with FaultProxy(s3_server, error_rate=0.0) as proxy:
        env = _job_env(proxy.url, tmp_path)
        with open(tmp_path / "down.err", "w") as err:
            proc = subprocess.Popen(_job_command(run_dir), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=err, text=True)
            seen = []
            for line in proc.stdout:
                seen.append(line)
                if "generate lora" in line:
                    proxy.set(1.0)  # down from here on
                    down_at = time.perf_counter()
                    break
            seen += proc.stdout.readlines()
            code = proc.wait(timeout=1200)
        stopped_after = time.perf_counter() - down_at
        stderr = (tmp_path / "down.err").read_text()
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert code == 2, stderr[-5000:]
        assert len(errors) == 1 and f"run_dir = {run_dir!r}" in errors[0], errors
        assert "Traceback" not in stderr, stderr[-5000:]
        print(f"storage down: the job stopped {stopped_after:.0f} s later with: {errors[0]}")
        proxy.set(0.0)
        code, out, seconds = _run(run_dir, env, tmp_path / "resume.log")
    assert code == 0, out[-5000:]
    print(f"resumed in {seconds:.0f} s")
    _same_results(run_dir, clean_s3_run)


def _in_own_mount_namespace() -> list[str] | None:
    """The command prefix that runs a shell where this test may mount a tmpfs of its own (a
    user and mount namespace: nothing it mounts is seen outside); None where not allowed."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    prefix = [unshare, "--user", "--map-root-user", "--mount"]
    probe = subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    return prefix if probe.returncode == 0 else None


# The small job's run directory on a 64 MB tmpfs, with all but this much of it filled first:
# enough for the data, cluster and fine-tuning stages (about 0.5 MB), not for what follows.
TMPFS_SIZE = "64m"
ROOM_LEFT = 700_000


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_a_full_disk_stops_the_job_in_one_line_and_the_same_command_finishes(tmp_path):
    """The run directory on a small real filesystem (a tmpfs), filled but for a few MB: the
    job stops with exit code 2 in one line naming the path and the space the stage needs;
    every shard, unit and checkpoint on it is whole or absent; once the filler is deleted,
    the same command finishes with a clean run's results."""
    prefix = _in_own_mount_namespace()
    if prefix is None:
        pytest.skip("this machine allows no tmpfs mount in a user namespace (unshare)")
    mount, out = tmp_path / "disk", tmp_path / "out"
    mount.mkdir()
    out.mkdir()
    run_dir = mount / "run"
    job = " ".join(f"'{part}'" for part in _job_command(str(run_dir)))
    script = f"""
        mount -t tmpfs -o size={TMPFS_SIZE} tmpfs '{mount}' || exit 90
        fallocate -l $(( $(df -B1 --output=avail '{mount}' | tail -1) - {ROOM_LEFT} )) '{mount}/filler'
        {job} > '{out}/full.out' 2> '{out}/full.err'; echo $? > '{out}/full.rc'
        cp -r '{run_dir}' '{out}/stopped'
        rm '{mount}/filler'
        {job} > '{out}/freed.out' 2> '{out}/freed.err'; echo $? > '{out}/freed.rc'
        cp -r '{run_dir}' '{out}/run'
    """
    env = _job_env(None, tmp_path)
    start = time.perf_counter()
    subprocess.run([*prefix, "sh", "-c", script], env=env, cwd=ROOT, timeout=3000, check=True)
    seconds = time.perf_counter() - start
    stderr = (out / "full.err").read_text()
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert (out / "full.rc").read_text().strip() == "2", stderr[-5000:]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-5000:]
    assert errors[0].startswith("error: no space left on device writing ") and str(run_dir) in errors[0]
    assert " needs about " in errors[0] and " free now" in errors[0]
    stopped = out / "stopped"
    markers = sorted(str(p.parent.relative_to(stopped)) for p in stopped.rglob("_COMPLETE.json"))
    assert not check_whole(stopped), check_whole(stopped)
    freed = (out / "freed.out").read_text()
    assert (out / "freed.rc").read_text().strip() == "0", (out / "freed.err").read_text()[-5000:]
    print(f"full disk: {errors[0]}\nstages complete then: {', '.join(markers)}; "
          f"{len(list(stopped.rglob('*.parquet')))} Parquet files, all whole; after freeing space: finished; "
          f"{seconds:.0f} s in all")

    reference = tmp_path / "reference"
    code, text, _ = _run(str(reference), env, tmp_path / "reference.log")
    assert code == 0, text[-5000:]
    assert "| LoRA |" in freed
    _same_results(str(out / "run"), str(reference))


def check_whole(run_dir: Path) -> list[str]:
    """What a stopped run vouches for that is half-written: a Parquet file whose footer does
    not read, a unit folder marked done (its unit.json) whose weights do not load, or a Tune
    checkpoint that the experiment's saved state names (the one a trial resumes from) that
    does not load. Empty when all of that is whole. A checkpoint folder whose copy the full
    disk cut short is not named there: Tune registers a checkpoint once it is persisted."""
    import re

    import pyarrow.parquet as pq
    import torch
    from safetensors import safe_open

    def unreadable(path: Path) -> str | None:
        try:
            if path.suffix == ".parquet":
                pq.read_metadata(path)
            elif path.suffix == ".safetensors":
                with safe_open(str(path), "pt") as handle:
                    list(handle.keys())
            elif path.suffix == ".pt":
                torch.load(path, weights_only=True)
        except Exception as exc:  # noqa: BLE001
            return f"{path}: {type(exc).__name__}: {str(exc)[:100]}"
        return None

    vouched = list(run_dir.rglob("*.parquet"))
    vouched += [w for record in run_dir.rglob("unit.json") for w in record.parent.rglob("*.safetensors")]
    for state in run_dir.rglob("experiment_state-*.json"):
        named = re.findall(r'unit\\": \\"([^\\]+)\\",.*?checkpoint_dir_name\\": \\"(checkpoint_\d+)', state.read_text())
        for unit, checkpoint in named:
            vouched += [f for folder in state.parent.glob(f"{unit}-*/{checkpoint}") for f in folder.rglob("*") if f.is_file()]
    return [problem for path in vouched if (problem := unreadable(path))]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
def test_the_jobs_log_on_a_full_disk_fails_no_one(capsys):
    """/dev/full answers every write with ENOSPC, as the run's log does on a full disk: what is
    logged or printed there is lost, with no traceback and no "--- Logging error ---"."""
    from engine import console

    raw = open("/dev/full", "w", buffering=1)  # noqa: SIM115 (closed by the wrapper, quietly)
    with pytest.raises(OSError, match="No space left"):
        raw.write("a line\n")
    log = console._LogFile(raw)
    assert log.write("a line\n") == len("a line\n")
    log.flush()
    logger = logging.getLogger("fairsynth-test-full-log")
    logger.addHandler(console._log_handler(log))
    logger.propagate = False
    logger.warning("lost")
    print("lost too", file=log)
    log.close()
    assert "Logging error" not in capsys.readouterr().err


def test_a_tune_state_cut_by_a_full_disk_is_not_resumed(tmp_path):
    """Tune writes its experiment state in place: a full disk cuts it short, and the re-run
    starts the experiment's unfinished trials again instead of failing to restore it."""
    from engine.stages.finetune.tune import unrestorable

    experiment = tmp_path / "lora-abc"
    (experiment / "g0-1_00000").mkdir(parents=True)
    state = experiment / "experiment_state-2026-12-07_15-21-52.json"
    state.write_text('{"trial_data": [["{}", "{}"]], "runner_data": {}}')
    assert unrestorable(str(experiment)) is None
    state.write_text('{"trial_data": [["{}", "{')  # cut where the disk filled
    assert "cut short" in unrestorable(str(experiment))
    state.write_text("{}")
    (experiment / "g0-1_00000" / "error.pkl").write_bytes(b"")
    assert "error file is empty" in unrestorable(str(experiment))


def test_a_tune_state_naming_modules_that_moved_is_not_resumed(tmp_path):
    """tuner.pkl names its callbacks and scheduler by module: one saved before a module moved
    cannot be loaded, so the experiment's unfinished trials start again instead."""
    import pickle

    from engine.stages.finetune.per_unit_asha import PerUnitASHA
    from engine.stages.finetune.tune import unrestorable

    experiment = tmp_path / "lora-abc"
    experiment.mkdir()
    (experiment / "tuner.pkl").write_bytes(pickle.dumps({"scheduler": PerUnitASHA}))
    assert unrestorable(str(experiment)) is None
    (experiment / "tuner.pkl").write_bytes(b"cengine.finetune.per_unit_asha\nPerUnitASHA\n.")  # an older layout
    assert "No module named 'engine.finetune'" in unrestorable(str(experiment))
    whole = pickle.dumps({"scheduler": PerUnitASHA, "points": list(range(50))})
    for cut in (b"", whole[: len(whole) // 2]):  # a full disk
        (experiment / "tuner.pkl").write_bytes(cut)
        assert "tuner.pkl is cut short" in unrestorable(str(experiment))


def test_a_tune_state_naming_a_deleted_checkpoint_is_not_resumed(tmp_path):
    """A driver killed after a trial saved a new checkpoint (and Tune deleted the older one)
    but before the experiment state was saved again: the state names a checkpoint that is
    gone, and every retry of that trial would fail to restore it."""
    import json
    import pickle

    from engine.stages.finetune.tune import unrestorable

    experiment = tmp_path / "lora-abc"
    trial = experiment / "g0-1_00000"
    trial.mkdir(parents=True)
    manager = pickle.dumps({"latest": f"{trial}/checkpoint_000002"}).hex()

    def save_state(status: str) -> None:
        runtime = json.dumps({"checkpoint_manager": {"_type": "CLOUDPICKLE_FALLBACK", "value": manager}})
        (experiment / "experiment_state-2026-12-07_15-21-52.json").write_text(
            json.dumps({"trial_data": [[json.dumps({"status": status}), runtime]], "runner_data": {}}))

    save_state("RUNNING")
    assert "checkpoint_000002, which is gone" in unrestorable(str(experiment))
    save_state("TERMINATED")  # a finished trial is not restored
    assert unrestorable(str(experiment)) is None
    save_state("RUNNING")
    (trial / "checkpoint_000002").mkdir()
    assert unrestorable(str(experiment)) is None
