"""Run every benchmark, keep each one's JSON (its last line) in benchmarks/results/, and
print the markdown table of figures.

    python benchmarks/run_all.py [--only NAME ...] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = [
    "tiny_model_quality",
    "cluster_speed",
    "sampling_throughput",
    "finetune_scaling",
    "train_throughput",
    "pipeline_breakdown",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="benchmark names to run")
    parser.add_argument("--quick", action="store_true", help="pass --quick to each benchmark that has it")
    args = parser.parse_args()
    results_dir = HERE / "results"
    results_dir.mkdir(exist_ok=True)
    rows = []
    for name in args.only or BENCHMARKS:
        script = HERE / f"{name}.py"
        if not script.exists():
            print(f"{name}: missing {script}", file=sys.stderr)
            continue
        start = time.perf_counter()
        takes_quick = "--quick" in script.read_text()
        cmd = [sys.executable, str(script)] + (["--quick"] if args.quick and takes_quick else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        lines = [line for line in out.stdout.strip().splitlines() if line.strip()]
        if out.returncode != 0 or not lines:
            print(f"{name}: failed (exit {out.returncode})\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        result = json.loads(lines[-1])
        result.setdefault("host", platform.node())
        result["seconds"] = round(seconds, 1)
        (results_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        rows.append(result)
        print(f"{name}: {result.get('metric')} = {result.get('value')} (target {result.get('target')}) in {seconds:.0f}s",
              flush=True)
    print()
    print("| benchmark | metric | value | target | device | seconds |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        value = r.get("value")
        shown = f"{value:.3g}" if isinstance(value, float) else value
        print(f"| {r['benchmark']} | {r.get('metric')} | {shown} | {r.get('target')} | {r.get('device')} | {r['seconds']} |")


if __name__ == "__main__":
    main()
