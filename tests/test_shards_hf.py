"""Synthetic shards as other tools see them: Hugging Face datasets decodes the image column to
PIL images with the right labels and groups, pyarrow, pandas and duckdb read the same files,
and the engine's own readers (training, filtering, grids) still get PNG bytes."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from engine.runs import RunDir
from engine.stages.data import builtin
from engine.stages.generate.shards import (
    IMAGE_TYPE,
    decode_png,
    encode_png,
    read_shard,
    read_synthetic,
    shard_paths,
    synthetic_dir,
    write_shard_table,
    write_shards,
)

METHOD = "lora"
PER_GROUP = 3
SHARDS = ("part-test-00000.parquet", "part-test-00001.parquet")


def _sampler_rows() -> pd.DataFrame:
    """Rows as the sampler hands them to the writer: PNG bytes, two shards, timing columns."""
    rows = []
    for group in range(4):
        label, attribute = divmod(group, 2)
        for i in range(PER_GROUP):
            obj = builtin.OBJECT_SUBTYPES[label][i % 3]
            bg = builtin.BACKGROUND_SUBTYPES[attribute][i % 2]
            seed = 100 * group + i
            rows.append({
                "shard": SHARDS[group // 2], "sampling_started": 0.0, "sampling_seconds": 0.1,
                "image": encode_png(builtin.render(obj, bg, seed, "benchmark", 32)),
                "label": label, "attribute": attribute, "group": group, "unit": f"g{group}", "cluster": -1,
                "seed": seed, "prompt": f"a photo of a {obj} on {bg}", "negative_prompt": "",
                "method": METHOD, "base_model": "tiny", "score": float("nan"), "kept": True,
            })
    return pd.DataFrame(rows)


@pytest.fixture()
def written(tmp_path):
    """A run whose synthetic folder holds two shards from the generate stage's writer."""
    run = RunDir(tmp_path / "run")
    rows = _sampler_rows()
    out = synthetic_dir(run, METHOD)
    out.mkdir(parents=True)
    expected = rows.groupby("shard").size().to_dict()
    summary = write_shards(rows, str(out), expected)
    assert sorted(summary["shard"]) == list(SHARDS)
    return run, rows.drop(columns=["shard", "sampling_started", "sampling_seconds"])


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_datasets_decodes_the_shards_as_images_with_labels_and_groups(written, tmp_path):
    import datasets

    run, rows = written
    files = [str(p) for p in shard_paths(run, METHOD)]
    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    assert isinstance(ds.features["image"], datasets.Image)
    assert len(ds) == len(rows)
    by_key = {(r.unit, r.seed): r for r in rows.itertuples()}
    for item in ds:
        want = by_key[(item["unit"], item["seed"])]
        assert isinstance(item["image"], Image.Image) and item["image"].size == (32, 32)
        assert (np.asarray(item["image"].convert("RGB")) == _pixels(want.image)).all()
        assert (item["label"], item["attribute"], item["group"]) == (want.label, want.attribute, want.group)
        assert item["kept"] is True and item["prompt"] == want.prompt
    assert sorted(ds.unique("group")) == [0, 1, 2, 3]


def test_pyarrow_pandas_and_duckdb_read_the_same_rows(written):
    import duckdb

    run, rows = written
    folder = synthetic_dir(run, METHOD)
    table = pq.read_table(folder)  # the whole folder; _-prefixed book-keeping files are skipped
    assert table.schema.field("image").type == IMAGE_TYPE and table.num_rows == len(rows)

    frame = pd.read_parquet(folder).sort_values(["group", "seed"]).reset_index(drop=True)
    assert frame["group"].tolist() == rows["group"].tolist()
    assert all(cell["path"] is None for cell in frame["image"])
    for cell, png in zip(frame["image"], rows["image"], strict=True):
        assert cell["bytes"] == png

    query = (
        'SELECT "group", label, count(*) AS n, min(octet_length(image.bytes)) AS smallest '
        f"FROM read_parquet('{folder}/part-*.parquet') GROUP BY ALL ORDER BY \"group\""
    )
    counts = duckdb.sql(query).fetchall()
    assert [(g, lab, n) for g, lab, n, _ in counts] == [(g, g // 2, PER_GROUP) for g in range(4)]
    assert min(smallest for *_, smallest in counts) > 0
    png = duckdb.sql(f"SELECT image.bytes FROM read_parquet('{folder}/part-*.parquet') LIMIT 1").fetchall()[0][0]
    assert _pixels(bytes(png)).shape == (32, 32, 3)


def test_engine_readers_get_png_bytes_and_a_rewrite_keeps_the_layout(written):
    run, rows = written
    frame = read_synthetic(run, METHOD).sort_values(["group", "seed"]).reset_index(drop=True)
    assert frame["image"].tolist() == rows["image"].tolist()  # bytes, as training and grids use them

    # Ray Data readers (training, filtering) hand the struct cell over; decode_png takes both.
    cell = pd.read_parquet(synthetic_dir(run, METHOD))["image"][0]
    assert (decode_png(cell) == decode_png(cell["bytes"])).all()
    assert decode_png(cell, 16).shape == (16, 16, 3)

    # The filter stage rewrites a shard from read_shard's frame: still the image layout.
    path = shard_paths(run, METHOD)[0]
    shard = read_shard(path)
    shard["kept"] = [i % 2 == 0 for i in range(len(shard))]
    write_shard_table(path, pa.Table.from_pandas(shard, preserve_index=False))
    schema = pq.read_schema(path)
    assert schema.field("image").type == IMAGE_TYPE and b"huggingface" in schema.metadata
    assert read_shard(path)["kept"].tolist() == shard["kept"].tolist()


def _write_card(run: RunDir, rows: pd.DataFrame) -> None:
    """The set's dataset card, from the files the data, finetune and generate stages write."""
    from engine.cards import write_dataset_card
    from engine.runs import atomic_write_json

    atomic_write_json(run / "data/groups.json", {
        "dataset": "builtin", "class_names": ["landbird", "waterbird"], "attribute_names": ["land", "water"]})
    units = [{"unit": f"g{g}", "group": g, "prompt": f"prompt {g}", "negative_prompt": "", "borrowed_from": None}
             for g in range(4)]
    atomic_write_json(run / f"finetune/{METHOD}/manifest.json", {"method": METHOD, "units": units})
    atomic_write_json(synthetic_dir(run, METHOD) / "_summary.json", {
        "base_model": "tiny", "images": len(rows), "shards": len(SHARDS), "plan_hash": "test",
        "sampling": {"steps": 2}, "per_group": rows.groupby("group").size().astype(str).to_dict(),
        "per_unit": rows.groupby("unit").size().to_dict()})
    write_dataset_card(run, METHOD, None)


def test_load_dataset_on_the_folder_takes_the_features_from_the_dataset_card(written, tmp_path):
    import datasets
    from huggingface_hub import DatasetCard

    run, rows = written
    _write_card(run, rows)
    folder = synthetic_dir(run, METHOD)
    card = DatasetCard.load(folder / "README.md")
    features = card.data.dataset_info["features"]
    assert [f["name"] for f in features] == [f.name for f in pq.read_schema(shard_paths(run, METHOD)[0])]
    assert card.data.configs[0]["data_files"] == [{"split": "train", "path": "part-*.parquet"}]
    assert "Not filtered yet" in card.text

    ds = datasets.load_dataset(str(folder), split="train", cache_dir=str(tmp_path / "hf"))
    assert len(ds) == len(rows)
    assert ds.features["label"].names == ["landbird", "waterbird"]
    assert ds.features["attribute"].names == ["land", "water"]
    assert ds.features["group"].names == ["landbird / land", "landbird / water", "waterbird / land", "waterbird / water"]
    assert isinstance(ds.features["image"], datasets.Image)
    plain = {"unit": "string", "cluster": "int64", "seed": "int64", "prompt": "string", "negative_prompt": "string",
             "method": "string", "base_model": "string", "score": "float64", "kept": "bool"}
    assert {name: ds.features[name].dtype for name in plain} == plain
    row = ds[0]
    assert ds.features["group"].int2str(row["group"]) == (
        f"{ds.features['label'].int2str(row['label'])} / {ds.features['attribute'].int2str(row['attribute'])}")
    assert isinstance(row["image"], Image.Image)
    # A whole-folder Parquet read steps over the card as over the _-files.
    table = pq.read_table(folder, ignore_prefixes=[".", "_", "README"])
    assert table.num_rows == len(rows)


def test_a_row_without_image_bytes_is_refused(tmp_path):
    rows = _sampler_rows().drop(columns=["shard", "sampling_started", "sampling_seconds"])
    rows.loc[2, "image"] = None
    with pytest.raises(RuntimeError, match="no image bytes"):
        write_shard_table(tmp_path / "part-x.parquet", pa.Table.from_pandas(rows, preserve_index=False))
    assert not list(tmp_path.iterdir())
