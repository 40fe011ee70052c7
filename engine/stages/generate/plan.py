"""The group-balanced generation plan: which unit draws how many images, with which prompt and seed.

Every group gets the same number of images (``generate.images_per_group``, or ``"fill"``: up to
the largest real training group). Inside a group the images are split across its units in
proportion to their real image counts; a borrowed unit (a minority group drawn from the
bias-aligned group's model, at ``generate.borrowed_strength`` of its fine-tuning) weighs as
much as the unit it borrows from. Each planned image has a seed derived from
``generate.seed`` and its unit, so a re-run plans the same rows.

Rows are ordered by (unit, seed) and cut into shards of ``generate.rows_per_shard``; a shard's
file name holds the plan hash (the generate stage's key over these rows) and its index, so
shards from a different plan never mix with this one and a re-run writes only the shards that
are missing.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import pandas as pd

from engine.config import Config, GenerateConfig
from engine.errors import FairsynthError
from engine.generation_methods import BASE
from engine.hashing import digest
from engine.stages import stage_key

# Columns of a plan row; the sampler adds image, method and base_model, filtering adds the rest.
PLAN_COLUMNS = (
    "shard", "unit", "group", "cluster", "label", "attribute", "seed", "prompt",
    "negative_prompt", "artifact", "artifact_kind", "model_strength",
)
def unit_seed_base(generate_seed: int, unit: str) -> int:
    """First seed of a unit: a stable hash, so units draw unrelated noise (a seed, not a
    cache key: it stays as it is, or every image changes)."""
    digest = hashlib.sha256(f"{generate_seed}/{unit}".encode()).hexdigest()
    return int(digest[:10], 16)  # 40 bits: leaves room for 2**23 images per unit below 2**63


def split_proportionally(total: int, weights: list[float]) -> list[int]:
    """Largest-remainder split of ``total`` by ``weights``; equal shares when all weights are 0."""
    if not weights:
        return []
    if sum(weights) <= 0:
        weights = [1.0] * len(weights)
    exact = [total * w / sum(weights) for w in weights]
    counts = [math.floor(x) for x in exact]
    # Ties go to the earlier unit, so the split is deterministic.
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def drawing_model(unit: dict, by_id: dict[str, dict], borrowed_strength: float) -> tuple[dict, float]:
    """The manifest entry whose artifact draws ``unit``, and the share of its fine-tuning it
    draws with: a borrowed unit draws with its lender's model (named in its own entry, as the
    finetune stage writes it, or found by id) at ``generate.borrowed_strength``; any other unit
    with its own, at all of it."""
    if not unit.get("borrowed_from"):
        return unit, 1.0
    if float(borrowed_strength) == 0.0:  # none of the lender's fine-tuning: the base model, as trained
        return {"artifact": "", "artifact_kind": BASE}, 1.0
    model = unit if unit["artifact"] else by_id.get(unit["borrowed_from"], unit)
    return model, (float(borrowed_strength) if model["artifact"] else 1.0)


def images_per_group(cfg: GenerateConfig, real_train_counts: list[int]) -> int:
    if cfg.images_per_group == "fill":
        largest = max(real_train_counts, default=0)
        if largest < 1:
            raise FairsynthError(
                "generate.images_per_group='fill' needs real training images, and every group is "
                "empty; set generate.images_per_group to a number"
            )
        return largest
    return int(cfg.images_per_group)


def _check_manifest(manifest: dict, n_groups: int) -> list[dict]:
    units = manifest.get("units")
    if not isinstance(units, list) or not units:
        raise FairsynthError(
            f"finetune manifest for method {manifest.get('method')!r} has no units; re-run the finetune stage"
        )
    needed = ("unit", "group", "cluster", "label", "attribute", "n_real", "artifact", "artifact_kind", "prompt")
    for unit in units:
        missing = [k for k in needed if k not in unit]
        if missing:
            raise FairsynthError(
                f"finetune manifest unit {unit.get('unit')!r} lacks {missing[0]!r}; re-run the finetune stage"
            )
    ids = [u["unit"] for u in units]
    if len(set(ids)) != len(ids):
        raise FairsynthError("finetune manifest lists a unit twice; re-run the finetune stage")
    covered = {int(u["group"]) for u in units}
    absent = [g for g in range(n_groups) if g not in covered]
    if absent:
        raise FairsynthError(
            f"finetune manifest for method {manifest.get('method')!r} has no unit for group {absent[0]}; "
            "re-run the finetune stage"
        )
    return units


@dataclass
class GroupBalancedPlan:
    """One row per image to generate, in (unit, seed) order, cut into shards."""

    method: str
    base_model: str
    rows: pd.DataFrame
    per_group: dict[int, int]
    sampling: dict  # as the stage summary reports it
    rows_per_shard: int
    hash: str = field(default="")

    @classmethod
    def build(cls, manifest: dict, real_train_counts: list[int], config: Config) -> GroupBalancedPlan:
        """The plan for a finetune manifest (``RUN/finetune/<method>/manifest.json``)."""
        cfg = config.generate
        n_groups = len(real_train_counts)
        units = _check_manifest(manifest, n_groups)
        units = sorted(units, key=lambda u: (int(u["group"]), int(u["cluster"]), str(u["unit"])))
        by_id = {u["unit"]: u for u in units}
        per_group_total = images_per_group(cfg, real_train_counts)

        rows = []
        per_group = {}
        for group in range(n_groups):
            members = [u for u in units if int(u["group"]) == group]
            weights = [float(by_id.get(u.get("borrowed_from") or "", u)["n_real"]) for u in members]
            counts = split_proportionally(per_group_total, weights)
            per_group[group] = per_group_total
            for unit, count in zip(members, counts, strict=True):
                base_seed = unit_seed_base(cfg.seed, str(unit["unit"]))
                model, strength = drawing_model(unit, by_id, cfg.borrowed_strength)
                for i in range(count):
                    rows.append({
                        "unit": str(unit["unit"]),
                        "group": group,
                        "cluster": int(unit["cluster"]),
                        "label": int(unit["label"]),
                        "attribute": int(unit["attribute"]),
                        "seed": base_seed + i,
                        "prompt": str(unit["prompt"]),
                        "negative_prompt": str(unit.get("negative_prompt") or ""),
                        "artifact": model["artifact"] or "",
                        "artifact_kind": str(model["artifact_kind"]) if model["artifact"] else BASE,
                        "model_strength": strength,
                        # What makes a re-trained artifact at the same path a different model.
                        "_identity": [model.get("steps"), model.get("final_loss"), model.get("trained_under")],
                    })
        frame = pd.DataFrame(rows)
        plan = cls(
            method=str(manifest.get("method", "")),
            base_model=str(manifest.get("base_model", "")),
            rows=frame,
            per_group=per_group,
            sampling={"steps": cfg.steps, "guidance_scale": cfg.guidance_scale, "scheduler": cfg.scheduler},
            rows_per_shard=cfg.rows_per_shard,
        )
        # What the stage reads of the finetune stage is these rows: a fine-tuning change that
        # leaves them as they were draws nothing again.
        from engine.stages.finetune.stage import (
            model_fingerprint,  # base weights re-trained in place redraw
        )

        plan.hash = stage_key(config, "generate", method=plan.method, base_model=model_fingerprint(config),
                              finetune=digest(frame.to_dict(orient="list")))
        plan.rows = frame = frame.drop(columns="_identity")
        frame.insert(0, "shard", [plan.shard_name(i // cfg.rows_per_shard) for i in range(len(frame))])
        return plan

    def shard_name(self, index: int) -> str:
        return f"part-{self.hash}-{index:05d}.parquet"

    @property
    def n_shards(self) -> int:
        return math.ceil(len(self.rows) / self.rows_per_shard)

    @property
    def shard_names(self) -> list[str]:
        return [self.shard_name(i) for i in range(self.n_shards)]

    def shard_sizes(self) -> dict[str, int]:
        return self.rows["shard"].value_counts().to_dict()

    def shards(self, only: set[str] | None = None) -> list[pd.DataFrame]:
        """The plan rows of each shard (those named in ``only``, when given), in order."""
        return [
            frame.reset_index(drop=True)
            for name, frame in self.rows.groupby("shard", sort=True)
            if only is None or name in only
        ]
