"""Datasets as group-labelled records, read lazily.

Every loader returns a ``GroupedDataset``: a table with one row per image (image_id,
source, label, attribute, split, group, subtype) and the names of classes and attributes.
``source`` is a file path, or a ``builtin://`` address the procedural benchmark renders on
demand; ``load_image`` turns either into uint8 pixels, so no loader holds decoded images.
A group is (class, attribute) with id = class * n_attributes + attribute.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from engine.config import DataConfig
from engine.data import builtin
from engine.errors import FairsynthError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
COLUMNS = ("image_id", "source", "label", "attribute", "split", "group", "subtype")
BUILTIN_SCHEME = "builtin://"


@dataclass
class GroupedDataset:
    name: str
    records: pd.DataFrame
    class_names: list[str]
    attribute_names: list[str]
    info: dict = field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def n_attributes(self) -> int:
        return len(self.attribute_names)

    @property
    def n_groups(self) -> int:
        return self.n_classes * self.n_attributes

    def group_id(self, label: int, attribute: int) -> int:
        return label * self.n_attributes + attribute

    def group_name(self, group: int) -> str:
        label, attribute = divmod(group, self.n_attributes)
        return f"{self.class_names[label]} / {self.attribute_names[attribute]}"

    def groups(self) -> list[dict]:
        return [
            {
                "id": g,
                "name": self.group_name(g),
                "class": g // self.n_attributes,
                "attribute": g % self.n_attributes,
            }
            for g in range(self.n_groups)
        ]

    def split(self, name: str) -> pd.DataFrame:
        return self.records[self.records["split"] == name].reset_index(drop=True)

    def group_counts(self, split: str) -> list[int]:
        counts = self.split(split)["group"].value_counts()
        return [int(counts.get(g, 0)) for g in range(self.n_groups)]


def _finish(name, rows: pd.DataFrame, class_names, attribute_names, info=None) -> GroupedDataset:
    rows = rows.copy()
    if "subtype" not in rows:
        rows["subtype"] = ""
    rows["label"] = rows["label"].astype(int)
    rows["attribute"] = rows["attribute"].astype(int)
    rows["group"] = rows["label"] * len(attribute_names) + rows["attribute"]
    rows = rows[list(COLUMNS)].reset_index(drop=True)
    return GroupedDataset(name, rows, list(class_names), list(attribute_names), info or {})


def _require_file(path: Path, dataset: str, what: str) -> Path:
    if not path.exists():
        raise FairsynthError(f"{dataset}: missing {what} {path}; check data.root")
    return path


def _require_root(cfg: DataConfig) -> Path:
    root = Path(cfg.root or "")
    if not cfg.root or not root.exists():
        raise FairsynthError(f"{cfg.name}: data.root {cfg.root!r} does not exist; point data.root at the dataset folder")
    return root


def _require_columns(frame: pd.DataFrame, needed: tuple[str, ...], path: Path, dataset: str) -> None:
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise FairsynthError(
            f"{dataset}: {path} has no column {missing[0]!r} (expected columns: {', '.join(needed)})"
        )


# --- loaders -------------------------------------------------------------------------------


def load_builtin(cfg: DataConfig) -> GroupedDataset:
    """The procedural benchmark: original train is biased, val and test are group-balanced."""
    b = cfg.builtin
    rng = np.random.default_rng(b.seed)
    rows = []
    n_classes, n_attrs = len(builtin.CLASS_NAMES), len(builtin.ATTRIBUTE_NAMES)

    def add(split: str, label: int, attribute: int, count: int) -> None:
        objects = builtin.OBJECT_SUBTYPES[label]
        backgrounds = builtin.BACKGROUND_SUBTYPES[attribute]
        for _ in range(count):
            obj = objects[rng.integers(len(objects))]
            bg = backgrounds[rng.integers(len(backgrounds))]
            seed = int(rng.integers(0, 2**31 - 1))
            index = len(rows)
            rows.append(
                {
                    "image_id": f"builtin-{split}-{index:06d}",
                    "source": f"{BUILTIN_SCHEME}{obj}/{bg}/{seed}",
                    "label": label,
                    "attribute": attribute,
                    "split": split,
                    "subtype": obj,
                }
            )

    per_class = b.n_train // n_classes
    for label in range(n_classes):
        n_aligned = int(round(per_class * b.original_alignment))
        # Class c's aligned background family is attribute c (landbirds on land).
        add("train", label, label, n_aligned)
        others = [a for a in range(n_attrs) if a != label]
        for i in range(per_class - n_aligned):
            add("train", label, others[i % len(others)], 1)
    for split, total in (("val", b.n_val), ("test", b.n_test)):
        for label in range(n_classes):
            for attribute in range(n_attrs):
                add(split, label, attribute, total // (n_classes * n_attrs))
    frame = pd.DataFrame(rows)
    names = cfg.class_names or list(builtin.CLASS_NAMES)
    attrs = cfg.attribute_names or list(builtin.ATTRIBUTE_NAMES)
    return _finish("builtin", frame, names, attrs, {"aligned": {c: c for c in range(n_classes)}})


def load_waterbirds(cfg: DataConfig) -> GroupedDataset:
    root = _require_root(cfg)
    meta = _require_file(root / "metadata.csv", "waterbirds", "metadata file")
    frame = pd.read_csv(meta)
    _require_columns(frame, ("img_id", "img_filename", "y", "split", "place"), meta, "waterbirds")
    split_names = {0: "train", 1: "val", 2: "test"}
    bad = frame[~frame["split"].isin(list(split_names))]
    if len(bad):
        raise FairsynthError(f"waterbirds: {meta} has split value {bad['split'].iloc[0]!r}; expected 0, 1 or 2")
    rows = pd.DataFrame(
        {
            "image_id": frame["img_id"].astype(str),
            "source": [str(root / f) for f in frame["img_filename"]],
            "label": frame["y"],
            "attribute": frame["place"],
            "split": frame["split"].map(split_names),
        }
    )
    return _finish(
        "waterbirds",
        rows,
        cfg.class_names or ["landbird", "waterbird"],
        cfg.attribute_names or ["land background", "water background"],
    )


def _read_celeba_attributes(path: Path) -> pd.DataFrame:
    lines = path.read_text().splitlines()
    if len(lines) < 3:
        raise FairsynthError(f"celeba: {path} is too short; expected a count line, a header line, then rows")
    names = lines[1].split()
    records = [line.split() for line in lines[2:] if line.strip()]
    bad = next((i for i, r in enumerate(records) if len(r) != len(names) + 1), None)
    if bad is not None:
        raise FairsynthError(
            f"celeba: {path} line {bad + 3} has {len(records[bad]) - 1} values, expected {len(names)}"
        )
    frame = pd.DataFrame(records, columns=["filename", *names])
    frame[names] = frame[names].astype(int)
    return frame


def load_celeba(cfg: DataConfig) -> GroupedDataset:
    root = _require_root(cfg)
    attr_path = _require_file(root / "list_attr_celeba.txt", "celeba", "attribute file")
    part_path = _require_file(root / "list_eval_partition.txt", "celeba", "partition file")
    attrs = _read_celeba_attributes(attr_path)
    target, attribute = cfg.target or "Blond_Hair", cfg.attribute or "Male"
    for name in (target, attribute):
        if name not in attrs.columns:
            valid = ", ".join(attrs.columns[1:])
            raise FairsynthError(f"celeba: unknown attribute name {name!r} in {attr_path}; valid: {valid}")
    parts = pd.read_csv(part_path, sep=r"\s+", header=None, names=["filename", "partition"])
    merged = attrs.merge(parts, on="filename", how="inner")
    if len(merged) < len(attrs):
        log.warning("celeba: %d images have no partition entry and are left out", len(attrs) - len(merged))
    image_dir = root / "img_align_celeba"
    rows = pd.DataFrame(
        {
            "image_id": merged["filename"],
            "source": [str(image_dir / f) for f in merged["filename"]],
            "label": (merged[target] > 0).astype(int),
            "attribute": (merged[attribute] > 0).astype(int),
            "split": merged["partition"].map({0: "train", 1: "val", 2: "test"}),
        }
    )
    t, a = target.replace("_", " ").lower(), attribute.replace("_", " ").lower()
    return _finish(
        "celeba",
        rows,
        cfg.class_names or [f"non-{t}", t],
        cfg.attribute_names or [f"non-{a}", a],
    )


_UTK_NAME = re.compile(r"^(\d+)_([01])_(\d+)_\d+")


def load_utkface(cfg: DataConfig) -> GroupedDataset:
    """Target gender (0 male, 1 female); attribute = age bin; seeded 80/10/10 split."""
    root = _require_root(cfg)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise FairsynthError(f"utkface: no .jpg images under {root}; point data.root at the UTKFace folder")
    rows, malformed = [], 0
    edges = cfg.age_bins
    for path in files:
        match = _UTK_NAME.match(path.name)
        if not match:
            malformed += 1
            continue
        age, gender = int(match.group(1)), int(match.group(2))
        bin_index = int(np.searchsorted(edges, age, side="right")) - 1
        if not 0 <= bin_index < len(edges) - 1:
            malformed += 1
            continue
        rows.append({"image_id": path.name, "source": str(path), "label": gender, "attribute": bin_index})
    if malformed:
        log.warning("utkface: skipped %d files with malformed names or ages outside data.age_bins", malformed)
    frame = pd.DataFrame(rows)
    order = np.random.default_rng(cfg.split_seed).permutation(len(frame))
    cut1, cut2 = int(0.8 * len(frame)), int(0.9 * len(frame))
    split = np.empty(len(frame), dtype=object)
    split[order[:cut1]], split[order[cut1:cut2]], split[order[cut2:]] = "train", "val", "test"
    frame["split"] = split
    bins = [f"aged {lo} to {hi - 1}" for lo, hi in zip(edges, edges[1:])]
    return _finish(
        "utkface",
        frame,
        cfg.class_names or ["male", "female"],
        cfg.attribute_names or bins,
        {"malformed_names": malformed},
    )


def load_manifest(cfg: DataConfig) -> GroupedDataset:
    """A user's own data: a CSV with path, label, attribute, split (paths relative to it)."""
    root = _require_root(cfg)
    csv = root if root.is_file() else root / "manifest.csv"
    _require_file(csv, "manifest", "manifest file")
    frame = pd.read_csv(csv)
    _require_columns(frame, ("path", "label", "attribute", "split"), csv, "manifest")
    numbered = {"0": "train", "1": "val", "2": "test"}
    split = frame["split"].astype(str).str.strip().map(lambda s: numbered.get(s, s))
    bad = split[~split.isin(SPLITS)]
    if len(bad):
        raise FairsynthError(f"manifest: {csv} has split {bad.iloc[0]!r}; expected train/val/test or 0/1/2")
    for column in ("label", "attribute"):
        if not pd.api.types.is_integer_dtype(frame[column]) or (frame[column] < 0).any():
            raise FairsynthError(f"manifest: {csv} column {column!r} must hold integers >= 0")
    rows = pd.DataFrame(
        {
            "image_id": frame["path"].astype(str),
            "source": [str((csv.parent / p).resolve()) for p in frame["path"]],
            "label": frame["label"],
            "attribute": frame["attribute"],
            "split": split,
        }
    )
    n_classes, n_attrs = int(rows["label"].max()) + 1, int(rows["attribute"].max()) + 1
    return _finish(
        "manifest",
        rows,
        cfg.class_names or [f"class {i}" for i in range(n_classes)],
        cfg.attribute_names or [f"attribute {i}" for i in range(n_attrs)],
    )


LOADERS = {
    "builtin": load_builtin,
    "waterbirds": load_waterbirds,
    "celeba": load_celeba,
    "utkface": load_utkface,
    "manifest": load_manifest,
}


# --- pixels --------------------------------------------------------------------------------


def load_image(source: str, size: int) -> np.ndarray:
    """uint8 [size, size, 3] for a record's source (a file, or a builtin:// address)."""
    if source.startswith(BUILTIN_SCHEME):
        obj, bg, seed = source[len(BUILTIN_SCHEME) :].split("/")
        return builtin.render(obj, bg, int(seed), "benchmark", size)
    try:
        with Image.open(source) as img:
            img = img.convert("RGB")
            if img.size != (size, size):
                img = _center_square(img).resize((size, size), Image.BICUBIC)
            return np.asarray(img, dtype=np.uint8)
    except FileNotFoundError:
        raise FairsynthError(f"missing image {source}; check data.root") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise FairsynthError(
            f"unreadable image {source} ({exc.__class__.__name__}); replace it, or set data.skip_bad_images=true"
        ) from None


def _center_square(img: Image.Image) -> Image.Image:
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side))


def find_bad_images(sources: list[str]) -> list[str]:
    """Sources that cannot be decoded completely (missing, corrupt or truncated files)."""
    bad = []
    for source in sources:
        if source.startswith(BUILTIN_SCHEME):
            continue
        try:
            with Image.open(source) as img:
                img.load()
        except (OSError, UnidentifiedImageError, SyntaxError):
            bad.append(source)
    return bad
