"""Run every benchmark, keep each one's JSON (its last line) in benchmarks/results/, print the
markdown table of figures, and exit non-zero when a benchmark fails or misses its target.

    python benchmarks/run_all.py [--only NAME ...] [--quick]

--quick passes each script smaller sizes (its own --quick, or the arguments below): the same
code paths, figures for a smoke check rather than for quoting.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Benchmark:
    name: str
    better: str | None  # "higher": value >= target; "lower": value <= target; None: a figure to read
    target: float | None = None  # where the script's own target is not a number
    quick: tuple[str, ...] = ()  # arguments for --quick, where the script has no --quick
    folder: str = ""  # "research": a figure of the method's quality, not of speed or reliability

    @property
    def script(self) -> Path:
        return HERE / self.folder / f"{self.name}.py"

    def met(self, result: dict) -> bool | None:
        """Whether the result meets its target; None when there is nothing to meet."""
        if "all_met" in result:
            return bool(result["all_met"])
        target = self.target if self.target is not None else result.get("target")
        value = result.get("value")
        if self.better is None or not isinstance(target, (int, float)) or not isinstance(value, (int, float)):
            return None
        return value >= target if self.better == "higher" else value <= target


BENCHMARKS = [
    Benchmark("tiny_model_quality", folder="research", better="higher", quick=("--per-prompt", "4", "--judge-images", "600", "--judge-steps", "100")),
    Benchmark("cluster_speed", "higher", target=5.0, quick=("--skip-real",)),
    Benchmark("sampling_throughput", "higher"),
    Benchmark("finetune_scaling", "higher", quick=("--steps", "40")),
    Benchmark("finetune_fidelity", folder="research", better="higher", quick=("--images", "4")),
    Benchmark("search_concurrency", "lower", quick=("--steps", "10")),
    Benchmark("train_throughput", "higher"),
    Benchmark("eval_memory", "lower", quick=("--images", "2000", "--no-whole")),
    Benchmark("unit_artifact_size", None),
    Benchmark("benchmark_calibration", folder="research", better="higher", quick=("--seeds", "0")),
    Benchmark("pipeline_breakdown", None),
    Benchmark("ablation", folder="research", better=None, quick=("--only", "base,synthetic_only", "--run-dir", "runs/ablation_quick",
                                       "--set", "generate.images_per_group=16", "--set", "finetune.steps=10",
                                       "--set", "train.pretrain_epochs=1", "--set", "train.epochs=1")),
    # Reads a finished run's units: the default run pipeline_breakdown makes, or under --quick
    # (where pipeline_breakdown runs in a temporary folder) the quick ablation's.
    Benchmark("borrowed_fidelity", folder="research", better="higher", quick=(
        "--images", "8", "--methods", "clustered_dreambooth",
        "--run-dir", str(HERE.parent / "runs" / "ablation_quick" / "severity-0.999"))),
    Benchmark("chaos", "higher", quick=("--methods", "erm,lora", "--signals", "kill")),
]
BY_NAME = {b.name: b for b in BENCHMARKS}


def run_one(bench: Benchmark, quick: bool) -> tuple[dict | None, str]:
    """The script's JSON result (or None) and, on failure, why."""
    script = bench.script
    extra = ["--quick"] if quick and "--quick" in script.read_text() else list(bench.quick) if quick else []
    out = subprocess.run([sys.executable, str(script), *extra], capture_output=True, text=True)
    lines = [line for line in out.stdout.strip().splitlines() if line.strip()]
    if out.returncode != 0 or not lines:
        return None, f"exit {out.returncode}\n{out.stderr[-2000:]}"
    try:
        return json.loads(lines[-1]), ""
    except json.JSONDecodeError:
        return None, f"its last line is not JSON: {lines[-1][:200]!r}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help=f"benchmark names to run: {', '.join(BY_NAME)}")
    parser.add_argument("--quick", action="store_true", help="smaller sizes for every benchmark")
    args = parser.parse_args()
    unknown = [n for n in args.only or [] if n not in BY_NAME]
    if unknown:
        print(f"unknown benchmark {unknown[0]!r}; valid: {', '.join(BY_NAME)}", file=sys.stderr)
        sys.exit(2)
    results_dir = HERE / "results"
    results_dir.mkdir(exist_ok=True)
    rows, failed, missed = [], [], []
    for bench in [BY_NAME[n] for n in args.only] if args.only else BENCHMARKS:
        start = time.perf_counter()
        result, why = run_one(bench, args.quick)
        seconds = time.perf_counter() - start
        if result is None:
            print(f"{bench.name}: failed ({why})", file=sys.stderr, flush=True)
            failed.append(bench.name)
            continue
        result.setdefault("host", platform.node())
        result.update(seconds=round(seconds, 1), quick=args.quick, met=bench.met(result))
        (results_dir / f"{bench.name}.json").write_text(json.dumps(result, indent=2) + "\n")
        rows.append(result)
        if result["met"] is False:
            missed.append(bench.name)
        print(f"{bench.name}: {result.get('metric')} = {result.get('value')} (target {result.get('target')}, "
              f"met: {result['met']}) in {seconds:.0f}s", flush=True)
    print()
    print("| benchmark | metric | value | target | met | device | seconds |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        value = r.get("value")
        shown = f"{value:.3g}" if isinstance(value, float) else value
        met = {True: "yes", False: "**no**", None: "-"}[r["met"]]
        print(f"| {r['benchmark']} | {r.get('metric')} | {shown} | {r.get('target')} | {met} | {r.get('device')} | {r['seconds']} |")
    if failed or missed:
        print(f"failed: {', '.join(failed) or 'none'}; missed the target: {', '.join(missed) or 'none'}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
