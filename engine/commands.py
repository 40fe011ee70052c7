"""The ``fairsynth`` command: one entry point for what a user runs.

    fairsynth run    [--config PRESET] [--set KEY=VALUE ...] [--run-dir DIR] [--force]
    fairsynth plan   [--config PRESET] [--set KEY=VALUE ...] [--gpus N] [--gpu-type TYPE] ...
    fairsynth stats  [options of jobs/data_stats.py]
    fairsynth report RUN
    fairsynth bench  [--only NAME ...] [--quick]

``run``, ``plan`` and ``stats`` run the job scripts themselves (jobs/full.py, jobs/plan.py,
jobs/data_stats.py), and ``bench`` runs benchmarks/run_all.py, so a subcommand and the script
that ``ray job submit ... -- python jobs/full.py`` runs can never disagree. ``report`` rebuilds
RUN/results.json, results.md, the plots and RUN/report.html from a run's metrics, without
running anything.
"""

from __future__ import annotations

import argparse
import sys

import yaml
from pydantic import ValidationError

from engine import storage
from engine.cli import config_help, run_job
from engine.config import REPO_ROOT, Config
from engine.errors import FairsynthError
from engine.html_report import REPORT_NAME
from engine.report import aggregate_seeds, collect_rows, seed_tag, severity_tag, write_results
from engine.runs import read_json

SCRIPTS = {
    "run": ("jobs/full.py", "the whole job: data, cluster, finetune, generate, filter, train, report"),
    "plan": ("jobs/plan.py", "FLOPs, GPU-hours, wall time and disk of every stage, before paying for them"),
    "stats": ("jobs/data_stats.py", "a dataset's groups and counts per split, before spending GPU hours"),
    "bench": ("benchmarks/run_all.py", "every benchmark, printing its figures"),
}
REPORT_HELP = "rebuild RUN/report.html, results.json, results.md and plots from a finished (or partly finished) run"


def top_parser() -> argparse.ArgumentParser:
    commands = "\n".join(
        f"  {name:<8} {text} ({script})" for name, (script, text) in SCRIPTS.items()
    ) + f"\n  {'report':<8} {REPORT_HELP}"
    parser = argparse.ArgumentParser(
        prog="fairsynth",
        description="Fair classifiers from group-balanced synthetic images. `fairsynth COMMAND --help` "
        "shows a command's own options.",
        epilog=f"commands:\n{commands}\n\n{config_help()}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=[*SCRIPTS, "report"], metavar="COMMAND", help="run, plan, stats, report or bench")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the command's own options")
    return parser


def run_script(command: str, args: list[str]) -> None:
    """Run a job script as `python SCRIPT ARGS` would, its --help naming the subcommand."""
    script = REPO_ROOT / SCRIPTS[command][0]
    if not script.exists():
        raise FairsynthError(
            f"{script} not found: the fairsynth command runs the scripts of a checkout; install it with `pip install -e .`"
        )
    # `python jobs/x.py` puts the script's folder first on the path; the jobs import _path from it.
    sys.path.insert(0, str(script.parent))
    # runpy would set argv[0] to the script's path, and argparse names the program after it.
    sys.argv = [f"fairsynth {command}", *args]
    code = compile(script.read_text(), str(script), "exec")
    exec(code, {"__name__": "__main__", "__file__": str(script), "__builtins__": __builtins__})


def run_config(run_dir: str) -> Config:
    """The resolved config a job wrote into its run directory."""
    path = storage.as_path(run_dir) / "config.yaml"
    if not storage.exists(path):
        raise FairsynthError(f"{run_dir} is not a fairsynth run: it has no config.yaml (give the --run-dir a job wrote)")
    try:
        return Config.model_validate(yaml.safe_load(path.read_text()) or {})
    except (yaml.YAMLError, ValidationError) as exc:
        first = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else "not valid YAML"
        raise FairsynthError(f"{path} is not a config this version reads ({first})") from None


def finished_rows(root, cfg: Config) -> list[dict]:
    """Result rows of one run directory (a job's, or one seed's inside it) for the methods
    whose train stage finished; a run that stopped early has fewer."""
    timings_path = root / "stage_seconds.json"
    timings = read_json(timings_path) if storage.exists(timings_path) else {}
    rows = []
    for severity in cfg.severities:
        finished = [
            m for m in cfg.methods if storage.exists(root / severity_tag(severity) / "train" / m / "metrics.json")
        ]
        rows += collect_rows(root, [severity], finished, timings)
    return rows


def rebuild_report(run_dir: str) -> str:
    """Rewrite RUN/results.{json,md}, plots and report.html from the metrics the run's train
    stages wrote, as the job writes them at its end (with ``seeds``: each seed's results, then
    their mean ± std); returns the results table. The tracker is not told again."""
    cfg = run_config(run_dir)
    root = storage.as_path(run_dir)
    if cfg.seeds is None:
        rows = finished_rows(root, cfg)
    else:
        per_seed = {seed: finished_rows(root / seed_tag(seed), cfg) for seed in cfg.seeds}
        per_seed = {seed: rows for seed, rows in per_seed.items() if rows}
        for seed, rows in per_seed.items():
            write_results(root / seed_tag(seed), rows, cfg.data.name)
        rows = aggregate_seeds(per_seed) if per_seed else []
    if not rows:
        raise FairsynthError(
            f"{run_dir} holds no trained method yet (no train/<method>/metrics.json in its severity folders); "
            f"finish it with `fairsynth run --run-dir {run_dir}`"
        )
    from engine.pipeline import finish_report
    from engine.tracking import Tracker

    return finish_report(cfg, root, rows, Tracker())  # the base Tracker logs nothing


def report_main(args: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="fairsynth report", description=REPORT_HELP)
    parser.add_argument("run", metavar="RUN", nargs="?", help="the run directory (a job's --run-dir)")
    parser.add_argument("--run-dir", default=None, help="the same, as the other commands take it")
    parsed = parser.parse_args(args)
    run_dir = parsed.run or parsed.run_dir
    if not run_dir:
        raise FairsynthError("fairsynth report needs the run directory: fairsynth report RUN")
    table = rebuild_report(run_dir)
    print(table)
    print(f"report: {storage.as_path(run_dir) / REPORT_NAME} (results.md, results.json, plots/ beside it)")


def main(argv: list[str] | None = None) -> None:
    parsed = top_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if parsed.command == "report":
        run_job(lambda: report_main(parsed.args))
    else:
        run_script(parsed.command, parsed.args)


if __name__ == "__main__":
    main()
