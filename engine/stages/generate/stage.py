"""The generate stage: a group-balanced plan streamed through Ray Data sampler actors into shards.

``from_pandas(plan shards)`` -> ``map_batches(SyntheticImageSampler, ActorPoolStrategy)`` ->
``map_batches(write_shards)``; the driver only counts finished shards for the progress bar.
One plan shard is one block, and block shaping is off for this pipeline, so a shard reaches
its writer whole. Shards already on disk are not planned again: a re-run after a crash, or a
node lost mid-way, writes only what is missing, and never a row twice. Samplers and writers
get the run's URI (engine.storage), never a driver-local path: on several nodes the run
directory is on object storage (s3://...) or a mount every node shares.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from tqdm.auto import tqdm

from engine import storage
from engine.cards import current_filter_summary, write_dataset_card
from engine.config import Config
from engine.errors import FairsynthError
from engine.runs import RunDir, atomic_write_json, read_json
from engine.stages.data.stage import load_run_dataset
from engine.stages.generate.plan import GroupBalancedPlan
from engine.stages.generate.shards import (
    TIMING_COLUMNS,
    remove_damaged_shards,
    remove_partial_shards,
    remove_stale_shards,
    shard_row_counts,
    synthetic_dir,
    write_shards,
)

log = logging.getLogger(__name__)

# A writer task only serialises Parquet; a sliver of a CPU leaves the rest to the samplers.
WRITER_NUM_CPUS = 0.25


def generate_stage_name(method: str) -> str:
    return f"synthetic/{method}"


def build_plan(cfg: Config, run: RunDir, method: str) -> GroupBalancedPlan:
    """The plan of a method's synthetic set, from its finetune manifest and the real data."""
    from engine.stages.finetune.stage import manifest_path  # imported here: it brings torch

    path = manifest_path(run, method)
    if not path.exists():
        raise FairsynthError(
            f"missing {path}: run `python jobs/finetune.py --method {method} --run-dir {run.root}` first"
        )
    manifest = read_json(path)
    if manifest.get("base_model") and manifest["base_model"] != cfg.model.base:
        raise FairsynthError(
            f"{path} was fine-tuned from {manifest['base_model']!r} but model.base is {cfg.model.base!r}; "
            "re-run the finetune stage or use the same model.base"
        )
    manifest = {**manifest, "base_model": cfg.model.base}
    dataset = load_run_dataset(run)
    return GroupBalancedPlan.build(manifest, dataset.group_counts("train"), cfg)


def run_generate_stage(cfg: Config, run: RunDir, method: str) -> dict:
    """Write ``RUN/synthetic/<method>/*.parquet``, its dataset card (README.md) and
    ``RUN/grids/<method>.png``; return a summary.

    Skipped when complete for the same plan. The completion marker holds the plan hash, the
    stage's key (engine/stages/__init__.py) over the plan's rows: the manifest's units and artifacts,
    the per-group counts, seeds, prompts, and the generate fields that change the images, not
    resources (actors, batch size, devices).
    """
    from engine.stages.generate.grids import write_sample_grid

    stage = generate_stage_name(method)
    plan = build_plan(cfg, run, method)
    out_dir = synthetic_dir(run, method)
    summary_path = out_dir / "_summary.json"
    expected = plan.shard_sizes()
    if run.is_complete(stage, plan.hash) and summary_path.exists():
        present = {p.name for p in out_dir.glob("part-*.parquet")}
        if present == set(expected) and not remove_damaged_shards(out_dir, expected):
            log.info("generate %s: complete (plan %s), skipped", method, plan.hash)
            return read_json(summary_path)

    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_shards(out_dir, set(expected))
    remove_partial_shards(out_dir)
    remove_damaged_shards(out_dir, expected)
    missing = [name for name in plan.shard_names if not (out_dir / name).exists()]
    log.info(
        "generate %s: plan %s, %d images in %d shards, %d shards to write",
        method, plan.hash, len(plan.rows), plan.n_shards, len(missing),
    )
    timing = {}
    if missing:
        _refuse_damaged_units(run, method)
        # New rows invalidate any earlier filtering: it ranks every image of a group together.
        run.clear_marker(f"filter/{method}")
        timing = _generate_shards(cfg, run, plan, missing)
        # Every writer has finished; one on a lost node may have left its temporary file.
        remove_partial_shards(out_dir)

    counts = shard_row_counts(sorted(out_dir.glob("part-*.parquet")))
    wrong = {n: c for n, c in counts.items() if expected.get(n) != c}
    absent = set(expected) - set(counts)
    if wrong or absent:
        name = next(iter(wrong or absent))
        raise FairsynthError(
            f"synthetic shard {out_dir / name} is missing or has the wrong row count; delete it and re-run generate"
        )
    write_sample_grid(run, method)
    summary = {
        "method": method,
        "plan_hash": plan.hash,
        "base_model": plan.base_model,
        "images": int(len(plan.rows)),
        "per_group": {str(g): n for g, n in plan.per_group.items()},
        "per_unit": {str(k): int(v) for k, v in plan.rows["unit"].value_counts().sort_index().items()},
        "shards": plan.n_shards,
        "shards_written": len(missing),
        "sampling": plan.sampling,
        "stage_seconds": round(time.perf_counter() - started, 2),
        **timing,
    }
    atomic_write_json(summary_path, summary)
    write_dataset_card(run, method, current_filter_summary(run, method))
    run.mark_complete(stage, plan.hash, images=summary["images"])
    return summary


def _refuse_damaged_units(run: RunDir, method: str) -> None:
    """No image is drawn from a unit artifact that differs from the one fine-tuning wrote."""
    from engine.stages.finetune.stage import damaged_units, manifest_path

    damaged = damaged_units(run, read_json(manifest_path(run, method)))
    if damaged:
        folder, problem = damaged[0]
        raise FairsynthError(
            f"unit artifact {folder} is damaged ({problem}); re-run the finetune stage "
            f"(jobs/finetune.py --method {method}, or the whole job), which trains it again"
        )


def _generate_shards(cfg: Config, run: RunDir, plan: GroupBalancedPlan, missing: list[str]) -> dict:
    """Run the pipeline over the missing shards; returns when shards landed (for throughput)."""
    import ray
    from ray.data import DataContext

    from engine.raylib import init_ray
    from engine.resources import actor_resources
    from engine.stages.generate.sampler import SyntheticImageSampler

    init_ray(cfg.ray)
    sizes = plan.shard_sizes()
    todo = plan.shards(only=set(missing))
    total = sum(len(s) for s in todo)
    # One call samples one whole shard (the sampler batches the UNet itself). Every shard but
    # the plan's last holds exactly rows_per_shard rows and the last one comes last, so batches
    # of that size never straddle two shards; Ray Data needs the explicit size to place GPUs.
    resources = replace(actor_resources(cfg, "generate", work=len(todo)), batch_size=plan.rows_per_shard)
    log.info("generate %s: %s", plan.method, resources.describe())
    context = DataContext.get_current()
    saved = context.target_max_block_size, context.enable_progress_bars
    # No block shaping: a sampler's output block is exactly the shard it was given, never
    # sliced or merged across a shard boundary, so each writer call sees whole shards.
    context.target_max_block_size = None
    context.enable_progress_bars = False  # our own bar counts images per second
    try:
        ds = ray.data.from_pandas(todo)
        ds = ds.map_batches(
            SyntheticImageSampler,
            fn_constructor_kwargs={
                "config": cfg.model_dump(mode="json"),
                "run_root": run.uri,  # never a driver-local path: actors may run on any node
                "method": plan.method,
                "base_model": plan.base_model,
            },
            batch_format="pandas",
            **resources.map_batches_kwargs(),
        )
        ds = ds.map_batches(
            write_shards,
            fn_kwargs={"out_dir": storage.uri(synthetic_dir(run, plan.method)), "expected_rows": sizes},
            batch_size=None,
            batch_format="pandas",
            num_cpus=WRITER_NUM_CPUS,
        )
        started = time.time()
        landed = []  # (wall clock when written, when its sampling started, rows) per shard
        worker_seconds = dict.fromkeys((*TIMING_COLUMNS, "write_seconds"), 0.0)
        with tqdm(total=total, unit="img", desc=f"generate {plan.method}", smoothing=0.1) as bar:
            for row in ds.iter_rows():
                landed.append((time.time(), float(row["sampling_started"]), int(row["rows"])))
                for name in worker_seconds:
                    worker_seconds[name] += float(row[name])
                bar.update(int(row["rows"]))
    finally:
        context.target_max_block_size, context.enable_progress_bars = saved
    timing = sampling_timing(started, landed)
    timing.update({name: round(value, 3) for name, value in worker_seconds.items()})
    timing["max_actors"] = resources.max_actors  # the pool's bound, as resolved for this cluster
    return timing


def sampling_timing(started: float, landed: list[tuple[float, float, int]]) -> dict:
    """How long the pipeline ran, how long before a sampler began (actor start and model load),
    and the rate after that: every image over the time from the first sampler call to the last
    shard written (scheduling, transfers and writes included)."""
    if not landed:
        return {}
    first_call = min(s for _, s, _ in landed)
    last_written = max(w for w, _, _ in landed)
    images = sum(n for _, _, n in landed)
    return {
        "pipeline_seconds": round(last_written - started, 3),
        "sampler_start_seconds": round(first_call - started, 3),
        "images_per_second_after_start": round(images / max(last_written - first_call, 1e-9), 3),
    }
