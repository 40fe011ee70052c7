"""How many images each group has: read from the data when it is here, else the documented
split sizes of the paper's datasets with severity applied by the data stage's own rule.

Group id = class * n_attributes + attribute, as everywhere in the engine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from engine.config import Config
from engine.errors import FairsynthError
from engine.stages.data.severity import conflicting_to_keep, infer_aligned


@dataclass
class GroupCounts:
    """Images per group and split, for one severity."""

    train: list[int]
    val: int
    test: int
    n_classes: int
    n_attributes: int
    source: str
    notes: list[str] = field(default_factory=list)

    @property
    def n_groups(self) -> int:
        return self.n_classes * self.n_attributes

    @property
    def n_train(self) -> int:
        return int(sum(self.train))


@dataclass(frozen=True)
class KnownSplits:
    """Group sizes of a dataset as distributed ("original"): [class][attribute] per split."""

    train: tuple[tuple[int, ...], ...]
    val: tuple[tuple[int, ...], ...]
    test: tuple[tuple[int, ...], ...]
    applies_when: dict
    reference: str
    approximate: bool = False


KNOWN_SPLITS = {
    # metadata.csv as distributed (Sagawa et al. 2020, "Distributionally Robust Neural
    # Networks", Waterbirds group sizes): class y (landbird, waterbird) x place (land, water).
    "waterbirds": KnownSplits(
        train=((3498, 184), (56, 1057)),
        val=((467, 466), (133, 133)),
        test=((2255, 2255), (642, 642)),
        applies_when={},
        reference="Waterbirds metadata.csv (Sagawa et al. 2020)",
    ),
    # list_eval_partition.txt with target Blond_Hair and attribute Male (the same paper's
    # CelebA group sizes): class (non-blond, blond) x attribute (female, male).
    "celeba": KnownSplits(
        train=((71629, 66874), (22880, 1387)),
        val=((8535, 8276), (2874, 182)),
        test=((9767, 7535), (2480, 180)),
        applies_when={"target": ("Blond_Hair", None), "attribute": ("Male", None)},
        reference="CelebA list_eval_partition.txt, Blond_Hair x Male (Sagawa et al. 2020)",
    ),
    # UTKFace has 23,708 aligned-and-cropped faces (12,391 male, 11,317 female) and no
    # official split; the loader cuts 80/10/10. Its per-(gender, age) counts are not
    # published: these assume 7,756 faces aged 40+ (the released age histogram), 63% of them
    # male, so each group is right to about 10%. class (male, female) x age (<40, 40+).
    "utkface": KnownSplits(
        train=((6004, 3909), (6757, 2296)),
        val=((750, 489), (845, 287)),
        test=((751, 488), (845, 287)),
        applies_when={"age_bins": ([0, 40, 200],)},
        reference="UTKFace (approximate group split)",
        approximate=True,
    ),
}


def _apply_known(cfg: Config, severity) -> GroupCounts:
    name = cfg.data.name
    known = KNOWN_SPLITS[name]
    for key, allowed in known.applies_when.items():
        value = getattr(cfg.data, key)
        if value not in allowed:
            raise FairsynthError(
                f"the planner knows {name}'s group sizes only for data.{key} in "
                f"{[a for a in allowed if a is not None]}, not {value!r}; point data.root at the dataset "
                "so the planner can count its groups"
            )
    train = np.array(known.train, dtype=np.int64)
    n_classes, n_attributes = train.shape
    notes = [f"{name}: group sizes from {known.reference}; data.root {cfg.data.root!r} is not here"]
    if known.approximate:
        notes.append(f"{name}: group sizes are approximate (about 10%)")
    if severity != "original":
        if cfg.data.aligned is not None:
            aligned = {int(c): int(a) for c, a in cfg.data.aligned.items()}
        else:
            frame = pd.DataFrame({
                "label": np.repeat(np.arange(n_classes).repeat(n_attributes), train.ravel()),
                "attribute": np.repeat(np.tile(np.arange(n_attributes), n_classes), train.ravel()),
            })
            aligned = infer_aligned(frame, n_classes, n_attributes)
        train = train.copy()
        for label, attribute in aligned.items():
            others = [a for a in range(n_attributes) if a != attribute]
            available = int(train[label, others].sum())
            keep = min(conflicting_to_keep(int(train[label, attribute]), float(severity)), available)
            # The data stage draws the kept conflicting images uniformly from all of them, so
            # each other attribute keeps its share.
            shares = train[label, others] / max(available, 1)
            kept = np.floor(shares * keep).astype(np.int64)
            for i in np.argsort(-(shares * keep - kept))[: keep - int(kept.sum())]:
                kept[i] += 1
            train[label, others] = kept
    return GroupCounts(
        train=[int(x) for x in train.ravel()],
        val=int(np.sum(known.val)),
        test=int(np.sum(known.test)),
        n_classes=n_classes,
        n_attributes=n_attributes,
        source=known.reference,
        notes=notes,
    )


def _from_dataset(cfg: Config, severity) -> GroupCounts:
    from engine.stages.data.prepare import load_dataset

    data = cfg.data.model_copy(update={"severity": severity})
    dataset = load_dataset(data, check_images=False)
    counts = {split: dataset.group_counts(split) for split in ("train", "val", "test")}
    return GroupCounts(
        train=counts["train"],
        val=int(sum(counts["val"])),
        test=int(sum(counts["test"])),
        n_classes=dataset.n_classes,
        n_attributes=dataset.n_attributes,
        source=f"{cfg.data.name} records" + (f" in {cfg.data.root}" if cfg.data.root else ""),
    )


def from_groups_json(path: Path) -> GroupCounts:
    """Counts exactly as a run's data stage recorded them (RUN/data/groups.json)."""
    summary = json.loads(Path(path).read_text())
    splits = summary["splits"]
    return GroupCounts(
        train=[int(x) for x in splits["train"]["group_counts"]],
        val=int(splits["val"]["n"]),
        test=int(splits["test"]["n"]),
        n_classes=len(summary["class_names"]),
        n_attributes=len(summary["attribute_names"]),
        source=str(path),
    )


def group_counts(cfg: Config, severity) -> GroupCounts:
    """Images per group at ``severity``: the real records when they can be read here, else
    the documented split sizes of Waterbirds, CelebA or UTKFace."""
    readable = cfg.data.name == "builtin" or (cfg.data.root and Path(cfg.data.root).exists())
    if readable:
        return _from_dataset(cfg, severity)
    if cfg.data.name in KNOWN_SPLITS:
        return _apply_known(cfg, severity)
    raise FairsynthError(
        f"data.root {cfg.data.root!r} does not exist and the planner knows no split sizes for "
        f"data.name={cfg.data.name!r}; point data.root at the dataset"
    )


def clusters_per_group(cfg: Config, counts: GroupCounts) -> list[int]:
    """Clusters the cluster stage makes per group, at most: k (k_max for 'auto'), capped so
    every cluster can hold cluster.min_cluster_size images; 0 for an empty group."""
    k = cfg.cluster.k_max if cfg.cluster.k == "auto" else int(cfg.cluster.k)
    return [0 if n == 0 else max(1, min(k, n // cfg.cluster.min_cluster_size)) for n in counts.train]


def trained_groups(cfg: Config, counts: GroupCounts) -> list[int]:
    """Groups that train their own model; the others borrow their class's aligned group's."""
    return [g for g, n in enumerate(counts.train) if n >= cfg.finetune.min_real_images]
