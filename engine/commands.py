"""The ``fairsynth`` command: one entry point for what a user runs.

    fairsynth run    [--config PRESET] [--set KEY=VALUE ...] [--run-dir DIR] [--force] [--seeds S,S]
    fairsynth plan   [--config PRESET] [--set KEY=VALUE ...] [--gpus N] [--gpu-type TYPE] ...
    fairsynth stats  [--config PRESET] [--data.name NAME --data.root DIR ...] [--json]
    fairsynth report RUN
    fairsynth bench  [--only NAME ...] [--quick]

``run``, ``plan`` and ``stats`` are the functions below; jobs/full.py, jobs/plan.py and
jobs/data_stats.py call the same ones, so a subcommand and what ``ray job submit ... --
python jobs/full.py`` runs can never disagree, and an installed wheel needs no checkout.
``report`` rebuilds RUN/results.json, results.md, the plots and RUN/report.html from a run's
metrics, without running anything. ``bench`` runs benchmarks/run_all.py, which only a checkout
has.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable

import yaml
from pydantic import ValidationError

from engine import storage
from engine.cli import config_from_args, config_help, dotted_overrides, job_parser, run_job
from engine.config import DATASETS, REPO_ROOT, Config
from engine.errors import FairsynthError
from engine.html_report import REPORT_NAME
from engine.report import aggregate_seeds, collect_rows, seed_tag, severity_tag, write_results
from engine.runs import read_json

RUN_HELP = "the whole job: data, cluster, finetune, generate, filter, train, report"
PLAN_HELP = "FLOPs, GPU-hours, wall time and disk of every stage, before paying for them"
STATS_HELP = "a dataset's groups and counts per split, before spending GPU hours"
REPORT_HELP = "rebuild RUN/report.html, results.json, results.md and plots from a finished (or partly finished) run"
BENCH_HELP = "every benchmark, printing its figures (a checkout's benchmarks/run_all.py)"
BENCH_SCRIPT = REPO_ROOT / "benchmarks" / "run_all.py"


def _job_name(prog: str) -> str:
    """The run log's name for a command: "fairsynth run" -> "run", "full.py" -> "full"."""
    return prog.removeprefix("fairsynth ").removesuffix(".py")


def run_command(argv: list[str], prog: str = "fairsynth run") -> None:
    """The whole job: data, cluster, finetune, generate, filter, train and report, for every
    method and severity in the config; with no arguments, the embedded tiny default. --seeds
    runs it once per seed (RUN/seed_<s>/) and reports mean ± std beside each seed's figures."""
    parser = job_parser(f"{RUN_HELP}; with no arguments, the embedded tiny default.", prog=prog)
    parser.add_argument("--seeds", default=None, metavar="S,S,...",
                        help="comma-separated seeds, e.g. 0,1,2: one whole run per seed, results as mean ± std")
    args = parser.parse_args(argv)
    if args.seeds is not None:
        args.overrides.append(f"seeds=[{args.seeds}]")
    cfg = config_from_args(args, job=_job_name(prog))

    from engine import console
    from engine.pipeline import run_full
    from engine.raylib import init_ray
    from engine.report import console_summary
    from engine.resources import check_cluster_supplies
    from engine.runlock import hold_until_exit

    start = time.perf_counter()
    hold_until_exit(cfg.run_dir, force=args.force)  # one job per run directory
    dashboard = init_ray(cfg.ray)
    if dashboard:
        print(f"ray dashboard: {dashboard}", flush=True)
    check_cluster_supplies(cfg)  # before any stage runs: a GPU preset on a machine without one

    def announce(stage: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {stage}", flush=True)

    table = run_full(cfg, force=args.force, on_stage=announce)
    rows = read_json(storage.as_path(cfg.run_dir) / "results.json")
    print()
    print(console_summary(rows, table, cfg.run_dir))
    if console.log_path() is not None:
        print(f"log: {console.log_path()} (Ray's own output; --verbose shows it here)")
    print(f"done in {time.perf_counter() - start:.0f} s")


def plan_command(argv: list[str], prog: str = "fairsynth plan") -> None:
    """Plan a job before paying for it: FLOPs, GPU-hours, wall time and disk of every stage on
    N GPUs (jobs/plan.py's docstring says how); --compare RUN checks a plan against a finished
    run, --measure measures each stage's MFU on this machine."""
    from engine.planning.hardware import DEVICE_TYPES

    parser = job_parser(PLAN_HELP, run_dir=False, prog=prog)
    parser.add_argument("--gpus", type=int, default=1, help="devices in the cluster (default 1)")
    parser.add_argument(
        "--gpu-type", default="cpu", type=str.lower,
        help=f"one of {', '.join(DEVICE_TYPES)} (default cpu: this machine)",
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak of a device not in the table")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--compare", metavar="RUN", default=None, help="check the plan against a finished run")
    parser.add_argument("--measure", action="store_true", help="measure each stage's MFU on this machine's device")
    parser.add_argument("--quick", action="store_true", help="with --measure: shorter measurements")
    parser.add_argument("--save", action="store_true", help="with --measure: write plan.results_dir/plan_mfu.json")
    args = parser.parse_args(argv)
    if args.gpu_type not in DEVICE_TYPES and args.peak_tflops is None:
        raise FairsynthError(
            f"unknown --gpu-type {args.gpu_type!r}; valid: {', '.join(DEVICE_TYPES)} (or give --peak-tflops for another card)"
        )
    if args.gpus < 1:
        raise FairsynthError(f"--gpus {args.gpus}: the cluster needs at least one device")

    from engine.planning.plan import compare_with_run, format_comparison, format_plan, plan_job
    from engine.runs import atomic_write_json

    if args.measure:
        from engine.planning.measure import RESULT_NAME, measure_stage_mfu

        cfg = config_from_args(args)
        result = measure_stage_mfu(cfg, quick=args.quick)
        if args.save:
            path = REPO_ROOT / cfg.plan.results_dir / f"{RESULT_NAME}.json"
            atomic_write_json(path, result)
            print(f"saved {path}", file=sys.stderr)
        print(json.dumps(result))
        return

    if args.compare:
        # The run's own config says what ran; --config / --set say how to plan (the plan section).
        settings = config_from_args(args).plan
        plan, rows = compare_with_run(args.compare, args.gpu_type, args.gpus, args.peak_tflops, settings)
        if args.json:
            print(json.dumps({"plan": plan.to_dict(), "comparison": rows}))
        else:
            print(format_plan(plan, f"the run in {args.compare}"))
            print()
            print(format_comparison(rows))
        return

    cfg = config_from_args(args)
    plan = plan_job(cfg, args.gpu_type, args.gpus, args.peak_tflops)
    if args.json:
        print(json.dumps({"config": args.config or "default", **plan.to_dict()}))
    else:
        print(format_plan(plan, args.config or "the default config"))


def stats_command(argv: list[str], prog: str = "fairsynth stats") -> None:
    """Describe a dataset before spending GPU hours: groups, aligned attributes, counts per
    split, and what is missing (a group with no images in a split, image files that do not
    exist). Any config key works as a flag (--data.root DIR is --set data.root=DIR)."""
    parser = job_parser(STATS_HELP, run_dir=False, prog=prog)
    parser.add_argument("--dataset", choices=DATASETS, default=None, help="data.name (default: the config's)")
    parser.add_argument("--root", default=None, help="data.root: the dataset folder (not needed for builtin)")
    parser.add_argument("--severity", default=None, help="data.severity: 'original' or p with 0.5 < p < 1")
    parser.add_argument("--target", default=None, help="data.target: class attribute name (CelebA)")
    parser.add_argument("--attribute", default=None, help="data.attribute: spurious attribute name (CelebA)")
    parser.add_argument("--check-images", action="store_true", help="decode every image once")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args, rest = parser.parse_known_args(argv)
    args.overrides += dotted_overrides(rest, parser)
    flags = {"name": args.dataset, "root": args.root, "severity": args.severity,
             "target": args.target, "attribute": args.attribute}
    if args.config is None and args.severity is None:
        flags["severity"] = "original"  # the dataset as distributed, unless asked otherwise
    args.overrides = [f"data.{k}={v}" for k, v in flags.items() if v is not None] + args.overrides
    cfg = config_from_args(args)

    from engine.stages.data.prepare import (
        describe,
        describe_text,
        findings,
        load_dataset,
        missing_files,
    )

    logging.getLogger("engine.stages.data.prepare").setLevel(logging.ERROR)  # its warnings are the notes printed
    dataset = load_dataset(cfg.data, check_images=args.check_images)
    missing = missing_files(dataset)
    if missing:
        raise FairsynthError(f"{cfg.data.name} at {cfg.data.root}: {missing}")
    summary = describe(dataset)
    print(json.dumps(summary, indent=2) if args.json else describe_text(summary, findings(dataset)))


def bench_command(argv: list[str]) -> None:
    """benchmarks/run_all.py as its own process; the benchmarks ship with a checkout only."""
    if not BENCH_SCRIPT.exists():
        raise FairsynthError(
            f"{BENCH_SCRIPT} not found: the benchmarks ship with a checkout, not the package; "
            "run `fairsynth bench` from a checkout installed with `pip install -e .`"
        )
    sys.exit(subprocess.run([sys.executable, str(BENCH_SCRIPT), *argv]).returncode)


def run_config(run_dir: str) -> Config:
    """The resolved config a job wrote into its run directory."""
    path = storage.as_path(run_dir) / "config.yaml"
    if not storage.exists(path):
        raise FairsynthError(f"{run_dir} is not a fairsynth run: it has no config.yaml (give the --run-dir a job wrote)")
    try:
        return Config.model_validate(yaml.safe_load(path.read_text()) or {})
    except (yaml.YAMLError, ValidationError) as exc:
        first = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else "not valid YAML"
        raise FairsynthError(f"{path} is not a config this version of fairsynth reads ({first}); "
                             "an older version's run: rerun its job with this version") from None


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


COMMANDS: dict[str, tuple[Callable[[list[str]], None], str]] = {
    "run": (run_command, RUN_HELP),
    "plan": (plan_command, PLAN_HELP),
    "stats": (stats_command, STATS_HELP),
    "report": (report_main, REPORT_HELP),
    "bench": (bench_command, BENCH_HELP),
}


def top_parser() -> argparse.ArgumentParser:
    commands = "\n".join(f"  {name:<8} {text}" for name, (_, text) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="fairsynth",
        description="Fair classifiers from group-balanced synthetic images. `fairsynth COMMAND --help` "
        "shows a command's own options.",
        epilog=f"commands:\n{commands}\n\n{config_help()}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help="run, plan, stats, report or bench")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the command's own options")
    return parser


def main(argv: list[str] | None = None) -> None:
    parsed = top_parser().parse_args(sys.argv[1:] if argv is None else argv)
    command, _ = COMMANDS[parsed.command]
    if command is bench_command:
        command(parsed.args)  # its own process handles its errors
    else:
        run_job(lambda: command(parsed.args))


if __name__ == "__main__":
    main()
