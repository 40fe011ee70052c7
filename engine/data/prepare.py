"""The data stage: load a dataset, apply severity, check images, record group counts."""

from __future__ import annotations

import logging

from engine.config import DataConfig
from engine.data.datasets import LOADERS, SPLITS, GroupedDataset, find_bad_images
from engine.data.severity import apply_severity, infer_aligned
from engine.errors import FairsynthError

log = logging.getLogger(__name__)


def load_dataset(cfg: DataConfig, check_images: bool = False) -> GroupedDataset:
    """The configured dataset at the configured severity, with group ids."""
    dataset = LOADERS[cfg.name](cfg)
    train = dataset.split("train")
    if cfg.aligned is not None:
        bad = {c: a for c, a in cfg.aligned.items() if not (0 <= c < dataset.n_classes and 0 <= a < dataset.n_attributes)}
        if bad:
            raise FairsynthError(
                f"config error: data.aligned = {cfg.aligned}: classes must be < {dataset.n_classes} "
                f"and attributes < {dataset.n_attributes}"
            )
        aligned = dict(cfg.aligned)
    else:
        aligned = dataset.info.get("aligned") or infer_aligned(train, dataset.n_classes, dataset.n_attributes)
    dataset.info["aligned"] = {int(c): int(a) for c, a in aligned.items()}
    dataset.info["severity"] = cfg.severity
    dataset.records = apply_severity(dataset.records, cfg.severity, aligned, cfg.split_seed)
    if check_images:
        bad = find_bad_images(dataset.records["source"].tolist())
        if bad and not cfg.skip_bad_images:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise FairsynthError(
                f"{len(bad)} unreadable images: {shown}; replace them or set data.skip_bad_images=true"
            )
        if bad:
            log.warning("skipping %d unreadable images", len(bad))
            dataset.records = dataset.records[~dataset.records["source"].isin(bad)].reset_index(drop=True)
        dataset.info["bad_images_skipped"] = len(bad)
    for group, count in enumerate(dataset.group_counts("train")):
        if count == 0:
            log.warning("group %d (%s) has no training images at severity %s", group, dataset.group_name(group), cfg.severity)
    return dataset


def describe(dataset: GroupedDataset) -> dict:
    """The JSON summary that jobs/data_stats.py prints and the data stage stores."""
    return {
        "dataset": dataset.name,
        "groups": dataset.groups(),
        "aligned": {str(c): a for c, a in dataset.info.get("aligned", {}).items()},
        "severity": dataset.info.get("severity"),
        "splits": {
            split: {"n": int((dataset.records["split"] == split).sum()), "group_counts": dataset.group_counts(split)}
            for split in SPLITS
        },
        **{k: v for k, v in dataset.info.items() if k not in ("aligned", "severity")},
    }
