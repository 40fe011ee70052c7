"""The train stage: build the Ray Data inputs, fit a TorchTrainer for one method, and write
RUN/train/<method>/metrics.json.

Ray Train keeps its checkpoints under ``ray.storage_path`` (default
RUN/train/<method>/ray), in an experiment named after the method and the config it trains
with; a re-run after an interruption picks up that experiment's latest checkpoint, and a
run whose completion marker matches is skipped.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

from engine import storage
from engine.config import Config
from engine.data.stage import load_run_dataset
from engine.errors import FairsynthError
from engine.generate.shards import shard_paths, synthetic_dir
from engine.raylib import init_ray
from engine.resources import train_workers, use_gpu
from engine.runs import RunDir, atomic_write_json, read_json
from engine.train import data as train_data
from engine.train.backbones import build_classifier
from engine.train.loop import SCORE, train_loop
from engine.train.methods import REAL, SYNTHETIC, get_method

log = logging.getLogger(__name__)

# What a generative method's synthetic images depend on, besides the data.
UPSTREAM_SECTIONS = ("model", "cluster", "finetune", "generate", "filter")


def stage_name(method: str) -> str:
    return f"train/{method}"


def train_hash(cfg: Config, method: str) -> str:
    sections = ["data", "train", "seed"]
    if get_method(method).uses_synthetic:
        sections += list(UPSTREAM_SECTIONS)
    return cfg.slice_hash(*sections)


def _storage(cfg: Config, run: RunDir, method: str) -> tuple[str, str]:
    name = f"{method}-{train_hash(cfg, method)}"
    if cfg.ray.storage_path:
        return cfg.ray.storage_path, name
    # A URI (s3://...) goes to Ray Train as it is; it opens it with pyarrow.fs on every node.
    return storage.uri(run / f"train/{method}/ray"), name


def _ordered_ingest():
    """Train's default ingest options, in order: each worker's split then gets the same rows
    in the same order every run (the splitter ignores locality and deals blocks by a fixed
    rule), which reproducible metrics need."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


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
            f"no synthetic shards in {directory}; run jobs/generate.py and jobs/filter.py "
            f"--method {method} first (or set train.pretrain_epochs=0)"
        )
    counts = train_data.kept_synthetic_counts(shards, n_groups)
    if sum(counts) == 0:
        raise FairsynthError(
            f"{directory} has no kept synthetic images; re-run jobs/filter.py --method {method} "
            "with a larger filter.keep_fraction"
        )
    empty = [group_name(g) for g, c in enumerate(counts) if c == 0]
    if empty:
        log.warning("%s: no kept synthetic images for group(s): %s", method, "; ".join(empty))
    return shards, counts


def _training_datasets(t, phases: list, records, train_counts: list[int], shards: list, synthetic_counts: list[int]) -> dict:
    """The Ray Data dataset each phase iterates, by name (REAL or SYNTHETIC), built once."""
    datasets = {}
    for phase in phases:
        if phase.dataset in datasets:
            continue
        if phase.dataset == REAL:
            base = train_data.real_images(
                records[records["split"] == "train"], t.image_size, t.cache_decoded, t.num_workers, t.seed
            )
            counts = train_counts
        else:
            base = train_data.synthetic_images(
                shards, t.image_size, t.cache_decoded, sum(synthetic_counts), t.num_workers, t.seed
            )
            counts = synthetic_counts
        weights = train_data.balanced_weights(counts) if phase.balanced else None
        datasets[phase.dataset] = train_data.training_view(
            base, image_size=t.image_size, augment=t.augment, weights=weights, seed=t.seed
        )
    return datasets


def epoch_progress(epochs: int, desc: str):
    """A Ray Train callback drawing one bar (with an ETA) over a fit's epochs. It runs in
    Train's controller actor, so the bar is Ray's tqdm, which the driver's console draws."""
    from ray.train import UserCallback

    class EpochProgress(UserCallback):
        def __init__(self):
            self.bar = None

        def after_report(self, run_context, metrics, checkpoint):
            from ray.experimental import tqdm_ray

            if self.bar is None:
                self.bar = tqdm_ray.tqdm(total=epochs, desc=desc, unit="epoch")
            # Epochs count from 0; a fit restored from a checkpoint starts past its first.
            self.bar.update(int(metrics[0].get("epoch", 0)) + 1 - self.bar.n)
            if self.bar.n >= epochs:
                self.bar.close()

    return EpochProgress()


def _trainer(t, loop_config: dict, datasets: dict, storage_path: str, name: str, epochs: int):
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
            checkpoint_config=CheckpointConfig(
                # The best-scoring checkpoint and the latest (to resume from) are kept.
                num_to_keep=2,
                checkpoint_score_attribute=SCORE,
                checkpoint_score_order="max",
            ),
            callbacks=[epoch_progress(epochs, f"train {name.split('-')[0]}")],
            # Train logs each checkpoint it persists at INFO; its own level follows ray.log_level.
            logging_config=LoggingConfig(log_level=loop_config["log_level"]),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split="all", execution_options=_ordered_ingest()),
    )


def _stage_metrics(method: str, final: dict, t, phases: list, dataset, train_counts: list[int],
                   synthetic_counts: list[int], checkpoint_dir: str, started: float) -> dict:
    """metrics.json: the final evaluation, the epochs' history, and what the run trained on."""
    uses_synthetic = get_method(method).uses_synthetic
    history = final["history"]
    trained = [h for h in history if h.get("images_per_second")]
    return {
        "method": method,
        "val": final["val"],
        "test": final["test"],
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
        "stage_seconds": time.perf_counter() - started,
    }


def run_train_stage(cfg: Config, run: RunDir, method: str) -> dict:
    """Train ``method`` on the run's data; returns (and writes) RUN/train/<method>/metrics.json."""
    stage = stage_name(method)
    metrics_path = run / f"{stage}/metrics.json"
    digest = train_hash(cfg, method)
    if run.is_complete(stage, digest) and metrics_path.exists():
        log.info("%s: complete, skipping", stage)
        return read_json(metrics_path)
    started = time.perf_counter()
    phases = get_method(method).phases(cfg.train)
    dataset = load_run_dataset(run)
    train_counts = dataset.group_counts("train")
    _check_backbone(cfg, dataset.n_classes)
    if sum(train_counts) == 0:
        raise FairsynthError(f"{run / 'data/records.parquet'} has no training images; re-run the data stage")
    shards, synthetic_counts = _synthetic_inputs(run, method, phases, dataset.n_groups, dataset.group_name)

    init_ray(cfg.ray)
    # 'auto' workers and model.device=cpu resolve here, against the cluster the job reached.
    t = cfg.train.model_copy(update={"num_workers": train_workers(cfg), "use_gpu": use_gpu(cfg)})
    # At least a block per worker: each streams its share of val and test (engine.train.loop).
    eval_refs = {s: train_data.eval_split_refs(dataset.split(s), t.image_size, t.num_workers) for s in ("val", "test")}
    datasets = _training_datasets(t, phases, dataset.records, train_counts, shards, synthetic_counts)
    storage_path, name = _storage(cfg, run, method)
    loop_config = {
        "train": t,
        "method": method,
        "n_groups": dataset.n_groups,
        "n_classes": dataset.n_classes,
        "train_group_counts": train_counts,
        "eval_refs": eval_refs,
        "tensorboard_dir": storage.uri(run / f"{stage}/tensorboard"),
        "log_level": cfg.ray.log_level,
        "failure_marker": str(Path(storage_path) / name / "injected_failure") if "://" not in storage_path else None,
    }
    trainer = _trainer(t, loop_config, datasets, storage_path, name, sum(p.epochs for p in phases))
    log.info("%s: training %s on %d worker(s)", stage, " -> ".join(f"{p.name}({p.epochs} epochs, {p.objective(t)})" for p in phases), t.num_workers)
    log.info("%s: inputs ready after %.1f s", stage, time.perf_counter() - started)
    result = trainer.fit()
    if not result.return_value:
        raise RuntimeError(f"{stage}: the train loop ended without its final evaluation ({result.error})")
    metrics = _stage_metrics(method, result.return_value, t, phases, dataset, train_counts, synthetic_counts,
                             f"{storage_path.rstrip('/')}/{name}", started)
    atomic_write_json(metrics_path, metrics)
    run.mark_complete(stage, digest)
    log.info(
        "%s: test worst-group %.3f, average-group %.3f (best epoch %d, %.0f s)",
        stage, metrics["test"]["worst_group"], metrics["test"]["average_group"], metrics["best_epoch"], metrics["stage_seconds"],
    )
    return metrics


def _is_nan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)
