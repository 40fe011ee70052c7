"""Synthetic image shards: the Parquet schema, the atomic per-shard writer, and reading them back.

``RUN/synthetic/<method>/part-<plan hash>-<index>.parquet`` holds one row per generated image
(schema :data:`SYNTHETIC_SCHEMA`); any Parquet reader opens them, and Hugging Face ``datasets``
(``load_dataset("parquet", data_files=...)``) decodes the ``image`` column to PIL images.
Book-keeping files beside them start with ``_`` (``_COMPLETE.json``, ``_summary.json``), which
Parquet dataset readers skip; ``README.md`` is the set's dataset card (engine/cards.py), which
``datasets.load_dataset(folder)`` reads for the features (a whole-folder pyarrow read needs
``ignore_prefixes=[".", "_", "README"]``, or the ``part-*.parquet`` files). A shard is written to a temporary name and renamed, so a reader,
or a re-run after a node died, never sees half a shard: it is there whole or not at all.
"""

from __future__ import annotations

import io
import json
import logging
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from engine import storage
from engine.errors import FairsynthError
from engine.runs import RunDir, atomic_write_bytes
from engine.storage import RunPath

log = logging.getLogger(__name__)

# The image column has the layout Hugging Face datasets stores its Image feature in: the PNG
# bytes and a path, always null here (the bytes are the image). datasets trusts the feature
# declared in the schema metadata only when the field equals its own, which is nullable;
# write_shard_table refuses a missing image instead.
IMAGE_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
_COLUMNS = pa.schema([
    pa.field("image", IMAGE_TYPE),  # {bytes: PNG, path: null}
    pa.field("label", pa.int64(), nullable=False),
    pa.field("attribute", pa.int64(), nullable=False),
    pa.field("group", pa.int64(), nullable=False),
    pa.field("unit", pa.string(), nullable=False),
    pa.field("cluster", pa.int64(), nullable=False),  # -1: the unit is a whole group
    pa.field("seed", pa.int64(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("negative_prompt", pa.string(), nullable=False),
    pa.field("method", pa.string(), nullable=False),
    pa.field("base_model", pa.string(), nullable=False),
    pa.field("score", pa.float64()),  # NaN until the filter stage scores the image
    pa.field("kept", pa.bool_(), nullable=False),  # True until the filter stage decides
])
_HF_VALUES = {pa.int64(): "int64", pa.string(): "string", pa.float64(): "float64", pa.bool_(): "bool"}


def hf_value_dtype(arrow_type: pa.DataType) -> str:
    """The Hugging Face ``Value`` dtype of a plain shard column."""
    return _HF_VALUES[arrow_type]


def _hf_features(schema: pa.Schema) -> dict:
    """The columns as datasets' Features.to_dict() writes them, without importing datasets."""
    return {
        f.name: {"_type": "Image"} if f.type == IMAGE_TYPE else {"dtype": hf_value_dtype(f.type), "_type": "Value"}
        for f in schema
    }


SYNTHETIC_SCHEMA = _COLUMNS.with_metadata(
    {"huggingface": json.dumps({"info": {"features": _hf_features(_COLUMNS)}})}
)
SHARD_GLOB = "part-*.parquet"
# What a local writer that died before its rename leaves (engine.storage's temporary names).
PARTIAL_SHARD_GLOB = ".part-*.tmp"
# Seconds a sampler spent on a shard's rows, by kind; they travel with the rows to the writer
# and into the stage summary, never into a shard.
TIMING_COLUMNS = ("switch_seconds", "sampling_seconds", "png_seconds")


# PNG level 1 is lossless like the default level 6 and several times faster to encode.
PNG_COMPRESS_LEVEL = 1


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> the PNG bytes a shard's ``image`` column holds."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def decode_png(data: bytes | dict, size: int | None = None) -> np.ndarray:
    """uint8 [H, W, 3]; with ``size``, resized the way the data stage resizes real images.

    ``data`` is PNG bytes or an ``image`` cell as a Parquet reader hands it over ({bytes, path}).
    """
    if isinstance(data, dict):
        data = data["bytes"]
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        if size is not None and img.size != (size, size):
            img = img.resize((size, size), Image.BICUBIC)
        return np.asarray(img, dtype=np.uint8)


def synthetic_dir(run: RunDir, method: str) -> RunPath:
    return run / "synthetic" / method


def shard_paths(run: RunDir, method: str) -> list[RunPath]:
    return sorted(synthetic_dir(run, method).glob(SHARD_GLOB))


def image_cells(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """An ``image`` column of PNG bytes (the sampler's rows) or of {bytes, path} cells -> the
    struct layout; a missing image fails loudly."""
    if pa.types.is_struct(column.type):
        cells = column.cast(IMAGE_TYPE)
        png = pc.struct_field(cells, "bytes")
    else:
        png = column.cast(pa.binary())
        cells = pa.chunked_array(
            [pa.StructArray.from_arrays([c, pa.nulls(len(c), pa.string())], fields=list(IMAGE_TYPE))
             for c in png.chunks],
            type=IMAGE_TYPE,
        )
    if column.null_count or png.null_count:
        raise RuntimeError("a synthetic row has no image bytes; a shard never holds a row without its image")
    return cells


def image_bytes(table: pa.Table) -> pa.Table:
    """The ``image`` column as plain PNG bytes, as the engine's pandas readers use it."""
    index = table.schema.get_field_index("image")
    if index < 0:
        return table
    return table.set_column(index, "image", pc.struct_field(table["image"], "bytes"))


def write_shard_table(path: RunPath, table: pa.Table) -> None:
    """Write one shard atomically (temporary name in the same folder, then rename)."""
    table = table.select(SYNTHETIC_SCHEMA.names)
    table = table.set_column(SYNTHETIC_SCHEMA.get_field_index("image"), "image", image_cells(table["image"]))
    buffer = io.BytesIO()
    pq.write_table(table.cast(SYNTHETIC_SCHEMA), buffer)
    atomic_write_bytes(path, buffer.getvalue())


def write_shards(batch: pd.DataFrame, out_dir: str, expected_rows: dict[str, int]) -> pd.DataFrame:
    """Ray Data task: write every shard in ``batch`` to ``out_dir`` (the folder's URI, or an
    absolute path on a mount every node shares), return one small row per shard written.

    A shard reaches this function whole (one plan shard is one block, and the pipeline never
    splits blocks), so it is written in one piece; a partial shard would mean a lost row and
    fails loudly rather than writing a short file.
    """
    written = []
    for name, rows in batch.groupby("shard", sort=False):
        if len(rows) != expected_rows[name]:
            raise RuntimeError(
                f"shard {name} arrived with {len(rows)} of its {expected_rows[name]} rows; "
                "the generation pipeline split a shard"
            )
        tick = time.perf_counter()
        timing = [c for c in TIMING_COLUMNS if c in rows]
        table = pa.Table.from_pandas(rows.drop(columns=["shard", "sampling_started", *timing]), preserve_index=False)
        write_shard_table(storage.as_path(out_dir) / name, table)
        written.append({
            "shard": name,
            "rows": len(rows),
            "sampling_started": float(rows["sampling_started"].min()),
            **{c: float(rows[c].sum()) for c in timing},
            "write_seconds": time.perf_counter() - tick,
        })
    return pd.DataFrame(written, columns=["shard", "rows", "sampling_started", *TIMING_COLUMNS, "write_seconds"])


def read_shard(path: RunPath, columns: list[str] | None = None) -> pd.DataFrame:
    """One shard's rows, ``image`` as PNG bytes."""
    try:
        return image_bytes(storage.read_parquet(path, columns=columns)).to_pandas()
    except (pa.ArrowInvalid, OSError) as exc:
        raise FairsynthError(f"synthetic shard {path} is unreadable ({exc}); delete it and re-run generate") from None


def read_synthetic(run: RunDir, method: str, columns: list[str] | None = None,
                   kept_only: bool = False) -> pd.DataFrame:
    """Every synthetic row of a method (``kept_only``: those the filter stage kept)."""
    paths = shard_paths(run, method)
    if not paths:
        raise FairsynthError(
            f"no synthetic images in {synthetic_dir(run, method)}; run "
            f"`python jobs/generate.py --method {method} --run-dir {run.root}` first"
        )
    wanted = None if columns is None else list(dict.fromkeys([*columns, *(["kept"] if kept_only else [])]))
    frame = pd.concat([read_shard(p, wanted) for p in paths], ignore_index=True)
    if kept_only:
        frame = frame[frame["kept"]].reset_index(drop=True)
        if columns is not None and "kept" not in columns:
            frame = frame.drop(columns="kept")
    return frame


def shard_row_counts(paths: list[RunPath]) -> dict[str, int]:
    """Rows per shard from the Parquet footers, without reading images."""
    return {p.name: storage.parquet_file(p).metadata.num_rows for p in paths}


def remove_damaged_shards(out_dir: RunPath, expected_rows: dict[str, int]) -> list[str]:
    """Delete the plan's shards whose Parquet footer cannot be read (a truncated file) or
    counts other rows than planned, so that the stage draws them again; returns their names."""
    damaged = []
    for name, rows in sorted(expected_rows.items()):
        path = out_dir / name
        if not path.exists():
            continue
        try:
            found = storage.parquet_file(path).metadata.num_rows
            problem = None if found == rows else f"{found} rows where the plan has {rows}"
        except (OSError, pa.ArrowException) as exc:
            problem = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'unreadable'}"
        if problem:
            log.warning("synthetic shard %s is damaged (%s); it is drawn again", path, problem)
            path.unlink()
            damaged.append(name)
    return damaged


def remove_partial_shards(out_dir: RunPath) -> list[str]:
    """Delete half-written shards: temporary files of writers whose process died before the
    rename (a node lost mid-write). Only while no writer of the folder runs: before a stage's
    pipeline starts, or after it ended. On object storage an upload is whole or absent, so
    nothing is ever left there."""
    if storage.is_remote(out_dir) or not out_dir.exists():
        return []
    partial = sorted(out_dir.glob(PARTIAL_SHARD_GLOB))
    for path in partial:
        path.unlink(missing_ok=True)
    if partial:
        log.info("removed %d half-written shards from %s (a writer died before finishing)", len(partial), out_dir)
    return [p.name for p in partial]


def remove_stale_shards(out_dir: RunPath, keep: set[str]) -> list[str]:
    """Delete shards of an earlier plan (another config or manifest), so readers see one plan."""
    stale = [p for p in sorted(out_dir.glob(SHARD_GLOB)) if p.name not in keep]
    for path in stale:
        path.unlink()
    if stale:
        log.info("removed %d shards of an earlier generation plan from %s", len(stale), out_dir)
    return [p.name for p in stale]
