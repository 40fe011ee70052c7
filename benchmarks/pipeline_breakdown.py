"""Pipeline breakdown: where the embedded default run's wall time goes, stage by stage, and how
much of the generate stage is spent outside sampling (actor start and model loading, model
switches, PNG encoding, Parquet writing, scheduling and transfers).

It reads a finished run of ``jobs/full.py`` (``RUN/stage_seconds.json`` and each method's
``synthetic/<method>/_summary.json``, both written by the job itself); with no finished run
at ``--run-dir`` it runs the job there first. ``--quick`` runs a smaller job (ERM and LoRA,
16 images per group) in a temporary folder instead. Prints markdown tables, then, as the last
line, one JSON object.

    python benchmarks/pipeline_breakdown.py                      # reads or makes runs/default
    python benchmarks/pipeline_breakdown.py --run-dir runs/my-run
    python benchmarks/pipeline_breakdown.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

STAGES = ("data", "cluster", "finetune", "generate", "filter", "train")
SHARED_STAGES = ("data", "cluster")  # run once per severity; every method's timings repeat them
QUICK_OVERRIDES = ["methods=[erm,lora]", "generate.images_per_group=16"]


def run_job(run_dir: Path, overrides: list[str]) -> None:
    cmd = [sys.executable, str(ROOT / "jobs" / "full.py"), "--run-dir", str(run_dir)]
    for override in overrides:
        cmd += ["--set", override]
    print(f"running: {' '.join(cmd)}", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=sys.stderr)


def stage_totals(stage_seconds: dict) -> dict[str, float]:
    """Seconds per stage summed over severities and methods, shared stages counted once."""
    totals = dict.fromkeys(STAGES, 0.0)
    for by_method in stage_seconds.values():
        for stage in SHARED_STAGES:
            totals[stage] += max((m.get(stage, 0.0) for m in by_method.values()), default=0.0)
        for stages in by_method.values():
            for stage in STAGES:
                if stage not in SHARED_STAGES:
                    totals[stage] += stages.get(stage, 0.0)
    return totals


def _actors(summary: dict, configured) -> int:
    """Sampler actors of a generate run: the resolved pool bound it recorded, else the config's
    number ('auto' in an older run: one)."""
    if summary.get("max_actors"):
        return int(summary["max_actors"])
    return configured if isinstance(configured, int) else 1


def generate_breakdown(summary: dict, num_actors: int) -> dict:
    """Shares of one generate stage's wall time; sampler seconds are divided by the actors
    that ran side by side, so a share is of wall time, not of summed busy time."""
    wall = summary["stage_seconds"]
    per_actor = {k: summary.get(k, 0.0) / num_actors for k in ("sampling_seconds", "png_seconds", "switch_seconds")}
    return {
        "stage_seconds": wall,
        "images": summary["images"],
        "sampler_start_seconds": summary.get("sampler_start_seconds", 0.0),
        **{k: round(v, 3) for k, v in per_actor.items()},
        "write_seconds": summary.get("write_seconds", 0.0),
        "outside_sampling_share": round(1.0 - per_actor["sampling_seconds"] / wall, 4) if wall else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default=str(ROOT / "runs" / "default"), help="a jobs/full.py run")
    parser.add_argument("--quick", action="store_true", help="run a smaller job in a temporary folder")
    args = parser.parse_args()

    import yaml

    from engine.runs import read_json

    run_dir = Path(tempfile.mkdtemp(prefix="fairsynth-breakdown-")) / "run" if args.quick else Path(args.run_dir)
    if not (run_dir / "stage_seconds.json").exists():
        run_job(run_dir, QUICK_OVERRIDES if args.quick else [])
    stage_seconds = read_json(run_dir / "stage_seconds.json")
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").exists() else {}
    configured = config.get("generate", {}).get("num_actors", 1)

    totals = stage_totals(stage_seconds)
    whole = sum(totals.values())
    print(f"Run: {run_dir}\n")
    print("| stage | seconds | share |")
    print("|---|---|---|")
    for stage, seconds in totals.items():
        print(f"| {stage} | {seconds:.1f} | {seconds / whole:.1%} |")
    print(f"| all stages | {whole:.1f} | 100% |\n")

    generate = {}
    for severity_dir in sorted(run_dir.glob("severity-*")):
        for summary_path in sorted((severity_dir / "synthetic").glob("*/_summary.json")):
            summary = read_json(summary_path)
            if "stage_seconds" in summary:
                generate[f"{severity_dir.name}/{summary['method']}"] = generate_breakdown(summary, _actors(summary, configured))
    print("| generate | seconds | images | actor start | sampling | PNG | model switches | writes | outside sampling |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, g in generate.items():
        share = "n/a" if g["outside_sampling_share"] is None else f"{g['outside_sampling_share']:.1%}"
        print(
            f"| {name} | {g['stage_seconds']:.1f} | {g['images']} | {g['sampler_start_seconds']:.1f} | "
            f"{g['sampling_seconds']:.1f} | {g['png_seconds']:.2f} | {g['switch_seconds']:.2f} | "
            f"{g['write_seconds']:.2f} | {share} |"
        )
    shares = [g["outside_sampling_share"] for g in generate.values() if g["outside_sampling_share"] is not None]
    walls = sum(g["stage_seconds"] for g in generate.values())
    sampling = sum(g["sampling_seconds"] for g in generate.values())
    overall = round(1.0 - sampling / walls, 4) if walls else None
    print(json.dumps({
        "benchmark": "pipeline_breakdown",
        "metric": "generate_outside_sampling_share",
        "value": overall,
        "target": None,
        "device": "cpu",
        "run_dir": str(run_dir),
        "stage_seconds": {k: round(v, 1) for k, v in totals.items()},
        "all_stages_seconds": round(whole, 1),
        "generate": generate,
        "per_method_share_range": [min(shares), max(shares)] if shares else None,
        "host": platform.node(),
    }))


if __name__ == "__main__":
    main()
