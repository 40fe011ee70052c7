"""Every method's classifier at its best: the same small random search for each method (the
same number of trials, the same epochs), chosen on validation worst-group accuracy.

The search space is engine/stages/train/hparams.py (learning rate and weight decay for all; Group-DRO's
step size and group adjustment; the last-layer learning rate where a method has that phase).
Trial 0 is the configured values. Each trial trains every method once per tuning seed, in
one Ray Train fit, on a finished run's data and synthetic sets (``jobs/full.py --run-dir RUN
--seeds S,S``); the search writes only under RUN/search/. It reads validation figures alone:
no test figure is trained on, printed or kept in search.json (each trial's metrics.json
holds them, as every train stage writes them; the search never reads them), so the seeds it tunes on can still be
reported elsewhere without having chosen anything on test.

Prints, per method, each trial's values and its mean validation WGA over the seeds, and the
chosen values as the ``train.method_overrides`` block a preset takes; the last line is JSON.
Resumable: a finished (trial, seed) is read back from RUN/search/search.json, under a key that
names the preset, the overrides and the severity too, so a search under other settings runs
its trials afresh.

    python benchmarks/research/baseline_search.py --run-dir runs/tune --seeds 100,101 [--trials 8]
        [--methods erm,group_dro,dfr] [--config tiny] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from engine.cli import run_job  # noqa: E402  (needs ROOT on the path)

# What a trial's run directory borrows from the tuning run: everything the train stage reads.
BORROWED = ("data", "cluster", "synthetic", "filter", "oracle", "config.yaml")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="a finished multi-seed run (jobs/full.py --seeds)")
    p.add_argument("--seeds", required=True, help="comma-separated tuning seeds, e.g. 100,101")
    p.add_argument("--methods", default="erm,group_dro,dfr")
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--severity", default="0.999")
    p.add_argument("--config", default=None)
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    return args


def trial_run(source: Path, target: Path) -> Path:
    """A run directory for the search's fits: the tuning run's inputs, linked, and a train
    folder of its own."""
    from engine.errors import FairsynthError

    if not (source / "data/_COMPLETE.json").exists():
        raise FairsynthError(f"{source} has no finished data stage; run jobs/full.py --run-dir ... --seeds ... first")
    target.mkdir(parents=True, exist_ok=True)
    for name in BORROWED:
        link = target / name
        if (source / name).exists() and not link.exists():
            link.symlink_to((source / name).resolve())
    return target


def run_trial(args, trial: int, seed: int) -> dict[str, dict]:
    """Every method's validation figures for one trial on one seed's run."""
    from engine.config import load_config
    from engine.report import seed_tag, severity_tag
    from engine.runs import RunDir
    from engine.stages.train import run_train_stages
    from engine.stages.train.hparams import trial_values

    severity = float(args.severity) if args.severity != "original" else args.severity
    source = Path(args.run_dir) / seed_tag(seed) / severity_tag(severity)
    # A folder per settings: its links point at the severity it trains on.
    target = trial_run(source, Path(args.run_dir) / "search" / settings_digest(args) / f"trial_{trial}" / seed_tag(seed))
    cfg = load_config(args.config, [*args.overrides, f"seed={seed}", f"data.severity={severity}", f"run_dir={target}",
                                    f"methods=[{','.join(args.methods)}]"])
    values = {m: trial_values(m, trial, cfg.train) for m in args.methods}
    cfg.train = cfg.train.model_copy(update={"method_overrides": {**cfg.train.method_overrides, **values}})
    metrics = run_train_stages(cfg, RunDir(target), args.methods)
    return {m: {"values": values[m], "val_worst_group": metrics[m]["val"]["worst_group"],
                "val_average_group": metrics[m]["val"]["average_group"]} for m in args.methods}


def settings_digest(args) -> str:
    """A digest of everything besides the trial and the seed that shapes a trial's figures:
    the preset, the overrides and the severity."""
    from engine.hashing import digest

    severity = args.severity if args.severity == "original" else float(args.severity)
    return digest({"config": args.config or "tiny", "set": sorted(args.overrides), "severity": severity}, 8)


def result_key(args, trial: int, seed: int) -> str:
    """Where a trial's figures on one seed live in search.json."""
    return f"{trial}/{seed}/{settings_digest(args)}"


def choose(results: dict, args, trials: int) -> dict[str, dict]:
    """Per method: each trial's mean validation WGA (then AGA) over the seeds, and the best."""
    out, seeds = {}, args.seeds
    for method in args.methods:
        rows = []
        for trial in range(trials):
            runs = [results.get(result_key(args, trial, seed), {}).get(method) for seed in seeds]
            if any(r is None for r in runs):
                continue
            wga = sum(r["val_worst_group"] for r in runs) / len(runs)
            aga = sum(r["val_average_group"] for r in runs) / len(runs)
            rows.append({"trial": trial, "values": runs[0]["values"], "val_worst_group": wga, "val_average_group": aga})
        if not rows:
            from engine.errors import FairsynthError

            raise FairsynthError(f"no finished trial of {method} on seeds {seeds}; run the search with --trials 1 or more")
        best = max(rows, key=lambda r: (r["val_worst_group"], r["val_average_group"], -r["trial"]))
        out[method] = {"trials": rows, "chosen": best}
    return out


def print_tables(chosen: dict) -> None:
    for method, found in chosen.items():
        keys = list(found["chosen"]["values"])
        print(f"\n{method}: mean validation worst-group / average-group accuracy (%) over the tuning seeds\n")
        print("| trial | " + " | ".join(keys) + " | val WGA / AGA |")
        print("|---" * (len(keys) + 2) + "|")
        for r in found["trials"]:
            mark = " (chosen)" if r["trial"] == found["chosen"]["trial"] else ""
            cells = " | ".join(f"{r['values'][k]:.3g}" for k in keys)
            print(f"| {r['trial']}{mark} | {cells} | {100 * r['val_worst_group']:.1f} / {100 * r['val_average_group']:.1f} |")
    print("\ntrain:\n  method_overrides:")
    for method, found in chosen.items():
        values = ", ".join(f"{k}: {v:.3g}" for k, v in found["chosen"]["values"].items())
        print(f"    {method}: {{{values}}}")


def main() -> None:
    args = parse_args()
    from engine.config import load_config
    from engine.raylib import init_ray
    from engine.runs import atomic_write_json

    logging.getLogger("engine").setLevel(logging.WARNING)
    init_ray(load_config(args.config, args.overrides).ray)
    store = Path(args.run_dir) / "search" / "search.json"
    results = json.loads(store.read_text()) if store.exists() else {}
    started = time.time()
    for trial in range(args.trials):
        for seed in args.seeds:
            key = result_key(args, trial, seed)
            if all(m in results.get(key, {}) for m in args.methods):
                continue
            results[key] = {**results.get(key, {}), **run_trial(args, trial, seed)}
            atomic_write_json(store, results)
            print(f"trial {trial} seed {seed} done ({time.time() - started:.0f} s)", file=sys.stderr, flush=True)
    chosen = choose(results, args, args.trials)
    print_tables(chosen)
    print(json.dumps({"benchmark": "baseline_search", "seeds": args.seeds, "trials": args.trials,
                      "chosen": {m: c["chosen"] for m, c in chosen.items()}}))


if __name__ == "__main__":
    run_job(main)
