"""The fine-tuning progress bar: one bar (with an ETA) over the steps of every trial of an
experiment, drawn by a Tune callback from the steps each trial reports.

Tune pickles the callback with the Tuner (``tuner.pkl``) and restores it on resume, so the
callback holds only its tally: the bar, a live terminal handle that cannot be unpickled, is
made on first use and left out of the pickle. Its own module, so the class pickles by name.
"""

from __future__ import annotations

from ray import tune


class StepProgress(tune.Callback):
    """Tune calls the hooks with keyword arguments, so they keep Tune's parameter names."""

    def __init__(self, n_trials: int, steps: int, desc: str):
        self.n_trials, self.steps, self.desc = n_trials, steps, desc
        self.targets: dict[str, int] = {}
        self.done: dict[str, int] = {}
        self._bar = None

    @property
    def bar(self):
        if self._bar is None:
            from tqdm.auto import tqdm

            # A restored experiment's bar starts at the steps its trials had already reported.
            self._bar = tqdm(total=self._total(), initial=sum(self.done.values()), unit="step",
                             desc=self.desc, smoothing=0.1)
        return self._bar

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_bar": None}

    # Tune saves these with each experiment checkpoint and hands them back on restore.
    def get_state(self) -> dict:
        return {"targets": dict(self.targets), "done": dict(self.done)}

    def set_state(self, state: dict) -> None:
        self.targets, self.done = dict(state["targets"]), dict(state["done"])

    def on_trial_result(self, iteration, trials, trial, result, **info):
        # A searched trial has its own step count; one ASHA stops early ends at its last.
        self.targets[trial.trial_id] = int(result.get("target_steps", self.steps))
        step = int(result.get("step", 0))
        # A trial resumed from its checkpoint reports steps it had reported before.
        self.bar.update(max(0, step - self.done.get(trial.trial_id, 0)))
        self.done[trial.trial_id] = max(step, self.done.get(trial.trial_id, 0))
        self._set_total()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.targets[trial.trial_id] = self.done.get(trial.trial_id, 0)
        self._set_total()

    def _total(self) -> int:
        return sum(self.targets.values()) + (self.n_trials - len(self.targets)) * self.steps

    def _set_total(self):
        self.bar.total = self._total()
        self.bar.refresh()

    def on_experiment_end(self, trials, **info):
        if self._bar is not None:
            self._bar.close()
