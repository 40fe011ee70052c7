"""Datasets as group-labelled records, read lazily.

Every loader returns a ``GroupedDataset``: a table with one row per image (image_id,
source, label, attribute, split, group, subtype) and the names of classes and attributes.
``source`` is a file path, or a ``builtin://`` address the procedural benchmark renders on
demand; ``load_image`` turns either into uint8 pixels, so no loader holds decoded images.
A group is (class, attribute) with id = class * n_attributes + attribute.
"""

from __future__ import annotations

import bisect
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from engine.config import DataConfig
from engine.errors import FairsynthError
from engine.stages.data import builtin

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
COLUMNS = ("image_id", "source", "label", "attribute", "split", "group", "subtype")
BUILTIN_SCHEME = builtin.BUILTIN_SCHEME


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


def _read_text(path: Path, dataset: str) -> str:
    try:
        return path.read_text()
    except UnicodeDecodeError:
        raise FairsynthError(f"{dataset}: {path} is not UTF-8 text; use the file as distributed") from None


def _read_csv(path: Path, dataset: str) -> pd.DataFrame:
    """Every cell as text ('' when empty): each loader checks and converts the columns it uses."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, index_col=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        reason = " ".join(str(exc).split())  # pandas' messages may span lines
        raise FairsynthError(f"{dataset}: {path} is not a readable CSV ({reason}); fix or replace it") from None
    if frame.empty:
        raise FairsynthError(f"{dataset}: {path} has no rows; point data.root at the full dataset")
    return frame.fillna("")


def _ids(values: pd.Series, count: int, what: str, where: str, hint: str = "") -> pd.Series:
    """``values`` as integers 0..count-1, or a one-line error naming the first that is not."""
    numbers = pd.to_numeric(values.astype(str).str.strip(), errors="coerce")
    good = numbers.isin(range(count))
    if not good.all():
        expected = f"an integer from 0 to {count - 1}" if count else "an integer"
        raise FairsynthError(f"{where} has {what} {values[~good].iloc[0]!r}; expected {expected}{hint}")
    return numbers.astype(int)


def _distinct_numbers(values: pd.Series) -> int:
    return int(pd.to_numeric(values.str.strip(), errors="coerce").nunique())


def _file_names(values: pd.Series, column: str, where: str) -> pd.Series:
    names = values.astype(str).str.strip()
    if (names == "").any():
        raise FairsynthError(f"{where} row {int((names == '').to_numpy().argmax()) + 1} has no {column}")
    return names


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
    rng = np.random.default_rng(cfg.seed)
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
                    "source": builtin.source_address(obj, bg, seed, b.rendering),
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
    frame = _read_csv(meta, "waterbirds")
    _require_columns(frame, ("img_id", "img_filename", "y", "split", "place"), meta, "waterbirds")
    class_names = cfg.class_names or ["landbird", "waterbird"]
    attribute_names = cfg.attribute_names or ["land background", "water background"]
    where = f"waterbirds: {meta}"
    rows = pd.DataFrame(
        {
            "image_id": frame["img_id"],
            "source": [str(root / f) for f in _file_names(frame["img_filename"], "img_filename", where)],
            "label": _ids(frame["y"], len(class_names), "y", where),
            "attribute": _ids(frame["place"], len(attribute_names), "place", where),
            "split": _ids(frame["split"], len(SPLITS), "split", where).map(dict(enumerate(SPLITS))),
        }
    )
    return _finish("waterbirds", rows, class_names, attribute_names)


def _read_celeba_attributes(path: Path) -> pd.DataFrame:
    """The attribute table as text: a count line, a header of names, then one row per image."""
    lines = _read_text(path, "celeba").splitlines()
    if len(lines) < 3:
        raise FairsynthError(f"celeba: {path} is too short; expected a count line, a header line, then rows")
    names = lines[1].split()
    twice = next((n for n in names if [*names, "filename"].count(n) > 1), None)
    if twice is not None:
        raise FairsynthError(f"celeba: {path} line 2 names the attribute {twice!r} twice; use the file as distributed")
    records = [(i + 3, line.split()) for i, line in enumerate(lines[2:]) if line.strip()]
    bad = next(((n, r) for n, r in records if len(r) != len(names) + 1), None)
    if bad is not None:
        raise FairsynthError(f"celeba: {path} line {bad[0]} has {len(bad[1]) - 1} values, expected {len(names)}")
    return pd.DataFrame([r for _, r in records], columns=["filename", *names])


def _celeba_flags(attrs: pd.DataFrame, name: str, path: Path) -> pd.Series:
    """An attribute column (1 yes, -1 or 0 no) as 0/1."""
    values = pd.to_numeric(attrs[name], errors="coerce")
    bad = ~values.isin((-1, 0, 1))
    if bad.any():
        raise FairsynthError(
            f"celeba: {path} has {name} = {attrs[name][bad].iloc[0]!r} for {attrs['filename'][bad].iloc[0]}; expected 1 or -1"
        )
    return (values > 0).astype(int)


def _read_celeba_partition(path: Path) -> pd.DataFrame:
    """File name and split (0 train, 1 val, 2 test) per line."""
    rows = [(i + 1, line.split()) for i, line in enumerate(_read_text(path, "celeba").splitlines()) if line.strip()]
    bad = next(((n, r) for n, r in rows if len(r) != 2), None)
    if bad is not None:
        raise FairsynthError(f"celeba: {path} line {bad[0]} has {len(bad[1])} fields, expected a file name and 0, 1 or 2")
    frame = pd.DataFrame([r for _, r in rows], columns=["filename", "partition"])
    frame["split"] = _ids(frame["partition"], len(SPLITS), "partition", f"celeba: {path}").map(dict(enumerate(SPLITS)))
    return frame.drop_duplicates("filename", keep="last")


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
    parts = _read_celeba_partition(part_path)
    merged = attrs.merge(parts, on="filename", how="inner")
    if merged.empty:
        raise FairsynthError(f"celeba: no image of {attr_path} is listed in {part_path}; use the files as distributed")
    if len(merged) < len(attrs):
        log.warning("celeba: %d images have no partition entry and are left out", len(attrs) - len(merged))
    image_dir = root / "img_align_celeba"
    rows = pd.DataFrame(
        {
            "image_id": merged["filename"],
            "source": [str(image_dir / f) for f in merged["filename"]],
            "label": _celeba_flags(merged, target, attr_path),
            "attribute": _celeba_flags(merged, attribute, attr_path),
            "split": merged["split"],
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
        bin_index = bisect.bisect_right(edges, age) - 1
        if not 0 <= bin_index < len(edges) - 1:
            malformed += 1
            continue
        rows.append({"image_id": path.name, "source": str(path), "label": gender, "attribute": bin_index})
    if not rows:
        raise FairsynthError(
            f"utkface: none of the {len(files)} images under {root} is named <age>_<gender 0|1>_<race>_<date>.jpg "
            "with an age inside data.age_bins; point data.root at the UTKFace folder"
        )
    if malformed:
        log.warning("utkface: skipped %d files with malformed names or ages outside data.age_bins", malformed)
    frame = pd.DataFrame(rows)
    order = np.random.default_rng(cfg.seed).permutation(len(frame))
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


MANIFEST_ID_HINT = " (ids count from 0 without gaps, or index data.{names} when it is set)"


def load_manifest(cfg: DataConfig) -> GroupedDataset:
    """A user's own data: a CSV with path, label, attribute, split (paths relative to it)."""
    root = _require_root(cfg)
    csv = root if root.is_file() else root / "manifest.csv"
    _require_file(csv, "manifest", "manifest file")
    frame = _read_csv(csv, "manifest")
    _require_columns(frame, ("path", "label", "attribute", "split"), csv, "manifest")
    numbered = {"0": "train", "1": "val", "2": "test"}
    split = frame["split"].astype(str).str.strip().map(lambda s: numbered.get(s, s))
    bad = split[~split.isin(SPLITS)]
    if len(bad):
        raise FairsynthError(f"manifest: {csv} has split {bad.iloc[0]!r}; expected train/val/test or 0/1/2")
    where = f"manifest: {csv}"
    paths = _file_names(frame["path"], "path", where)
    # Ids number the classes (attributes) from 0 without gaps, or index the configured names.
    n_classes = len(cfg.class_names) if cfg.class_names else _distinct_numbers(frame["label"])
    n_attrs = len(cfg.attribute_names) if cfg.attribute_names else _distinct_numbers(frame["attribute"])
    rows = pd.DataFrame(
        {
            "image_id": paths,
            "source": [str((csv.parent / p).resolve()) for p in paths],
            "label": _ids(frame["label"], n_classes, "label", where, MANIFEST_ID_HINT.format(names="class_names")),
            "attribute": _ids(frame["attribute"], n_attrs, "attribute", where,
                              MANIFEST_ID_HINT.format(names="attribute_names")),
            "split": split,
        }
    )
    _refuse_repeated_images(rows, where)
    return _finish(
        "manifest",
        rows,
        cfg.class_names or [f"class {i}" for i in range(n_classes)],
        cfg.attribute_names or [f"attribute {i}" for i in range(n_attrs)],
    )


def _refuse_repeated_images(rows: pd.DataFrame, where: str) -> None:
    """One file listed twice (as ``a.png`` and ``./a.png``, or under two labels or splits)
    would put test images into training or count an image twice: name the first such pair."""
    repeated = rows["source"].duplicated(keep=False)
    if not repeated.any():
        return
    first = rows[repeated].groupby("source", sort=False).head(2).iloc[:2]
    (i, a), (j, b) = first.iterrows()
    raise FairsynthError(
        f"{where} rows {i + 1} and {j + 1} name the same image {a['source']} "
        f"({a['image_id']!r} label {a['label']} split {a['split']}; {b['image_id']!r} label {b['label']} "
        f"split {b['split']}); list each image once"
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
        return builtin.render_address(source, size)
    try:
        with _open_image(source) as img:
            _refuse_oversized(img, source)
            img = _as_rgb(img, source)
            if img.size != (size, size):
                img = _center_square(img).resize((size, size), Image.BICUBIC)
            return np.asarray(img, dtype=np.uint8)
    except FileNotFoundError:
        raise FairsynthError(f"missing image {source}; check data.root") from None
    except Image.DecompressionBombError as exc:
        raise FairsynthError(f"image {source} refused as a possible decompression bomb ({exc}); "
                             "shrink or remove it") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise FairsynthError(
            f"unreadable image {source} ({exc.__class__.__name__}); replace it, or set data.skip_bad_images=true"
        ) from None


def _open_image(source: str) -> Image.Image:
    # Pillow warns of images past its pixel limit; _refuse_oversized refuses them in one line instead.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(source)


def _refuse_oversized(img: Image.Image, source: str) -> None:
    # Pillow only warns up to twice its limit; an image that large is refused before it is decoded.
    width, height = img.size
    if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
        raise FairsynthError(f"image {source} is {width} x {height} pixels, over the {Image.MAX_IMAGE_PIXELS} "
                             "pixels Pillow decodes safely (a possible decompression bomb); shrink or remove it")


def _as_rgb(img: Image.Image, source: str) -> Image.Image:
    """8-bit RGB. Pillow's own conversion clips 16-bit grey (PNG's I;16) to white, so those
    pixels are scaled; float pixels have no agreed range and are refused."""
    if img.mode.startswith("I;16") or img.mode == "I":
        values = np.asarray(img).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise FairsynthError(f"image {source} has {img.mode} pixels outside 0-65535; save it as 8- or 16-bit")
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if img.mode == "F":
        raise FairsynthError(f"image {source} has floating-point pixels (mode F), which have no fixed range; "
                             "save it as an 8- or 16-bit image")
    return img.convert("RGB")


def _center_square(img: Image.Image) -> Image.Image:
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side))


def find_bad_images(sources: list[str]) -> list[str]:
    """Sources that cannot be decoded completely (missing, corrupt or truncated files), or
    whose pixels cannot be read as 8-bit RGB (float pixels, decompression bombs)."""
    bad = []
    for source in sources:
        if source.startswith(BUILTIN_SCHEME):
            continue
        try:
            with _open_image(source) as img:
                _refuse_oversized(img, source)
                img.load()
                _as_rgb(img, source)
        except (OSError, UnidentifiedImageError, SyntaxError, Image.DecompressionBombError, FairsynthError):
            bad.append(source)
    return bad
