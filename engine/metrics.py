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


def chance(group_sizes: list[int], n_classes: int) -> dict:
    """What a classifier that guesses (each class with probability 1 / n_classes, each image on
    its own) scores on a split of these group sizes: the expected worst-group accuracy and its
    standard deviation, and the expected average-group accuracy.

    A group's accuracy is Binomial(n_g, p) / n_g; the worst group's is their minimum, whose
    distribution is exact from the groups' survival functions: P(min >= v) = prod_g P(X_g >= v n_g).
    """
    from scipy.stats import binom

    p = 1.0 / n_classes
    sizes = [int(n) for n in group_sizes if n > 0]
    if not sizes:
        return {"worst_group": math.nan, "worst_group_std": math.nan, "average_group": math.nan}
    values = np.array(sorted({k / n for n in sizes for k in range(n + 1)}))
    # P(X_g / n_g >= v) for every value and group; ceil with a tolerance for v = k / n_g exactly.
    survival = np.ones(len(values))
    for n in sizes:
        survival *= binom.sf(np.ceil(values * n - 1e-9) - 1, n, p)
    mass = survival - np.append(survival[1:], 0.0)
    mean = float(values @ mass)
    second = float((values * values) @ mass)
    return {"worst_group": mean, "worst_group_std": math.sqrt(max(second - mean * mean, 0.0)), "average_group": p}
