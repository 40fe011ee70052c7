"""The stage protocol (engine/stages/__init__.py): every config field is declared in the schema as
changing named stages' output or as resources only, and each stage's cache key is derived
from that, so a field added to a section moves exactly the keys of the stages it feeds."""

from __future__ import annotations

import json

import pytest
from pydantic import Field

from engine.config import (
    RESOURCES,
    ClusterConfig,
    Config,
    FinetuneConfig,
    GenerateConfig,
    load_config,
    output_of,
)
from engine.generation_methods import get_method
from engine.runs import RunDir
from engine.stages import FORMAT_VERSION, STAGES, field_marks, stage_fields, stage_key
from engine.stages.cluster.stage import cluster_hash, embeddings_hash
from engine.stages.data.stage import data_hash
from engine.stages.finetune.stage import class_image_key, stage_hash, training_hash, unit_plan_hash
from engine.stages.generate.oracle import oracle_hash
from engine.stages.train.stage import train_hash


def _keys(cfg: Config, run: RunDir) -> dict[str, str]:
    """Every stage's key as the stages derive it, for one method of each kind."""
    lora, clustered = get_method("lora"), get_method("clustered_dreambooth")
    keys = {
        "data": data_hash(cfg), "embeddings": embeddings_hash(cfg), "cluster": cluster_hash(cfg),
        "unit_plan/lora": unit_plan_hash(cfg, lora), "unit_plan/clustered": unit_plan_hash(cfg, clustered),
        "class_images": class_image_key(cfg, "a photo of a landbird"),
        "unit_training/lora": training_hash(cfg, lora), "finetune/lora": stage_hash(cfg, lora),
        "finetune/clustered": stage_hash(cfg, clustered), "oracle": oracle_hash(cfg),
        # The generate stage's input is its plan's rows (here fixed): its own fields alone move it.
        "generate": stage_key(cfg, "generate", method="lora", base_model="tiny", finetune="rows"),
    }
    keys["filter"] = stage_key(cfg, "filter", generate=keys["generate"], embeddings=keys["embeddings"])
    keys["fidelity"] = stage_key(cfg, "fidelity", filter=keys["filter"])
    run.mark_complete("filter/lora", keys["fidelity"], kept_hash=keys["filter"])
    keys["train/lora"], keys["train/erm"] = train_hash(cfg, run, "lora"), train_hash(cfg, run, "erm")
    return keys


def _moved(before: dict, after: dict) -> set[str]:
    return {k for k in before if before[k] != after[k]}


def test_every_config_field_is_declared_for_a_stage_or_as_resources():
    marks = field_marks()
    assert not [path for path, stages in marks.items() if stages is None]
    named = {s for stages in marks.values() for s in stages}
    assert named <= set(STAGES), f"fields name undeclared stages: {named - set(STAGES)}"
    assert all(need in STAGES for needs in STAGES.values() for need in needs)
    # A few declarations the caches rely on.
    assert "cluster.batch_size" not in stage_fields("cluster")[0]
    assert "generate.guidance_scale" in stage_fields("class_images")[0]
    assert "generate.prompt_template" in stage_fields("unit_plan")[0]
    assert "train.method_overrides" not in stage_fields("train")[0]


@pytest.mark.parametrize("section, annotation_cls, moved", [
    # A clustering knob: the clusters move, and what reads them (a per-cluster method's units).
    ("cluster", ClusterConfig, {"cluster", "unit_plan/clustered", "finetune/clustered"}),
    # A sampling knob: the images (and the classifiers trained on them) move, the models do not.
    ("generate", GenerateConfig, {"generate", "filter", "fidelity", "train/lora"}),
    # A training knob: every trained unit moves, the plan of units does not.
    ("finetune", FinetuneConfig, {"unit_training/lora", "finetune/lora", "finetune/clustered"}),
])
def test_a_field_added_to_a_section_moves_the_keys_of_its_stages_alone(tmp_path, section, annotation_cls, moved):
    extended = type(f"Extended{annotation_cls.__name__}", (annotation_cls,), {
        "__annotations__": {"new_knob": int, "new_resource": int},
        "new_knob": Field(1),  # nobody lists it anywhere
        "new_resource": Field(1, json_schema_extra=RESOURCES),
    })
    root = type("ExtendedConfig", (Config,), {"__annotations__": {section: extended}, section: extended()})
    base = root()
    assert f"{section}.new_knob" in field_marks(root)
    before = _keys(base, RunDir(tmp_path / "a"))
    knob = root.model_validate({section: {"new_knob": 2}})
    assert _moved(before, _keys(knob, RunDir(tmp_path / "b"))) == moved
    resource = root.model_validate({section: {"new_resource": 2}})
    assert _moved(before, _keys(resource, RunDir(tmp_path / "c"))) == set()


def test_a_field_marked_for_another_stage_moves_that_stage(tmp_path):
    """A generate field marked for the unit plan (a prompt) moves the units, not the sampler."""
    extended = type("PromptedGenerate", (GenerateConfig,), {
        "__annotations__": {"new_prompt": str}, "new_prompt": Field("x", json_schema_extra=output_of("unit_plan")),
    })
    root = type("PromptedConfig", (Config,), {"__annotations__": {"generate": extended}, "generate": extended()})
    before = _keys(root(), RunDir(tmp_path / "a"))
    after = _keys(root.model_validate({"generate": {"new_prompt": "y"}}), RunDir(tmp_path / "b"))
    assert _moved(before, after) == {"unit_plan/lora", "unit_plan/clustered", "finetune/lora", "finetune/clustered"}


def test_seed_and_upstream_changes_reach_every_stage_that_reads_them(tmp_path):
    base = _keys(load_config(), RunDir(tmp_path / "a"))
    reseeded = _keys(load_config(None, ["seed=3"]), RunDir(tmp_path / "b"))
    assert _moved(base, reseeded) == set(base)
    encoder = _keys(load_config(None, ["model.encoder=random:clip-vit-l14:width=0.05"]), RunDir(tmp_path / "c"))
    assert _moved(base, encoder) == {"embeddings", "cluster", "unit_plan/clustered", "finetune/clustered",
                                     "filter", "fidelity", "train/lora"}
    guidance = _keys(load_config(None, ["generate.guidance_scale=11"]), RunDir(tmp_path / "d"))
    # The base model draws prior-preservation images with the sampler's settings, and a
    # DreamBooth unit learns from them; LoRA units have no prior term.
    assert _moved(base, guidance) == {"class_images", "finetune/clustered", "generate", "filter", "fidelity",
                                      "train/lora"}
    assert training_hash(load_config(), get_method("dreambooth")) != training_hash(
        load_config(None, ["generate.guidance_scale=11"]), get_method("dreambooth"))
    no_prior = ["finetune.prior_preservation=false"]
    assert training_hash(load_config(None, no_prior), get_method("dreambooth")) == training_hash(
        load_config(None, [*no_prior, "generate.guidance_scale=11"]), get_method("dreambooth"))


def test_a_stage_key_names_every_stage_it_needs():
    with pytest.raises(TypeError, match="needs the input of embeddings"):
        stage_key(load_config(), "cluster")


def test_a_marker_of_another_format_version_is_not_complete(tmp_path):
    run = RunDir(tmp_path)
    run.mark_complete("data", "abc")
    marker = json.loads(run.marker("data").read_text())
    assert marker["format"] == FORMAT_VERSION and run.is_complete("data", "abc")
    run.marker("data").write_text(json.dumps({**marker, "format": FORMAT_VERSION - 1}))
    assert not run.is_complete("data", "abc") and run.read_marker("data") is None
    run.marker("data").write_text(json.dumps({"hash": "abc", "finished": 1.0}))  # before markers had one
    assert not run.is_complete("data", "abc")
