"""Describe a dataset before spending GPU hours: groups, aligned attributes, counts per split,
and what is missing (a group with no images in a split, image files that do not exist).

    python jobs/data_stats.py --data.name manifest --data.root DIR     # your own folder + CSV
    python jobs/data_stats.py --config waterbirds_0999 [--json]
    python jobs/data_stats.py --dataset waterbirds --root DIR --severity 0.999

Any config key works as a flag (--data.root DIR is --set data.root=DIR).
"""

import json
import logging

import _path  # noqa: F401

from engine.cli import config_from_args, dotted_overrides, job_parser, run_job
from engine.config import DATASETS
from engine.errors import FairsynthError


def main() -> None:
    parser = job_parser(__doc__.splitlines()[0], run_dir=False)
    parser.add_argument("--dataset", choices=DATASETS, default=None, help="data.name (default: the config's)")
    parser.add_argument("--root", default=None, help="data.root: the dataset folder (not needed for builtin)")
    parser.add_argument("--severity", default=None, help="data.severity: 'original' or p with 0.5 < p < 1")
    parser.add_argument("--target", default=None, help="data.target: class attribute name (CelebA)")
    parser.add_argument("--attribute", default=None, help="data.attribute: spurious attribute name (CelebA)")
    parser.add_argument("--check-images", action="store_true", help="decode every image once")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args, rest = parser.parse_known_args()
    args.overrides += dotted_overrides(rest, parser)
    flags = {"name": args.dataset, "root": args.root, "severity": args.severity,
             "target": args.target, "attribute": args.attribute}
    if args.config is None and args.severity is None:
        flags["severity"] = "original"  # the dataset as distributed, unless asked otherwise
    args.overrides = [f"data.{k}={v}" for k, v in flags.items() if v is not None] + args.overrides
    cfg = config_from_args(args)

    from engine.data.prepare import describe, describe_text, findings, load_dataset, missing_files

    logging.getLogger("engine.data.prepare").setLevel(logging.ERROR)  # its warnings are the notes printed
    dataset = load_dataset(cfg.data, check_images=args.check_images)
    missing = missing_files(dataset)
    if missing:
        raise FairsynthError(f"{cfg.data.name} at {cfg.data.root}: {missing}")
    summary = describe(dataset)
    print(json.dumps(summary, indent=2) if args.json else describe_text(summary, findings(dataset)))


if __name__ == "__main__":
    run_job(main)
