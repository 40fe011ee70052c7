"""Sample grids to look at: ``RUN/grids/<method>.png``, one row per unit, grouped by group.

Each row starts with the unit's id and group name and shows its first images in seed order.
Once the filter stage has scored a method, images it dropped get a red frame.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from engine import storage
from engine.runs import RunDir, atomic_write_bytes
from engine.stages.data.stage import load_run_dataset
from engine.stages.generate.shards import read_shard, shard_paths

LABEL_WIDTH = 170
MIN_CELL = 64  # tiny 32 px samples are drawn at twice their size
MAX_CELL = 160  # 512 px samples are shrunk so a grid stays a few MB
PAD = 2
REJECTED = (220, 30, 30)


def grid_path(run: RunDir, method: str):
    return run / "grids" / f"{method}.png"


def render_grid(rows: list[tuple[str, list[np.ndarray], list[bool]]], cell: int) -> Image.Image:
    """A labelled grid: one (label, images, kept flags) tuple per row."""
    columns = max((len(images) for _, images, _ in rows), default=1)
    width = LABEL_WIDTH + columns * (cell + PAD) + PAD
    height = len(rows) * (cell + PAD) + PAD
    canvas = Image.new("RGB", (width, max(height, cell)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for r, (label, images, kept) in enumerate(rows):
        top = PAD + r * (cell + PAD)
        draw.multiline_text((4, top + 4), label, fill=(0, 0, 0), font=font, spacing=2)
        for c, (image, keep) in enumerate(zip(images, kept, strict=True)):
            left = LABEL_WIDTH + PAD + c * (cell + PAD)
            tile = Image.fromarray(image)
            resample = Image.NEAREST if tile.width <= cell else Image.LANCZOS
            tile = tile.resize((cell, cell), resample)
            canvas.paste(tile, (left, top))
            if not keep:
                draw.rectangle([left, top, left + cell - 1, top + cell - 1], outline=REJECTED, width=3)
    return canvas


def _first_images(run: RunDir, method: str, per_unit: int) -> pd.DataFrame:
    """The first ``per_unit`` rows of each unit by seed, reading images only from their shards."""
    columns = ["unit", "group", "cluster", "seed", "score", "kept"]
    parts = []
    for path in shard_paths(run, method):
        part = read_shard(path, columns)
        part["path"] = str(path)
        parts.append(part)
    if not parts:
        return pd.DataFrame(columns=[*columns, "path", "image"])
    meta = pd.concat(parts, ignore_index=True).sort_values(["group", "cluster", "unit", "seed"])
    chosen = meta.groupby("unit", sort=False).head(per_unit)
    images = {}
    for path, part in chosen.groupby("path"):
        table = read_shard(storage.as_path(path), ["unit", "seed", "image"])
        wanted = set(zip(part["unit"], part["seed"], strict=True))
        for unit, seed, image in zip(table["unit"], table["seed"], table["image"], strict=True):
            if (unit, seed) in wanted:
                images[(unit, seed)] = image
    chosen = chosen.copy()
    chosen["image"] = [images[(u, s)] for u, s in zip(chosen["unit"], chosen["seed"], strict=True)]
    return chosen


def write_sample_grid(run: RunDir, method: str, per_unit: int = 8) -> None:
    """Draw ``RUN/grids/<method>.png`` from the method's shards."""
    from engine.stages.generate.shards import decode_png

    frame = _first_images(run, method, per_unit)
    dataset = load_run_dataset(run)
    rows = []
    for (group, unit), part in frame.groupby(["group", "unit"], sort=False):
        images = [decode_png(b) for b in part["image"]]
        scored = part["score"].notna().any()
        kept = part["kept"].tolist() if scored else [True] * len(part)
        rows.append((f"{unit}\n{dataset.group_name(int(group))}", images, kept))
    side = max((im.shape[0] for _, ims, _ in rows for im in ims), default=MIN_CELL)
    canvas = render_grid(rows, cell=min(max(side, MIN_CELL), MAX_CELL))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    atomic_write_bytes(grid_path(run, method), buffer.getvalue())
