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
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from faultproxy import FAULTS, FaultProxy

from engine import storage
from engine.cli import run_job
from engine.diskspace import StageSpace, format_bytes
from engine.errors import FairsynthError, disk_full
from engine.storage import RemotePath, StorageError

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "fairsynth-faults"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server on a free local port with one bucket; yields its URL."""
    moto_server = pytest.importorskip("moto.server")
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    url = f"http://127.0.0.1:{port}"
    import pyarrow.fs as pafs

    pafs.S3FileSystem(endpoint_override=url, region="us-east-1", access_key="testing", secret_key="testing",
                      allow_bucket_creation=True).create_dir(BUCKET)
    yield url
    server.stop()


def _aws_env(endpoint: str) -> dict:
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def through_proxy(s3_server, monkeypatch):
    """A FaultProxy in front of the S3 server, with the AWS variables pointing at it."""
    with FaultProxy(s3_server, error_rate=0.0, seed=1) as proxy:
        for key, value in _aws_env(proxy.url).items():
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


def test_a_stage_on_a_full_disk_names_the_path_and_the_space_it_needs(tmp_path, caplog):
    from engine.config import load_config

    cfg = load_config(None, ["methods=[erm,lora]", "severities=[0.95]"])
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


def test_a_stage_failure_on_dead_storage_names_run_dir(through_proxy, monkeypatch):
    monkeypatch.setattr(storage, "RETRY_FIRST_PAUSE_S", 0.05)
    from engine.config import load_config

    space = StageSpace(load_config(None, ["methods=[erm]"]))
    run_dir = f"s3://{BUCKET}/stage-down"
    through_proxy.set(1.0)
    # An error that came through Ray Data or Tune, not the storage layer: the probe decides.
    failure = space.stage_failure(RuntimeError("a read task failed"), run_dir, 0.95, "filter", "lora")
    assert isinstance(failure, FairsynthError)
    assert str(failure).startswith(f"run_dir = {run_dir!r}: the storage failed during stage filter lora (")
    through_proxy.set(0.0)
    assert space.stage_failure(RuntimeError("a bug"), run_dir, 0.95, "filter", "lora") is None


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
