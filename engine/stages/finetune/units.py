"""Which units a fine-tuning method has, which real images each trains on, which units borrow
another unit's model, and the prompts every unit trains and generates with.

A unit is what one fine-tuning trial trains: a group (LoRA, DreamBooth), a (group, cluster)
pair (clustered DreamBooth), or, for vanilla, a group drawn by the base model. A group with
fewer real training images than ``finetune.min_real_images`` (a minority group at extreme
bias) trains nothing: it borrows the model of the bias-aligned group of the same class and
generates with that group's prompt, its own attribute word swapped in, no identifier, and a
negative prompt against the source attribute (PAPER.md step 3), at ``generate.borrowed_strength``
of the source's fine-tuning (engine/stages/generate/plan.py). Per-cluster methods mirror
the source group's clusters, one borrowing unit per source cluster, so a minority group is
drawn with the same variety as the group it borrows from.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import pandas as pd

from engine.config import Config
from engine.errors import FairsynthError
from engine.hashing import digest
from engine.stages.data.datasets import GroupedDataset

log = logging.getLogger(__name__)

NO_CLUSTER = -1


@dataclass
class Unit:
    """One fine-tuning unit and everything its trial and the manifest need."""

    unit: str
    group: int
    cluster: int
    label: int
    attribute: int
    n_real: int
    # Real training images the unit's model learns from (empty when it trains nothing).
    sources: list[str] = field(default_factory=list)
    # Caption of every training image; None when the unit trains nothing.
    train_prompt: str | None = None
    # Prior-preservation prompt: what the base model draws for the unit's group.
    class_prompt: str = ""
    prompt: str = ""
    negative_prompt: str = ""
    borrowed_from: str | None = None

    @property
    def trains(self) -> bool:
        return self.train_prompt is not None and self.borrowed_from is None

    def training_hash(self) -> str:
        """What the unit's trained model depends on, beyond the config."""
        return digest({k: v for k, v in asdict(self).items() if k in ("unit", "sources", "train_prompt", "class_prompt")})


def unit_id(group: int, cluster: int = NO_CLUSTER) -> str:
    return f"g{group}" if cluster == NO_CLUSTER else f"g{group}c{cluster}"


class PromptBook:
    """The generate section's prompt templates, filled with a dataset's class and attribute words."""

    def __init__(self, cfg: Config, dataset: GroupedDataset):
        self.cfg = cfg
        self.dataset = dataset

    def _fill(self, key: str, **words: str) -> str:
        template = getattr(self.cfg.generate, key)
        try:
            return template.format(**words)
        except (KeyError, IndexError, ValueError) as exc:
            valid = ", ".join("{" + w + "}" for w in words)
            raise FairsynthError(
                f"config error: generate.{key} = {template!r} cannot be filled ({exc!r}); "
                f"valid placeholders: {valid}"
            ) from None

    def words(self, label: int, attribute: int) -> dict[str, str]:
        return {
            "class_name": self.dataset.class_names[label],
            "attribute_name": self.dataset.attribute_names[attribute],
        }

    def plain(self, label: int, attribute: int) -> str:
        return self._fill("prompt_template", **self.words(label, attribute))

    def with_identifier(self, label: int, attribute: int) -> str:
        return self._fill(
            "identifier_template", identifier=self.cfg.finetune.identifier, **self.words(label, attribute)
        )

    def negative(self, source_attribute: int) -> str:
        return self._fill(
            "negative_prompt_template", source_attribute_name=self.dataset.attribute_names[source_attribute]
        )

    def own_negative(self, label: int, attribute: int) -> str:
        """The negative prompt of a unit drawing with its own model: the words of the classes
        and attributes it is not (a comma-separated list where there are several)."""
        return self._fill(
            "own_negative_prompt_template",
            other_class_names=_other_names(self.dataset.class_names, label),
            other_attribute_names=_other_names(self.dataset.attribute_names, attribute),
            **self.words(label, attribute),
        ).strip()


def _other_names(names: list[str] | tuple[str, ...], own: int) -> str:
    """Every name but ``names[own]``, comma-separated."""
    return ", ".join(name for i, name in enumerate(names) if i != own)


def train_sources_by_group(dataset: GroupedDataset) -> dict[int, pd.DataFrame]:
    train = dataset.split("train")
    return {g: train[train["group"] == g] for g in range(dataset.n_groups)}


def borrowing_source(cfg: Config, dataset: GroupedDataset, group: int, counts: list[int]) -> int | None:
    """The group whose model ``group`` borrows, or None when it trains its own."""
    label, attribute = divmod(group, dataset.n_attributes)
    if counts[group] >= cfg.finetune.min_real_images:
        return None
    aligned = dataset.info.get("aligned", {}).get(label)
    source = None if aligned is None else dataset.group_id(label, int(aligned))
    if source is None or source == group:
        if counts[group] == 0:
            raise FairsynthError(
                f"group {group} ({dataset.group_name(group)}) has 0 real training images and nothing to "
                f"borrow (it is its class's bias-aligned group); lower data.severity or add images"
            )
        log.warning(
            "group %d (%s) has only %d real training images (finetune.min_real_images=%d) and is its "
            "class's aligned group, so it trains on what it has",
            group, dataset.group_name(group), counts[group], cfg.finetune.min_real_images,
        )
        return None
    if counts[source] == 0:
        raise FairsynthError(
            f"group {group} ({dataset.group_name(group)}) has {counts[group]} real training images and its "
            f"class's aligned group {source} ({dataset.group_name(source)}) has none to lend; "
            "lower data.severity or add images"
        )
    return source


def plan_base_units(cfg: Config, dataset: GroupedDataset) -> list[Unit]:
    """One unit per group, drawn by the base model with the plain prompt (nothing trains)."""
    prompts = PromptBook(cfg, dataset)
    by_group = train_sources_by_group(dataset)
    return [
        Unit(
            unit=unit_id(g), group=g, cluster=NO_CLUSTER, label=g // dataset.n_attributes,
            attribute=g % dataset.n_attributes, n_real=len(by_group[g]),
            class_prompt=prompts.plain(*divmod(g, dataset.n_attributes)),
            prompt=prompts.plain(*divmod(g, dataset.n_attributes)),
        )
        for g in range(dataset.n_groups)
    ]


def cluster_map(dataset: GroupedDataset, assignments: pd.DataFrame | None) -> dict[str, int]:
    """Each training image's cluster, from the cluster stage's ``assignments`` (image_id,
    group, cluster)."""
    if assignments is None:
        raise FairsynthError("clustered units need RUN/cluster/assignments.parquet; run the cluster stage first")
    cluster_of = dict(zip(assignments["image_id"], assignments["cluster"].astype(int), strict=True))
    missing = [i for i in dataset.split("train")["image_id"] if i not in cluster_of]
    if missing:
        raise FairsynthError(
            f"training image {missing[0]!r} has no cluster in RUN/cluster/assignments.parquet "
            "(written for other data); re-run the cluster stage"
        )
    return cluster_of


def plan_trained_units(
    cfg: Config, dataset: GroupedDataset, with_identifier: bool, cluster_of: dict[str, int] | None = None
) -> list[Unit]:
    """Every unit of a trained method, trained ones first in group order, borrowing ones after.

    Captions carry the identifier when ``with_identifier``; with ``cluster_of`` (image id ->
    cluster, :func:`cluster_map`) a group trains one unit per cluster of its images.
    """
    prompts = PromptBook(cfg, dataset)
    by_group = train_sources_by_group(dataset)
    counts = [len(by_group[g]) for g in range(dataset.n_groups)]
    per_cluster = cluster_of is not None

    def caption(label: int, attribute: int) -> str:
        return prompts.with_identifier(label, attribute) if with_identifier else prompts.plain(label, attribute)

    def own_units(group: int) -> list[Unit]:
        label, attribute = divmod(group, dataset.n_attributes)
        rows = by_group[group]
        if per_cluster:
            clusters = rows["image_id"].map(cluster_of).to_numpy()
            parts = [(int(c), rows[clusters == c]) for c in sorted(set(clusters.tolist()))]
        else:
            parts = [(NO_CLUSTER, rows)]
        return [
            Unit(
                unit=unit_id(group, c), group=group, cluster=c, label=label, attribute=attribute,
                n_real=len(part), sources=part["source"].tolist(), train_prompt=caption(label, attribute),
                class_prompt=prompts.plain(label, attribute), prompt=caption(label, attribute),
                negative_prompt=prompts.own_negative(label, attribute),
            )
            for c, part in parts
        ]

    sources = {g: borrowing_source(cfg, dataset, g, counts) for g in range(dataset.n_groups)}
    trained = {g: own_units(g) for g in range(dataset.n_groups) if sources[g] is None}
    units = [u for g in sorted(trained) for u in trained[g]]
    for group, source in sorted((g, s) for g, s in sources.items() if s is not None):
        label, attribute = divmod(group, dataset.n_attributes)
        own = by_group[group]
        for lender in trained[source]:
            if per_cluster:
                n_real = int((own["image_id"].map(cluster_of) == lender.cluster).sum())
            else:
                n_real = len(own)
            units.append(
                Unit(
                    unit=unit_id(group, lender.cluster), group=group, cluster=lender.cluster, label=label,
                    attribute=attribute, n_real=n_real, class_prompt=prompts.plain(label, attribute),
                    prompt=prompts.plain(label, attribute),
                    negative_prompt=prompts.negative(lender.attribute), borrowed_from=lender.unit,
                )
            )
        log.info(
            "group %d (%s) has %d real training images (< finetune.min_real_images=%d): it borrows %s",
            group, dataset.group_name(group), counts[group], cfg.finetune.min_real_images,
            ", ".join(u.unit for u in trained[source]),
        )
    return units
