"""Train a classifier for one method and write RUN/train/<method>/metrics.json.

erm and group_dro train on the real (biased) training split; vanilla, lora, dreambooth and
clustered_dreambooth pretrain on their kept synthetic images first (run the generate and
filter stages for that method before this job).
"""

import json

import _path  # noqa: F401

from engine.cli import config_from_args, job_parser, run_job
from engine.config import METHODS


def main() -> None:
    parser = job_parser(__doc__)
    parser.add_argument("--method", required=True, choices=METHODS)
    args = parser.parse_args()

    from engine.raylib import init_ray
    from engine.resources import check_cluster_supplies
    from engine.runlock import hold_until_exit
    from engine.runs import RunDir
    from engine.stages.data.stage import run_data_stage
    from engine.stages.train import run_train_stage

    cfg = config_from_args(args)
    run = RunDir(cfg.run_dir)
    hold_until_exit(cfg.run_dir, force=args.force)  # one job per run directory
    run.prepare(cfg, force=args.force)
    init_ray(cfg.ray)
    check_cluster_supplies(cfg)  # a GPU preset on a machine without one stops before any stage
    run_data_stage(cfg, run)
    metrics = run_train_stage(cfg, run, args.method)
    summary = {split: {k: metrics[split][k] for k in ("worst_group", "average_group", "accuracy")} for split in ("val", "test")}
    print(json.dumps({"method": args.method, **summary, "stage_seconds": round(metrics["stage_seconds"], 1)}, indent=2))


if __name__ == "__main__":
    run_job(main)
