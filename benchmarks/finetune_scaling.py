"""Fine-tuning scaling: N units trained by the fine-tune stage's Ray Tune runner with N trial
slots at once vs one slot (one after another). Scaling efficiency = sequential / (N x parallel);
1.0 is perfect. Target on 2 cores with 2 trials: 0.85.

Both runs go through ``engine.stages.finetune.tune.run_unit_trials`` (the stage's own path: Tune
trials, checkpoints, artifacts), in one Ray session, each in a fresh experiment folder. On CPU
each trial gets one CPU and so one torch thread. Prints a markdown row, then, as the last
line, one JSON object.

    python benchmarks/finetune_scaling.py                 # 2 LoRA trials, CPU, finetune.steps each
    python benchmarks/finetune_scaling.py --trials 4 --method dreambooth --gpu 0.25
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


def main() -> None:
    from engine.generation_methods import GENERATION_METHODS

    trained = [name for name, cls in GENERATION_METHODS.items() if cls.trains]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=2, help="units trained, and trial slots in the parallel run")
    parser.add_argument("--method", default="lora", choices=trained)
    parser.add_argument("--steps", type=int, default=None, help="training steps per unit (default: finetune.steps)")
    parser.add_argument("--gpu", type=float, default=0.0, help="GPU share per trial (0: CPU trials)")
    parser.add_argument("--base", default="tiny", help="model.base")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    import ray

    from engine.config import load_config
    from engine.generation_methods import get_method
    from engine.raylib import start_local_ray
    from engine.runs import RunDir
    from engine.stages.data.stage import run_data_stage
    from engine.stages.finetune.stage import ensure_class_images
    from engine.stages.finetune.trainer import UnitJob, unit_seed
    from engine.stages.finetune.tune import run_unit_trials
    from engine.stages.finetune.units import plan_trained_units

    resources = f"{{CPU: 1, GPU: {args.gpu}}}" if args.gpu > 0 else "{CPU: 1}"
    if args.steps is None:
        args.steps = load_config().finetune.steps  # what the stage trains by default
    cfg = load_config(None, [
        f"model.base={args.base}", f"finetune.steps={args.steps}", f"finetune.trial_resources={resources}",
        "finetune.checkpoint_every=1000000", "model.device=" + ("cuda" if args.gpu > 0 else "cpu"),
        *args.overrides,
    ])
    strategy = get_method(args.method)
    workdir = Path(tempfile.mkdtemp(prefix="fairsynth-ftscale-"))
    run = RunDir(workdir / "run")
    run.prepare(cfg)
    dataset = run_data_stage(cfg, run)
    # Trained units of the real stage; with more trials than units, units repeat under new ids.
    units = [u for u in plan_trained_units(cfg, dataset, strategy.uses_identifier) if u.trains]
    start_local_ray(num_cpus=args.trials, num_gpus=1 if args.gpu > 0 else 0, include_dashboard=False)
    class_images = ensure_class_images(cfg, run, sorted({u.class_prompt for u in units})) if strategy.uses_prior(cfg.finetune) else {}
    jobs = []
    for i in range(args.trials):
        unit = units[i % len(units)]
        name = unit.unit if i < len(units) else f"{unit.unit}r{i}"
        jobs.append(UnitJob(
            method=args.method, unit=name, sources=unit.sources, train_prompt=unit.train_prompt,
            class_prompt=unit.class_prompt, class_images=class_images.get(unit.class_prompt),
            model=cfg.model, finetune=cfg.finetune, seed=unit_seed(0, unit.unit),
        ))

    def timed(slots: int, tag: str) -> tuple[float, list[float]]:
        ft = cfg.finetune.model_copy(update={"max_concurrent_trials": slots})
        start = time.perf_counter()
        results = run_unit_trials(jobs, ft, str(workdir / f"tune-{tag}"), prefix=tag)
        wall = time.perf_counter() - start
        return wall, [r.finished_at - r.started_at for r in results.values()]

    # Warm-up: Ray's worker pool, imports and the page cache, so neither timed run pays them alone.
    warm = cfg.finetune.model_copy(update={"steps": 2})
    run_unit_trials(jobs[:1], warm, str(workdir / "tune-warmup"), prefix="warmup")
    sequential, seq_trials = timed(1, "sequential")
    parallel, par_trials = timed(args.trials, "parallel")
    ray.shutdown()
    efficiency = sequential / (args.trials * parallel)

    device = f"cuda ({args.gpu} GPU per trial)" if args.gpu > 0 else f"cpu ({os.cpu_count()} cores visible, {args.trials} Ray CPUs)"
    print("| benchmark | method | trials | steps | sequential s | parallel s | efficiency | target | device |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| finetune_scaling | {args.method} | {args.trials} | {args.steps} | {sequential:.1f} | {parallel:.1f} "
          f"| {efficiency:.2f} | 0.85 | {device} |")
    print(json.dumps({
        "benchmark": "finetune_scaling", "metric": "scaling_efficiency", "value": round(efficiency, 4),
        "target": 0.85, "device": device, "method": args.method, "trials": args.trials, "steps": args.steps,
        "sequential_s": round(sequential, 2), "parallel_s": round(parallel, 2),
        "trial_seconds_sequential": [round(s, 2) for s in seq_trials],
        "trial_seconds_parallel": [round(s, 2) for s in par_trials],
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "host": platform.node(),
    }))


if __name__ == "__main__":
    main()
