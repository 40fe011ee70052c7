"""Plan a job before paying for it: FLOPs, GPU-hours, wall time and disk of every stage on N GPUs.

    python jobs/plan.py [--config PRESET] [--set key=value ...] --gpus N --gpu-type h100 [--json]
    python jobs/plan.py --compare RUN [--gpu-type cpu --gpus 1]   # predicted vs RUN/stage_seconds.json
    python jobs/plan.py --measure [--config PRESET] [--save]      # measure each stage's MFU here

FLOPs are counted with PyTorch's FLOP counter over the configured models built on the meta
device (no weights, no GPU); wall time divides them by the device's peak times each stage's
achieved fraction (config plan.gpu_mfu / plan.cpu_mfu, or a benchmark's measurement) and
spreads trials, shards and workers over the GPUs as the stages do. Disk per stage: bytes its
outputs keep in the run directory (fine-tuned units from the models' shapes, synthetic PNGs)
and the peak its running tasks hold besides (fine-tuning checkpoints in flight). --gpu-type cpu plans this
machine, at its measured matmul peak.
"""

import json
import sys

import _path  # noqa: F401

from engine.cli import config_from_args, job_parser, run_job
from engine.errors import FairsynthError
from engine.planning.hardware import DEVICE_TYPES


def main() -> None:
    parser = job_parser(__doc__.splitlines()[0], run_dir=False)
    parser.add_argument("--gpus", type=int, default=1, help="devices in the cluster (default 1)")
    parser.add_argument(
        "--gpu-type", default="cpu", type=str.lower,
        help=f"one of {', '.join(DEVICE_TYPES)} (default cpu: this machine)",
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak of a device not in the table")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--compare", metavar="RUN", default=None, help="check the plan against a finished run")
    parser.add_argument("--measure", action="store_true", help="measure each stage's MFU on this machine's device")
    parser.add_argument("--quick", action="store_true", help="with --measure: shorter measurements")
    parser.add_argument("--save", action="store_true", help="with --measure: write plan.results_dir/plan_mfu.json")
    args = parser.parse_args()
    if args.gpu_type not in DEVICE_TYPES and args.peak_tflops is None:
        raise FairsynthError(
            f"unknown --gpu-type {args.gpu_type!r}; valid: {', '.join(DEVICE_TYPES)} (or give --peak-tflops for another card)"
        )
    if args.gpus < 1:
        raise FairsynthError(f"--gpus {args.gpus}: the cluster needs at least one device")

    from engine.config import REPO_ROOT
    from engine.planning.plan import compare_with_run, format_comparison, format_plan, plan_job
    from engine.runs import atomic_write_json

    if args.measure:
        from engine.planning.measure import RESULT_NAME, measure_stage_mfu

        cfg = config_from_args(args)
        result = measure_stage_mfu(cfg, quick=args.quick)
        if args.save:
            path = REPO_ROOT / cfg.plan.results_dir / f"{RESULT_NAME}.json"
            atomic_write_json(path, result)
            print(f"saved {path}", file=sys.stderr)
        print(json.dumps(result))
        return

    if args.compare:
        # The run's own config says what ran; --config / --set say how to plan (the plan section).
        settings = config_from_args(args).plan
        plan, rows = compare_with_run(args.compare, args.gpu_type, args.gpus, args.peak_tflops, settings)
        if args.json:
            print(json.dumps({"plan": plan.to_dict(), "comparison": rows}))
        else:
            print(format_plan(plan, f"the run in {args.compare}"))
            print()
            print(format_comparison(rows))
        return

    cfg = config_from_args(args)
    plan = plan_job(cfg, args.gpu_type, args.gpus, args.peak_tflops)
    if args.json:
        print(json.dumps({"config": args.config or "default", **plan.to_dict()}))
    else:
        print(format_plan(plan, args.config or "the default config"))


if __name__ == "__main__":
    run_job(main)
