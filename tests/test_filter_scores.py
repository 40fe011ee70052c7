"""The filter's rule on hand-made embeddings: score = alpha * sim(image, class prompt) +
(1 - alpha) * sim(image, group centroid), keep the top 75% of each group. The images that
must be kept are worked out by hand below, not by running the formula a second time."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from engine.errors import FairsynthError
from engine.stages.filter.stage import SyntheticImageScorer, select_top_fraction
from engine.stages.generate.shards import encode_png

# Four axes: 0 = class 0's prompt, 1 = group 0's centroid, 2 = group 1's centroid, 3 = class
# 1's prompt. Groups (class, attribute): 0 = (0, 0), 1 = (0, 1), 3 = (1, 1), with no real image
# (no centroid). Each image is (group, the similarities it is built with); the rest of its unit
# length goes to an axis that would score it wrongly if the scorer took another group's centroid
# or another class's prompt.
CLASS_PROMPTS = ["a photo of a landbird", "a photo of a waterbird"]
TEXT = {CLASS_PROMPTS[0]: [1, 0, 0, 0], CLASS_PROMPTS[1]: [0, 0, 0, 1]}
# The scorer takes one prompt per group; with a class-only template a class's prompt repeats.
GROUP_PROMPTS = [CLASS_PROMPTS[0], CLASS_PROMPTS[0], CLASS_PROMPTS[1], CLASS_PROMPTS[1]]
GROUP_MEANS = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0], [np.nan] * 4], dtype=np.float32)
IMAGES = {
    # group 0: (sim to class 0, sim to centroid 0); filler on axis 2 (group 1's centroid)
    "A": (0, {0: 0.8, 1: -0.5}, 2), "B": (0, {0: -0.4, 1: 0.75}, 2), "C": (0, {0: 0.5, 1: 0.5}, 2),
    "D": (0, {0: 0.4, 1: 0.4}, 2), "E": (0, {0: 0.3, 1: 0.6}, 2), "F": (0, {0: 0.6, 1: 0.1}, 2),
    "G": (0, {0: 0.2, 1: 0.3}, 2), "H": (0, {0: 0.1, 1: 0.3}, 2),
    # group 1: (sim to class 0, sim to centroid 1); filler on axis 1 (group 0's centroid)
    "I": (1, {0: 0.9, 2: 0.0}, 1), "J": (1, {0: 0.1, 2: 0.95}, 1), "K": (1, {0: 0.3, 2: 0.3}, 1),
    "L": (1, {0: 0.35, 2: 0.35}, 1),
    # group 3: sim to class 1 only (no centroid); filler on axis 0 (class 0's prompt)
    "M": (3, {3: 0.9}, 0), "N": (3, {3: 0.1}, 0), "O": (3, {3: 0.5}, 0), "P": (3, {3: 0.3}, 0),
}
NAMES = list(IMAGES)

# By hand: keep_count(8) = 6 (two dropped), keep_count(4) = 3 (one dropped).
# alpha 0.5, group 0: A .15, B .175, C .5, D .4, E .45, F .35, G .25, H .2 -> drop A, B (the
#   best class match and the best centroid match, each poor on the other term)
#   group 1: I .45, J .525, K .3, L .35 -> drop K;  group 3 (class term only) -> drop N
# alpha 1 (class term only): group 0 drops H .1, B -.4; group 1 drops J .1; group 3 drops N
# alpha 0 (centroid term only): group 0 drops F .1, A -.5; group 1 drops I 0; group 3 -> N
DROPPED = {0.5: {"A", "B", "K", "N"}, 1.0: {"H", "B", "J", "N"}, 0.0: {"F", "A", "I", "N"}}
SCORES_AT_HALF = {"A": 0.15, "B": 0.175, "C": 0.5, "D": 0.4, "E": 0.45, "F": 0.35, "G": 0.25, "H": 0.2,
                  "I": 0.45, "J": 0.525, "K": 0.3, "L": 0.35, "M": 0.9, "N": 0.1, "O": 0.5, "P": 0.3}


def _embedding(parts: dict[int, float], filler: int) -> list[float]:
    vector = [0.0] * 4
    for axis, value in parts.items():
        vector[axis] = value
    vector[filler] = math.sqrt(1 - sum(v * v for v in parts.values()))  # unit length, as CLIP's
    return vector


class HandMadeEncoder:
    """An image-text encoder whose embeddings are the table above: image i is a 4x4 PNG of
    value i, and reads back as IMAGES' i-th vector."""

    dim = 4
    image_size = 4

    def encode_texts(self, texts):
        return np.array([TEXT[t] for t in texts], dtype=np.float32)

    def encode_images(self, images):
        table = [_embedding(parts, filler) for _, parts, filler in IMAGES.values()]
        return np.array([table[int(i)] for i in images[:, 0, 0, 0]], dtype=np.float32)


@pytest.fixture
def batch() -> pd.DataFrame:
    groups = [IMAGES[n][0] for n in NAMES]
    return pd.DataFrame({
        "image": [encode_png(np.full((4, 4, 3), i, dtype=np.uint8)) for i in range(len(NAMES))],
        "unit": [f"g{g}" for g in groups],
        "seed": range(len(NAMES)),
        "group": groups,
        "label": [g // 2 for g in groups],
    })


@pytest.mark.parametrize("alpha", [0.5, 1.0, 0.0])
def test_the_kept_75_percent_are_those_worked_out_by_hand(monkeypatch, batch, alpha):
    import engine.models.encoders

    monkeypatch.setattr(engine.models.encoders, "load_encoder", lambda name, device: HandMadeEncoder())
    scorer = SyntheticImageScorer("hand-made", "cpu", 0.0, 32, GROUP_PROMPTS, GROUP_MEANS, alpha)
    scores = scorer(batch)
    kept = select_top_fraction(scores, 0.75)
    dropped = {NAMES[i] for i in scores.loc[~kept, "seed"]}
    assert dropped == DROPPED[alpha]
    if alpha == 0.5:
        by_name = dict(zip([NAMES[i] for i in scores["seed"]], scores["score"]))
        assert by_name == pytest.approx(SCORES_AT_HALF, abs=1e-6)
        # Group 3 has no centroid: its similarity to one is NaN, not a number that ranks.
        assert scores.loc[scores["group"] == 3, "sim_centroid"].isna().all()


def test_one_prompt_per_class_instead_of_per_group_is_a_clear_error(monkeypatch):
    import engine.models.encoders

    monkeypatch.setattr(engine.models.encoders, "load_encoder", lambda name, device: HandMadeEncoder())
    with pytest.raises(FairsynthError, match="2 prompts for 4 groups"):
        SyntheticImageScorer("hand-made", "cpu", 0.0, 32, CLASS_PROMPTS, GROUP_MEANS, 0.5)
