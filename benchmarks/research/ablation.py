"""Ablation: how each of the method's choices moves worst-group accuracy, for one generative
method on one config (default: the embedded default, clustered DreamBooth, severity 0.999).

Each variant is one ``jobs/full.py`` run, the command printed beside its row, all in one run
directory: the stages cache by what their inputs hash to, so a variant re-runs only the
stages its change reaches (a stage-2 choice re-runs train; filtering off re-runs filter and
train; more images per group re-runs generate, filter and train).

    base           the config as given (train.stage2=last_layer on group-balanced real data, 96 images
                   per group, filter on)
    synthetic_only no stage 2: the classifier trained on synthetic images alone
    stage2_full    stage 2 trains every layer (CE + SupCon)
    stage2_dro     stage 2 trains every layer with Group-DRO
    unbalanced_stage2  stage 2 reads the real set as it is, not group-balanced
    no_filter      every generated image kept (filter.keep_fraction=1)
    group_prompt_filter  the filter's text term names the attribute too (the paper's names the class)
    images_400     400 synthetic images per group

Prints a markdown table of validation figures (choices are made on validation; test figures
are read once, for the results table), then, as the last line, one JSON object. A figure to
read, with no target: it shows how each choice moves the result, not a threshold.

    python benchmarks/research/ablation.py [--method clustered_dreambooth] [--config tiny] [--seed 0]
        [--run-dir runs/ablation] [--only base,no_filter] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "base": [],
    "synthetic_only": ["train.stage2=none"],
    "stage2_full": ["train.stage2=full"],
    "stage2_dro": ["train.stage2=group_dro"],
    "unbalanced_stage2": ["train.group_balanced_sampling=false"],
    "no_filter": ["filter.keep_fraction=1.0"],
    "group_prompt_filter": ["filter.class_prompt_template=a photo of a {class_name} on {attribute_name}"],
    "images_400": ["generate.images_per_group=400"],
}
TITLES = {
    "base": "as configured (stage 2 last layer, group-balanced; 96 images per group; filtered)",
    "synthetic_only": "synthetic images only (no stage 2)",
    "stage2_full": "stage 2: every layer, CE + SupCon",
    "stage2_dro": "stage 2: every layer, Group-DRO",
    "unbalanced_stage2": "stage 2 on the real set as it is (not group-balanced)",
    "no_filter": "no filtering (every generated image kept)",
    "group_prompt_filter": "filter scored against the group prompt (class and attribute)",
    "images_400": "400 images per group",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="clustered_dreambooth")
    p.add_argument("--config", default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-dir", default="runs/ablation")
    p.add_argument("--only", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    args = p.parse_args(argv)
    args.only = [v.strip() for v in args.only.split(",") if v.strip()]
    unknown = sorted(set(args.only) - set(VARIANTS))
    if unknown:
        p.error(f"--only: unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    return args


def command(args, variant: str) -> list[str]:
    """The jobs/full.py command line of one variant."""
    # The run's one seed sets the data and every stage, so --seed S repeats the S column of a
    # multi-seed run.
    sets = [f"methods=[{args.method}]", f"seed={args.seed}", *args.overrides, *VARIANTS[variant]]
    return ["python", "jobs/full.py", "--config", args.config, "--run-dir", args.run_dir,
            *[part for s in sets for part in ("--set", s)]]


def run_variant(args, variant: str) -> dict:
    """Run one variant; its results row for the method, with the command and its seconds."""
    cmd = command(args, variant)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    started = time.time()
    done = subprocess.run([sys.executable, *cmd[1:]], cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise SystemExit(f"ablation variant {variant} failed (exit {done.returncode}):\n{tail}")
    rows = json.loads((ROOT / args.run_dir / "results.json").read_text())
    row = next(r for r in rows if r["method"] == args.method)
    fidelity = row.get("synthetic_fidelity") or {}
    return {
        "variant": variant,
        "command": shlex.join(cmd),
        "val_worst_group": row["val_worst_group"],
        "val_average_group": row["val_average_group"],
        "synthetic_images": row.get("synthetic_images", 0),
        "fidelity_after": fidelity.get("after"),
        "seconds": round(time.time() - started, 1),
    }


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def main(argv=None) -> None:
    args = parse_args(argv)
    results = []
    for variant in args.only:
        print(f"running {variant}: {shlex.join(command(args, variant))}", file=sys.stderr, flush=True)
        results.append(run_variant(args, variant))
    print(f"| {args.method}, seed {args.seed} | val WGA / AGA (%) | group fidelity (%) | synthetic images |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {TITLES[r['variant']]} | {pct(r['val_worst_group'])} / {pct(r['val_average_group'])} | "
              f"{pct(r['fidelity_after'])} | {r['synthetic_images']} |")
    print(json.dumps({"benchmark": "ablation", "method": args.method, "config": args.config, "seed": args.seed,
                      "metric": "val_worst_group", "value": results[0]["val_worst_group"],
                      "variants": results}))


if __name__ == "__main__":
    main()
