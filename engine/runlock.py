"""One run directory, one job: a job holds ``RUN/.fairsynth.lock`` while it runs.

Two jobs with different settings on one run directory delete each other's temporary shards
and leave outputs that are part one job's and part the other's. The lock names its holder
(host, process id, start time) so that the second job refuses in one line saying who holds it.

The lock is taken by creating the file only if it does not exist: ``O_EXCL`` on a local or
shared filesystem, a conditional write (``If-None-Match: *``) on S3. The holder renews it every
minute; one not renewed for ``EXPIRES_S`` belongs to a job that died and is taken over, as is
one whose holder on this host is no longer running. ``--force`` takes over any lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from engine import storage
from engine.errors import FairsynthError

log = logging.getLogger(__name__)

LOCK_NAME = ".fairsynth.lock"
RENEW_S = 60.0
EXPIRES_S = 600.0  # ten missed renewals: a job that died (a spot node gone, SIGKILL)


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: float
    renewed: float
    token: str

    @classmethod
    def this_process(cls) -> Holder:
        now = time.time()
        return cls(socket.gethostname(), os.getpid(), now, now, secrets.token_hex(8))

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self.started))
        return f"host {self.host}, process {self.pid}, started {started}"

    def is_stale(self, now: float) -> bool:
        """Not renewed for EXPIRES_S, or its process on this host is gone."""
        if now - self.renewed > EXPIRES_S:
            return True
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False  # another user's live process
        return False

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, data: bytes) -> Holder | None:
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError):
            return None  # half-written or not ours: only --force takes it over


class LocalLockFile:
    """The lock on a local or shared (NFS, a cluster mount) filesystem."""

    def __init__(self, path: str):
        self.path = path

    def create(self, data: bytes) -> bool:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def read(self) -> tuple[bytes, object] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, data

    def replace(self, data: bytes, version: object) -> bool:
        """Write ``data`` if the lock still holds ``version``; the compare and the write are
        two steps here, so the writer checks afterwards that its own data is in place."""
        current = self.read()
        if current is None or current[1] != version:
            return False
        storage.write_bytes(self.path, data)
        return (self.read() or (b"", None))[0] == data

    def delete(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)


class S3LockFile:
    """The lock on S3, written with S3's conditional writes: If-None-Match to take it,
    If-Match (the ETag read) to renew or take over exactly the lock that was read."""

    def __init__(self, uri: str):
        import boto3

        bucket, _, key = uri.split("://", 1)[1].partition("/")
        self.bucket, self.key = bucket, key
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self.client = boto3.client("s3", endpoint_url=endpoint)

    def _put(self, data: bytes, **condition) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data, **condition)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict", "412"):
                return False
            raise
        return True

    def create(self, data: bytes) -> bool:
        return self._put(data, IfNoneMatch="*")

    def read(self) -> tuple[bytes, object] | None:
        from botocore.exceptions import ClientError

        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return got["Body"].read(), got["ETag"]

    def replace(self, data: bytes, version: object) -> bool:
        return self._put(data, IfMatch=version)

    def delete(self) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key)


def lock_file(run_dir: str) -> LocalLockFile | S3LockFile:
    uri = storage.uri(run_dir).rstrip("/")
    if not storage.is_remote(uri):
        return LocalLockFile(os.path.join(uri, LOCK_NAME))
    if not uri.startswith(("s3://", "s3a://")):
        raise FairsynthError(f"run_dir = {run_dir!r}: a job can lock only a local or s3:// run directory")
    return S3LockFile(f"{uri}/{LOCK_NAME}")


def acquire(run_dir: str, force: bool = False) -> tuple[LocalLockFile | S3LockFile, Holder]:
    """Take the run directory's lock for this process, or raise FairsynthError naming the job
    that holds it."""
    from engine.runs import RunDir

    RunDir(run_dir).create()  # a run directory that cannot be written fails here, in its own line
    try:
        return _take(lock_file(run_dir), Holder.this_process(), run_dir, force)
    except FairsynthError:
        raise
    except Exception as err:  # storage errors (OSError, botocore's) after the check above
        raise FairsynthError(f"run_dir = {run_dir!r}: its lock ({LOCK_NAME}) could not be taken "
                             f"({type(err).__name__}: {err}); check the storage and try again") from None


def _take(lock, me: Holder, run_dir: str, force: bool) -> tuple[LocalLockFile | S3LockFile, Holder]:
    for _ in range(5):  # another job may take, renew or release it between two steps
        if lock.create(me.encode()):
            return lock, me
        current = lock.read()
        if current is None:
            continue
        data, version = current
        holder = Holder.decode(data)
        if holder is not None and holder.token == me.token:
            # Our own write: it landed, but the answer was lost and the retry found it there.
            return lock, me
        if holder is None and not force:
            raise FairsynthError(
                f"run directory {run_dir} has a lock file ({LOCK_NAME}) that is not a fairsynth lock; "
                "if no job runs there, pass --force to take it over")
        if holder is not None and not force and not holder.is_stale(time.time()):
            raise FairsynthError(
                f"run directory {run_dir} is in use by another job ({holder.describe()}); wait for it "
                "to finish or stop it, use another --run-dir, or pass --force if that job is gone")
        if lock.replace(me.encode(), version):
            why = "--force" if force else "its holder stopped renewing it"
            log.warning("took over the lock of %s from %s (%s)", run_dir, holder.describe() if holder else "?", why)
            return lock, me
    raise FairsynthError(f"run directory {run_dir}: could not take its lock ({LOCK_NAME}); try again")


def _renew(lock, me: Holder, stop: threading.Event) -> None:
    while not stop.wait(RENEW_S):
        try:
            current = lock.read()
        except Exception as exc:  # noqa: BLE001 (a storage hiccup: the next renewal tries again)
            log.warning("could not renew the lock of this run directory (%s: %s)", type(exc).__name__, exc)
            continue
        holder = Holder.decode(current[0]) if current is not None else None
        if holder is None or holder.token != me.token:
            log.error("the lock of this run directory was taken over by another job; this job's "
                      "outputs may be mixed with that job's")
            return
        with contextlib.suppress(Exception):  # a storage hiccup: the next renewal tries again
            lock.replace(Holder(**{**asdict(me), "renewed": time.time()}).encode(), current[1])


@contextlib.contextmanager
def hold_run_dir(run_dir: str, force: bool = False) -> Iterator[None]:
    """Hold the run directory's lock while the block runs (renewed in the background)."""
    lock, me = acquire(run_dir, force)
    stop = threading.Event()
    renewer = threading.Thread(target=_renew, args=(lock, me, stop), name="run-dir-lock", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join(timeout=5)
        try:
            current = lock.read()
            if current is not None and (holder := Holder.decode(current[0])) is not None and holder.token == me.token:
                lock.delete()
        except Exception as exc:  # noqa: BLE001 (storage that is down: the job's own error says so)
            # Left behind, the lock names a process that is gone: the next job on this host
            # takes it over, another host's once it expires (or with --force).
            log.warning("could not release the lock of %s (%s: %s)", run_dir, type(exc).__name__, exc)


def hold_until_exit(run_dir: str, force: bool = False) -> None:
    """For a job's process: hold the run directory's lock until the process exits (a SIGKILL
    leaves it, to expire or be seen dead, see :class:`Holder`)."""
    import atexit

    held = hold_run_dir(run_dir, force)
    held.__enter__()
    atexit.register(held.__exit__, None, None, None)
