"""The data stage's outputs in the run directory, and how later stages read them back."""

from __future__ import annotations

import io

from engine import storage
from engine.config import Config
from engine.runs import RunDir, atomic_write_bytes, atomic_write_json, read_json
from engine.stages import stage_key
from engine.stages.data.datasets import GroupedDataset
from engine.stages.data.prepare import describe, load_dataset

STAGE = "data"


def data_hash(cfg: Config) -> str:
    return stage_key(cfg, STAGE)


def run_data_stage(cfg: Config, run: RunDir) -> GroupedDataset:
    """Write RUN/data/groups.json and RUN/data/records.parquet (skipped when complete)."""
    if run.is_complete(STAGE, data_hash(cfg)):
        return load_run_dataset(run)
    dataset = load_dataset(cfg.data, check_images=cfg.data.name != "builtin")
    buffer = io.BytesIO()
    dataset.records.to_parquet(buffer, index=False)
    atomic_write_bytes(run / "data/records.parquet", buffer.getvalue())
    summary = describe(dataset)
    summary["class_names"], summary["attribute_names"] = dataset.class_names, dataset.attribute_names
    atomic_write_json(run / "data/groups.json", summary)
    run.mark_complete(STAGE, data_hash(cfg))
    return dataset


def load_run_dataset(run: RunDir) -> GroupedDataset:
    """The dataset exactly as the data stage wrote it (after severity and image checks)."""
    summary = read_json(run / "data/groups.json")
    records = storage.read_parquet(run / "data/records.parquet").to_pandas()
    info = {"aligned": {int(k): v for k, v in summary["aligned"].items()}, "severity": summary.get("severity")}
    return GroupedDataset(summary["dataset"], records, summary["class_names"], summary["attribute_names"], info)
