"""The data stage: load a dataset, apply severity, check images, record group counts."""

from __future__ import annotations

import logging
from pathlib import Path

from engine.config import DataConfig
from engine.errors import FairsynthError
from engine.stages.data.datasets import LOADERS, SPLITS, GroupedDataset, find_bad_images
from engine.stages.data.severity import apply_severity, infer_aligned

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
    dataset.records = apply_severity(dataset.records, cfg.severity, aligned, cfg.seed)
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
    for finding in findings(dataset):
        log.warning("%s", finding)
    return dataset


def findings(dataset: GroupedDataset) -> list[str]:
    """What a user should know before spending GPU hours: groups with no images in a split."""
    notes = []
    aligned = dataset.info.get("aligned", {})
    for group, count in enumerate(dataset.group_counts("train")):
        if count == 0:
            minority = aligned.get(dataset.groups()[group]["class"]) != dataset.groups()[group]["attribute"]
            kind = "a bias-conflicting group" if minority else "an aligned group"
            why = ("the generative methods draw it from a swapped-attribute prompt with the aligned group's "
                   "model; ERM and Group-DRO never see it" if minority
                   else "no unit can be fine-tuned on it, and the minority units that borrow from it fail")
            notes.append(f"group {group} ({dataset.group_name(group)}), {kind}, has no training images: {why}")
    for split in ("val", "test"):
        for group, count in enumerate(dataset.group_counts(split)):
            if count == 0:
                notes.append(f"group {group} ({dataset.group_name(group)}) has no {split} images: its {split} "
                             f"accuracy, and so worst-group accuracy, cannot be measured; add some to the {split} split")
    return notes


def missing_files(dataset: GroupedDataset, shown: int = 3) -> str | None:
    """One line naming image files the records point at that do not exist, or None."""
    sources = [s for s in dataset.records["source"] if "://" not in s]
    missing = [s for s in sources if not Path(s).is_file()]
    if not missing:
        return None
    names = ", ".join(missing[:shown]) + (f" and {len(missing) - shown} more" if len(missing) > shown else "")
    return f"{len(missing)} of {len(sources)} image files do not exist: {names}; paths are relative to the CSV's folder"


def describe_text(summary: dict, notes: list[str]) -> str:
    """The summary of :func:`describe` as a table people read: images per group and split."""
    splits = list(summary["splits"])
    width = max(len(g["name"]) for g in summary["groups"]) + 2
    lines = [f"{summary['dataset']} at severity {summary['severity']}; aligned (class -> attribute): "
             + ", ".join(f"{c} -> {a}" for c, a in summary["aligned"].items()), "",
             "group".ljust(width + 4) + "".join(s.rjust(8) for s in splits)]
    for g in summary["groups"]:
        counts = "".join(str(summary["splits"][s]["group_counts"][g["id"]]).rjust(8) for s in splits)
        lines.append(f"{g['id']:>2}  {g['name'].ljust(width)}{counts}")
    lines.append("total".ljust(width + 4) + "".join(str(summary["splits"][s]["n"]).rjust(8) for s in splits))
    return "\n".join(lines + ([""] + [f"note: {n}" for n in notes] if notes else []))


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
