"""Where each method's training hyperparameters may range, declared once (DomainBed's
hparams_registry): the baseline search (benchmarks/research/baseline_search.py) draws every method's
trials from here, the same number for each, and keeps the one with the best validation
worst-group accuracy as that method's ``train.method_overrides``.

Every method searches its learning rate and weight decay; Group-DRO also its step size and
group adjustment; a method with a second, last-layer phase (DFR and the generative methods)
also that phase's learning rate. Trial 0 is the configured values, so a search never chooses
worse than them on validation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from engine.config import METHODS, TrainConfig


@dataclass(frozen=True)
class LogUniform:
    low: float
    high: float

    def draw(self, rng: np.random.Generator) -> float:
        return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))


@dataclass(frozen=True)
class Choice:
    values: tuple[float, ...]

    def draw(self, rng: np.random.Generator) -> float:
        return float(self.values[rng.integers(len(self.values))])


SPACE = {
    "learning_rate": LogUniform(3e-4, 1e-2),
    "weight_decay": LogUniform(1e-5, 1e-2),
    "finetune_learning_rate": LogUniform(1e-3, 3e-2),
    "group_dro_eta": LogUniform(1e-3, 1e-1),
    "group_dro_adjustment": Choice((0.0, 1.0, 2.0, 4.0)),
}
SHARED = ("learning_rate", "weight_decay")
SEARCHED = {
    "erm": SHARED,
    "group_dro": (*SHARED, "group_dro_eta", "group_dro_adjustment"),
    **{m: (*SHARED, "finetune_learning_rate") for m in METHODS if m not in ("erm", "group_dro")},
}


def trial_values(method: str, trial: int, train: TrainConfig, search_seed: int = 0) -> dict[str, float]:
    """The hyperparameters of ``method``'s trial number ``trial``: the configured ones for
    trial 0, else a seeded draw from the method's space (the same draws on every run seed)."""
    keys = SEARCHED[method]
    if trial == 0:
        own = train.for_method(method)
        return {k: float(getattr(own, k)) for k in keys}
    rng = np.random.default_rng([search_seed, trial, METHODS.index(method)])
    return {k: SPACE[k].draw(rng) for k in keys}
