"""Progress on long work: fine-tuning shows one bar over the steps of every trial."""

import io
from types import SimpleNamespace

import pytest
import tqdm.auto

from engine.stages.finetune.tune import step_progress


def test_fine_tuning_bar_sums_steps_over_trials_and_ends_full():
    # The suite turns bars off (TQDM_DISABLE), so the steps are read from the callback's tally.
    callback = step_progress(n_trials=3, steps=100, desc="finetune lora")
    a, b, c = (SimpleNamespace(trial_id=t) for t in "abc")
    callback.on_trial_result(iteration=0, trials=[], trial=a, result={"step": 50, "target_steps": 100})
    callback.on_trial_result(iteration=0, trials=[], trial=b, result={"step": 25, "target_steps": 200})  # a searched trial's own count
    assert (sum(callback.done.values()), callback.bar.total) == (75, 100 + 200 + 100)
    callback.on_trial_result(iteration=0, trials=[], trial=b, result={"step": 25, "target_steps": 200})  # resumed from its checkpoint
    callback.on_trial_result(iteration=0, trials=[], trial=a, result={"step": 100, "target_steps": 100})
    callback.on_trial_complete(iteration=0, trials=[], trial=a)
    callback.on_trial_result(iteration=0, trials=[], trial=c, result={"step": 40, "target_steps": 100})
    callback.on_trial_complete(iteration=0, trials=[], trial=c)  # stopped early by ASHA: its remaining steps leave the total
    callback.on_trial_result(iteration=0, trials=[], trial=b, result={"step": 200, "target_steps": 200})
    callback.on_trial_complete(iteration=0, trials=[], trial=b)
    assert sum(callback.done.values()) == callback.bar.total == 100 + 200 + 40
    callback.on_experiment_end(trials=[])


def test_training_bar_follows_the_reported_epochs_and_closes_at_the_last():
    from engine.stages.train.stage import epoch_progress

    # One fit's epochs, every method's together: a second method's epoch 0 is the fit's epoch 1.
    callback = epoch_progress(epochs=3, desc="train erm, lora")
    callback.after_report(None, [{"epoch": 0, "fit_epoch": 1}], None)  # restored after epoch 0 was done
    assert callback.bar.n == 2 and not callback.bar._closed
    callback.after_report(None, [{"epoch": 1, "fit_epoch": 2}], None)
    assert callback.bar.n == 3 and callback.bar._closed


def _trainable(config):  # a Tune function trainable; these tests never run it
    pass


class ShownBar(tqdm.auto.tqdm):
    """A bar that draws (to a stream of its own), though the suite turns bars off."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "disable": False, "file": io.StringIO()})


@pytest.fixture
def shown_bars(monkeypatch):
    monkeypatch.setattr(tqdm.auto, "tqdm", ShownBar)
    return ShownBar


def test_a_tuner_with_the_fine_tuning_bar_is_restored_with_its_tally(tmp_path, shown_bars):
    """Tune pickles the callback with the Tuner (tuner.pkl); a live bar in it made every resume
    fail with a RecursionError inside tqdm."""
    from ray import tune

    from engine.stages.finetune.progress import StepProgress

    callback = step_progress(n_trials=2, steps=10, desc="finetune dreambooth")
    callback.on_trial_result(iteration=0, trials=[], trial=SimpleNamespace(trial_id="a"), result={"step": 4})
    tune.Tuner(_trainable, param_space={"unit": tune.grid_search(["g0", "g3"])},
               run_config=tune.RunConfig(name="exp", storage_path=str(tmp_path), callbacks=[callback]))
    callback.bar.close()

    (progress,) = tune.Tuner.restore(str(tmp_path / "exp"), _trainable)._local_tuner.get_run_config().callbacks
    assert isinstance(progress, StepProgress) and progress.done == {"a": 4}
    progress.on_trial_result(iteration=0, trials=[], trial=SimpleNamespace(trial_id="a"), result={"step": 6})
    assert (progress.bar.n, progress.bar.total) == (6, 20)  # the bar goes on from the saved tally
    progress.on_experiment_end(trials=[])


# The failed restore leaves a half-unpickled bar behind, whose __del__ then fails.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_tuner_state_saved_with_a_live_bar_by_an_older_version_is_made_loadable(tmp_path, shown_bars):
    from ray import tune

    from engine.stages.finetune.tune import _make_tuner_state_loadable

    class OldProgress(tune.Callback):  # what the fine-tuning bar was: made at once, pickled with the Tuner
        def __init__(self):
            self.bar = shown_bars(total=10)

    old = OldProgress()
    tune.Tuner(_trainable, run_config=tune.RunConfig(name="exp", storage_path=str(tmp_path), callbacks=[old]))
    old.bar.close()
    experiment = str(tmp_path / "exp")
    with pytest.raises(RecursionError):
        tune.Tuner.restore(experiment, _trainable)

    fresh = step_progress(n_trials=1, steps=10, desc="finetune lora")
    _make_tuner_state_loadable(experiment, [fresh])
    (progress,) = tune.Tuner.restore(experiment, _trainable)._local_tuner.get_run_config().callbacks
    assert type(progress) is type(fresh) and progress.desc == "finetune lora"
