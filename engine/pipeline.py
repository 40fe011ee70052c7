"""The whole job: data -> cluster -> finetune -> generate -> filter -> train -> report, for
every configured method and severity, in one Ray session.

Each severity gets its own run directory inside the job's (RUN/severity-<p>/), laid out as
DESIGN.md describes; stages skip what is complete for the same config slice, so a re-run
after a failure resumes and adding a method reuses what exists. Every generative method is
fine-tuned, sampled and filtered first; then one Ray Train fit trains every method's
classifier, so its workers start once a severity (engine.stages.train.stage).

With ``seeds`` set, the whole job runs once per seed in RUN/seed_<s>/ (each a complete run,
with its own results), and RUN/results.{json,md} show every method's mean ± std over the
seeds beside each seed's figures. A seed sets ``seed``, which the data (the built-in world,
splits, severity subsampling) and every stage follow, so seeds share nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from engine import storage
from engine.config import Config
from engine.diskspace import StageSpace
from engine.errors import FairsynthError
from engine.generation_methods import is_generation_method
from engine.html_report import write_html_report
from engine.report import aggregate_seeds, collect_rows, seed_tag, severity_tag, write_results
from engine.runs import RunDir, atomic_write_json
from engine.tracking import Tracker, get_tracker

log = logging.getLogger(__name__)


def severity_config(cfg: Config, severity) -> Config:
    sub = cfg.model_copy(deep=True)
    sub.data.severity = severity
    sub.run_dir = str(storage.as_path(cfg.run_dir) / severity_tag(severity))
    return sub


def seed_config(cfg: Config, seed: int) -> Config:
    """One seed's whole job: its own run directory and ``seed`` (which every stage reads)."""
    sub = cfg.model_copy(deep=True)
    sub.seeds = None
    sub.seed = seed
    sub.run_dir = str(storage.as_path(cfg.run_dir) / seed_tag(seed))
    return sub


def run_severity(cfg: Config, force: bool, on_stage: Callable[[str], None], space: StageSpace | None = None) -> dict:
    """Every stage for one severity; returns seconds spent per method and stage. Before each
    stage the free space is checked against the plan's (``space``); a full disk or storage
    that stays down during a stage stops the job in one line (engine/diskspace.py)."""
    from engine.stages.cluster.stage import run_cluster_stage
    from engine.stages.data.stage import run_data_stage
    from engine.stages.filter import run_filter_stage
    from engine.stages.finetune import run_finetune_stage
    from engine.stages.generate import run_generate_stage
    from engine.stages.generate.oracle import ORACLE, run_oracle_stage
    from engine.stages.train import run_train_stages, train_complete

    space = space or StageSpace(cfg)
    run = RunDir(cfg.run_dir)
    run.prepare(cfg, force=force)
    shared: dict[str, float] = {}

    def guarded(stage: str, method: str, fn, *args):
        space.check(run.root, cfg.data.severity, stage, method)
        try:
            return fn(*args)
        except (FairsynthError, KeyboardInterrupt):
            raise
        except Exception as exc:
            failure = space.stage_failure(exc, run.root, cfg.data.severity, stage, method)
            if failure is None:
                raise
            raise failure from exc

    def timed(name: str, fn, *args, stage: str = "", method: str = "") -> float:
        on_stage(f"{severity_tag(cfg.data.severity)}: {name}")
        start = time.perf_counter()
        guarded(stage or name, method, fn, *args)
        return time.perf_counter() - start

    shared["data"] = timed("data", run_data_stage, cfg, run)
    generative = [m for m in cfg.methods if is_generation_method(m)]
    if generative:
        shared["cluster"] = timed("cluster", run_cluster_stage, cfg, run)
    seconds: dict[str, dict[str, float]] = {method: dict(shared) for method in cfg.methods}
    for method in generative:
        for stage, fn in (("finetune", run_finetune_stage), ("generate", run_generate_stage), ("filter", run_filter_stage)):
            seconds[method][stage] = timed(f"{stage} {method}", fn, cfg, run, method, stage=stage, method=method)
    if ORACLE in cfg.methods:
        seconds[ORACLE]["generate"] = timed("oracle", run_oracle_stage, cfg, run, stage="generate", method=ORACLE)
    # Every method trains in one fit, which starts its workers once (engine.stages.train.stage).
    pending = [m for m in cfg.methods if not train_complete(cfg, run, m)]
    on_stage(f"{severity_tag(cfg.data.severity)}: train {', '.join(pending) or 'complete'}")
    for method in pending:
        space.check(run.root, cfg.data.severity, "train", method)
    metrics = guarded("train", ", ".join(pending), run_train_stages, cfg, run, cfg.methods)
    for method in cfg.methods:
        seconds[method]["train"] = metrics[method]["stage_seconds"] if method in pending else 0.0
    return seconds


def run_seed(cfg: Config, force: bool, on_stage: Callable[[str], None], space: StageSpace | None = None) -> list[dict]:
    """Every severity and method of one run directory: writes its stage_seconds.json and
    grids, and returns its result rows."""
    root = storage.as_path(cfg.run_dir)
    RunDir(root).prepare(cfg, force=force)
    timings: dict[str, dict] = {}
    for severity in cfg.severities:
        sub = severity_config(cfg, severity)
        timings[str(severity)] = run_severity(sub, force, on_stage, space)
        grids = storage.as_path(sub.run_dir) / "grids"
        for png in sorted(grids.glob("*.png")) if grids.exists() else []:
            storage.copy_file(png, root / "grids" / f"{severity_tag(severity)}_{png.name}")
    atomic_write_json(root / "stage_seconds.json", timings)
    return collect_rows(root, cfg.severities, cfg.methods, timings)


def run_full(cfg: Config, force: bool = False, on_stage: Callable[[str], None] = log.info) -> str:
    """Run every severity and method (once per seed of ``seeds``), then write
    RUN/results.{json,md}, plots and grids; returns the results table."""
    root = storage.as_path(cfg.run_dir)
    tracker = get_tracker(cfg)
    tracker.check()  # a tracker that cannot log fails now, not after hours of compute
    RunDir(root).prepare(cfg, force=force)
    space = StageSpace(cfg)  # one plan for the job: every seed needs what the first does
    if cfg.seeds is None:
        rows = run_seed(cfg, force, on_stage, space)
        on_stage("report")
        return finish_report(cfg, root, rows, tracker)
    per_seed: dict[int, list[dict]] = {}
    for seed in cfg.seeds:
        sub = seed_config(cfg, seed)
        rows = run_seed(sub, force, lambda stage, seed=seed: on_stage(f"{seed_tag(seed)}: {stage}"), space)
        write_results(storage.as_path(sub.run_dir), rows, cfg.data.name)
        per_seed[seed] = rows
    on_stage("report")
    return finish_report(cfg, root, aggregate_seeds(per_seed), tracker)


def finish_report(cfg: Config, root, rows: list[dict], tracker: Tracker) -> str:
    """results.{json,md}, plots, RUN/report.html, and the tracker's copy; returns the table."""
    table = write_results(root, rows, cfg.data.name)
    write_html_report(root)
    tracker.log_run(cfg, root, rows)
    return table
