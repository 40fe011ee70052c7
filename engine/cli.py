"""What every job shares: the common flags, logging, and turning bad input into one line
on stderr with exit code 2 instead of a traceback."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable

from engine.config import Config, load_config
from engine.errors import FairsynthError


def job_parser(description: str, run_dir: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=None, help="preset name in configs/ or a YAML path")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set generate.images_per_group=64 (repeatable)",
    )
    if run_dir:
        parser.add_argument("--run-dir", default=None, help="run directory (default: config run_dir)")
        parser.add_argument("--force", action="store_true", help="reuse a run directory written by another config")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    cfg = load_config(args.config, args.overrides)
    if getattr(args, "run_dir", None):
        cfg.run_dir = args.run_dir
    return cfg


def _terminate(signum, frame):  # noqa: ARG001
    # SIGTERM (a cluster stopping the job) unwinds like Ctrl-C: temporary files are removed
    # and no completion marker is written for the interrupted stage.
    raise KeyboardInterrupt


def run_job(main: Callable[[], object]) -> None:
    """Run a job's main(); FairsynthError becomes one stderr line and exit code 2."""
    logging.basicConfig(
        level=os.environ.get("FAIRSYNTH_LOG", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # FAISS reports at INFO which CPU build it tried first, with a traceback-like line for the
    # one it could not load; that is normal and not the job's news.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    os.umask(0o022)  # outputs are never world-writable
    signal.signal(signal.SIGTERM, _terminate)
    try:
        main()
    except FairsynthError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(FairsynthError.exit_code)
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume", file=sys.stderr)
        sys.exit(130)
