"""The oracle's training set (built-in benchmark only): real, group-balanced renders.

A generative method pretrains its classifier on kept synthetic images; the oracle pretrains
the same classifier, the same way, on the same number of real images per group, drawn fresh
by the benchmark's own renderer. It is the ceiling a perfect generator would reach, and the
gap between it and the best real-data method is what the synthetic images can close. Its
shards take the synthetic layout (``engine.stages.generate.shards``), every row kept, so the train
stage reads them as it reads a generative method's.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pyarrow as pa

from engine.config import Config
from engine.errors import FairsynthError
from engine.runs import RunDir
from engine.stages import stage_key
from engine.stages.data import builtin
from engine.stages.data.stage import data_hash, load_run_dataset
from engine.stages.filter.stage import keep_count
from engine.stages.generate.shards import (
    encode_png,
    remove_stale_shards,
    synthetic_dir,
    write_shard_table,
)

log = logging.getLogger(__name__)

ORACLE = "oracle"
STAGE = "oracle"


def oracle_hash(cfg: Config) -> str:
    """The oracle set depends on the data (and its seed) and on the size of a kept synthetic set."""
    return stage_key(cfg, STAGE, data=data_hash(cfg))


def images_per_group(cfg: Config, train_counts: list[int]) -> int:
    """As many images per group as a generative method keeps after filtering."""
    planned = cfg.generate.images_per_group
    generated = max(train_counts) if planned == "fill" else planned
    return keep_count(generated, cfg.filter.keep_fraction)


def draw_oracle_rows(cfg: Config, dataset, per_group: int) -> pd.DataFrame:
    """``per_group`` fresh renders of every group, none of them an image of the dataset."""
    if cfg.data.name != "builtin":
        raise FairsynthError("methods: 'oracle' needs data.name=builtin (it draws real images with the "
                             "built-in renderer); remove it from methods")
    taken = {int(source.split("/")[4]) for source in dataset.records["source"]}  # builtin://obj/bg/seed/...
    rng = np.random.default_rng([cfg.seed, 0x0AC1E])
    rows = []
    for group in range(dataset.n_groups):
        label, attribute = divmod(group, dataset.n_attributes)
        objects, backgrounds = builtin.OBJECT_SUBTYPES[label], builtin.BACKGROUND_SUBTYPES[attribute]
        drawn = 0
        while drawn < per_group:
            obj, bg = objects[rng.integers(len(objects))], backgrounds[rng.integers(len(backgrounds))]
            seed = int(rng.integers(0, 2**31 - 1))
            if seed in taken:
                continue
            taken.add(seed)
            image = builtin.render(obj, bg, seed, "benchmark", cfg.data.image_size, cfg.data.builtin.rendering)
            rows.append({"image": encode_png(image), "label": label, "attribute": attribute, "group": group,
                         "unit": f"g{group}", "cluster": -1, "seed": seed, "prompt": "", "negative_prompt": "",
                         "method": ORACLE, "base_model": f"builtin renderer ({cfg.data.builtin.rendering})",
                         "score": float("nan"), "kept": True})
            drawn += 1
    return pd.DataFrame(rows)


def run_oracle_stage(cfg: Config, run: RunDir) -> int:
    """Write ``RUN/synthetic/oracle`` (skipped when complete); returns its image count."""
    key = oracle_hash(cfg)
    if run.is_complete(STAGE, key):
        log.info("oracle: complete, skipping")
        return int(run.read_marker(STAGE).get("images", 0))
    dataset = load_run_dataset(run)
    per_group = images_per_group(cfg, dataset.group_counts("train"))
    rows = draw_oracle_rows(cfg, dataset, per_group)
    out = synthetic_dir(run, ORACLE)
    size = cfg.generate.rows_per_shard
    names = set()
    for index, start in enumerate(range(0, len(rows), size)):
        name = f"part-{key[:12]}-{index:05d}.parquet"
        write_shard_table(out / name, pa.Table.from_pandas(rows.iloc[start:start + size], preserve_index=False))
        names.add(name)
    remove_stale_shards(out, keep=names)
    run.mark_complete(STAGE, key, images=len(rows), kept_hash=key)
    log.info("oracle: %d real renders, %d per group", len(rows), per_group)
    return len(rows)
