"""Run a preset end to end (by default engine/configs/gpu_smoke.yaml) and measure, per stage, the wall
time, the share of 2-second `nvidia-smi` samples with a GPU busy, peak GPU memory, and the disk
the run directory takes: the figures a new GPU cluster is judged by.

    python benchmarks/gpu_smoke_run.py [--config gpu_smoke] [--run-dir DIR] [--set k=v ...]
        [--out benchmarks/results/gpu_smoke-<device>.json]

Stage windows come from the lines jobs/full.py prints as each stage starts. On a machine with
no `nvidia-smi` the GPU columns are empty and the rest is still measured. Prints a markdown
table, then the JSON as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE_LINE = re.compile(r"^\[\s*([\d.]+)s\] (?:[^:]+: )?(\w+)")
BUSY_PERCENT = 5.0  # utilization above this counts as the GPU busy
SAMPLE_SECONDS = 2.0


def gpu_sampler(samples: list, stop: threading.Event, started: float) -> None:
    """Append (seconds since start, max utilization %, total memory MiB) every 2 s."""
    query = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]
    while not stop.is_set():
        try:
            out = subprocess.run(query, capture_output=True, text=True, timeout=10).stdout
            rows = [[float(x) for x in line.split(",")] for line in out.strip().splitlines() if line.strip()]
            if rows:
                samples.append((time.time() - started, max(r[0] for r in rows), sum(r[1] for r in rows)))
        except (OSError, ValueError, subprocess.TimeoutExpired):
            pass
        stop.wait(SAMPLE_SECONDS)


def disk_bytes(path: Path) -> int:
    total = 0
    for f in path.rglob("*") if path.exists() else []:
        try:
            total += f.stat().st_size if f.is_file() else 0
        except OSError:  # a temporary file renamed or removed while we walked
            pass
    return total


def disk_sampler(paths: list[Path], peak: list[int], stop: threading.Event) -> None:
    """Keep the largest total size of ``paths`` seen, every 2 s (checkpoints come and go
    while fine-tuning prints nothing)."""
    while not stop.is_set():
        peak[0] = max(peak[0], sum(disk_bytes(p) for p in paths))
        stop.wait(SAMPLE_SECONDS)


def stage_windows(lines: list[tuple[float, str]], end: float) -> list[tuple[str, float, float]]:
    """(stage, start, end) from the job's announce lines, in seconds since the job started."""
    marks = [(float(m.group(1)), m.group(2)) for _, line in lines if (m := STAGE_LINE.match(line))]
    return [(name, t, marks[i + 1][0] if i + 1 < len(marks) else end) for i, (t, name) in enumerate(marks)]


def summarize(windows, samples, offset: float) -> dict[str, dict]:
    """Per stage: seconds, GPU-busy share of its samples, peak GPU memory."""
    per_stage: dict[str, dict] = defaultdict(lambda: {"seconds": 0.0, "samples": 0, "busy": 0, "peak_mib": 0.0})
    for name, start, end in windows:
        row = per_stage[name]
        row["seconds"] += end - start
        for t, util, mib in samples:
            if start <= t - offset < end:
                row["samples"] += 1
                row["busy"] += util > BUSY_PERCENT
                row["peak_mib"] = max(row["peak_mib"], mib)
    return {
        name: {
            "seconds": round(r["seconds"], 1),
            "gpu_busy_share": round(r["busy"] / r["samples"], 3) if r["samples"] else None,
            "peak_gpu_mib": r["peak_mib"] if r["samples"] else None,
        }
        for name, r in per_stage.items()
    }


def device_name() -> str:
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip().splitlines()
        if out:
            return re.sub(r"[^a-z0-9]+", "-", out[0].lower()).strip("-")
    return "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="gpu_smoke")
    parser.add_argument("--run-dir", default="runs/gpu_smoke")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", default=None, help="JSON file (default benchmarks/results/gpu_smoke-<device>.json)")
    args = parser.parse_args()
    run_dir = Path(args.run_dir)
    cmd = [sys.executable, "jobs/full.py", "--config", args.config, "--run-dir", str(run_dir), "--force"]
    for override in args.overrides:
        cmd += ["--set", override]

    samples: list = []
    stop = threading.Event()
    started = time.time()
    sampler = threading.Thread(target=gpu_sampler, args=(samples, stop, started), daemon=True)
    if shutil.which("nvidia-smi"):
        sampler.start()
    # The run directory plus the per-node cache of fine-tuned units the samplers load.
    watched = [ROOT / run_dir, Path(os.environ.get("FAIRSYNTH_CACHE", "/tmp/fairsynth-cache"))]
    peak = [0]
    threading.Thread(target=disk_sampler, args=(watched, peak, stop), daemon=True).start()
    lines: list[tuple[float, str]] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as job:
        for line in job.stdout:
            print(line, end="", flush=True)
            lines.append((time.time() - started, line.rstrip("\n")))
    stop.set()
    end = time.time() - started
    peak_disk = max(peak[0], sum(disk_bytes(p) for p in watched))
    # The job's own clock starts after its imports; align it to the first announce line.
    first = next(((t, float(m.group(1))) for t, line in lines if (m := STAGE_LINE.match(line))), (0.0, 0.0))
    offset = first[0] - first[1]
    stages = summarize(stage_windows(lines, end - offset), samples, offset)
    result = {
        "benchmark": "gpu_smoke_run",
        "device": device_name(),
        "config": args.config,
        "overrides": args.overrides,
        "returncode": job.returncode,
        "wall_seconds": round(end, 1),
        "stages": stages,
        "peak_gpu_mib": max((s[2] for s in samples), default=None),
        "gpu_busy_share": round(sum(s[1] > BUSY_PERCENT for s in samples) / len(samples), 3) if samples else None,
        "disk_bytes_final": disk_bytes(ROOT / run_dir),
        "disk_watched": [str(p) for p in watched],
        "disk_bytes_peak": peak_disk,
    }
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"gpu_smoke-{result['device']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n| stage | seconds | GPU busy | peak GPU MiB |\n|---|---|---|---|")
    for name, s in stages.items():
        busy = "-" if s["gpu_busy_share"] is None else f"{s['gpu_busy_share']:.0%}"
        print(f"| {name} | {s['seconds']} | {busy} | {s['peak_gpu_mib'] or '-'} |")
    print(json.dumps(result))
    sys.exit(job.returncode)


if __name__ == "__main__":
    main()
