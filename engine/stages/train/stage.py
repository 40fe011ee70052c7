"""The train stage: build the Ray Data inputs, fit one TorchTrainer for the methods still to
train, and write RUN/train/<method>/metrics.json for each.

One fit trains all of them in turn (engine.stages.train.loop): a fit's worker group, process group
and data coordinators take about half a minute to start on 2 CPU cores, which six methods
paid six times. Ray Train keeps its checkpoints under ``ray.storage_path`` (default
RUN/train/<method>/ray for one method, RUN/train/ray for several), in an experiment named
after the methods and the config they train with; a re-run after an interruption picks up
that experiment's latest checkpoint, methods finished in it included, and a method whose
completion marker matches is skipped. When a fit fails, the methods it finished are written
out before the error is raised, so a re-run with other methods (the failing one left out, say)
does not train them again.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
import time
from pathlib import Path

from engine import storage
from engine.config import Config
from engine.console import ray_prints
from engine.errors import FairsynthError
from engine.hashing import digest
from engine.raylib import init_ray, retry_node_loss
from engine.resources import train_workers, use_gpu
from engine.runs import RunDir, atomic_write_json, read_json
from engine.stages import stage_key
from engine.stages.data.stage import data_hash, load_run_dataset
from engine.stages.generate.shards import shard_paths, synthetic_dir
from engine.stages.train import data as train_data
from engine.stages.train.backbones import build_classifier
from engine.stages.train.loop import STATE_FILE, read_checkpoint_state, train_loop
from engine.stages.train.methods import REAL, SYNTHETIC, get_method

log = logging.getLogger(__name__)


def stage_name(method: str) -> str:
    return f"train/{method}"


def train_hash(cfg: Config, run: RunDir, method: str) -> str:
    """What a method's classifier depends on: the data, the train section as the method trains
    with it (its own overrides, not another method's) and the seed, and for
    a generative method the synthetic images it reads. Those are named by the filter stage's
    marker (its key over the generation plan and the settings that pick the kept images), so an
    upstream change that leaves the kept images as they were (a sampler's batch size, the
    fidelity judge) trains nothing again."""
    own = cfg.model_copy(update={"train": cfg.train.for_method(method)})
    kept = _kept_set_hash(run, method) if get_method(method).uses_synthetic else None
    return stage_key(own, "train", method=method, data=data_hash(cfg), filter=kept)


def _kept_set_hash(run: RunDir, method: str) -> str:
    marker = run.read_marker(get_method(method).synthetic_stage)
    return str(marker["kept_hash"]) if marker else "none"  # not filtered yet: never a finished filter's key


def _storage(cfg: Config, run: RunDir, keys: dict[str, str]) -> tuple[str, str]:
    """Where the fit's experiment lives, and its name: the method's own folder for one, a
    shared one, named by every method's key (``train_hash``), for several."""
    methods = list(keys)
    if len(methods) == 1:
        name, folder = f"{methods[0]}-{keys[methods[0]]}", f"train/{methods[0]}/ray"
    else:
        joined = ",".join(f"{m}:{keys[m]}" for m in methods)
        name, folder = f"methods-{digest(joined)}", "train/ray"
    if cfg.ray.storage_path:
        return cfg.ray.storage_path, name
    # A URI (s3://...) goes to Ray Train as it is; it opens it with pyarrow.fs on every node.
    return storage.uri(run / folder), name


def _ordered_ingest():
    """Train's default ingest options, in order: each worker's split then gets the same rows
    in the same order every run (the splitter ignores locality and deals blocks by a fixed
    rule), which reproducible metrics need. Built here rather than from
    DataConfig.default_ingest_options(), which passes the deprecated exclude_resources on and
    so warns."""
    from ray.data import DataContext, ExecutionOptions

    current = DataContext.get_current().execution_options
    return ExecutionOptions(resource_limits=current.resource_limits, preserve_order=True,
                            verbose_progress=current.verbose_progress)


def _check_backbone(cfg: Config, n_classes: int) -> None:
    """Fail in the driver, with one line, before any worker starts."""
    build_classifier(cfg.train.backbone, n_classes, cfg.train.pretrained_weights)


def _synthetic_inputs(run: RunDir, method: str, phases: list, n_groups: int, group_name) -> tuple[list, list[int]]:
    """A generative method's synthetic shards and their kept rows per group; none where no
    phase reads them (a baseline, or train.pretrain_epochs=0)."""
    if not (get_method(method).uses_synthetic and any(p.dataset == SYNTHETIC for p in phases)):
        return [], [0] * n_groups
    directory = synthetic_dir(run, method)
    shards = shard_paths(run, method)
    if not shards:
        raise FairsynthError(
            f"no synthetic shards in {directory}; run `python jobs/full.py --set 'methods=[{method}]'` "
            "first (or set train.pretrain_epochs=0)"
        )
    counts = train_data.kept_synthetic_counts(shards, n_groups)
    if sum(counts) == 0:
        raise FairsynthError(
            f"{directory} has no kept synthetic images; re-run the filter stage with a larger "
            f"filter.keep_fraction (`python jobs/full.py --set 'methods=[{method}]' --set filter.keep_fraction=...`)"
        )
    empty = [group_name(g) for g, c in enumerate(counts) if c == 0]
    if empty:
        log.warning("%s: no kept synthetic images for group(s): %s", method, "; ".join(empty))
    return shards, counts


def _training_datasets(t, phases: list, real_base, train_counts: list[int], shards: list, synthetic_counts: list[int]) -> dict:
    """The Ray Data view each of a method's phases iterates, by ``Phase.view`` (its dataset,
    sampled as it is or group-balanced). Every method gets views of its own (each counts its epochs from the first, for seeded
    order, resampling and augmentation); ``real_base()`` gives the decoded real split they share."""
    datasets = {}
    for phase in phases:
        if phase.view in datasets:
            continue
        if phase.dataset == REAL:
            base = real_base()
            counts = train_counts
        else:
            base = retry_node_loss(  # its listing of the shards fails whole with a node
                "reading the synthetic shards", train_data.synthetic_images,
                shards, t.image_size, t.cache_decoded, sum(synthetic_counts), t.num_workers, t.seed
            )
            counts = synthetic_counts
        weights = train_data.balanced_weights(counts) if phase.balanced else None
        datasets[phase.view] = train_data.training_view(
            base, image_size=t.image_size, augment=t.augment, weights=weights, seed=t.seed
        )
    return datasets


def epoch_progress(epochs: int, desc: str):
    """A Ray Train callback drawing one bar (with an ETA) over a fit's epochs, every method's
    together. It runs in Train's controller actor, so the bar is Ray's tqdm, which the
    driver's console draws."""
    from ray.train import UserCallback

    class EpochProgress(UserCallback):
        def __init__(self):
            self.bar = None

        def after_report(self, run_context, metrics, checkpoint):
            from ray.experimental import tqdm_ray

            if self.bar is None:
                self.bar = tqdm_ray.tqdm(total=epochs, desc=desc, unit="epoch")
            # Epochs count from 0; a fit restored from a checkpoint starts past its first.
            self.bar.update(int(metrics[0].get("fit_epoch", 0)) + 1 - self.bar.n)
            if self.bar.n >= epochs:
                self.bar.close()

    return EpochProgress()


def _trainer(t, loop_config: dict, datasets: dict, storage_path: str, name: str, epochs: int, desc: str):
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchTrainer

    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=t.max_failures),
            # The latest two checkpoints: a run resumes from the latest, and each carries its
            # method's best epoch so far (engine.stages.train.loop), so none is kept for its score.
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=[epoch_progress(epochs, desc)],
            # Train logs each checkpoint it persists at INFO; its own level follows ray.log_level.
            logging_config=LoggingConfig(log_level=loop_config["log_level"]),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split="all", execution_options=_ordered_ingest()),
    )


def _stage_metrics(method: str, final: dict, t, phases: list, dataset, train_counts: list[int],
                   synthetic_counts: list[int], checkpoint_dir: str, seconds: float) -> dict:
    """metrics.json: the final evaluation, the epochs' history, and what the run trained on."""
    uses_synthetic = get_method(method).uses_synthetic
    history = final["history"]
    trained = [h for h in history if h.get("images_per_second")]
    return {
        "method": method,
        "val": final["val"],
        "test": final["test"],
        "synthetic_only": _synthetic_only(final, phases),
        "best_epoch": final["best_epoch"],
        "epochs": [{k: v for k, v in h.items() if not _is_nan(v)} for h in history],
        "synthetic_images": int(sum(synthetic_counts)) if uses_synthetic else 0,
        "synthetic_group_counts": synthetic_counts if uses_synthetic else None,
        "train_group_counts": train_counts,
        "group_names": [dataset.group_name(g) for g in range(dataset.n_groups)],
        "phases": [dataclasses.asdict(p) for p in phases],
        "backbone": t.backbone,
        "num_workers": t.num_workers,
        "images_per_second": (
            sum(h["images_per_second"] * h["epoch_seconds"] for h in trained) / sum(h["epoch_seconds"] for h in trained)
            if trained
            else None
        ),
        "checkpoint_dir": checkpoint_dir,
        "stage_seconds": seconds,
    }


def _synthetic_only(final: dict, phases: list) -> dict | None:
    """val and test figures of the classifier trained on synthetic images alone: the end of
    stage 1 (the loop scores it there), or the final model when nothing follows stage 1."""
    if phases and phases[-1].dataset == SYNTHETIC:
        return {"val": final["val"], "test": final["test"]}
    return next((h["synthetic_only"] for h in final["history"] if "synthetic_only" in h), None)


@dataclasses.dataclass
class MethodInputs:
    """What one method trains on, checked in the driver before any worker starts."""

    method: str
    phases: list
    shards: list
    synthetic_counts: list[int]


def _method_inputs(cfg: Config, run: RunDir, methods: list[str], dataset) -> list[MethodInputs]:
    inputs = []
    for method in methods:
        phases = get_method(method).phases(cfg.train.for_method(method))
        shards, counts = _synthetic_inputs(run, method, phases, dataset.n_groups, dataset.group_name)
        inputs.append(MethodInputs(method, phases, shards, counts))
    return inputs


def _fit_datasets(t, run: RunDir, inputs: list[MethodInputs], records, train_counts: list[int]) -> tuple[dict, list[dict]]:
    """Every method's datasets, named "<method>.<train|synthetic>" in the fit, and each
    method's job for the loop (its name, its datasets' names, its TensorBoard folder)."""
    # Decoded once, on first use, for every method that reads it.
    real_split = functools.cache(lambda: train_data.real_images(
        records[records["split"] == "train"], t.image_size, t.cache_decoded, t.num_workers, t.seed
    ))
    datasets, jobs = {}, []
    for item in inputs:
        views = _training_datasets(t, item.phases, real_split, train_counts, item.shards, item.synthetic_counts)
        # A dataset's name becomes part of a log path: no slash in it.
        names = {kind: f"{item.method}.{kind}" for kind in views}
        datasets.update({names[kind]: view for kind, view in views.items()})
        jobs.append({"method": item.method, "datasets": names,
                     "tensorboard_dir": storage.uri(run / f"{stage_name(item.method)}/tensorboard")})
    return datasets, jobs


def train_complete(cfg: Config, run: RunDir, method: str, key: str | None = None) -> bool:
    key = key or train_hash(cfg, run, method)
    return run.is_complete(stage_name(method), key) and (run / f"{stage_name(method)}/metrics.json").exists()


def run_train_stage(cfg: Config, run: RunDir, method: str) -> dict:
    """Train ``method`` on the run's data; returns (and writes) RUN/train/<method>/metrics.json."""
    return run_train_stages(cfg, run, [method])[method]


def run_train_stages(cfg: Config, run: RunDir, methods: list[str]) -> dict[str, dict]:
    """Train every one of ``methods`` not yet complete, in one fit; returns (and writes) each
    method's RUN/train/<method>/metrics.json, by method. A method's ``stage_seconds`` is its
    own epochs and evaluation plus an equal share of what the fit's methods share (inputs,
    worker start)."""
    # Each method's key, read once: the one it is checked, trained and marked under.
    keys = {m: train_hash(cfg, run, m) for m in methods}
    done = {m: read_json(run / f"{stage_name(m)}/metrics.json") for m in methods if train_complete(cfg, run, m, keys[m])}
    for method in done:
        log.info("%s: complete, skipping", stage_name(method))
    pending = [m for m in methods if m not in done]
    if not pending:
        return done
    started = time.perf_counter()
    dataset = load_run_dataset(run)
    train_counts = dataset.group_counts("train")
    _check_backbone(cfg, dataset.n_classes)
    if sum(train_counts) == 0:
        raise FairsynthError(f"{run / 'data/records.parquet'} has no training images; re-run the data stage")
    inputs = _method_inputs(cfg, run, pending, dataset)
    storage_path, name = _storage(cfg, run, {m: keys[m] for m in pending})
    checkpoint_dir = f"{storage_path.rstrip('/')}/{name}"
    # The checkpoint a resumed fit starts from is checked here, in one line, before a worker loads it.
    _latest_checkpoint_state(checkpoint_dir)

    init_ray(cfg.ray)
    # 'auto' workers and model.device=cpu resolve here, against the cluster the job reached.
    t = cfg.train.model_copy(update={"num_workers": train_workers(cfg), "use_gpu": use_gpu(cfg)})
    # At least a block per worker: each streams its share of val and test (engine.stages.train.loop).
    eval_refs = {s: train_data.eval_split_refs(dataset.split(s), t.image_size, t.num_workers) for s in ("val", "test")}
    datasets, jobs = _fit_datasets(t, run, inputs, dataset.records, train_counts)
    loop_config = {
        "train": t,
        "methods": jobs,
        "n_groups": dataset.n_groups,
        "n_classes": dataset.n_classes,
        "train_group_counts": train_counts,
        "eval_refs": eval_refs,
        "log_level": cfg.ray.log_level,
        "failure_marker": str(Path(storage_path) / name / "injected_failure") if "://" not in storage_path else None,
    }
    epochs = sum(p.epochs for item in inputs for p in item.phases)
    trainer = _trainer(t, loop_config, datasets, storage_path, name, epochs, f"train {', '.join(pending)}")
    for item in inputs:
        log.info("%s: training %s on %d worker(s)", stage_name(item.method),
                 " -> ".join(f"{p.name}({p.epochs} epochs, {p.objective(t)})" for p in item.phases), t.num_workers)
    log.info("train: inputs of %d method(s) ready after %.1f s", len(pending), time.perf_counter() - started)
    fit_started_at = time.time()

    def save(finals: dict) -> None:
        """metrics.json and the completion marker of every method in ``finals``. A result that
        started before this fit was restored from an earlier job's checkpoint and keeps its
        own seconds; the methods trained now share the rest of the wall time."""
        fresh = [m for m in finals if finals[m].get("started_at", 0.0) >= fit_started_at]
        own = sum(finals[m]["seconds"] for m in fresh)
        shared = max(0.0, time.perf_counter() - started - own) / max(len(fresh), 1)
        for item in inputs:
            if item.method not in finals:
                continue
            final = finals[item.method]
            seconds = final["seconds"] + (shared if item.method in fresh else 0.0)
            metrics = _stage_metrics(item.method, final, t, item.phases, dataset, train_counts,
                                     item.synthetic_counts, checkpoint_dir, seconds)
            atomic_write_json(run / f"{stage_name(item.method)}/metrics.json", metrics)
            run.mark_complete(stage_name(item.method), keys[item.method])
            log.info(
                "%s: test worst-group %.3f, average-group %.3f (best epoch %d, %.0f s)", stage_name(item.method),
                metrics["test"]["worst_group"], metrics["test"]["average_group"], metrics["best_epoch"],
                metrics["stage_seconds"],
            )
            done[item.method] = metrics

    try:
        with ray_prints():  # what Ray Train prints around the fit goes to the run's log
            result = trainer.fit()
    except BaseException:
        # The methods the fit finished before it failed are kept, so a re-run (with the same
        # methods or fewer) trains only what is left.
        save(_finished_in_latest_checkpoint(checkpoint_dir))
        raise
    finals = result.return_value or {}
    missing = [m for m in pending if m not in finals]
    if missing:
        save(finals)
        raise RuntimeError(f"train: the loop ended without the final evaluation of {', '.join(missing)} ({result.error})")
    save(finals)
    return {m: done[m] for m in methods}


CHECKPOINT_FOLDER = re.compile(r"checkpoint_\d{4}-\d{2}-\d{2}_[\d.-]+")


def _latest_checkpoint_state(experiment: str) -> dict | None:
    """The state in an experiment's latest checkpoint (checkpoint folders sort by their time
    stamps), or None when it has none; FairsynthError when that state is not one of ours."""
    folder = storage.as_path(experiment)
    # checkpoint_<time stamp> folders only: Train also keeps checkpoint_manager_snapshot.json here.
    checkpoints = sorted(p for p in folder.iterdir() if CHECKPOINT_FOLDER.fullmatch(p.name)) if folder.exists() else []
    if not checkpoints:
        return None
    return read_checkpoint_state((checkpoints[-1] / STATE_FILE).read_bytes(), str(checkpoints[-1] / STATE_FILE))


def _finished_in_latest_checkpoint(experiment: str) -> dict:
    """The finished methods' results in an experiment's latest checkpoint; none if it has no
    readable one (a failure before the first epoch ended)."""
    try:
        state = _latest_checkpoint_state(experiment) or {}
        return dict(state.get("finished", {}))
    except Exception as exc:  # saving what finished is a courtesy on the way to re-raising
        log.warning("train: could not read the finished methods from %s (%s: %s)", experiment, type(exc).__name__, exc)
        return {}


def _is_nan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)
