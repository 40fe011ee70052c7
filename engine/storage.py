"""Where a run's files live: a local folder (on a cluster, a mount every node shares) or
object storage (``s3://bucket/prefix``), behind one small interface built on pyarrow.fs.

A local run directory is handled with pathlib exactly as before (``pathlib.Path``); a URI
becomes a :class:`RemotePath`, which offers the pathlib methods the stages use (``/``,
``name``, ``parent``, ``exists``, ``glob``, ``read_bytes``, ``write_bytes`` ...) on the
pyarrow filesystem. The functions here take either, so stage code is the same for both.

- S3 uses the standard AWS variables: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (or
  an instance profile), ``AWS_DEFAULT_REGION`` / ``AWS_REGION``, and ``AWS_ENDPOINT_URL``
  (or ``AWS_ENDPOINT_URL_S3``) for an S3-compatible server; the endpoint is passed to
  pyarrow explicitly, so it does not depend on the pyarrow version honouring the variable.
  Every process that touches the run (driver, actors, tasks, Train workers) builds its own
  filesystem from the URI and its own environment: remote processes get URI strings, never
  a driver's local path.
- Writes are atomic: locally a temporary name in the same folder, then a rename; on S3 one
  upload, whose object readers see whole (once the upload completes) or not at all.
- Object storage fails now and then (a 500, a 503, a dropped connection). Each request is
  retried by the AWS SDK inside pyarrow; an operation that still fails with such an error is
  tried again here, :data:`RETRY_ATTEMPTS` times in all with a doubling pause, each retry
  logged as a warning. Then it raises :class:`StorageError`, which names the path and the
  last error. Not-found, access and other permanent errors are never retried.
- Diffusers and TensorBoard need local files: :func:`local_copy` downloads a remote file or
  folder into a per-node cache, :func:`upload_folder` puts a local folder under a URI.
"""

from __future__ import annotations

import atexit
import contextlib
import fnmatch
import functools
import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs

from engine.hashing import digest

# Where remote artifacts are downloaded on each node (one folder per artifact URI).
CACHE_ENV = "FAIRSYNTH_CACHE"

log = logging.getLogger(__name__)

# Attempts per storage operation, and the first pause (doubling each time, at most
# RETRY_MAX_PAUSE_S): 0.5 + 1 + 2 + 4 + 8 s, so storage down for about 15 s is ridden out
# and storage that stays down stops the job within half a minute of the first error.
RETRY_ATTEMPTS = 6
RETRY_FIRST_PAUSE_S = 0.5
RETRY_MAX_PAUSE_S = 8.0
# pyarrow's messages for errors worth another try (AWS SDK error kinds, curl and socket errors).
TRANSIENT_MARKERS = (
    "NETWORK_CONNECTION", "INTERNAL_FAILURE", "SERVICE_UNAVAILABLE", "SLOW_DOWN", "THROTTLING",
    "REQUEST_TIMEOUT", "HTTP status 5", "curlCode", "Connection reset", "timed out", "Timeout",
)


class StorageError(OSError):
    """A storage operation that kept failing after every retry."""


def is_transient(exc: BaseException) -> bool:
    """True for an error a later attempt may not see: a 5xx answer, a dropped or timed-out
    connection. Missing files, denied access and bad requests are not."""
    if isinstance(exc, StorageError) or not isinstance(exc, OSError):
        return False
    if isinstance(exc, (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    text = str(exc)
    return any(marker in text for marker in TRANSIENT_MARKERS)


def retrying(what: str, where: object, fn, *args, attempts: int | None = None, **kwargs):
    """``fn(*args, **kwargs)``, tried again on a transient error (:func:`is_transient`) up to
    ``attempts`` times in all, each retry logged; then :class:`StorageError`."""
    attempts = attempts or RETRY_ATTEMPTS
    pause = RETRY_FIRST_PAUSE_S
    for attempt in range(1, attempts + 1):
        try:
            return fn(*args, **kwargs)
        except OSError as exc:
            if not is_transient(exc):
                raise
            text = " ".join(str(exc).split())[:300]
            if attempt == attempts:
                raise StorageError(f"{where}: {what} failed {attempts} times; last error: {text}") from exc
            log.warning("storage: %s %s failed (%s); retry %d of %d in %.1f s",
                        what, where, text, attempt, attempts - 1, pause)
            time.sleep(pause)
            pause = min(2 * pause, RETRY_MAX_PAUSE_S)
    raise AssertionError("unreachable")


def is_remote(location: str | os.PathLike) -> bool:
    """True for a URI with a scheme other than file:// (s3://, gs://, ...)."""
    if isinstance(location, RemotePath):
        return True
    text = str(location)
    return "://" in text and not text.startswith("file://")


@functools.lru_cache(maxsize=16)
def _filesystem(scheme: str, bucket: str, endpoint: str | None, region: str | None) -> pafs.FileSystem:
    if scheme in ("s3", "s3a") and (endpoint or region):
        kwargs = {"endpoint_override": endpoint} if endpoint else {}
        if region:
            kwargs["region"] = region
        # A short connect timeout: an unreachable endpoint fails the run at start in seconds.
        return pafs.S3FileSystem(connect_timeout=10, request_timeout=60, **kwargs)
    # No endpoint or region given: pyarrow finds the bucket's region (and its own defaults).
    return pafs.FileSystem.from_uri(f"{scheme}://{bucket}")[0]


# Cached filesystems are dropped before pyarrow finalizes S3 at exit (pyarrow.fs registered
# that first, and atexit runs the last registered first): one still alive then is freed after
# the AWS SDK it uses, and the process aborts on its way out (a Ray worker retiring after
# writing shards did).
atexit.register(_filesystem.cache_clear)


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path within it) of a URI or local path."""
    if not is_remote(uri):
        text = str(uri).removeprefix("file://")
        return pafs.LocalFileSystem(), str(Path(text).expanduser().resolve())
    scheme, _, rest = str(uri).partition("://")
    rest = "/".join(p for p in rest.split("/") if p)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return _filesystem(scheme, rest.split("/")[0], endpoint, region), rest


class RemotePath:
    """A file or folder under a URI, with the pathlib methods the stages use."""

    def __init__(self, uri: str):
        scheme, _, rest = str(uri).partition("://")
        self.scheme = scheme
        self.key = "/".join(p for p in rest.split("/") if p)  # bucket/a/b, no empty parts

    # --- names -------------------------------------------------------------------------------
    def __str__(self) -> str:
        return f"{self.scheme}://{self.key}"

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and str(self) == str(other)

    def __lt__(self, other: RemotePath) -> bool:
        return str(self) < str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __truediv__(self, other: str | os.PathLike) -> RemotePath:
        return RemotePath(f"{self}/{str(other).strip('/')}")

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    @property
    def parent(self) -> RemotePath:
        head = self.key.rsplit("/", 1)[0] if "/" in self.key else self.key
        return RemotePath(f"{self.scheme}://{head}")

    def with_name(self, name: str) -> RemotePath:
        return self.parent / name

    def relative_to(self, other: RemotePath | str) -> PurePosixPath:
        return PurePosixPath(self.key).relative_to(RemotePath(str(other)).key)

    def resolve(self) -> RemotePath:
        return self

    # --- the filesystem ----------------------------------------------------------------------
    @property
    def fs(self) -> pafs.FileSystem:
        return filesystem_for(str(self))[0]

    @property
    def fs_path(self) -> str:
        return filesystem_for(str(self))[1]

    def _info(self) -> pafs.FileInfo:
        return retrying("stat", self, self.fs.get_file_info, self.fs_path)

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def _children(self, recursive: bool) -> list[tuple[str, pafs.FileInfo]]:
        selector = pafs.FileSelector(self.fs_path, allow_not_found=True, recursive=recursive)
        base = self.fs_path.rstrip("/") + "/"
        listing = retrying("list", self, self.fs.get_file_info, selector)
        return [(info.path[len(base):], info) for info in listing]

    def iterdir(self) -> list[RemotePath]:
        return sorted(self / rel for rel, _ in self._children(recursive=False))

    def glob(self, pattern: str) -> list[RemotePath]:
        """Files and folders matching ``pattern`` (``*.parquet``; ``**/x`` searches below)."""
        recursive = "/" in pattern
        found = []
        for rel, _ in self._children(recursive):
            name = rel if recursive else rel.rsplit("/", 1)[-1]
            if fnmatch.fnmatchcase(name, pattern.removeprefix("**/")) or (
                recursive and fnmatch.fnmatchcase(rel.rsplit("/", 1)[-1], pattern.removeprefix("**/"))
            ):
                found.append(self / rel)
        return sorted(found)

    def rglob(self, pattern: str) -> list[RemotePath]:
        return sorted(self / rel for rel, _ in self._children(True)
                      if fnmatch.fnmatchcase(rel.rsplit("/", 1)[-1], pattern))

    def read_bytes(self, *, attempts: int | None = None) -> bytes:
        def read() -> bytes:
            with self.fs.open_input_stream(self.fs_path) as stream:
                return stream.read()

        return retrying("read", self, read, attempts=attempts)

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes, *, attempts: int | None = None) -> int:
        # One upload: the object appears whole when it completes, or not at all; a retry
        # uploads it again whole.
        def write() -> None:
            with self.fs.open_output_stream(self.fs_path) as stream:
                stream.write(data)

        retrying("write", self, write, attempts=attempts)
        return len(data)

    def write_text(self, text: str) -> int:
        return self.write_bytes(text.encode())

    def unlink(self, missing_ok: bool = False, *, attempts: int | None = None) -> None:
        try:
            retrying("delete", self, self.fs.delete_file, self.fs_path, attempts=attempts)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:  # noqa: ARG002
        """Object stores have no folders: a key's prefix exists once a file is under it."""

    def rmtree(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            retrying("delete", self, self.fs.delete_dir, self.fs_path)


RunPath = Path | RemotePath


def as_path(location: str | os.PathLike | RemotePath) -> RunPath:
    """A local path as ``pathlib.Path`` (unchanged), a URI as :class:`RemotePath`."""
    if isinstance(location, RemotePath):
        return location
    text = str(location)
    if is_remote(text):
        return RemotePath(text)
    return Path(text.removeprefix("file://"))


def uri(path: RunPath | str) -> str:
    """What a remote process is given: the URI, or a local path made absolute (on a cluster
    it must name a mount every node shares)."""
    path = as_path(path)
    return str(path) if isinstance(path, RemotePath) else str(path.resolve())


def fs_path(path: RunPath | str) -> tuple[pafs.FileSystem | None, str]:
    """(filesystem, path) for pyarrow and Ray Data readers: (None, absolute path) locally, so
    local reads stay what they were."""
    path = as_path(path)
    if isinstance(path, RemotePath):
        return path.fs, path.fs_path
    return None, str(path.resolve())


# --- reading and writing -----------------------------------------------------------------------


def read_bytes(path: RunPath | str) -> bytes:
    return as_path(path).read_bytes()


def exists(path: RunPath | str) -> bool:
    return as_path(path).exists()


def _atomic_write_local(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path: RunPath | str, data: bytes) -> None:
    """Atomic: a temporary name then a rename locally, one upload on object storage."""
    path = as_path(path)
    if isinstance(path, RemotePath):
        path.write_bytes(data)
    else:
        _atomic_write_local(path, data)


def delete(path: RunPath | str, missing_ok: bool = True) -> None:
    """Remove a file, or a folder with everything under it."""
    path = as_path(path)
    if isinstance(path, RemotePath):
        if path.is_dir():
            path.rmtree()
        else:
            path.unlink(missing_ok=missing_ok)
    elif path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=missing_ok)


def copy_file(source: RunPath | str, target: RunPath | str) -> None:
    source, target = as_path(source), as_path(target)
    if isinstance(source, Path) and isinstance(target, Path):
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    else:
        write_bytes(target, read_bytes(source))


def dataset_source(paths: list[RunPath]) -> dict:
    """``paths`` and ``filesystem`` for ``ray.data.read_parquet``: absolute local paths as
    before, or paths within the object store's filesystem, which read tasks on any node use."""
    located = [fs_path(p) for p in paths]
    filesystem = located[0][0] if located else None
    return {"paths": [where for _, where in located], "filesystem": filesystem}


def read_parquet(path: RunPath | str, columns: list[str] | None = None):
    """A Parquet file as a pyarrow Table (only ``columns`` read, when given)."""
    import pyarrow.parquet as pq

    fs, where = fs_path(path)
    if fs is None:
        return pq.read_table(where, columns=columns)
    return retrying("read", path, pq.read_table, where, columns=columns, filesystem=fs)


def parquet_file(path: RunPath | str):
    """``pyarrow.parquet.ParquetFile`` (footer and schema without reading the data)."""
    import pyarrow.parquet as pq

    fs, where = fs_path(path)
    if fs is None:
        return pq.ParquetFile(where)
    return retrying("read", path, pq.ParquetFile, where, filesystem=fs)


def load_numpy(path: RunPath | str):
    """``numpy.load`` of a .npy or .npz file (no pickles)."""
    import io

    import numpy as np

    return np.load(io.BytesIO(read_bytes(path)), allow_pickle=False)


def save_numpy(path: RunPath | str, array) -> None:
    """``numpy.save`` of ``array`` (no pickles), written atomically."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    write_bytes(path, buffer.getvalue())


# --- folders for libraries that need local files ------------------------------------------------


def upload_folder(local: str | os.PathLike, target: RunPath | str, last: str | None = None,
                  replace: bool = True) -> None:
    """Put every file under ``local`` below ``target``, replacing what was there (with
    ``replace=False`` on object storage: adding to it, as log folders want). Locally the
    folder appears in one rename; on object storage files go up one upload each, ``last``
    (the folder's completion record, e.g. ``unit.json``) after all others, so its presence
    says the folder is whole."""
    local, target = Path(local), as_path(target)
    if isinstance(target, Path):
        with atomic_local_directory(target) as tmp:
            shutil.copytree(local, tmp, dirs_exist_ok=True)
        return
    if replace:
        target.rmtree()
    files = sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: (p.relative_to(local).as_posix() == last, p))
    for file in files:
        (target / file.relative_to(local).as_posix()).write_bytes(file.read_bytes())


def download_folder(source: RunPath | str, local: str | os.PathLike) -> Path:
    """Copy a remote file or folder to ``local`` (a file keeps its name inside ``local``)."""
    source, local = as_path(source), Path(local)
    local.mkdir(parents=True, exist_ok=True)
    if isinstance(source, Path):
        if source.is_dir():
            shutil.copytree(source, local, dirs_exist_ok=True)
        else:
            shutil.copy2(source, local / source.name)
        return local
    if source.is_file():
        (local / source.name).write_bytes(source.read_bytes())
        return local
    for child in source.rglob("*"):
        if child.is_file():
            target = local / child.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(child.read_bytes())
    return local


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "fairsynth-cache")


def _listing(path: RemotePath) -> list[tuple[str, int, int]]:
    """(relative name, size, modification time) of every file at or under ``path``."""
    info = path._info()
    if info.type == pafs.FileType.File:
        return [(path.name, info.size, info.mtime_ns or 0)]
    return sorted((rel, i.size, i.mtime_ns or 0) for rel, i in path._children(True) if i.type == pafs.FileType.File)


def local_copy(path: RunPath | str) -> Path:
    """A local path holding ``path``: itself when local, else a download into this node's
    cache. The cache key covers the URI and every file's size and modification time, so a
    unit re-trained at the same path is fetched again; the folder appears in one rename, so
    a concurrent or interrupted download is never read half-done."""
    path = as_path(path)
    if isinstance(path, Path):
        return path
    listing = _listing(path)
    if not listing:
        raise FileNotFoundError(str(path))
    is_file = listing == [(path.name, *listing[0][1:])] and path.is_file()
    folder = cache_dir() / f"{digest([str(path), listing])}-{path.name}"
    if not folder.exists():
        tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}")
        download_folder(path, tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process on this node won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return folder / path.name if is_file else folder


@contextlib.contextmanager
def atomic_local_directory(path: Path):
    """Yield a temporary sibling folder; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: RunPath | str, last: str | None = None):
    """Yield a local folder to fill; on success it becomes ``path`` (one rename locally, an
    upload to object storage with the file ``last`` uploaded last)."""
    path = as_path(path)
    if isinstance(path, Path):
        with atomic_local_directory(path) as tmp:
            yield tmp
        return
    with tempfile.TemporaryDirectory(prefix="fairsynth-upload-") as tmp:
        yield Path(tmp)
        upload_folder(tmp, path, last=last)


# --- checking a run directory at start ---------------------------------------------------------


# Attempts of the probe: it asks whether the storage answers now (a job about to start, or a
# stage that failed after its own retries), which waiting longer would not change.
PROBE_ATTEMPTS = 2


def check_writable(root: RunPath | str) -> str | None:
    """Write and delete a probe object under ``root``; None when that worked, else why not."""
    probe = as_path(root) / f"_probe-{uuid.uuid4().hex}"
    try:
        if isinstance(probe, RemotePath):
            probe.write_bytes(b"fairsynth probe\n", attempts=PROBE_ATTEMPTS)
            if probe.read_bytes(attempts=PROBE_ATTEMPTS) != b"fairsynth probe\n":
                return "a probe file read back different bytes"
            probe.unlink(attempts=PROBE_ATTEMPTS)
            return None
        write_bytes(probe, b"fairsynth probe\n")
        if read_bytes(probe) != b"fairsynth probe\n":
            return "a probe file read back different bytes"
        delete(probe)
    except Exception as exc:  # noqa: BLE001 (any failure means the run cannot use it)
        text = " ".join(str(exc).split()) or exc.__class__.__name__
        return text[:300]
    return None
