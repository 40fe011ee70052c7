"""ASHA within each unit, for a search whose trials of every unit share one Tune experiment.

One experiment for all units lets their trials run side by side under one
``max_concurrent_trials`` cap, but a single ASHA would rank a trial against every trial at
its rung, and held-out losses of different units do not compare (a hard unit's best trial
would be stopped for lagging an easy unit's). :class:`PerUnitASHA` keeps one ASHA per value
of ``trial.config["unit"]`` and hands each trial's events to its unit's; trials start in
submission order (FIFO), which the shared cap already bounds.

Kept in its own module so that importing the fine-tune stage does not import Tune's
schedulers; it is pickled with the experiment's tuner state, so ``Tuner.restore`` needs it
importable under this name (an experiment saved under another name starts its unfinished
trials again: engine.stages.finetune.tune.unrestorable).
"""

from __future__ import annotations

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler


class PerUnitASHA(FIFOScheduler):
    """``ASHAScheduler(**asha)`` per unit; stops trials only against trials of the same unit."""

    def __init__(self, **asha):
        super().__init__()
        self._asha_args = asha
        self._metric = asha["metric"]
        self._by_unit: dict[str, ASHAScheduler] = {}

    def _asha(self, trial) -> ASHAScheduler:
        unit = trial.config["unit"]
        if unit not in self._by_unit:
            self._by_unit[unit] = ASHAScheduler(**self._asha_args)
        return self._by_unit[unit]

    def set_search_properties(self, metric, mode, **spec) -> bool:
        # Metric and mode are fixed at construction, as ASHAScheduler's own would be.
        return not metric and not mode

    def on_trial_add(self, tune_controller, trial) -> None:
        self._asha(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        return self._asha(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._asha(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._asha(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "\n".join(f"unit {unit}: {asha.debug_string()}" for unit, asha in sorted(self._by_unit.items()))
