"""A generation method is one registered class: a toy method added here, in this one file, is
accepted by the config, planned and costed by the planner, titled in the report, and its
artifact is loaded by the sampler, with no name check anywhere to extend."""

from pathlib import Path

import pandas as pd
import pytest
import torch

from engine import generation_methods as gm
from engine.config import load_config
from engine.errors import FairsynthError
from engine.stages.data.datasets import GroupedDataset


class BaseReference(gm.Artifact):
    """A unit that draws with the base model, saved as a note naming it."""

    kind = "toy_base_reference"
    card_tags = ("toy",)

    def save(self, unet, text_encoder, folder, ft, with_text_encoder):
        (folder / "base.txt").write_text("the base model\n")

    def activate(self, models, artifact, strength):
        assert (models.local_path(artifact) / "base.txt").read_text() == "the base model\n"
        models.disable_adapters()
        return models.base_unet, models.base_prompts

    def describe(self, ft):
        return "a note naming the base"


class ToyMethod(gm.GenerationMethod):
    """One unit per group whose model is the base itself: LoRA adapters it never keeps."""

    name = "toy"
    title = "Toy (the base model)"
    cost_family = "toy"

    def artifact_kind(self, ft):
        return BaseReference.kind

    def make_trainable(self, unet, text_encoder, ft):
        return gm._add_lora(unet, text_encoder, ft, with_text_encoder=False)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(gm.ARTIFACTS, BaseReference.kind, BaseReference)
    monkeypatch.setitem(gm.GENERATION_METHODS, ToyMethod.name, ToyMethod)
    return gm.get_method(ToyMethod.name)


def _dataset(counts: dict[int, int]) -> GroupedDataset:
    rows = [
        {"image_id": f"g{g}_{i}", "source": f"img/g{g}_{i}.png", "label": g // 2, "attribute": g % 2,
         "split": "train", "group": g, "subtype": 0}
        for g, n in counts.items() for i in range(n)
    ]
    return GroupedDataset(
        name="toy", records=pd.DataFrame(rows), class_names=["landbird", "waterbird"],
        attribute_names=["land", "water"], info={"aligned": {0: 0, 1: 1}},
    )


def test_a_registered_method_is_planned_costed_and_titled(toy):
    from engine.planning.plan import plan_job
    from engine.report import method_title

    cfg = load_config(None, ["methods=[lora,toy]", "finetune.min_real_images=4"])
    assert cfg.methods == ["lora", "toy"]
    assert method_title("toy") == "Toy (the base model)"

    units = toy.plan_units(cfg, _dataset({0: 12, 1: 2, 2: 6, 3: 9}))
    # Group 1 has fewer than finetune.min_real_images and borrows its class's aligned group.
    assert [(u.unit, u.trains, u.borrowed_from) for u in units] == [
        ("g0", True, None), ("g2", True, None), ("g3", True, None), ("g1", False, "g0"),
    ]
    assert units[0].prompt == "a photo of a landbird on land"  # no identifier: plain captions

    plan = plan_job(cfg, "cpu", 1, peak_tflops=1.0)
    rows = {(r.stage, r.method): r for r in plan.rows}
    finetune, lora = rows[("finetune", "toy")], rows[("finetune", "lora")]
    # It trains LoRA adapters on one unit per group, as the lora method does: the same cost.
    assert finetune.flops == lora.flops > 0 and finetune.tasks == lora.tasks
    assert finetune.disk_bytes == 0  # BaseReference keeps nothing the planner counts
    assert any("a note naming the base" in note for note in finetune.notes)
    assert {("generate", "toy"), ("filter", "toy"), ("train", "toy")} <= set(rows)

    with pytest.raises(FairsynthError, match="unknown method 'toy2'"):
        load_config(None, ["methods=[toy2]"])


def test_the_sampler_loads_a_registered_artifact(toy, tmp_path: Path):
    from engine.cards import unit_tags
    from engine.models.loading import load_base_pipeline
    from engine.stages.generate.sampler import UnitModels

    cfg = load_config(None, [])
    folder = tmp_path / "finetune/toy/units/g0"
    folder.mkdir(parents=True)
    toy.save_artifact(None, None, folder, cfg.finetune)

    pipe = load_base_pipeline(cfg.model.base, "cpu", cfg.model.attention, cfg.model.allow_pickle)
    models = UnitModels(pipe, tmp_path, cfg.model.attention, cfg.model.allow_pickle)
    unet, prompts = models.activate("finetune/toy/units/g0", toy.artifact_kind(cfg.finetune))
    assert unet is pipe.unet and prompts is models.base_prompts
    assert "toy" in unit_tags("toy", BaseReference.kind)

    with pytest.raises(FairsynthError, match="artifact_kind 'toy_other' .* is unknown"):
        models.activate("finetune/toy/units/g0", "toy_other")
    with torch.no_grad():
        assert prompts(["a photo of a landbird on land"]).shape[0] == 1
