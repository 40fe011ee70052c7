"""Synthetic group fidelity: does a generated image show the group it was drawn for?

A judge reads each synthetic image's class and attribute; a unit's fidelity is the share of
its images read as exactly the unit's group (class and attribute). The filter stage reads
every image once, and reports fidelity per method and unit over all generated images
("before" filtering) and over the kept ones ("after"), so the filter's effect shows.

Judges, chosen by ``fidelity.judge`` (``auto``: the learned judge on the built-in benchmark,
CLIP elsewhere):

- ``learned``: a small CNN trained on group-balanced real renders of the built-in benchmark
  (``engine.models.judge``, shipped with the package): it reads an image as a model of the
  real images does, so an image it reads right also looks like a real one of its group.

- ``renderer``: the built-in benchmark's own drawing rules (``engine.stages.data.builtin``), read
  backwards. The attribute is the background family whose colour ramp the image border lies
  on; the class is the object's shape (landbirds are drawn taller than wide, waterbirds
  wider than tall). An object is there when enough pixels match some object colour of the
  palette better than the background (all colours counted together: a generated bird is
  often shaded between two), and its silhouette is the pixels nearer the most common one.
  It knows nothing the generator or the filter learned, so it is independent of both. On
  8,000 real renders of each it read 99.94% of the classic rendering right (dark crows on
  forest read as waterbirds; backgrounds all right), 99.51% of the calibrated one and 100%
  of base-style ones (tests/test_fidelity.py and tests/test_builtin_calibration.py check
  samples of each).
- ``clip``: zero-shot CLIP (``model.encoder``): the class prompt and the attribute prompt of
  highest cosine similarity, as the paper's filter scores classes.

A reading of -1 means the judge saw no object (or no background) it knows; such an image
matches no group.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from engine.stages.data import builtin

UNREADABLE = -1

# Renderer knowledge: the two colours each background blends between, the object colours
# (shaded by up to +-18% top to bottom), and the base style's dark outline.
_BACKGROUND_NAMES = tuple(builtin.BACKGROUNDS)
_BACKGROUND_ENDS = np.array(
    [[builtin._BACKGROUND_COLOURS[b][0], builtin._BACKGROUND_COLOURS[b][1]] for b in _BACKGROUND_NAMES],
    dtype=np.float32,
)
_OBJECT_NAMES = tuple(builtin.OBJECTS)
_OBJECT_COLOURS = np.array([builtin._OBJECT_COLOUR[o] for o in _OBJECT_NAMES], dtype=np.float32)
_SHADE_RANGE = (0.8, 1.2)
_OUTLINE_COLOUR = np.array([15.0, 15.0, 15.0], dtype=np.float32)
# A background whose border lies further than this (RGB distance, median over the border)
# from every palette ramp is not one the renderer draws. Real renders stay below about 40.
MAX_BACKGROUND_DISTANCE = 70.0
# Fewest object pixels, as a share of the image, that count as an object.
MIN_OBJECT_SHARE = 0.03


def _distance_to_segments(pixels: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """RGB distance of pixels [n, 3] to each segment ends[k] = (a, b): [n, k]."""
    a, b = ends[:, 0], ends[:, 1]
    d = b - a
    t = np.einsum("nkc,kc->nk", pixels[:, None, :] - a[None], d) / np.maximum((d * d).sum(1), 1e-6)
    t = np.clip(t, 0.0, 1.0)
    nearest = a[None] + t[..., None] * d[None]
    return np.linalg.norm(pixels[:, None, :] - nearest, axis=-1)


def _border(image: np.ndarray) -> np.ndarray:
    h, w, _ = image.shape
    width = max(1, round(min(h, w) / 10))
    mask = np.zeros((h, w), dtype=bool)
    mask[:width], mask[-width:], mask[:, :width], mask[:, -width:] = True, True, True, True
    return mask


def _object_segments() -> np.ndarray:
    low, high = _SHADE_RANGE
    return np.stack([_OBJECT_COLOURS * low, _OBJECT_COLOURS * high], axis=1)


# The base style's dark outline first, then the objects' shading ramps.
_PALETTE_ENDS = np.concatenate([np.stack([_OUTLINE_COLOUR, _OUTLINE_COLOUR])[None], _object_segments()])


def _silhouette(mask: np.ndarray) -> np.ndarray:
    """The largest blob of object pixels, after closing the gaps that pixels of an object
    coloured close to its background leave (a dark crow on forest trunks)."""
    from scipy import ndimage

    mask = ndimage.binary_fill_holes(mask)
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
    return labels == (1 + int(np.argmax(sizes)))


def _is_tall(mask: np.ndarray) -> bool:
    """Whether a silhouette's long axis is nearer vertical than horizontal."""
    ys, xs = np.nonzero(mask)
    cov = np.cov(np.stack([xs, ys]).astype(np.float64))
    values, vectors = np.linalg.eigh(cov)
    major = vectors[:, int(np.argmax(values))]
    return abs(major[1]) > abs(major[0])


def read_renderer_image(image: np.ndarray) -> tuple[int, int]:
    """(class, attribute) of one built-in-benchmark-like image, -1 where unreadable."""
    pixels = image.reshape(-1, 3).astype(np.float32)
    h, w, _ = image.shape
    border = _border(image).reshape(-1)
    # Median over the border: an object reaching the edge is outvoted.
    border_distance = np.median(_distance_to_segments(pixels[border], _BACKGROUND_ENDS), axis=0)
    background = int(np.argmin(border_distance))
    if border_distance[background] > MAX_BACKGROUND_DISTANCE:
        return UNREADABLE, UNREADABLE
    attribute = builtin.BACKGROUND_ATTRIBUTE[_BACKGROUND_NAMES[background]]

    # The renderer shifts each image's background colours; measure the shift on the border.
    ramp = _BACKGROUND_ENDS[background]
    shift = np.median(pixels[border] - _nearest_on_segment(pixels[border], ramp), axis=0)
    to_background = _distance_to_segments(pixels - shift, ramp[None])[:, 0]
    # Pixels the background explains as well as its own border pixels (the 90th percentile
    # of their distance) do not vote: a dark forest texture, shifted, can pass for a crow.
    explained = to_background <= np.percentile(to_background[border], 90)
    to_palette = _distance_to_segments(pixels, _PALETTE_ENDS)
    choice = np.argmin(np.column_stack([to_background, to_palette]), axis=1) - 1
    votes = np.bincount(choice[(choice >= 0) & ~explained], minlength=len(_PALETTE_ENDS))
    # Whether there is an object counts the pixels of every palette colour together: a
    # generator's bird is often shaded between two (orange between duck and sparrow), and no
    # single colour then reaches the share. Its silhouette is read below from the winning
    # colour, which takes in a neighbouring shade but not a far one (sparrow and gull).
    if votes.sum() < MIN_OBJECT_SHARE * h * w:
        return UNREADABLE, attribute
    # Second pass with this image's own object colour (the renderer shifts it too): the
    # median of the pixels that voted for the winning palette colour, over its shading range.
    own = np.median(pixels[(choice == int(np.argmax(votes))) & ~explained], axis=0)
    low, high = _SHADE_RANGE
    own_ramp = np.stack([own * low, own * high]) / ((low + high) / 2)
    to_object = np.minimum(_distance_to_segments(pixels, own_ramp[None])[:, 0], to_palette[:, 0])
    silhouette = _silhouette((to_object < to_background).reshape(h, w))
    if silhouette.sum() < MIN_OBJECT_SHARE * h * w:
        return UNREADABLE, attribute
    # Shape decides the class, as in the renderer; colour only finds the object.
    return (0 if _is_tall(silhouette) else 1), attribute


def _nearest_on_segment(pixels: np.ndarray, ends: np.ndarray) -> np.ndarray:
    a, b = ends
    d = b - a
    t = np.clip((pixels - a) @ d / max(float(d @ d), 1e-6), 0.0, 1.0)
    return a + t[:, None] * d


class RendererJudge:
    """Reads class and attribute with the built-in benchmark's drawing rules."""

    name = "renderer"

    def read(self, images) -> tuple[np.ndarray, np.ndarray]:
        """Images: uint8 [n, H, W, 3], or a list of [H, W, 3] (sizes may differ)."""
        readings = [read_renderer_image(np.asarray(im)) for im in images]
        labels = np.array([r[0] for r in readings], dtype=np.int64)
        attributes = np.array([r[1] for r in readings], dtype=np.int64)
        return labels, attributes


class LearnedJudge:
    """Reads class and attribute with the shipped learned judge (engine.models.judge)."""

    name = "learned"

    def __init__(self):
        from engine.models.judge import load_judge

        self.model = load_judge()

    def read(self, images) -> tuple[np.ndarray, np.ndarray]:
        from engine.models.judge import read_groups

        labels, attributes = read_groups(self.model, list(images))
        return labels.astype(np.int64), attributes.astype(np.int64)


class ClipJudge:
    """Zero-shot image-text encoder: the class and attribute prompts nearest each image."""

    name = "clip"

    def __init__(self, encoder, class_prompts: list[str], attribute_prompts: list[str]):
        self.encoder = encoder
        self.class_embeddings = np.asarray(encoder.encode_texts(class_prompts), dtype=np.float32)
        self.attribute_embeddings = np.asarray(encoder.encode_texts(attribute_prompts), dtype=np.float32)

    def read_embeddings(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        embeddings = np.asarray(embeddings, dtype=np.float32)
        labels = np.argmax(embeddings @ self.class_embeddings.T, axis=1)
        attributes = np.argmax(embeddings @ self.attribute_embeddings.T, axis=1)
        return labels.astype(np.int64), attributes.astype(np.int64)

    def read(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.read_embeddings(self.encoder.encode_images(images))


def make_judge(kind: str, encoder=None, prompts: tuple[list[str], list[str]] | None = None):
    """The judge ``kind`` names (judge_kind); the clip judge reads with ``encoder`` and the
    class and attribute ``prompts`` (judge_prompts)."""
    if kind == "renderer":
        return RendererJudge()
    if kind == "learned":
        return LearnedJudge()
    return ClipJudge(encoder, *prompts)


def judge_kind(cfg) -> str:
    """The judge ``fidelity.judge`` names; 'auto' picks the learned judge on the built-in benchmark."""
    if cfg.fidelity.judge != "auto":
        return cfg.fidelity.judge
    return "learned" if cfg.data.name == "builtin" else "clip"


def judge_prompts(cfg, class_names: list[str], attribute_names: list[str]) -> tuple[list[str], list[str]]:
    """The clip judge's prompts: one per class and one per attribute."""
    f = cfg.fidelity
    return (
        [f.class_prompt_template.format(class_name=c) for c in class_names],
        [f.attribute_prompt_template.format(attribute_name=a) for a in attribute_names],
    )


def _shares(part: pd.DataFrame, n_attributes: int) -> dict:
    """Share of rows read as their own group, own class and own attribute (None if no row)."""
    if part.empty:
        return {"group": None, "class": None, "attribute": None}
    label, attribute = np.divmod(part["group"].to_numpy(np.int64), n_attributes)
    own_class = part["judged_label"].to_numpy() == label
    own_attribute = part["judged_attribute"].to_numpy() == attribute
    return {
        "group": float(np.mean(own_class & own_attribute)),
        "class": float(np.mean(own_class)),
        "attribute": float(np.mean(own_attribute)),
    }


def group_fidelity(readings: pd.DataFrame, n_attributes: int, group_names: list[str], judge: str) -> dict:
    """Fidelity of a method's synthetic set, overall and per unit, over every generated image
    ("before" filtering) and over the kept ones ("after").

    ``readings``: one row per image with unit, group, kept, judged_label, judged_attribute.
    Shares are of images read as the unit's exact group; the class and attribute shares
    say which half went wrong.
    """
    kept = readings["kept"].astype(bool)

    def entry(part: pd.DataFrame, part_kept: pd.Series) -> dict:
        before, after = _shares(part, n_attributes), _shares(part[part_kept], n_attributes)
        return {
            "images": int(len(part)),
            "kept": int(part_kept.sum()),
            "before": before["group"],
            "after": after["group"],
            "class_before": before["class"],
            "attribute_before": before["attribute"],
            "class_after": after["class"],
            "attribute_after": after["attribute"],
        }

    per_unit = {}
    for unit, part in readings.groupby("unit", sort=True):
        group = int(part["group"].iloc[0])
        per_unit[str(unit)] = {"group": group, "name": group_names[group], **entry(part, kept[part.index])}
    scored = {u: e for u, e in per_unit.items() if e["after"] is not None}
    worst = min(scored, key=lambda u: (scored[u]["after"], u)) if scored else None
    return {
        "judge": judge,
        **entry(readings, kept),
        "worst_unit_after": None if worst is None else {"unit": worst, "after": scored[worst]["after"]},
        "per_unit": per_unit,
    }
