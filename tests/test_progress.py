"""Progress on long work: fine-tuning shows one bar over the steps of every trial."""

from types import SimpleNamespace

from engine.finetune.tune import step_progress


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
    from engine.train.stage import epoch_progress

    # One fit's epochs, every method's together: a second method's epoch 0 is the fit's epoch 1.
    callback = epoch_progress(epochs=3, desc="train erm, lora")
    callback.after_report(None, [{"epoch": 0, "fit_epoch": 1}], None)  # restored after epoch 0 was done
    assert callback.bar.n == 2 and not callback.bar._closed
    callback.after_report(None, [{"epoch": 1, "fit_epoch": 2}], None)
    assert callback.bar.n == 3 and callback.bar._closed
