"""Free space against what a stage is planned to write, and a full disk or a storage outage
during a stage turned into one line that names the run directory.

The planner (engine/planning: the same counts as ``jobs/plan.py``) says how many bytes each
stage's outputs keep and how many its running tasks hold besides (fine-tuning checkpoints in
flight). Before a stage starts, a local run directory's free space (``shutil.disk_usage``) is
compared with that and a warning logged when it falls short; object storage has no such
limit and is not checked. The plan is worked out once per job, the first time a stage that
the planner counts bytes for (a generative method's) is about to start.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from engine import storage
from engine.config import Config
from engine.errors import FairsynthError, disk_full, find_cause
from engine.generation_methods import is_generation_method

log = logging.getLogger(__name__)


# Free bytes under which a local run directory whose stage failed counts as full.
NEARLY_FULL = 1 << 20


def format_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds ``path`` (or would: its nearest existing parent)."""
    path = Path(path).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


class StageSpace:
    """Planned bytes per (severity, stage, method) of one job, checked before each stage."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._needs: dict[tuple[str, str, str], float] | None = None

    def _plan(self) -> dict[tuple[str, str, str], float]:
        if self._needs is None:
            from engine.planning.plan import plan_job

            self._needs = {}
            try:
                # Only bytes are read; the peak given skips measuring this machine's matmuls.
                plan = plan_job(self.cfg, "cpu", 1, peak_tflops=1.0)
            except Exception as exc:  # noqa: BLE001 (a plan that cannot be made checks nothing)
                log.info("disk: no space check (%s: %s)", type(exc).__name__, exc)
                return self._needs
            for row in plan.rows:
                key = (row.severity, row.stage, row.method)
                self._needs[key] = self._needs.get(key, 0.0) + row.disk_bytes + row.scratch_bytes
        return self._needs

    def need(self, severity, stage: str, method: str = "") -> float:
        """Bytes the planner counts for ``stage`` of ``method`` at ``severity`` (0 if none)."""
        if not any(is_generation_method(m) for m in self.cfg.methods) or stage in ("data", "cluster"):
            return 0.0  # the planner counts no bytes for these: no need to build it
        return self._plan().get((str(severity), stage, method), 0.0)

    def check(self, run_dir, severity, stage: str, method: str = "") -> None:
        """Log one warning when a local run directory has less free space than ``stage`` needs."""
        if storage.is_remote(run_dir):
            return
        need = self.need(severity, stage, method)
        if not need:
            return
        free = free_bytes(Path(str(run_dir)))
        if free < need:
            log.warning("disk: %s needs about %s in %s, and %s is free; it may stop with a full disk",
                        _stage_name(stage, method), format_bytes(need), run_dir, format_bytes(free))

    def stage_failure(self, exc: BaseException, run_dir, severity, stage: str, method: str = "") -> FairsynthError | None:
        """The one line for a stage that stopped on a full disk or on storage that stayed
        down; None for any other error. ``run_dir`` is the stage's folder (a severity's or a
        seed's); the line names it and the job's run_dir."""
        name = _stage_name(stage, method)
        full = disk_full(exc)
        if full is None and not storage.is_remote(run_dir) and free_bytes(Path(str(run_dir))) < NEARLY_FULL:
            # A library can lose the ENOSPC on its way out: Tune, reading back a trial's
            # error file that the full disk left empty, raises EOFError.
            full = exc
        if full is not None:
            where = getattr(full, "filename", None) or str(run_dir)
            need = self.need(severity, stage, method) if not storage.is_remote(run_dir) else 0.0
            room = ""
            if not storage.is_remote(run_dir):
                planned = f"needs about {format_bytes(need)}" if need else "needs more than the disk has"
                room = f"; {name} {planned}, {format_bytes(free_bytes(Path(str(run_dir))))} free now"
            return FairsynthError(
                f"no space left on device writing {where} (run_dir = {self.cfg.run_dir!r}){room}; "
                "free some space and run the same command again to resume")
        if not storage.is_remote(run_dir):
            return None
        failed = find_cause(exc, lambda e: isinstance(e, storage.StorageError))
        if failed is None:
            # The error came another way (Ray Data, Tune): if the storage cannot be written now,
            # that is the news; if it can, the error is something else and goes out as it is.
            problem = storage.check_writable(run_dir)
            if problem is None:
                return None
            failed = problem
        text = " ".join(str(failed).split())[:400]
        return FairsynthError(
            f"run_dir = {self.cfg.run_dir!r}: the storage failed during {name} ({text}); finished work "
            "is kept: run the same command again once the storage answers")


def _stage_name(stage: str, method: str) -> str:
    return f"stage {stage}{' ' + method if method else ''}"
