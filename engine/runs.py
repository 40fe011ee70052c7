"""The run directory: where every stage reads its inputs and writes its outputs.

Writes are atomic (temporary name, then rename), so a reader never sees half a file. Each
stage ends by writing a completion marker that holds the hash of the config slice its
outputs depend on; a stage whose marker matches is skipped, so a re-run after a crash redoes
only what is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from engine.config import Config
from engine.errors import FairsynthError

# Sections that define a run's identity: a run directory written with other values holds
# outputs of a different experiment, and mixing them would corrupt results.
IDENTITY_SECTIONS = ("data", "model", "seed")
MARKER_NAME = "_COMPLETE.json"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
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


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_directory(path: Path):
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


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FairsynthError(f"missing {path}: run the stage that writes it first") from None
    except json.JSONDecodeError as exc:
        raise FairsynthError(f"{path} is not valid JSON ({exc.msg}); delete it and re-run its stage") from None


class RunDir:
    """Paths of one run, plus stage completion markers."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __truediv__(self, other: str) -> Path:
        return self.root / other

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def marker(self, stage: str) -> Path:
        return self.root / stage / MARKER_NAME

    def is_complete(self, stage: str, slice_hash: str) -> bool:
        path = self.marker(stage)
        if not path.exists():
            return False
        try:
            return json.loads(path.read_text()).get("hash") == slice_hash
        except (json.JSONDecodeError, OSError):
            return False

    def mark_complete(self, stage: str, slice_hash: str, **extra: Any) -> None:
        """Written last: its presence means every output of the stage is in place."""
        atomic_write_json(self.marker(stage), {"hash": slice_hash, "finished": time.time(), **extra})

    def clear_marker(self, stage: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.marker(stage).unlink()

    def prepare(self, cfg: Config, force: bool = False) -> None:
        """Create the run directory and write the resolved config, refusing to mix runs."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "config.yaml"
        if path.exists() and not force:
            try:
                previous = Config.model_validate(yaml.safe_load(path.read_text()) or {})
            except Exception:
                raise FairsynthError(
                    f"{path} is not a fairsynth config; use another --run-dir or pass --force"
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
