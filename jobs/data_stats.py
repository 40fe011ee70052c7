"""Describe a dataset before spending GPU hours: groups, aligned attributes, counts per split."""

import argparse
import json

import _path  # noqa: F401

from engine.cli import run_job
from engine.config import DATASETS, load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", choices=DATASETS, default="builtin")
    parser.add_argument("--root", default=None, help="dataset folder (not needed for builtin)")
    parser.add_argument("--severity", default="original", help="'original' or p with 0.5 < p < 1")
    parser.add_argument("--target", default=None, help="class attribute name (CelebA)")
    parser.add_argument("--attribute", default=None, help="spurious attribute name (CelebA)")
    parser.add_argument("--check-images", action="store_true", help="decode every image once")
    args = parser.parse_args()

    from engine.data.prepare import describe, load_dataset

    overrides = [f"data.name={args.dataset}", f"data.severity={args.severity}"]
    if args.root:
        overrides.append(f"data.root={args.root}")
    if args.target:
        overrides.append(f"data.target={args.target}")
    if args.attribute:
        overrides.append(f"data.attribute={args.attribute}")
    cfg = load_config(None, overrides)
    dataset = load_dataset(cfg.data, check_images=args.check_images)
    print(json.dumps(describe(dataset), indent=2))


if __name__ == "__main__":
    run_job(main)
