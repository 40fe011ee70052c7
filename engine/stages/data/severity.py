"""Bias severity (FFR's rule): per class keep every bias-aligned training image and
round(n_aligned * (1 - p) / p) bias-conflicting ones; val and test stay as they are."""

from __future__ import annotations

import logging
import math
from fractions import Fraction

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)


def infer_aligned(train: pd.DataFrame, n_classes: int, n_attributes: int) -> dict[int, int]:
    """The attribute most over-represented in each class: argmax_a P(a | y) / P(a)."""
    p_a = np.bincount(train["attribute"], minlength=n_attributes) / max(len(train), 1)
    aligned = {}
    for label in range(n_classes):
        in_class = train[train["label"] == label]["attribute"]
        p_a_given_y = np.bincount(in_class, minlength=n_attributes) / max(len(in_class), 1)
        ratio = np.divide(p_a_given_y, p_a, out=np.zeros(n_attributes), where=p_a > 0)
        aligned[label] = int(np.argmax(ratio))
    return aligned


def conflicting_to_keep(n_aligned: int, severity: float) -> int:
    """round(n_aligned * (1 - p) / p), computed exactly (0.8 is not 4/5 in binary) and
    rounding halves up, so the count does not depend on floating-point noise."""
    p = Fraction(str(severity))
    return math.floor(n_aligned * (1 - p) / p + Fraction(1, 2))


def apply_severity(
    records: pd.DataFrame, severity: float | str, aligned: dict[int, int], seed: int
) -> pd.DataFrame:
    """Subsample the training split's bias-conflicting images; a seeded, stable choice."""
    if severity == "original":
        return records
    rng = np.random.default_rng(seed)
    train = records[records["split"] == "train"]
    keep = np.ones(len(records), dtype=bool)
    for label, attribute in sorted(aligned.items()):
        in_class = train[train["label"] == label]
        n_aligned = int((in_class["attribute"] == attribute).sum())
        conflicting = in_class[in_class["attribute"] != attribute].index.to_numpy().copy()
        wanted = conflicting_to_keep(n_aligned, float(severity))
        if wanted > len(conflicting):
            log.warning(
                "class %d: severity %s asks for %d bias-conflicting images but only %d exist; keeping all",
                label, severity, wanted, len(conflicting),
            )
            wanted = len(conflicting)
        dropped = rng.permutation(conflicting)[wanted:]
        keep[records.index.get_indexer(dropped)] = False
    return records[keep].reset_index(drop=True)
