"""The stage protocol: what each stage's cached output depends on, declared once.

A stage is named here with the stages it needs (what it reads from the run directory). The
config fields its output depends on are declared in the schema (engine/config.py): a section
names the stages its fields change (``Section.stages``), and a field that differs carries its
own mark (``json_schema_extra=output_of(...)``, or ``RESOURCES`` for none). A stage's key
hashes :data:`FORMAT_VERSION`, the stage's name, the values of every field marked for it (and
the run's seed when one of them is in a seeded section), and what it reads from the stages it
needs, so a field added to a section is covered without anyone listing it.

Every completion marker holds a key and the format version (engine/runs.py): a run directory
written by another version re-runs its stages rather than being read through shims.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import BaseModel

from engine.config import Config, Section, SeededSection
from engine.hashing import digest

# Raise when what a stage writes changes form: every stage of an older run directory re-runs.
FORMAT_VERSION = 2

# Stage -> the stages it needs. A stage that reads an upstream's outputs hashes that upstream's
# key, or a digest of the very content it reads (the generate stage hashes its plan's rows, so a
# fine-tuning change that leaves the units as they were draws nothing again).
STAGES: dict[str, tuple[str, ...]] = {
    "data": (),
    "embeddings": ("data",),                   # training images through model.encoder
    "cluster": ("embeddings",),
    "unit_plan": ("data", "cluster"),          # a method's units, their images and prompts
    "class_images": (),                        # prior-preservation images of the base model
    "unit_training": ("class_images",),        # how a unit trains, beyond its images and prompts
    "finetune": ("unit_plan", "unit_training"),  # a method's manifest
    "generate": ("finetune",),
    "filter": ("generate", "embeddings"),      # the kept images (group means come from embeddings)
    "fidelity": ("filter",),                   # the judge's report on them
    "oracle": ("data",),
    "train": ("data", "filter"),
}


def _field_stages(model: type[BaseModel], inherited: tuple[str, ...] | None, prefix: str = ""):
    """(dotted field, stages it changes, in a seeded section) for every leaf field of ``model``."""
    own = model.stages if issubclass(model, Section) and model.stages is not None else inherited
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        marked = (field.json_schema_extra or {}).get("stages") if isinstance(field.json_schema_extra, dict) else None
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _field_stages(field.annotation, tuple(marked) if marked is not None else own, f"{path}.")
            continue
        stages = tuple(marked) if marked is not None else own
        yield path, stages, issubclass(model, SeededSection)


@cache
def field_marks(model: type[Config] = Config) -> dict[str, tuple[str, ...] | None]:
    """Every leaf field of the config and the stages it changes (None: unmarked, a schema error)."""
    return {path: stages for path, stages, _ in _field_stages(model, None)}


@cache
def stage_fields(stage: str, model: type[Config] = Config) -> tuple[tuple[str, ...], bool]:
    """The fields ``stage``'s output depends on, and whether it reads the run's seed."""
    if stage not in STAGES:
        raise KeyError(f"unknown stage {stage!r}; declared: {', '.join(STAGES)}")
    found = [(path, seeded) for path, stages, seeded in _field_stages(model, None) if stage in (stages or ())]
    return tuple(p for p, _ in found), any(seeded for _, seeded in found)


def _value(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node.model_dump(mode="json") if isinstance(node, BaseModel) else node


def stage_key(cfg: Config, stage: str, **inputs: Any) -> str:
    """The cache key of ``stage`` under ``cfg``.

    ``inputs`` gives, for each stage it needs, what it read from that stage: its key or a digest
    of the content (None where this config reads nothing of it, e.g. the cluster stage for a
    method with a unit per group), plus anything else the stage reads (a method's name, the
    base model's files). A need left out is an error: the declaration is what the key covers.
    """
    fields, seeded = stage_fields(stage, type(cfg))
    missing = [n for n in STAGES[stage] if n not in inputs]
    if missing:
        raise TypeError(f"stage_key({stage!r}) needs the input of {', '.join(missing)}")
    payload = {
        "format": FORMAT_VERSION,
        "stage": stage,
        "fields": {f: _value(cfg, f) for f in fields},
        "inputs": {k: v for k, v in inputs.items() if v is not None},
    }
    if seeded:
        payload["seed"] = cfg.seed
    return digest(payload)
