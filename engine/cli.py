"""What every job shares: the common flags, a help text that lists the presets and the config
keys, logging, and turning bad input into one line on stderr with exit code 2 instead of a
traceback."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import yaml
from pydantic import BaseModel

from engine import console
from engine.config import DEFAULT_PRESET, PRESET_DIR, Config, load_config
from engine.errors import FairsynthError, disk_full, find_cause
from engine.redact import redact, redact_log_handlers

HELP_WIDTH = 120  # a config key's help line is cut here; engine/config.py has the whole text


def preset_summaries() -> dict[str, str]:
    """Preset name -> the first sentence of the comment that opens its file."""
    summaries = {}
    for path in sorted(PRESET_DIR.glob("*.yaml")):
        lines = []
        for line in path.read_text().splitlines():
            if not line.startswith("#") or line.strip() == "#":
                break
            lines.append(line.lstrip("#").strip())
        text = " ".join(lines)
        summaries[path.stem] = text.split(". ")[0].rstrip(".")
    return summaries


def _config_fields(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            yield from _config_fields(kind, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def _shown(tree: dict, key: str) -> str:
    """The value at a dotted key, as YAML would write it on one line."""
    for part in key.split("."):
        tree = tree[part]
    return yaml.safe_dump(tree, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def config_keys() -> list[tuple[str, str, str]]:
    """(dotted key, default as YAML would write it, description) for every config key."""
    defaults = Config().model_dump(mode="json")
    return [(key, _shown(defaults, key), field.description or "") for key, field in _config_fields(Config)]


def config_help() -> str:
    """The presets and the config keys, for the end of a --help text."""
    tiny = load_config(DEFAULT_PRESET).model_dump(mode="json")
    lines = ["presets (--config NAME, files in engine/configs/; or a YAML path):"]
    lines += [f"  {name:<18} {text}" for name, text in preset_summaries().items()]
    lines += ["", "config keys (--set KEY=VALUE; defaults are the paper's where it states them, engine/config.py",
              f"explains each; [{DEFAULT_PRESET}: VALUE] where the {DEFAULT_PRESET} preset, run with no --config, "
              "sets another):"]
    for key, default, text in config_keys():
        own = _shown(tiny, key)
        note = f"[{DEFAULT_PRESET}: {own}] " if own != default else ""
        lines.append(f"  {key:<38} {default:<12} {note}{text}".rstrip())
    return "\n".join(line if len(line) <= HELP_WIDTH else line[: HELP_WIDTH - 3] + "..." for line in lines)


def job_parser(description: str, run_dir: bool = True, prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=description, epilog=config_help(), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=None, help="preset name in engine/configs/ or a YAML path")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set generate.images_per_group=64 (repeatable)",
    )
    if run_dir:
        parser.add_argument("--run-dir", default=None, help="run directory (default: config run_dir)")
        parser.add_argument("--force", action="store_true", help="reuse a run directory written by another config")
        parser.add_argument("--verbose", action="store_true",
                            help="show Ray's own output on the console (default: in RUN/logs/)")
    return parser


def dotted_overrides(tokens: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """Config keys given as flags (``--data.root DIR`` or ``--data.root=DIR``) as --set items;
    anything else left over is the parser's usual one-line error."""
    overrides, i = [], 0
    while i < len(tokens):
        token = tokens[i]
        key, sep, value = token[2:].partition("=")
        if not token.startswith("--") or "." not in key:
            parser.error(f"unrecognized argument {token!r}; config keys go as --set KEY=VALUE or --KEY VALUE")
        if not sep:
            if i + 1 >= len(tokens):
                parser.error(f"{token} needs a value")
            value, i = tokens[i + 1], i + 1
        overrides.append(f"{key}={value}")
        i += 1
    return overrides


def config_from_args(args: argparse.Namespace, job: str | None = None) -> Config:
    """The job's config; a job with a run directory also sends Ray's own output to the run's
    log, RUN/logs/<job>-*.log (default: the script's name), from here on (engine/console.py),
    unless --verbose."""
    cfg = load_config(args.config, args.overrides)
    if getattr(args, "run_dir", None):
        cfg.run_dir = args.run_dir
    if hasattr(args, "verbose") and not console.verbose_requested(args.verbose):
        console.route_to_run_log(cfg.run_dir, job or Path(sys.argv[0]).stem)
    return cfg


def _terminate(signum, frame):  # noqa: ARG001
    # SIGTERM (a cluster stopping the job) unwinds like Ctrl-C: temporary files are removed
    # and no completion marker is written for the interrupted stage.
    raise KeyboardInterrupt


def _storage_line(err: BaseException) -> str | None:
    """One line for a full disk or storage that kept failing; None for any other error."""
    from engine.storage import StorageError

    full = disk_full(err)
    if full is not None:
        where = getattr(full, "filename", None)
        return (f"no space left on device{f' writing {where}' if where else ''} ({full}); "
                "free some space and run the same command again to resume")
    failed = find_cause(err, lambda e: isinstance(e, StorageError))
    if failed is not None:
        return f"{failed}; run the same command again once the storage answers"
    return None


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
    redact_log_handlers()
    os.umask(0o022)  # outputs are never world-writable
    signal.signal(signal.SIGTERM, _terminate)
    try:
        main()
    except FairsynthError as err:
        print(f"error: {redact(str(err))}", file=sys.stderr)
        sys.exit(FairsynthError.exit_code)
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        line = _storage_line(err)
        if line is not None:  # outside a stage (engine.pipeline names the stage inside one)
            print(f"error: {redact(line)}", file=sys.stderr)
            sys.exit(FairsynthError.exit_code)
        if console.log_path() is not None:
            print(f"Ray's output of this job: {console.log_path()}", file=sys.stderr)
        raise
    finally:
        console.finish()
