"""Group metrics: per-group accuracy, worst-group (WGA), average-group (AGA) and the
average accuracy weighted by training group proportions."""

from __future__ import annotations

import math

import numpy as np


def group_accuracies(predictions, labels, groups, n_groups: int) -> list[float]:
    """Accuracy per group id; NaN for a group with no examples."""
    predictions, labels, groups = (np.asarray(x) for x in (predictions, labels, groups))
    correct = predictions == labels
    out = []
    for g in range(n_groups):
        mask = groups == g
        out.append(float(correct[mask].mean()) if mask.any() else math.nan)
    return out


def summarize(predictions, labels, groups, n_groups: int, train_group_counts=None) -> dict:
    per_group = group_accuracies(predictions, labels, groups, n_groups)
    present = [a for a in per_group if not math.isnan(a)]
    result = {
        "per_group": per_group,
        "worst_group": min(present) if present else math.nan,
        "average_group": float(np.mean(present)) if present else math.nan,
        "accuracy": float(np.mean(np.asarray(predictions) == np.asarray(labels))) if len(labels) else math.nan,
    }
    if train_group_counts is not None:
        weights = np.asarray(train_group_counts, dtype=float)
        usable = [(w, a) for w, a in zip(weights, per_group) if not math.isnan(a)]
        total = sum(w for w, _ in usable)
        result["weighted_average"] = sum(w * a for w, a in usable) / total if total else math.nan
    return result
