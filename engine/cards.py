"""Cards that the Hugging Face tools read: a model card beside every fine-tuned unit and a
dataset card beside every method's synthetic set.

A card is a ``README.md`` whose YAML front matter ``huggingface_hub.ModelCard`` /
``DatasetCard`` read and the Hub shows. Cards describe outputs; they are never an input to a
stage, so no cache key or completion marker covers them.
"""

from __future__ import annotations

import logging

from huggingface_hub import ModelCard, ModelCardData

from engine import storage
from engine.generation_methods import get_artifact, get_method

CARD_FILE = "README.md"

log = logging.getLogger(__name__)

# The base model's license binds what is fine-tuned from it.
OPENRAIL_BASES = ("stable-diffusion-v1-", "stable-diffusion-v1-5")


def base_license(base: str) -> str:
    """The Hub license id of a unit fine-tuned from ``base``."""
    if base == "tiny" or base.startswith("random:"):
        return "apache-2.0"  # the project's own weights (the shipped tiny model, seeded random ones)
    if any(name in base for name in OPENRAIL_BASES):
        return "creativeml-openrail-m"
    return "other"  # the base model's own terms apply


def unit_tags(method: str, artifact_kind: str) -> list[str]:
    tags = ["text-to-image", "diffusers", "diffusers-training", "stable-diffusion"]
    tags += [*get_method(method).card_tags, *get_artifact(artifact_kind).card_tags]
    return [*tags, "fairsynth"]


def unit_card(*, method: str, base_model: str, dataset: str, unit: dict, group_name: str,
              settings: dict, record: dict) -> str:
    """The model card of one trained unit (``unit``: its manifest fields; ``settings``: the
    finetune keys it was trained under; ``record``: its unit.json)."""
    kind = record["artifact_kind"]
    data = ModelCardData(
        base_model=base_model, library_name="diffusers", license=base_license(base_model),
        tags=unit_tags(method, kind), instance_prompt=unit["train_prompt"],
    )
    where = f"group {unit['group']} ({group_name})"
    if unit["cluster"] >= 0:
        where += f", cluster {unit['cluster']}"
    rows = [("steps trained", record["steps"]), ("learning rate used", record["learning_rate"]),
            *sorted((f"finetune.{k}", v) for k, v in settings.items()), ("final loss", record["final_loss"]),
            ("held-out loss", record.get("heldout_loss"))]
    table = "\n".join(f"| {k} | {v if v is not None else '-'} |" for k, v in rows)
    body = f"""
# fairsynth {method} unit {unit['unit']}: {group_name}

`{base_model}` fine-tuned by fairsynth's `{method}` method (stored as `{kind}`) on the
{unit['n_real']} real training images of {where} of the `{dataset}` dataset, to draw
group-balanced synthetic training images.

## Prompts

- trained on: `{unit['train_prompt']}`
- draws with: `{unit['prompt']}`
- negative prompt: `{unit['negative_prompt'] or '(none)'}`

## Training

| setting | value |
|---|---|
{table}

## Samples

The generate stage draws this unit's images. Its first samples are row `{unit['unit']}` of
the method's grid in the run directory, [`grids/{method}.png`](../../../../grids/{method}.png)
(images the filter dropped have a red frame).

## Use

{get_artifact(kind).how_to_load(base_model, unit['prompt'], settings)}
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


# --- the dataset card of a method's synthetic set ---------------------------------------------

# Columns whose integers name something: declared as ClassLabel features with those names.
NAMED_COLUMNS = ("label", "attribute", "group")


def group_names(class_names: list[str], attribute_names: list[str]) -> list[str]:
    """Group names in group-id order (id = label * n_attributes + attribute), as
    GroupedDataset.group_name writes them."""
    return [f"{c} / {a}" for c in class_names for a in attribute_names]


def dataset_features(class_names: list[str], attribute_names: list[str]) -> list[dict]:
    """The shards' columns as a dataset card's ``dataset_info.features`` (datasets' YAML form),
    read off the shard schema so the two cannot drift apart."""
    from engine.stages.generate.shards import IMAGE_TYPE, SYNTHETIC_SCHEMA, hf_value_dtype

    names = {"label": class_names, "attribute": attribute_names, "group": group_names(class_names, attribute_names)}
    features = []
    for field in SYNTHETIC_SCHEMA:
        if field.type == IMAGE_TYPE:
            dtype = "image"
        elif field.name in NAMED_COLUMNS:
            dtype = {"class_label": {"names": {str(i): n for i, n in enumerate(names[field.name])}}}
        else:
            dtype = hf_value_dtype(field.type)
        features.append({"name": field.name, "dtype": dtype})
    return features


def _code(text: str) -> str:
    return f"`{text}`" if text else "-"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _group_rows(groups: dict, generated: dict, filtered: dict | None) -> list[str]:
    """One table row per group: images generated, kept, and the judge's group fidelity."""
    names = group_names(groups["class_names"], groups["attribute_names"])
    per_unit = (filtered or {}).get("fidelity", {}).get("per_unit", {})
    rows = []
    for group, name in enumerate(names):
        images = int(generated["per_group"].get(str(group), 0))
        if filtered is None:
            rows.append(f"| {group} | {name} | {images} | - | - | - |")
            continue
        kept = filtered["per_group"].get(str(group), {}).get("kept", 0)
        units = [u for u in per_unit.values() if u["group"] == group]
        right_all = sum(u["before"] * u["images"] for u in units if u["before"] is not None)
        right_kept = sum(u["after"] * u["kept"] for u in units if u["after"] is not None)
        all_share = right_all / images if images else None
        kept_share = right_kept / kept if kept else None
        rows.append(f"| {group} | {name} | {images} | {kept} | {_share(all_share)} | {_share(kept_share)} |")
    return rows


def dataset_card(*, method: str, groups: dict, generated: dict, manifest: dict, filtered: dict | None) -> str:
    """The dataset card of a method's synthetic set: ``groups`` is data/groups.json,
    ``generated`` the generate stage's _summary.json, ``manifest`` the finetune manifest and
    ``filtered`` the filter stage's summary.json (None until the filter has scored this set)."""
    from huggingface_hub import DatasetCard, DatasetCardData

    base = generated["base_model"]
    data = DatasetCardData(
        license=base_license(base), task_categories=["image-classification"],
        tags=["synthetic", "text-to-image", "fairness", "group-robustness", "fairsynth"],
        dataset_info={"features": dataset_features(groups["class_names"], groups["attribute_names"])},
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": "part-*.parquet"}]}],
    )
    sampling = ", ".join(f"{k} {v}" for k, v in generated["sampling"].items())
    if filtered is None:
        filter_text = ("Not filtered yet: every row has `kept` true and `score` NaN until the filter "
                       "stage scores the set.")
    else:
        fid = filtered["fidelity"]
        filter_text = (
            f"The filter scored every image with `{filtered['encoder']}` (alpha {filtered['alpha']}: "
            f"class prompt and group centroid) and kept the top {filtered['keep_fraction']:.0%} of each "
            f"group: {filtered['kept']} of {filtered['images']} images "
            f"({filtered['kept'] / max(filtered['images'], 1):.1%}), `kept` true. A classifier trains "
            f"on the kept rows. Group fidelity ({fid['judge']} judge: the share of images read as "
            f"exactly their group) is {_share(fid['before'])} over all images and "
            f"{_share(fid['after'])} over the kept ones."
        )
    unit_rows = [
        f"| {u['unit']} | {u['group']} | `{u['prompt']}` | {_code(u['negative_prompt'])} | "
        f"{u['borrowed_from'] or '-'} | {generated['per_unit'].get(u['unit'], 0)} |"
        for u in manifest["units"]
    ]
    body = f"""
# fairsynth synthetic set: {method}, {groups['dataset']}

Group-balanced synthetic training images of the `{groups['dataset']}` dataset's classes
({', '.join(groups['class_names'])}) on its attributes ({', '.join(groups['attribute_names'])}),
drawn from `{base}` by the units of fairsynth's `{method}` method: {generated['images']} images
in {generated['shards']} Parquet shards, one row per image.

```python
from datasets import load_dataset
ds = load_dataset("path/to/this/folder", split="train")
kept = ds.filter(lambda row: row["kept"])
```

## Generation

- base model: `{base}`; sampler: {sampling}
- plan `{generated['plan_hash']}`; each image's `seed` and `prompt` are in its row

| unit | group | prompt | negative prompt | borrows | images |
|---|---|---|---|---|---|
{chr(10).join(unit_rows)}

## Filtering

{filter_text}

| group | name | generated | kept | fidelity (all) | fidelity (kept) |
|---|---|---|---|---|---|
{chr(10).join(_group_rows(groups, generated, filtered))}
"""
    return str(DatasetCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def current_filter_summary(run, method: str) -> dict | None:
    """The filter stage's summary of the set's present rows, or None: new rows clear its marker."""
    from engine.runs import read_json
    from engine.stages.filter.stage import filter_stage_name

    if not run.marker(filter_stage_name(method)).exists():
        return None
    return read_json(run / filter_stage_name(method) / "summary.json")


def write_dataset_card(run, method: str, filtered: dict | None) -> None:
    """Write ``RUN/synthetic/<method>/README.md`` from the generate stage's summary, the
    finetune manifest and ``filtered`` (the filter stage's summary, or None); nothing when a
    source is missing."""
    from engine.runs import atomic_write_text, read_json
    from engine.stages.finetune.stage import manifest_path
    from engine.stages.generate.shards import synthetic_dir

    folder = synthetic_dir(run, method)
    sources = (run / "data/groups.json", folder / "_summary.json", manifest_path(run, method))
    missing = [path for path in sources if not storage.exists(path)]
    if missing:  # shards that no generate stage wrote (a test's, an import): a card has no source
        log.info("no dataset card for %s: %s is missing", folder, missing[0])
        return
    card = dataset_card(method=method, groups=read_json(run / "data/groups.json"),
                        generated=read_json(folder / "_summary.json"),
                        manifest=read_json(manifest_path(run, method)), filtered=filtered)
    atomic_write_text(folder / CARD_FILE, card)
