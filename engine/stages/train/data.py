"""Ray Data pipelines that feed the classifier: real records and synthetic Parquet shards in,
decoded (and, for training, resampled and augmented) image batches out.

Every dataset yields rows of ``image`` (uint8 [H, W, 3]), ``label`` and ``group``; val and
test are decoded once and handed to the workers as object refs to their blocks
(``eval_split_refs``), which each worker streams. Decoding
(rendering a builtin:// source, reading a file, or decoding a synthetic row's PNG bytes) runs
once in ``map_batches`` tasks; with ``train.cache_decoded`` the decoded images are kept in
the object store (which spills to disk when full), so later epochs only resample and
augment. Training views re-run their random steps every epoch: random crops and flips, and
for group-balanced sampling each row is repeated floor(w_g) times plus once more with
probability frac(w_g), where w_g = (rows / groups present) / n_g, so every group is drawn
equally often in expectation and an epoch keeps the size of the training set (the
reference's sampling with replacement, done per block so it streams).

Reproducible: the same config and seed give the same batches, so the same metrics. Every
pipeline runs with Ray Data's ``preserve_order`` (blocks leave each operator in input order,
and the train stage's streaming split, ignoring locality, deals them to the workers by a
fixed rule), and every random step is seeded: the record order, the synthetic shuffle, the
block order (a ``RandomSeedConfig`` reseeded per execution, i.e. per epoch), and the
resampling and augmentation, which read a per-row ``draw`` column from Ray Data's seeded
``random()`` expression, also reseeded per epoch. Per-row draws make a row's fate a
function of the seed and the epoch, not of which task ran it or when.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pyarrow as pa

from engine import storage
from engine.errors import FairsynthError
from engine.stages.data.datasets import load_image
from engine.stages.generate.shards import decode_png

log = logging.getLogger(__name__)

SYNTHETIC_COLUMNS = ("image", "label", "group", "kept")
# The per-row uniform (Ray Data's seeded random() expression) that resampling and augmentation
# draw from; training_view adds it and drops it again.
DRAW = "draw"
# Decoded bytes per block. Every epoch re-runs one augmentation task per block, and on a
# small machine the fixed cost of a task, not the pixels, dominates: 1902 32-px images in 8
# blocks took 0.26 s an epoch, in 2 blocks 0.14 s, beside 1.6 s of training.
BLOCK_BYTES = 32 * 2**20
# A whole CPU per decode or augmentation task: half-CPU tasks ran twice as many worker
# processes on a 2-core machine, each costing seconds to start, for no faster epochs.
DATA_TASK_CPUS = 1.0


def decode_sources(batch: pd.DataFrame, image_size: int) -> dict:
    """Records (source, label, group) -> decoded images."""
    images = np.stack([load_image(s, image_size) for s in batch["source"]]) if len(batch) else np.zeros(
        (0, image_size, image_size, 3), np.uint8
    )
    return {
        "image": images,
        "label": batch["label"].to_numpy(np.int64),
        "group": batch["group"].to_numpy(np.int64),
    }


def decode_synthetic(batch: pd.DataFrame, image_size: int) -> dict:
    """Synthetic rows -> decoded images, kept rows only (the filter stage's choice)."""
    batch = batch[batch["kept"].astype(bool)]
    images = (
        np.stack([decode_png(b, image_size) for b in batch["image"]])
        if len(batch)
        else np.zeros((0, image_size, image_size, 3), np.uint8)
    )
    return {
        "image": images,
        "label": batch["label"].to_numpy(np.int64),
        "group": batch["group"].to_numpy(np.int64),
    }


def _uniforms(batch: dict) -> np.ndarray:
    """One uniform per row: the seeded ``draw`` column (training_view adds it), else fresh."""
    if DRAW in batch:
        return np.asarray(batch[DRAW], dtype=np.float64)
    return np.random.default_rng().random(len(batch["group"]))


def _batch_rng(batch: dict) -> np.random.Generator:
    """A generator seeded by the batch's draws: the same rows in the same epoch, the same numbers."""
    if DRAW not in batch:
        return np.random.default_rng()
    return np.random.default_rng(np.frombuffer(np.asarray(batch[DRAW], dtype=np.float64).tobytes(), np.uint32))


def resample_groups(batch: dict, weights: list[float]) -> dict:
    """Repeat each row floor(w) times, plus once with probability frac(w), w = its group's weight."""
    w = np.asarray(weights, dtype=np.float64)[batch["group"]]
    copies = np.floor(w).astype(np.int64) + (_uniforms(batch) < (w - np.floor(w)))
    index = np.repeat(np.arange(len(w)), copies)
    return {k: v[index] for k, v in batch.items()}


def _reflect_pad(images: np.ndarray, pad: int) -> np.ndarray:
    """np.pad(mode="reflect") on the two spatial axes, about ten times faster for small images."""
    n, h, w, c = images.shape
    out = np.empty((n, h + 2 * pad, w + 2 * pad, c), images.dtype)
    out[:, pad : pad + h, pad : pad + w] = images
    out[:, :pad, pad : pad + w] = images[:, pad:0:-1]
    out[:, pad + h :, pad : pad + w] = images[:, h - 2 : h - 2 - pad : -1]
    out[:, :, :pad] = out[:, :, 2 * pad : pad : -1]
    out[:, :, pad + w :] = out[:, :, pad + w - 2 : w - 2 : -1]
    return out


def augment_images(batch: dict, pad: int) -> dict:
    """Random crop after reflection padding, and random horizontal flip."""
    images = batch["image"]
    n, h, w, _ = images.shape
    if n == 0:
        return batch
    rng = _batch_rng(batch)
    padded = _reflect_pad(images, pad)
    dy = rng.integers(0, 2 * pad + 1, n)
    dx = rng.integers(0, 2 * pad + 1, n)
    flip = rng.random(n) < 0.5
    out = np.empty_like(images)
    # A slice per image beats one fancy-indexed gather over every pixel several times over.
    for i in range(n):
        crop = padded[i, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out[i] = crop[:, ::-1] if flip[i] else crop
    return {**batch, "image": out}


def balanced_weights(group_counts: list[int]) -> list[float]:
    """Per-group repeat weights that draw every present group equally often per epoch."""
    counts = np.asarray(group_counts, dtype=np.float64)
    present = counts > 0
    if not present.any():
        return [0.0] * len(group_counts)
    target = counts.sum() / present.sum()
    return [float(target / c) if c > 0 else 0.0 for c in counts]


def block_count(n_rows: int, image_size: int, min_blocks: int = 1) -> int:
    """Blocks for n decoded images: about BLOCK_BYTES each, at least one per worker."""
    by_size = -(-n_rows * image_size * image_size * 3 // BLOCK_BYTES)
    return max(1, min(n_rows, max(min_blocks, by_size)))


def real_images(records: pd.DataFrame, image_size: int, cache: bool, min_blocks: int = 1, seed: int = 0):
    """One split's records as a dataset of decoded images, in a seeded random order.

    Records come sorted by class and group, and each worker streams whole blocks: without
    the shuffle a worker could see a single class, and its BatchNorm statistics with it.
    """
    import ray

    if records.empty:
        raise FairsynthError("a split the train stage needs has no images; check the data stage's groups.json")
    order = np.random.default_rng(seed).permutation(len(records))
    plan = records[["source", "label", "group"]].iloc[order].reset_index(drop=True)
    blocks = block_count(len(plan), image_size, min_blocks)
    bounds = np.linspace(0, len(plan), blocks + 1).astype(int)
    parts = [plan.iloc[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    ds = ray.data.from_pandas(parts).map_batches(
        decode_sources, fn_kwargs={"image_size": image_size}, batch_format="pandas", num_cpus=DATA_TASK_CPUS
    )
    ordered(ds)
    return ds.materialize() if cache else ds


def eval_split_refs(records: pd.DataFrame, image_size: int, min_blocks: int = 1) -> list:
    """An evaluation split decoded once, as object refs to per-block column arrays of about
    BLOCK_BYTES, at least ``min_blocks`` (one per worker): each worker fetches its blocks one
    at a time, zero-copy from the object store, instead of re-running a pipeline per epoch."""
    return real_images(records, image_size, cache=True, min_blocks=min_blocks).to_numpy_refs()


def kept_synthetic_counts(files: list[storage.RunPath], n_groups: int) -> list[int]:
    """Kept synthetic rows per group, read from the small columns only."""
    counts = np.zeros(n_groups, dtype=np.int64)
    for file in files:
        try:
            schema = storage.parquet_file(file).schema_arrow
        except (OSError, pa.ArrowException) as exc:  # a truncated file: never trained on
            raise FairsynthError(
                f"synthetic shard {file} is damaged ({type(exc).__name__}); re-run the generate stage, "
                "which draws it again"
            ) from None
        missing = [c for c in SYNTHETIC_COLUMNS if c not in schema.names]
        if missing:
            raise FairsynthError(
                f"synthetic shard {file} has no column {missing[0]!r}; re-run the generate stage that wrote it"
            )
        table = storage.read_parquet(file, columns=["group", "kept"]).to_pandas()
        groups = table.loc[table["kept"].astype(bool), "group"].to_numpy(np.int64)
        if len(groups) and (groups.min() < 0 or groups.max() >= n_groups):
            raise FairsynthError(
                f"synthetic shard {file} has group ids outside 0..{n_groups - 1}; it belongs to another dataset"
            )
        counts += np.bincount(groups, minlength=n_groups)
    return [int(c) for c in counts]


def synthetic_images(
    files: list[storage.RunPath], image_size: int, cache: bool, n_rows: int, min_blocks: int = 1, seed: int = 0
):
    """The kept rows of a method's synthetic shards, decoded, in a seeded random order."""
    import ray

    # Read tasks open the shards on whichever node runs them: URIs with the run's filesystem.
    ds = ray.data.read_parquet(**storage.dataset_source(files)).select_columns(list(SYNTHETIC_COLUMNS)).map_batches(
        decode_synthetic, fn_kwargs={"image_size": image_size}, batch_format="pandas", num_cpus=DATA_TASK_CPUS
    )
    # Shards hold one unit (a group) each: shuffled once, every block mixes the groups (so
    # every worker sees them all), and a few large blocks save a task per shard every epoch.
    ds = ds.random_shuffle(seed=seed).repartition(block_count(n_rows, image_size, min_blocks))
    ordered(ds)
    return ds.materialize() if cache else ds


def ordered(ds):
    """Run ``ds`` (and every dataset derived from it, which shares its context) in order:
    blocks leave each operator as they entered it, so seeded steps see the same blocks."""
    ds.context.execution_options.preserve_order = True
    return ds


def training_view(ds, *, image_size: int, augment: bool, weights: list[float] | None, seed: int = 0):
    """What one training epoch iterates: blocks in random order, resampled, augmented, with
    every random step seeded from ``seed`` and the epoch (Ray Data's execution index)."""
    from ray.data import RandomSeedConfig
    from ray.data.expressions import random

    per_epoch = RandomSeedConfig(seed=seed, reseed_after_execution=True)
    ds = ordered(ds.randomize_block_order(seed=per_epoch))
    # Executed every epoch in every worker's split: progress bars there are only noise.
    ds.context.enable_progress_bars = False
    if weights is None and not augment:
        return ds
    ds = ds.with_column(DRAW, random(seed=seed, reseed_after_execution=True))
    if weights is not None:
        ds = ds.map_batches(resample_groups, fn_kwargs={"weights": weights}, batch_format="numpy", num_cpus=DATA_TASK_CPUS)
    if augment:
        pad = max(1, image_size // 8)
        ds = ds.map_batches(augment_images, fn_kwargs={"pad": pad}, batch_format="numpy", num_cpus=DATA_TASK_CPUS)
    return ds.drop_columns([DRAW])
