"""The whole job: data -> cluster -> finetune -> generate -> filter -> train -> report, for
every configured method and severity, in one Ray session.

Each severity gets its own run directory inside the job's (RUN/severity-<p>/), laid out as
DESIGN.md describes; stages skip what is complete for the same config slice, so a re-run
after a failure resumes and adding a method reuses what exists.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from engine import storage
from engine.config import GENERATIVE_METHODS, Config
from engine.report import collect_rows, severity_tag, write_results
from engine.runs import RunDir, atomic_write_json

log = logging.getLogger(__name__)


def severity_config(cfg: Config, severity) -> Config:
    sub = cfg.model_copy(deep=True)
    sub.data.severity = severity
    sub.run_dir = str(storage.as_path(cfg.run_dir) / severity_tag(severity))
    return sub


def run_severity(cfg: Config, force: bool, on_stage: Callable[[str], None]) -> dict:
    """Every stage for one severity; returns seconds spent per method and stage."""
    from engine.cluster import run_cluster_stage
    from engine.data.stage import run_data_stage
    from engine.finetune import run_finetune_stage
    from engine.generate import run_filter_stage, run_generate_stage
    from engine.train import run_train_stage

    run = RunDir(cfg.run_dir)
    run.prepare(cfg, force=force)
    shared: dict[str, float] = {}

    def timed(name: str, fn, *args) -> float:
        on_stage(f"{severity_tag(cfg.data.severity)}: {name}")
        start = time.perf_counter()
        fn(*args)
        return time.perf_counter() - start

    shared["data"] = timed("data", run_data_stage, cfg, run)
    generative = [m for m in cfg.methods if m in GENERATIVE_METHODS]
    if generative:
        shared["cluster"] = timed("cluster", run_cluster_stage, cfg, run)
    seconds: dict[str, dict[str, float]] = {}
    for method in cfg.methods:
        stages = dict(shared)
        if method in GENERATIVE_METHODS:
            stages["finetune"] = timed(f"finetune {method}", run_finetune_stage, cfg, run, method)
            stages["generate"] = timed(f"generate {method}", run_generate_stage, cfg, run, method)
            stages["filter"] = timed(f"filter {method}", run_filter_stage, cfg, run, method)
        stages["train"] = timed(f"train {method}", run_train_stage, cfg, run, method)
        seconds[method] = stages
    return seconds


def run_full(cfg: Config, force: bool = False, on_stage: Callable[[str], None] = log.info) -> str:
    """Run every severity and method, then write RUN/results.{json,md}, plots and grids."""
    root = storage.as_path(cfg.run_dir)
    RunDir(root).prepare(cfg, force=force)
    timings: dict[str, dict] = {}
    for severity in cfg.severities:
        sub = severity_config(cfg, severity)
        timings[str(severity)] = run_severity(sub, force, on_stage)
        grids = storage.as_path(sub.run_dir) / "grids"
        for png in sorted(grids.glob("*.png")) if grids.exists() else []:
            storage.copy_file(png, root / "grids" / f"{severity_tag(severity)}_{png.name}")
    atomic_write_json(root / "stage_seconds.json", timings)
    on_stage("report")
    rows = collect_rows(root, cfg.severities, cfg.methods, timings)
    return write_results(root, rows, cfg.data.name)
