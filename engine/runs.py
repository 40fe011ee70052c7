"""The run directory: where every stage reads its inputs and writes its outputs.

The run directory is a local folder (on a cluster, a mount every node shares) or an object
store prefix such as ``s3://bucket/run`` (engine.storage says which variables pick the
endpoint and credentials). Writes are atomic (a temporary name then a rename locally, one
upload on object storage), so a reader never sees half a file. Each
stage ends by writing a completion marker that holds its key (engine/stages/__init__.py: the config
fields and inputs its outputs depend on) and the format version; a stage whose marker matches
is skipped, so a re-run after a crash redoes only what is missing.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import yaml

from engine import storage
from engine.config import Config
from engine.errors import FairsynthError
from engine.stages import FORMAT_VERSION
from engine.storage import RemotePath, RunPath

# Sections that define a run's identity: a run directory written with other values holds
# outputs of a different experiment, and mixing them would corrupt results.
IDENTITY_SECTIONS = ("data", "model", "seed")
MARKER_NAME = "_COMPLETE.json"


def atomic_write_bytes(path: RunPath | str, data: bytes) -> None:
    """Temporary name then rename locally; one upload on object storage."""
    storage.write_bytes(path, data)


def atomic_write_text(path: RunPath | str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: RunPath | str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


# A folder filled locally that appears whole at its run path (engine.storage).
atomic_directory = storage.atomic_directory


def read_json(path: RunPath | str) -> Any:
    try:
        return json.loads(storage.as_path(path).read_text())
    except FileNotFoundError:
        raise FairsynthError(f"missing {path}: run the stage that writes it first") from None
    except json.JSONDecodeError as exc:
        raise FairsynthError(f"{path} is not valid JSON ({exc.msg}); delete it and re-run its stage") from None


class RunDir:
    """Paths of one run, plus stage completion markers.

    ``root`` is a ``pathlib.Path`` for a local run directory and an
    :class:`engine.storage.RemotePath` for ``s3://bucket/prefix``; ``run / "a/b"`` gives the
    same kind, so stage code reads and writes both alike. Remote processes get :attr:`uri`.
    """

    def __init__(self, root: str | Path | RemotePath):
        self.root: RunPath = storage.as_path(root)

    @property
    def uri(self) -> str:
        """The run as remote actors, tasks and workers are given it (never a relative path)."""
        return storage.uri(self.root)

    @property
    def is_remote(self) -> bool:
        return isinstance(self.root, RemotePath)

    def __truediv__(self, other: str) -> RunPath:
        return self.root / other

    def marker(self, stage: str) -> RunPath:
        return self.root / stage / MARKER_NAME

    def read_marker(self, stage: str) -> dict | None:
        """The stage's completion marker when this version wrote it, else None (a marker of
        another format version is a stage to re-run, never one to read)."""
        path = self.marker(stage)
        if not path.exists():
            return None
        try:
            marker = json.loads(path.read_text())
        except storage.StorageError:
            raise  # storage that is down says nothing about the stage: never redo it for that
        except (json.JSONDecodeError, OSError):
            return None
        return marker if isinstance(marker, dict) and marker.get("format") == FORMAT_VERSION else None

    def is_complete(self, stage: str, key: str) -> bool:
        marker = self.read_marker(stage)
        return marker is not None and marker.get("hash") == key

    def mark_complete(self, stage: str, key: str, **extra: Any) -> None:
        """Written last: its presence means every output of the stage is in place."""
        atomic_write_json(self.marker(stage), {"hash": key, "format": FORMAT_VERSION, "finished": time.time(), **extra})

    def clear_marker(self, stage: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.marker(stage).unlink()

    def check_writable(self) -> None:
        """Write and delete a probe file, so an unreachable or read-only run directory fails
        before any stage runs rather than after the first hour of work."""
        problem = storage.check_writable(self.root)
        if problem is None:
            return
        if self.is_remote:
            fix = ("create the bucket, and give every node credentials that may write it "
                   "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an instance profile; "
                   "AWS_ENDPOINT_URL for an S3-compatible server)")
        else:
            fix = "use a folder this user can write (on a cluster, a mount every node shares)"
        raise FairsynthError(f"run_dir = {self.uri!r} cannot be written ({problem}); {fix}, or set --run-dir")

    def create(self) -> None:
        """Create the run directory (a local one) and check that it can be written."""
        if not self.is_remote:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise FairsynthError(
                    f"run_dir = {self.uri!r} cannot be created ({exc.strerror}); "
                    "use a folder this user can write, or set --run-dir"
                ) from None
        self.check_writable()

    def prepare(self, cfg: Config, force: bool = False) -> None:
        """Create the run directory and write the resolved config, refusing to mix runs."""
        self.create()
        path = self.root / "config.yaml"
        if path.exists() and not force:
            try:
                previous = Config.model_validate(yaml.safe_load(path.read_text()) or {})
            except storage.StorageError:
                raise  # the storage failed, not the config: --force would overwrite a good one
            except Exception:
                raise FairsynthError(
                    f"{path} is not a config this version of fairsynth reads (another tool's, or an "
                    "older version's); use another --run-dir or pass --force"
                ) from None
            if previous.slice_hash(*IDENTITY_SECTIONS) != cfg.slice_hash(*IDENTITY_SECTIONS):
                changed = [
                    s for s in IDENTITY_SECTIONS if previous.slice_hash(s) != cfg.slice_hash(s)
                ]
                raise FairsynthError(
                    f"run directory {self.root} was written by a different config "
                    f"(changed: {', '.join(changed)}); use another --run-dir or pass --force"
                )
        atomic_write_text(path, cfg.to_yaml())
