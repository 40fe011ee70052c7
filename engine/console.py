"""What a job's console shows: its own lines (stage lines, progress bars, its warnings and
errors, the summary); Ray's own output goes to the run's log, ``RUN/logs/<job>-<time>.log``.

Ray's own output is what Ray's libraries log in the driver, what its workers print (streamed
to the driver), what Tune prints around an experiment (a box-drawn table, paths under
/tmp/ray), Python warnings from libraries, and lines Ray's native core worker writes straight
to the process's stderr. The last reach no Python object, so the job's file descriptor 2 goes
to the log and Python's ``sys.stderr`` to a copy of the terminal's. ``--verbose`` (or
``FAIRSYNTH_VERBOSE=1``) leaves everything on the console as Ray prints it. With a run
directory on object storage the log is written locally and uploaded when the job ends.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from engine import storage
from engine.errors import FairsynthError

VERBOSE_ENV = "FAIRSYNTH_VERBOSE"
LOG_DIR = "logs"


@dataclass
class _Routing:
    log: io.TextIOBase  # the job's log, line-buffered
    local_path: Path
    target: storage.RunPath  # where the log ends up (the same file for a local run)


_routing: _Routing | None = None


class _LogFile(io.TextIOBase):
    """The job's log file, whose writes never fail the job: on a full disk the text is lost
    (the job's own error says the disk is full), not turned into a traceback in whatever
    library was printing, or into logging's "--- Logging error ---" reports."""

    def __init__(self, file: io.TextIOBase):
        self._file = file

    def write(self, text: str) -> int:
        try:
            return self._file.write(text)
        except OSError:
            return len(text)

    def flush(self) -> None:
        with contextlib.suppress(OSError):
            self._file.flush()

    def fileno(self) -> int:
        return self._file.fileno()

    @property
    def encoding(self) -> str:
        return self._file.encoding

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()


def verbose_requested(flag: bool) -> bool:
    return flag or os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def log_path() -> storage.RunPath | None:
    """Where this job's log ends up, when Ray's output is routed there."""
    return None if _routing is None else _routing.target


def route_to_run_log(run_dir: str, job: str) -> storage.RunPath:
    """Send Ray's own output of this process to ``RUN/logs/<job>-<time>.log`` from now on."""
    global _routing
    if _routing is not None:
        return _routing.target
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = storage.as_path(run_dir) / LOG_DIR / f"{job}-{stamp}-{os.getpid()}.log"
    local = target if isinstance(target, Path) else storage.cache_dir() / LOG_DIR / target.name
    try:
        local.parent.mkdir(parents=True, exist_ok=True)
        log = _LogFile(open(local, "a", buffering=1, encoding="utf-8", errors="backslashreplace"))  # noqa: SIM115
    except OSError as exc:
        raise FairsynthError(
            f"cannot write the job's log {local} ({exc.strerror}): give a --run-dir this user may write, "
            "or pass --verbose to keep Ray's output on the console"
        ) from exc
    log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)}\n")
    _routing = _Routing(log, local, target)
    _split_stderr(log)
    _route_python_warnings(log)
    _job_logs_to_file(log)
    return target


def _split_stderr(log: io.TextIOBase) -> None:
    """File descriptor 2 (native code's stderr) to the log; Python's sys.stderr, and every
    logging handler writing to it, to a copy of the terminal's descriptor."""
    sys.stderr.flush()
    terminal = os.fdopen(os.dup(2), "w", buffering=1, encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
                         errors="backslashreplace")
    old = sys.stderr
    sys.stderr = terminal  # first: whatever fails from here on still reaches the console
    os.dup2(log.fileno(), 2)
    for handler in _all_handlers():
        # logging's last-resort handler reads sys.stderr anew on every record.
        if isinstance(getattr(type(handler), "stream", None), property):
            continue
        if isinstance(handler, logging.StreamHandler) and handler.stream in (old, sys.__stderr__):
            handler.setStream(terminal)


def _job_logs_to_file(log: io.TextIOBase) -> None:
    """The job's own INFO lines (what each stage is doing) to the log; its warnings and errors
    to the console too."""
    root = logging.getLogger()
    for handler in root.handlers:
        if type(handler) is logging.StreamHandler:
            handler.setLevel(max(handler.level, logging.WARNING))
    root.addHandler(_log_handler(log))


def _all_handlers() -> list[logging.Handler]:
    loggers = [logging.getLogger()] + [
        item for item in logging.Logger.manager.loggerDict.values() if isinstance(item, logging.Logger)
    ]
    return [handler for lg in loggers for handler in lg.handlers]


def _route_python_warnings(log: io.TextIOBase) -> None:
    """Warnings that libraries raise (deprecations and the like) go to the log."""
    logging.captureWarnings(True)
    warnings_logger = logging.getLogger("py.warnings")
    warnings_logger.handlers[:] = [_log_handler(log)]
    warnings_logger.propagate = False


def _log_handler(log: io.TextIOBase) -> logging.Handler:
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return handler


# Loggers Ray writes to during ray.init after it set its console handler up anew, which no
# handler routed beforehand reaches: a filter on the logger itself sends their records to the log.
RAY_INIT_LOGGERS = ("ray._private.authentication.authentication_token_setup",)


class _ToLog(logging.Filter):
    """Hands a logger's records to the log's handler instead of its own and its parents'."""

    def __init__(self, handler: logging.Handler):
        super().__init__()
        self.handler = handler

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= self.handler.level:
            self.handler.handle(record)
        return False


def route_ray_loggers() -> None:
    """Ray's driver-side loggers to the log: before ``ray.init`` (which logs how it starts)
    and again after it (which sets them up anew). A no-op unless this job routes its output
    (route_to_run_log)."""
    if _routing is None:
        return
    for name in RAY_INIT_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ToLog) for f in logger.filters):
            logger.addFilter(_ToLog(_log_handler(_routing.log)))
    for name, item in list(logging.Logger.manager.loggerDict.items()):
        if not (name == "ray" or name.startswith("ray.")) or not isinstance(item, logging.Logger):
            continue
        for handler in item.handlers:
            # Console handlers (Ray's PlainRayHandler among them) only; session files keep theirs.
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setStream(_routing.log)


def route_ray_output() -> None:
    """After ``ray.init``: Ray's driver-side loggers and its workers' streamed output to the
    log. A no-op unless this job routes its output (route_to_run_log)."""
    if _routing is None:
        return
    route_ray_loggers()
    _route_worker_streams(_routing.log)
    _route_cluster_errors(_routing.log)


def _route_cluster_errors(log: io.TextIOBase) -> None:
    """The cluster's error messages (a raylet that died, a worker killed for memory), which Ray
    prints whole on the driver's stdout, to the log; the console gets each kind's first line
    once, as one warning. A spot cluster losing nodes would otherwise fill the console."""
    from ray._private import worker

    original = getattr(worker, "print_to_stdstream", None)
    if original is None or getattr(original, "fairsynth_routed", False):
        return
    shown: set[str] = set()

    def to_log(data: dict, ignore_prefix: bool) -> None:
        if data.get("pid") != "raylet":
            return original(data, ignore_prefix)
        worker.print_worker_logs(data, log, ignore_prefix)
        for message in data.get("lines", []):
            first = first_line(message)
            # One node's id or address apart, the same news (read before the line is cut).
            kind = _IDS.sub("#", first_line(message, limit=len(str(message))))
            if first and kind not in shown:
                shown.add(kind)
                logging.getLogger(__name__).warning("ray: %s (more in the run's log)", first)

    to_log.fairsynth_routed = True
    worker.print_to_stdstream = to_log


# Node and worker ids (hex), addresses and other numbers in a Ray message.
_IDS = re.compile(r"[0-9a-f]{16,}|\d+(?:[.:]\d+)*")


def first_line(message: str, limit: int = 160) -> str:
    """A Ray message's first line, cut to ``limit`` characters."""
    line = next((part.strip() for part in str(message).splitlines() if part.strip()), "")
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _route_worker_streams(log: io.TextIOBase) -> None:
    """What workers print to the log, except the progress bars they draw through Ray's tqdm
    (Train's epoch bar): those are drawn here, one bar each, as the driver's own."""
    from ray._private import worker
    from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

    dispatcher = getattr(worker, "global_worker_stdstream_dispatcher", None)
    if dispatcher is None or not hasattr(worker, "print_worker_logs"):
        return  # another Ray: its worker output stays on the console
    bars = _RemoteBars()

    # Ray's own prefixes (who printed each line) without its terminal colours: the log is text.
    os.environ["RAY_COLOR_PREFIX"] = "0"

    def to_log(data: dict) -> None:
        lines = data.get("lines", [])
        for line in lines:
            if RAY_TQDM_MAGIC in line:
                bars.update(json.loads(line))
        rest = [line for line in lines if RAY_TQDM_MAGIC not in line]
        if rest:
            worker.print_worker_logs({**data, "lines": rest}, log)

    with contextlib.suppress(KeyError, ValueError):
        dispatcher.remove_handler("ray_print_logs")
    with contextlib.suppress(KeyError, ValueError):
        dispatcher.remove_handler("fairsynth_log")
    dispatcher.add_handler("fairsynth_log", to_log)


class _RemoteBars:
    """Progress bars that workers report through Ray's tqdm (``ray.experimental.tqdm_ray``),
    drawn on the driver's console as plain tqdm bars without the worker's prefix."""

    def __init__(self):
        self.bars: dict[str, object] = {}
        self.lock = threading.Lock()

    def update(self, state: dict) -> None:
        from tqdm.auto import tqdm

        with self.lock:
            bar = self.bars.get(state["uuid"])
            if bar is None:
                bar = self.bars[state["uuid"]] = tqdm(total=state["total"], desc=state["desc"], unit=state["unit"])
            if state["total"] != bar.total:
                bar.total = state["total"]
            bar.update(state["x"] - bar.n)
            if state.get("closed"):
                bar.close()
                del self.bars[state["uuid"]]


@contextlib.contextmanager
def ray_prints():
    """What a Ray library prints to stdout meanwhile (Tune's experiment tables and paths) goes
    to the log; outside a routed job, to the console as usual."""
    if _routing is None:
        yield
        return
    sys.stdout.flush()
    with contextlib.redirect_stdout(_routing.log):
        yield


def finish() -> None:
    """Flush the log and, for a run on object storage, upload it. Called as the job ends."""
    global _routing
    if _routing is None:
        return
    _routing.log.flush()
    if not isinstance(_routing.target, Path):
        with contextlib.suppress(Exception):  # a log that cannot be uploaded must not fail the job
            # Two tries: storage that stays down has already stopped the job in its own line.
            _routing.target.write_bytes(_routing.local_path.read_bytes(), attempts=storage.PROBE_ATTEMPTS)
