"""Search concurrency: ``finetune.num_samples`` trials per unit for several units, every unit's
trials in one experiment (the engine's search) vs units searched one after another (one
experiment per unit, as the engine did before). Prints concurrent / sequential wall time;
target 0.5 with 2 units x 2 samples on 4 slots, where searching one unit at a time leaves
half the slots idle.

Both sides go through ``engine.stages.finetune.tune.run_unit_trials`` (the sequential side calls it
once per unit, which is exactly a one-unit search), in one Ray session, in fresh experiment
folders, timed in alternating rounds. Each trial gets one CPU (one torch thread) or
``--gpu`` of a GPU; Ray is given ``--slots`` CPUs, which on a machine with fewer cores than
slots means the concurrent side's trials share cores. Also reports, from the trials' own
wall-clock windows, the peak number of trials running at once on each side and the share of
slot-seconds spent in trials (slot_busy; actor start and Tune's bookkeeping are outside it).
Prints a markdown row, then, as the last line, one JSON object.

    python benchmarks/search_concurrency.py                    # 2 units x 2 samples, 4 slots, CPU
    python benchmarks/search_concurrency.py --steps 50 --rounds 2
    python benchmarks/search_concurrency.py --units 4 --samples 3 --slots 12 --gpu 0.25
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")

TARGET = 0.5


def trial_spans(experiments: set[str]) -> list[tuple[float, float]]:
    """Each trial's [start, last report] wall-clock window, from its own metrics."""
    from ray.tune import ExperimentAnalysis

    return [(t.last_result["started_at"], t.last_result["reported_at"])
            for path in experiments for t in ExperimentAnalysis(path).trials if t.last_result.get("started_at")]


def peak_running(spans: list[tuple[float, float]]) -> int:
    """Most windows that hold one instant."""
    return max((sum(s <= start < e for s, e in spans) for start, _ in spans), default=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=2, help="units searched")
    parser.add_argument("--samples", type=int, default=2, help="finetune.num_samples (trials per unit)")
    parser.add_argument("--slots", type=int, default=None, help="finetune.max_concurrent_trials (default: units x samples)")
    parser.add_argument("--steps", type=int, default=None, help="finetune.steps, the middle step choice (default: the config's)")
    parser.add_argument("--rounds", type=int, default=1, help="timed rounds, alternating which side goes first")
    parser.add_argument("--gpu", type=float, default=0.0, help="GPU share per trial (0: CPU trials)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    slots = args.slots or args.units * args.samples
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    import ray

    from engine.config import load_config
    from engine.generation_methods import get_method
    from engine.raylib import start_local_ray
    from engine.runs import RunDir
    from engine.stages.data.stage import run_data_stage
    from engine.stages.finetune.trainer import UnitJob, unit_seed
    from engine.stages.finetune.tune import run_unit_trials

    resources = f"{{CPU: 1, GPU: {args.gpu}}}" if args.gpu > 0 else "{CPU: 1}"
    steps = args.steps or load_config().finetune.steps
    cfg = load_config(None, [
        f"finetune.steps={steps}", f"finetune.num_samples={args.samples}", f"finetune.max_concurrent_trials={slots}",
        f"finetune.trial_resources={resources}", "model.device=" + ("cuda" if args.gpu > 0 else "cpu"),
        *args.overrides,
    ])
    workdir = Path(tempfile.mkdtemp(prefix="fairsynth-search-"))
    run = RunDir(workdir / "run")
    run.prepare(cfg)
    # Trained LoRA units of the real stage; with more units asked for, units repeat under new ids.
    units = [u for u in get_method("lora").plan_units(cfg, run_data_stage(cfg, run)) if u.trains]
    jobs = []
    for i in range(args.units):
        unit = units[i % len(units)]
        name = unit.unit if i < len(units) else f"{unit.unit}r{i}"
        jobs.append(UnitJob(method="lora", unit=name, sources=unit.sources, train_prompt=unit.train_prompt,
                            class_prompt=unit.class_prompt, class_images=None, model=cfg.model,
                            finetune=cfg.finetune, seed=unit_seed(cfg.finetune.seed, name)))
    start_local_ray(num_cpus=slots, num_gpus=1 if args.gpu > 0 else 0, include_dashboard=False)

    def timed(tag: str, groups: list[list[UnitJob]]) -> tuple[float, int, float]:
        """Wall seconds, peak trials at once, and the share of slot-seconds trials were training."""
        start = time.perf_counter()
        chosen = {}
        for group in groups:
            chosen.update(run_unit_trials(group, cfg.finetune, str(workdir / f"tune-{tag}"), prefix=tag))
        wall = time.perf_counter() - start
        spans = trial_spans({r.experiment for r in chosen.values()})
        return wall, peak_running(spans), sum(e - s for s, e in spans) / (slots * wall)

    # Warm-up: Ray's worker pool, imports and the page cache, so neither timed side pays them alone.
    warm = cfg.finetune.model_copy(update={"steps": 2, "num_samples": 1})
    run_unit_trials(jobs[:1], warm, str(workdir / "tune-warmup"), prefix="warmup")
    sides = {"sequential": [[job] for job in jobs], "concurrent": [jobs]}
    walls: dict[str, list[float]] = {name: [] for name in sides}
    busy: dict[str, list[float]] = {name: [] for name in sides}
    peaks: dict[str, int] = {}
    for r in range(args.rounds):
        for name in (sides if r % 2 == 0 else reversed(list(sides))):
            wall, peaks[name], share = timed(f"{name}{r}", sides[name])
            walls[name].append(wall)
            busy[name].append(share)
            print(f"round {r} {name}: {wall:.1f} s, peak {peaks[name]} trials, slots busy {share:.2f}",
                  file=sys.stderr, flush=True)
    ray.shutdown()
    sequential, concurrent = sum(walls["sequential"]), sum(walls["concurrent"])
    ratio = concurrent / sequential

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    device = f"cuda ({args.gpu} GPU per trial)" if args.gpu > 0 else f"cpu ({cores} cores, {slots} Ray CPUs)"
    shape = f"{args.units} units x {args.samples} samples, {slots} slots"
    print("| benchmark | setup | steps | sequential s | concurrent s | ratio | peak trials seq / conc | target | device |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| search_concurrency | {shape} | {steps} | {sequential:.1f} | {concurrent:.1f} | {ratio:.2f} "
          f"| {peaks['sequential']} / {peaks['concurrent']} | {TARGET} | {device} |")
    print(json.dumps({
        "benchmark": "search_concurrency", "metric": "concurrent_over_sequential", "value": round(ratio, 4),
        "target": TARGET, "device": device, "units": args.units, "samples": args.samples, "slots": slots,
        "steps": steps, "rounds": args.rounds,
        "sequential_s": [round(w, 2) for w in walls["sequential"]],
        "concurrent_s": [round(w, 2) for w in walls["concurrent"]],
        "peak_trials_sequential": peaks["sequential"], "peak_trials_concurrent": peaks["concurrent"],
        "slot_busy_sequential": [round(b, 3) for b in busy["sequential"]],
        "slot_busy_concurrent": [round(b, 3) for b in busy["concurrent"]],
        "load_average_before": load_before, "host": platform.node(),
    }))


if __name__ == "__main__":
    main()
