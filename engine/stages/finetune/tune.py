"""Fine-tuning units as Ray Tune trials: one per unit (a grid over units), or ``num_samples``
per unit in a search, all in parallel.

- Resources per trial come from ``finetune.trial_resources`` (``{"GPU": 1}``, a fraction such
  as ``{"GPU": 0.5}`` for LoRA, or CPUs); at most ``finetune.max_concurrent_trials`` run at
  once, or with 'auto' every trial is queued and runs as the cluster makes room (an
  autoscaling cluster adds nodes for the pending ones). On CPU a trial uses as many torch threads as CPUs it was given, so parallel trials
  do not fight over cores.
- A trial reports a checkpoint every ``finetune.checkpoint_every`` steps;
  ``FailureConfig(max_failures)`` restarts a crashed trial from its last checkpoint, and a
  re-run of the job restores the experiment (``Tuner.restore``) so unfinished trials resume.
- ``finetune.num_samples > 1`` searches the learning rate and the step count per unit: one
  experiment holds every unit's sampled trials, so the search of all units fills the cluster
  (still at most ``max_concurrent_trials`` at once); ASHA, one instance per unit, stops a
  trial whose held-out denoising loss lags the other trials of its own unit (losses of
  different units do not compare), and each unit's best finished trial is chosen.

Trials never write into the run directory: the unit's artifact travels in the trial's last
checkpoint, and :func:`run_unit_trials` hands back where each one lies, so trials can run on
any node of a cluster with shared ``ray.storage_path``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import pickle
import re
import signal
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from engine.config import FinetuneConfig
from engine.console import ray_prints
from engine.errors import FairsynthError
from engine.generation_methods import get_method
from engine.hashing import digest
from engine.raylib import device_for
from engine.resources import max_concurrent_trials, trial_bundle
from engine.stages.finetune.trainer import FAILURE_MARKER, UnitJob, UnitTrainer

log = logging.getLogger(__name__)

SEARCH_STEP_FACTORS = (0.5, 1.0, 2.0)


@dataclass
class UnitResult:
    """The chosen trial of one unit: where its last checkpoint lies and what it reached."""

    unit: str
    checkpoint: object  # ray.tune.Checkpoint
    steps: int
    final_loss: float | None
    learning_rate: float
    heldout_loss: float | None = None
    # Wall-clock window of the trial's last attempt, and the step it resumed at (0: fresh).
    started_at: float | None = None
    finished_at: float | None = None
    resumed_at: int = 0
    # The Tune experiment the trial ran in (local path or URI); the stage removes it once
    # every unit it trained is in the manifest.
    experiment: str | None = None


def unit_trial(config: dict, jobs: dict[str, UnitJob]) -> None:
    """The Tune function trainable: train ``config['unit']`` with the trial's resources."""
    import ray.tune
    import torch
    # Every checkpoint would log a line; the stage logs what matters. (Pipeline loading
    # bars are turned off by engine.models.loading.)
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    job = jobs[config["unit"]]
    context = ray.tune.get_context()
    allotted = context.get_trial_resources().required_resources
    # One torch thread per allotted CPU: two trials on two cores each take one.
    torch.set_num_threads(max(1, int(allotted.get("CPU", 1))))
    device = device_for(float(allotted.get("GPU", 0)), job.model.device)

    def report(metrics: dict, save) -> None:
        metrics = {**metrics, "unit": job.unit}
        if save is None:
            ray.tune.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="fairsynth-ckpt-") as folder:
            save(Path(folder))
            ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(folder))

    trainer = UnitTrainer(
        job,
        device,
        learning_rate=config.get("learning_rate"),
        steps=config.get("steps"),
        score_heldout="learning_rate" in config,
        failure_marker=Path(context.get_trial_dir()) / FAILURE_MARKER,
    )
    checkpoint = ray.tune.get_checkpoint()
    if checkpoint is None:
        trainer.run(report)
        return
    with checkpoint.as_directory() as folder:
        trainer.run(report, resume_from=Path(folder))


def _trial_dirname(trial) -> str:
    return f"{trial.config.get('unit', 'unit')}-{trial.trial_id}"


def _error_line(error: BaseException | None) -> str:
    """The user-facing line of a trial's error (its FairsynthError's, when it raised one)."""
    text = str(error or "")
    found = re.findall(r"FairsynthError: (.+)", text)
    if found:
        return found[-1].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else repr(error)


def experiment_name(prefix: str, jobs: list[UnitJob], extra: str = "") -> str:
    """Names an experiment by what its trials learn from, so a re-run with the same pending
    units restores it, and runs of other data sharing ``ray.storage_path`` never do."""
    payload = sorted((j.unit, j.sources, j.train_prompt, j.class_prompt) for j in jobs)
    return f"{prefix}-{digest([payload, extra], length=10)}"


def step_progress(n_trials: int, steps: int, desc: str):
    """A Tune callback drawing one progress bar (with an ETA) over the fine-tuning steps of
    every trial of an experiment (engine.stages.finetune.progress)."""
    from engine.stages.finetune.progress import StepProgress

    return StepProgress(n_trials, steps, desc)


class _WithoutTqdm(pickle.Unpickler):
    """Loads a pickle with every tqdm object in it replaced by an empty stand-in."""

    class Dropped:
        pass

    def find_class(self, module: str, name: str):
        from tqdm import tqdm

        if module.split(".")[0] == "tqdm":
            return self.Dropped
        found = super().find_class(module, name)
        return self.Dropped if isinstance(found, type) and issubclass(found, tqdm) else found


def _make_tuner_state_loadable(experiment: str, callbacks: list) -> None:
    """Runs interrupted before the fine-tuning bar stopped being pickled saved a live tqdm bar
    in ``tuner.pkl``, which no later run can unpickle (a RecursionError inside tqdm). Such a
    file gets ``callbacks`` in place of its own, so the experiment's trials resume."""
    import ray.cloudpickle as cloudpickle
    from ray.train._internal.storage import get_fs_and_path

    fs, path = get_fs_and_path(experiment)
    state_file = f"{path.rstrip('/')}/tuner.pkl"
    with fs.open_input_file(state_file) as f:
        data = f.readall()
    try:
        cloudpickle.loads(data)
        return
    except RecursionError:
        pass
    state = _WithoutTqdm(io.BytesIO(data)).load()
    state["_run_config"].callbacks = callbacks
    with fs.open_output_stream(f"{state_file}.tmp") as f:
        f.write(cloudpickle.dumps(state))
    fs.move(f"{state_file}.tmp", state_file)
    log.info("%s: replaced the progress bar saved in tuner.pkl by an older version", experiment)


def _fit(trainable, name: str, storage_path: str, ft: FinetuneConfig, param_space: dict,
         points: list[dict] | None = None, scheduler=None, trials: int = 1):
    """Run (or restore) one experiment: a trial per point of ``points`` when given (each a full
    config inside ``param_space``'s space), else one per variant of ``param_space``."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    experiment = f"{storage_path.rstrip('/')}/{name}"
    # Pickled with the Tuner and restored with it (engine.stages.finetune.progress).
    callbacks = [step_progress(trials, ft.steps, f"finetune {name.split('-')[0]}")]
    reason = unrestorable(experiment) if tune.Tuner.can_restore(experiment) else None
    if reason:
        log.warning("the fine-tuning experiment in %s cannot be resumed: %s; its unfinished trials start again",
                    experiment, reason)
        from engine import storage

        storage.delete(experiment)
    if tune.Tuner.can_restore(experiment):
        log.info("resuming the fine-tuning experiment in %s", experiment)
        _make_tuner_state_loadable(experiment, callbacks)
        tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                num_samples=len(points) if points else 1,
                # The one cap on trials at once, shared by every unit's trials.
                search_alg=BasicVariantGenerator(points_to_evaluate=points, max_concurrent=max_concurrent_trials(ft)),
                scheduler=scheduler,
                reuse_actors=True,
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage_path,
                failure_config=tune.FailureConfig(max_failures=ft.max_failures),
                # One checkpoint per trial: a resumable one (fp32 weights and optimizer state,
                # over 10 GB for a full SD 1.5 DreamBooth unit) until the last step's, which
                # holds only the compact artifact (engine/stages/finetune/trainer.py).
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                verbose=0,
                callbacks=callbacks,
            ),
        )
    with _sigterm_stops_tune() as stopped, ray_prints():  # Tune's table and paths go to the run's log
        grid = tuner.fit()
    if stopped:
        raise KeyboardInterrupt  # the job's own SIGTERM handling goes on from here (engine.cli)
    return grid, experiment


def unrestorable(experiment: str) -> str | None:
    """Why a Tune experiment's saved state cannot be resumed, or None when it can.

    - Tune writes its experiment state and each trial's error file in place, so a full disk
      can leave the newest state cut short (Tune.restore then yields trials without their
      config) or an error file empty (reading it back raises EOFError). Objects on S3 are
      written whole.
    - The state names each trial's latest checkpoint as of its last save, and Tune deletes a
      trial's older checkpoints as it makes new ones (``num_to_keep``): a driver killed
      between the two leaves a state naming a checkpoint that is gone, which every retry of
      the trial then fails to restore.
    - ``tuner.pkl`` names the callbacks and scheduler by module: one saved by a version of
      fairsynth whose modules had other names cannot be loaded."""
    from engine import storage

    folder = storage.as_path(experiment)
    states = sorted(folder.glob("experiment_state-*.json"))
    try:
        state = json.loads(storage.read_bytes(states[-1])) if states else {}
        if any(storage.read_bytes(p) == b"" for p in folder.glob("*/error.pkl")):
            return "a trial's error file is empty (a full disk)"
        tuner_state = _tuner_state_problem(folder / "tuner.pkl")
        if tuner_state:
            return tuner_state
        gone = _missing_checkpoints(folder, state)
    except storage.StorageError:
        raise  # storage that is down says nothing about the saved state: never delete it for that
    except (ValueError, OSError, KeyError, TypeError):
        return "its saved state is cut short (a full disk leaves Tune's saved state half-written)"
    if gone:
        return f"its saved state names checkpoint {gone[0]}, which is gone (the job was killed between a checkpoint and the next save)"
    return None


def _tuner_state_problem(tuner_state) -> str | None:
    """Why ``tuner.pkl`` cannot be loaded, or None when it loads (or is absent)."""
    import pickle

    import ray.cloudpickle as cloudpickle

    from engine import storage

    if not tuner_state.exists():
        return None
    try:
        cloudpickle.loads(storage.read_bytes(tuner_state))
    except RecursionError:
        return None  # a progress bar pickled by an older version: _make_tuner_state_loadable replaces it
    except (ImportError, AttributeError) as error:
        return f"its saved state names code this version does not have ({error})"
    except (pickle.UnpicklingError, EOFError):
        return "its tuner.pkl is cut short (Tune writes it in place; a full disk leaves it half-written)"
    return None


_CHECKPOINT_IN_STATE = re.compile(rb"([^/\x00-\x20\"']+)/(checkpoint_\d{6})")


def _missing_checkpoints(folder, state: dict) -> list[str]:
    """The checkpoints an unfinished trial of the saved ``state`` would restore from that are
    not in ``folder``. Tune pickles each trial's checkpoint manager into the state, so the
    paths are read out of the pickle's bytes: a trial folder and a checkpoint folder name."""
    missing = []
    for meta, runtime in state.get("trial_data", []):
        if json.loads(meta).get("status") == "TERMINATED":
            continue  # a finished trial is not restored
        manager = json.loads(runtime).get("checkpoint_manager") or {}
        value = manager.get("value", "") if isinstance(manager, dict) else ""
        blob = bytes.fromhex(value) if manager.get("_type") == "CLOUDPICKLE_FALLBACK" else json.dumps(manager).encode()
        for trial_dir, name in sorted(set(_CHECKPOINT_IN_STATE.findall(blob))):
            path = folder / trial_dir.decode() / name.decode()
            if not path.exists():
                missing.append(str(path))
    return missing


@contextlib.contextmanager
def _sigterm_stops_tune():
    """While Tune runs, SIGTERM stops it the way Ctrl-C does: Tune saves the experiment state
    one last time and stops its trials, so a re-run resumes every trial from its latest
    checkpoint. A KeyboardInterrupt raised inside Tune's loop instead skips that save (the
    re-run then goes back to an older checkpoint) and leaves the trials to be killed with Ray.
    Yields a list that holds the signal once one came; a second one interrupts at once."""
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous) or threading.current_thread() is not threading.main_thread():
        yield []  # no handler of the job's to defer to: SIGTERM keeps its usual effect
        return
    received: list[int] = []

    def stop(signum, frame):
        tune_handler = signal.getsignal(signal.SIGUSR1)
        if received or getattr(tune_handler, "__name__", "") != "signal_interrupt_tune_run":
            previous(signum, frame)  # a second signal, or Tune not listening yet
            return
        received.append(signum)
        log.warning("stopping the fine-tuning trials; the experiment is saved for the re-run")
        tune_handler(signal.SIGUSR1, frame)

    # Tune installs its SIGUSR1 handler in every fit and never removes it: an earlier fit's
    # would set that fit's flag, which nothing reads any more.
    previous_usr1 = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, stop)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGUSR1, previous_usr1)


def _collect(grid, experiment: str, ft: FinetuneConfig, lr_field: str) -> dict[str, UnitResult]:
    """The best finished trial per unit; a failed or diverged unit is a one-line error."""
    by_unit: dict[str, list] = {}
    for result in grid:
        by_unit.setdefault(result.config["unit"], []).append(result)
    chosen = {}
    for unit, results in by_unit.items():
        finished = [r for r in results if r.error is None and (r.metrics or {}).get("finished")]
        if not finished:
            first = results[0]
            where = first.checkpoint.path if first.checkpoint is not None else experiment
            if first.error is not None:
                raise FairsynthError(
                    f"fine-tuning unit {unit} failed {ft.max_failures + 1} times: {_error_line(first.error)}; "
                    f"fix the cause and re-run the same command to resume from {where}"
                )
            nan_at = (first.metrics or {}).get("nan_at_step")
            if nan_at is not None:
                raise FairsynthError(
                    f"fine-tuning unit {unit}: the loss became NaN at step {nan_at}; the last good checkpoint "
                    f"(step {first.metrics.get('step')}) is kept in {where}; lower {lr_field} "
                    f"(now {first.metrics.get('learning_rate'):g}) and re-run"
                )
            raise FairsynthError(
                f"fine-tuning unit {unit} stopped before finishing (see {experiment}); re-run the same command"
            )
        best = min(finished, key=lambda r: r.metrics.get("heldout_loss", r.metrics.get("final_loss") or 0.0))
        chosen[unit] = UnitResult(
            unit=unit,
            checkpoint=best.checkpoint,
            steps=int(best.metrics["step"]),
            final_loss=best.metrics.get("final_loss"),
            learning_rate=float(best.metrics["learning_rate"]),
            heldout_loss=best.metrics.get("heldout_loss"),
            started_at=best.metrics.get("started_at"),
            finished_at=best.metrics.get("reported_at"),
            resumed_at=int(best.metrics.get("resumed_at", 0)),
            experiment=experiment,
        )
    return chosen


def remove_experiment(location: str) -> bool:
    """Delete a finished Tune experiment (a local path or a ``ray.storage_path`` URI) with
    its trial checkpoints; the tuner state goes first, so a half-deleted experiment is never
    restored. Returns whether there was one."""
    import pyarrow.fs as pafs
    from ray.train._internal.storage import get_fs_and_path

    fs, path = get_fs_and_path(location)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return False
    tuner_state = f"{path.rstrip('/')}/tuner.pkl"
    if fs.get_file_info(tuner_state).type == pafs.FileType.File:
        fs.delete_file(tuner_state)
    fs.delete_dir(path)
    return True


def run_unit_trials(jobs: list[UnitJob], ft: FinetuneConfig, storage_path: str, prefix: str,
                    model_device: str = "auto") -> dict[str, UnitResult]:
    """Train every job as a Tune trial; returns each unit's chosen result.

    ``storage_path`` is where Tune keeps experiments and checkpoints (a local folder or a
    cluster's shared storage); ``prefix`` names the experiments, which also carry a hash of
    the units they train, so a re-run with the same pending units restores the same one.
    """
    from ray import tune

    if not jobs:
        return {}
    by_unit = {job.unit: job for job in jobs}
    strategy = get_method(jobs[0].method)
    lr_field = f"finetune.{strategy.learning_rate_field(ft)}"
    trainable = tune.with_resources(
        tune.with_parameters(unit_trial, jobs=by_unit), tune.PlacementGroupFactory([trial_bundle(ft, model_device)])
    )
    if ft.num_samples <= 1:
        grid, experiment = _fit(trainable, experiment_name(prefix, jobs), storage_path, ft,
                                {"unit": tune.grid_search(sorted(by_unit))}, trials=len(jobs))
        return _collect(grid, experiment, ft, lr_field)
    return _search(trainable, jobs, ft, storage_path, prefix, strategy.learning_rate(ft), lr_field)


def _search(trainable, jobs: list[UnitJob], ft: FinetuneConfig, storage_path: str, prefix: str,
            center: float, lr_field: str) -> dict[str, UnitResult]:
    """Every unit's ``num_samples`` trials in one experiment, so they run side by side.

    One experiment rather than one per unit (run one after another, or from threads): Tune
    then holds all trials under the one ``max_concurrent_trials`` cap and one restore, and
    the only thing that must stay per unit, ASHA's comparison, is :class:`PerUnitASHA`'s job.
    """
    from ray import tune

    from engine.stages.finetune.per_unit_asha import PerUnitASHA

    step_choices = sorted({max(1, int(round(ft.steps * f))) for f in SEARCH_STEP_FACTORS})
    low, high = center / ft.search_lr_factor, center * ft.search_lr_factor
    space = {"unit": tune.choice(sorted(j.unit for j in jobs)), "learning_rate": tune.loguniform(low, high),
             "steps": tune.choice(step_choices)}
    # Drawn from each unit's own seed, so a unit's candidates do not depend on which other
    # units are pending; sample-major, so the first trials to start cover every unit.
    draws = {job.unit: _draw_configs(job, ft.num_samples, low, high, step_choices) for job in jobs}
    points = [draws[job.unit][i] for i in range(ft.num_samples) for job in jobs]
    max_steps = max(step_choices)
    scheduler = PerUnitASHA(time_attr="step", metric="heldout_loss", mode="min", max_t=max_steps,
                            grace_period=min(ft.checkpoint_every, max_steps), reduction_factor=2)
    grid, experiment = _fit(trainable, experiment_name(prefix, jobs, "search"), storage_path, ft, space,
                            points, scheduler, trials=len(points))
    chosen = _collect(grid, experiment, ft, lr_field)
    for unit, result in sorted(chosen.items()):
        log.info("unit %s: search chose learning rate %.2e, %d steps", unit, result.learning_rate, result.steps)
    return chosen


def _draw_configs(job: UnitJob, n: int, low: float, high: float, step_choices: list[int]) -> list[dict]:
    """``n`` trial configs of one unit: a log-uniform learning rate and a step count each."""
    import numpy as np

    rng = np.random.default_rng(job.seed)
    # Clipped: exp(log(low)) may round below low, and Tune warns about a point outside the space.
    return [{"unit": job.unit,
             "learning_rate": float(np.clip(np.exp(rng.uniform(np.log(low), np.log(high))), low, high)),
             "steps": int(rng.choice(step_choices))} for _ in range(n)]
