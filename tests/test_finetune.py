"""The fine-tune stage on the tiny model and the built-in benchmark at extreme bias (0.999:
the minority groups have no real images and borrow), with 2 trials at once on a local Ray."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from engine.config import load_config
from engine.errors import FairsynthError
from engine.generation_methods import get_method
from engine.models.tiny import tiny_model_path
from engine.raylib import local_ray as shared_local_ray
from engine.runs import RunDir, atomic_write_bytes
from engine.stages.data.datasets import GroupedDataset
from engine.stages.data.stage import run_data_stage
from engine.stages.finetune import run_finetune_stage
from engine.stages.finetune.units import plan_trained_units

ROOT = Path(__file__).resolve().parents[1]

# Small enough for 2 cores: 200 training images (95 per aligned group, 0 per minority group
# at severity 0.999), 4 steps per unit, a checkpoint every 2.
TEST_SETTINGS = [
    "data.builtin.n_train=200", "data.builtin.n_val=8", "data.builtin.n_test=8", "data.severity=0.999",
    "finetune.steps=4", "finetune.checkpoint_every=2", "finetune.batch_size=4", "finetune.num_class_images=4",
    "finetune.trial_resources={CPU: 1}", "finetune.max_concurrent_trials=2", "generate.steps=2",
    "generate.batch_size=4", "ray.num_cpus=2", "model.device=cpu",
]


@pytest.fixture(scope="module")
def local_ray():
    with shared_local_ray(num_cpus=2, ignore_reinit_error=True):
        yield


def make_cfg(run_dir: Path, *extra: str):
    cfg = load_config(None, [*TEST_SETTINGS, *extra])
    cfg.run_dir = str(run_dir)
    return cfg


def failing_at_step(cfg, step: int):
    """``cfg`` with the fine-tuning test hook set: every trial raises once at ``step``."""
    cfg.finetune._inject_failure_at_step = step
    return cfg


def prepared_run(cfg) -> RunDir:
    run = RunDir(cfg.run_dir)
    run.prepare(cfg)
    return run


def unit_record(run: RunDir, method: str, unit: str) -> dict:
    return json.loads((run / f"finetune/{method}/units/{unit}/unit.json").read_text())


def lora_tensors(run: RunDir, unit: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / f"finetune/lora/units/{unit}/pytorch_lora_weights.safetensors")


@pytest.fixture(scope="module")
def lora_run(local_ray, tmp_path_factory):
    """LoRA through the stage, every trial crashing once at step 3 (after its step-2 checkpoint).
    At 1e-2 (the tiny preset's value, set here so the test keeps it): the test's 4 steps then
    make an adapter of full effect (see the plain-diffusers test); at 3e-3 they move the
    image's pixels by 0.006."""
    cfg = failing_at_step(make_cfg(tmp_path_factory.mktemp("lora"), "finetune.lora_learning_rate=1e-2"), 3)
    run = prepared_run(cfg)
    return cfg, run, run_finetune_stage(cfg, run, "lora")


# --- units, without Ray --------------------------------------------------------------------


def _dataset(counts: dict[int, int]) -> GroupedDataset:
    rows = [
        {"image_id": f"{g}-{i}", "source": f"builtin://crow/forest/{i}", "label": g // 2, "attribute": g % 2,
         "split": "train", "group": g, "subtype": ""}
        for g, n in counts.items() for i in range(n)
    ]
    return GroupedDataset("builtin", pd.DataFrame(rows), ["landbird", "waterbird"], ["land", "water"],
                          {"aligned": {0: 0, 1: 1}})


def test_minority_group_borrows_the_aligned_model_with_swapped_prompt():
    cfg = load_config(None, ["finetune.min_real_images=4"])
    units = {u.unit: u for u in get_method("dreambooth").plan_units(cfg, _dataset({0: 50, 1: 2, 2: 0, 3: 40}))}
    assert [u for u in units if units[u].trains] == ["g0", "g3"]
    g1, g2 = units["g1"], units["g2"]
    assert (g1.borrowed_from, g2.borrowed_from) == ("g0", "g3")
    assert g1.prompt == "a photo of a landbird on water" and g1.negative_prompt == "land"
    assert g2.prompt == "a photo of a waterbird on land" and g2.negative_prompt == "water"
    assert units["g0"].prompt == "a photo of a landbird on land sks"  # trained units keep the identifier
    # A unit drawing with its own model contrasts with the class and attribute it is not.
    assert (units["g0"].negative_prompt, units["g3"].negative_prompt) == ("waterbird water", "landbird land")
    assert (g1.n_real, g2.n_real) == (2, 0)


def test_own_negative_prompt_names_every_other_class_and_attribute_or_nothing_in_the_paper_presets():
    rows = [{"image_id": f"{g}-{i}", "source": "", "label": g // 3, "attribute": g % 3, "split": "train",
             "group": g, "subtype": ""} for g in range(6) for i in range(5)]
    dataset = GroupedDataset("three", pd.DataFrame(rows), ["cat", "dog"], ["grass", "sand", "snow"], {})
    own = {u.unit: u.negative_prompt for u in get_method("dreambooth").plan_units(load_config(None, []), dataset)}
    assert own["g1"] == "dog grass, snow" and own["g5"] == "cat grass, sand"
    paper = load_config(None, ['generate.own_negative_prompt_template=""'])
    assert {u.negative_prompt for u in get_method("dreambooth").plan_units(paper, dataset)} == {""}
    assert load_config("waterbirds_0999", []).generate.own_negative_prompt_template == ""
    with pytest.raises(FairsynthError, match=r"generate.own_negative_prompt_template = '\{other_group\}': has the "
                       r"unknown placeholder \{other_group\}; valid placeholders: \{other_class_names\}, "
                       r"\{other_attribute_names\}"):
        load_config(None, ['generate.own_negative_prompt_template="{other_group}"'])


def test_unit_with_no_images_and_nothing_to_borrow_is_a_clear_error():
    cfg = load_config(None, [])
    with pytest.raises(FairsynthError, match=r"group 3 \(waterbird / water\) has 0 real training images and nothing to borrow"):
        get_method("dreambooth").plan_units(cfg, _dataset({0: 50, 1: 2, 2: 5, 3: 0}))


def test_vanilla_units_draw_with_the_base_model(tmp_path):
    cfg = make_cfg(tmp_path)
    manifest = run_finetune_stage(cfg, prepared_run(cfg), "vanilla")
    assert [u["unit"] for u in manifest["units"]] == ["g0", "g1", "g2", "g3"]
    assert all(u["artifact"] is None and u["artifact_kind"] == "base" and u["borrowed_from"] is None
               for u in manifest["units"])
    assert manifest["units"][1]["prompt"] == "a photo of a landbird on water"


# --- LoRA -----------------------------------------------------------------------------------


def test_lora_trains_aligned_groups_in_parallel_and_minorities_borrow(lora_run):
    cfg, run, manifest = lora_run
    units = {u["unit"]: u for u in manifest["units"]}
    assert units["g0"]["artifact"] == "finetune/lora/units/g0" and units["g0"]["artifact_kind"] == "lora"
    assert units["g1"]["borrowed_from"] == "g0" and units["g1"]["artifact"] == units["g0"]["artifact"]
    assert units["g2"]["borrowed_from"] == "g3" and units["g2"]["negative_prompt"] == "water"
    assert all(units[u]["steps"] == 4 and np.isfinite(units[u]["final_loss"]) for u in ("g0", "g3"))
    # Two trials at once: their training windows overlap.
    a, b = unit_record(run, "lora", "g0"), unit_record(run, "lora", "g3")
    assert max(a["started_at"], b["started_at"]) < min(a["finished_at"], b["finished_at"])
    assert json.loads(run.marker("finetune/lora").read_text())["trained"] == 2
    # Each trained unit's loss curve stays for `tensorboard --logdir RUN` after its experiment is gone.
    for unit in ("g0", "g3"):
        assert list((run / f"finetune/lora/tensorboard/{unit}").glob("events.out.tfevents*")), unit


def test_lora_loads_with_plain_diffusers_and_changes_images(lora_run, tmp_path):
    import copy

    from diffusers import StableDiffusionPipeline


    cfg, run, manifest = lora_run
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_path()), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def draw():
        return pipe("a photo of a landbird on land", num_inference_steps=3, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    def effect(folder) -> float:
        """Mean change of the image's [0, 1] pixels with the LoRA in ``folder`` loaded."""
        pipe.load_lora_weights(str(folder))
        after = draw()
        pipe.unload_lora_weights()
        return float(np.abs(after - before).mean())

    # The folder diffusers loads from holds the unit's model card too (test_lora_units_have_a_model_card).
    assert (run.root / manifest["units"][0]["artifact"] / "README.md").is_file()
    # The baseline: the adapter as training starts it (Gaussian A, zero B), saved by the strategy.
    strategy = get_method("lora")
    unet, text_encoder = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    strategy.prepare(unet, text_encoder, cfg.finetune)
    strategy.save_artifact(unet, text_encoder, tmp_path, cfg.finetune)
    before = draw()
    untrained, trained = effect(tmp_path), effect(run.root / manifest["units"][0]["artifact"])
    # Measured: untrained 0 exactly; trained for the test's 4 steps 0.157 (40 levels of 255);
    # adapters with random B of the trained B's size moved it 0.03 to 0.28 over six seeds. So 4
    # steps make a LoRA of full effect, and 0.05 (a third of it) is far above the untrained 0.
    assert untrained < 1e-6
    assert trained > 0.05 + untrained
    assert np.allclose(draw(), before, atol=1e-6)  # unloaded, nothing is left


def test_lora_units_have_a_model_card_the_hub_tools_read(lora_run):
    from huggingface_hub import ModelCard

    from engine.stages.generate.grids import grid_path

    cfg, run, manifest = lora_run
    units = {u["unit"]: u for u in manifest["units"]}
    for name, group in (("g0", "landbird / land"), ("g3", "waterbird / water")):
        card = ModelCard.load(run.root / units[name]["artifact"] / "README.md")
        assert card.data.base_model == "tiny" and card.data.library_name == "diffusers"
        assert card.data.license == "apache-2.0"
        assert {"text-to-image", "diffusers", "lora", "fairsynth"} <= set(card.data.tags)
        assert "dreambooth" not in card.data.tags
        assert card.data.instance_prompt == units[name]["prompt"]
        record = unit_record(run, "lora", name)
        assert f"unit {name}: {group}" in card.text
        assert f"| steps trained | {record['steps']} |" in card.text
        assert f"| learning rate used | {record['learning_rate']} |" in card.text
        assert f"| finetune.lora_rank | {cfg.finetune.lora_rank} |" in card.text
        # The samples link leads to the generate stage's grid of the method (engine/stages/generate/grids.py).
        link = re.search(r"\[`grids/lora.png`\]\(([^)]+)\)", card.text).group(1)
        folder = run.root / units[name]["artifact"]
        assert (folder / link).resolve() == Path(grid_path(run, "lora")).resolve()
        assert "pipe.load_lora_weights" in card.text
    # Borrowing units draw with their lender's folder and card; they have none of their own.
    assert not (run / "finetune/lora/units/g1").exists()


def test_rerun_skips_finished_units(lora_run):
    cfg, run, manifest = lora_run
    before = unit_record(run, "lora", "g0")
    marker = json.loads(run.marker("finetune/lora").read_text())["hash"]
    # A card is no input: an edited one neither retrains its unit nor changes the stage's key.
    card = run / "finetune/lora/units/g0/README.md"
    card.write_text(card.read_text() + "\nedited by hand\n")
    run.clear_marker("finetune/lora")
    assert run_finetune_stage(cfg, run, "lora") == manifest
    assert unit_record(run, "lora", "g0") == before
    assert json.loads(run.marker("finetune/lora").read_text())["hash"] == marker
    assert card.read_text().endswith("edited by hand\n")


def test_crashed_trial_resumes_from_its_checkpoint_and_matches_an_uninterrupted_run(lora_run, tmp_path):
    from engine.stages.finetune.trainer import ARTIFACT_DIR, UnitJob, UnitTrainer, unit_seed

    cfg, run, manifest = lora_run
    unit = next(u for u in get_method("lora").plan_units(cfg, run_data_stage(cfg, run)) if u.unit == "g0")
    assert unit_record(run, "lora", "g0")["resumed_at"] == 2  # the checkpoint before the crash
    # The same unit trained in one go, in this process, ends with the very same weights.
    job = UnitJob(method="lora", unit="g0", sources=unit.sources, train_prompt=unit.train_prompt,
                  class_prompt=unit.class_prompt, class_images=None, model=cfg.model,
                  finetune=failing_at_step(cfg.model_copy(deep=True), None).finetune,
                  seed=unit_seed(cfg.finetune.seed, "g0"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        outcome = UnitTrainer(job, "cpu").run(lambda metrics, save: save and save(tmp_path))
    finally:
        torch.set_num_threads(threads)
    from safetensors.torch import load_file

    clean, resumed = load_file(tmp_path / ARTIFACT_DIR / "pytorch_lora_weights.safetensors"), lora_tensors(run, "g0")
    assert resumed.keys() == clean.keys() and all(torch.equal(resumed[k], clean[k]) for k in clean)
    assert manifest["units"][0]["final_loss"] == pytest.approx(outcome.final_loss, rel=1e-6)


def test_finished_experiment_is_removed_and_a_lost_unit_trains_again_to_the_same_weights(lora_run):
    cfg, run, manifest = lora_run
    tune_dir = run / "finetune/lora/tune"
    # Once the manifest lists the units, their trial checkpoints would be a second copy.
    assert not list(tune_dir.rglob("checkpoint_*")) and not list(tune_dir.rglob("tuner.pkl"))
    weights = lora_tensors(run, "g0")
    records = {u: unit_record(run, "lora", u) for u in ("g0", "g3")}
    shutil.rmtree(run / "finetune/lora/units/g0")
    run.clear_marker("finetune/lora")
    assert run_finetune_stage(cfg, run, "lora") == manifest
    again = lora_tensors(run, "g0")
    assert again.keys() == weights.keys() and all(torch.equal(again[k], weights[k]) for k in weights)
    assert unit_record(run, "lora", "g3") == records["g3"]  # untouched
    assert unit_record(run, "lora", "g0")["final_loss"] == records["g0"]["final_loss"]
    assert not list(tune_dir.rglob("checkpoint_*"))


def _rerun_with_records(cfg, run: RunDir, method: str, experiments: dict[str, str]) -> None:
    """Re-run a finished stage after setting the units' recorded experiments; the records are
    put back afterwards (the run is shared by the module's tests)."""
    saved = {u: unit_record(run, method, u) for u in experiments}
    try:
        for unit, experiment in experiments.items():
            record = {**saved[unit], "experiment": experiment}
            (run / f"finetune/{method}/units/{unit}/unit.json").write_text(json.dumps(record))
        run.clear_marker(f"finetune/{method}")
        run_finetune_stage(cfg, run, method)
    finally:
        for unit, record in saved.items():
            (run / f"finetune/{method}/units/{unit}/unit.json").write_text(json.dumps(record))


def test_a_unit_record_naming_a_folder_outside_the_tune_storage_deletes_nothing(lora_run, tmp_path, caplog):
    cfg, run, _ = lora_run
    precious = tmp_path / "precious"
    (precious / "keep").mkdir(parents=True)
    (run / "finetune/lora/tune/linked").symlink_to(precious, target_is_directory=True)
    try:
        with caplog.at_level("WARNING", logger="engine.stages.finetune.stage"):
            _rerun_with_records(cfg, run, "lora", {"g0": str(precious), "g3": "../units"})
            _rerun_with_records(cfg, run, "lora", {"g0": "linked", "g3": "../../.."})
    finally:
        (run / "finetune/lora/tune/linked").unlink()
    assert (precious / "keep").is_dir() and (run / "finetune/lora/units/g0/unit.json").exists()
    refused = [r.getMessage() for r in caplog.records if "not deleting" in r.getMessage()]
    assert len(refused) == 4 and any(repr(str(precious)) in message for message in refused)


def test_a_copied_run_deletes_its_own_tune_folders_never_the_originals(lora_run, tmp_path):
    """The README's recipe: copy a run (here one whose experiments are still on disk), run the copy."""
    cfg, run, _ = lora_run
    name = Path(unit_record(run, "lora", "g0")["experiment"]).name
    leftover = run / f"finetune/lora/tune/{name}"
    (leftover / "checkpoint_000000").mkdir(parents=True)
    try:
        copy = tmp_path / "copy"
        shutil.copytree(run.root, copy, symlinks=True)
        RunDir(copy).clear_marker("finetune/lora")
        run_finetune_stage(failing_at_step(make_cfg(copy, "finetune.lora_learning_rate=1e-2"), 3),
                           RunDir(copy), "lora")
        assert (leftover / "checkpoint_000000").is_dir(), "the copy deleted the original run's experiment"
        assert not (copy / f"finetune/lora/tune/{name}").exists()
    finally:
        shutil.rmtree(leftover, ignore_errors=True)


def test_a_unit_artifact_with_wrong_shapes_is_refused_for_drawing_and_trained_again(lora_run, tmp_path):
    """Planted after the stage finished: the next run notices it, whatever its marker says."""
    from safetensors.torch import save_file

    from engine.stages.finetune.stage import damaged_units
    from engine.stages.generate.stage import _refuse_damaged_units

    cfg, run, manifest = lora_run
    weights = lora_tensors(run, "g0")
    path = run / "finetune/lora/units/g0/pytorch_lora_weights.safetensors"
    name = sorted(weights)[0]
    save_file({**weights, name: weights[name].reshape(-1)[:-1].contiguous()}, str(path))

    assert damaged_units(run, manifest) == [
        (str(path.parent), f"{path.name} holds other tensors (names, shapes or types) than were written")]
    with pytest.raises(FairsynthError, match=rf"unit artifact {path.parent} is damaged .*re-run the finetune stage"):
        _refuse_damaged_units(run, "lora")
    assert run_finetune_stage(cfg, run, "lora") == manifest  # marked complete, yet g0 is trained again
    again = lora_tensors(run, "g0")
    assert again.keys() == weights.keys() and all(torch.equal(again[k], weights[k]) for k in weights)
    assert damaged_units(run, manifest) == []


def test_nan_loss_stops_the_trial_keeps_its_checkpoint_and_marks_nothing(local_ray, tmp_path):
    cfg = make_cfg(tmp_path, "finetune.lora_learning_rate=1e30", "finetune.checkpoint_every=1")
    run = prepared_run(cfg)
    with pytest.raises(FairsynthError, match=r"loss became NaN at step 2; the last good checkpoint \(step 1\) is kept in .+; lower finetune.lora_learning_rate \(now 1e\+30\)"):
        run_finetune_stage(cfg, run, "lora")
    assert not run.marker("finetune/lora").exists()
    assert not (run / "finetune/lora/manifest.json").exists()
    assert not (run / "finetune/lora/units").exists()
    assert list((run / "finetune/lora/tune").rglob("checkpoint_000000/training_state.pt"))


# --- DreamBooth and clustered DreamBooth ------------------------------------------------------


def write_subtype_clusters(cfg, run: RunDir) -> None:
    """The cluster stage's output with clusters = sub-types (two per group), so the units are known."""
    from engine.stages.cluster.stage import cluster_hash
    from engine.stages.data.stage import run_data_stage

    train = run_data_stage(cfg, run).split("train")
    codes = {name: i % 2 for i, name in enumerate(sorted(train["subtype"].unique()))}
    frame = pd.DataFrame({"image_id": train["image_id"], "group": train["group"],
                          "cluster": train["subtype"].map(codes).astype(int), "distance": 0.0})
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    atomic_write_bytes(run / "cluster/assignments.parquet", buffer.getvalue())
    run.mark_complete("cluster", cluster_hash(cfg))


@pytest.fixture(scope="module")
def dreambooth_run(local_ray, tmp_path_factory):
    """DreamBooth (full weights, stored as rank-delta_rank weight changes) through the stage,
    every trial crashing once at step 3 (after its step-2 checkpoint)."""
    cfg = failing_at_step(make_cfg(tmp_path_factory.mktemp("dreambooth"), "finetune.prior_preservation=true"), 3)
    run = prepared_run(cfg)
    return cfg, run, run_finetune_stage(cfg, run, "dreambooth")


def train_in_process(cfg, run, method: str, unit_name: str, folder: Path):
    """The unit trained in one go in this process, each checkpoint written to
    ``folder/step<N>``; returns its trainer, which holds the fine-tuned models."""
    from engine.stages.finetune.stage import ensure_class_images
    from engine.stages.finetune.trainer import UnitJob, UnitTrainer, unit_seed

    strategy = get_method(method)
    unit = next(u for u in plan_trained_units(cfg, run_data_stage(cfg, run), strategy.uses_identifier)
                if u.unit == unit_name)
    class_images = None
    if strategy.uses_prior(cfg.finetune):
        class_images = ensure_class_images(cfg, run, [unit.class_prompt])[unit.class_prompt]
    job = UnitJob(method=method, unit=unit_name, sources=unit.sources, train_prompt=unit.train_prompt,
                  class_prompt=unit.class_prompt, class_images=class_images, model=cfg.model,
                  finetune=failing_at_step(cfg.model_copy(deep=True), None).finetune,
                  seed=unit_seed(cfg.finetune.seed, unit_name))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = UnitTrainer(job, "cpu")

        def report(metrics, save):
            if save is not None:
                (folder / f"step{metrics['step']}").mkdir()
                save(folder / f"step{metrics['step']}")

        trainer.run(report)
    finally:
        torch.set_num_threads(threads)
    return trainer


def test_dreambooth_resumes_exactly_and_its_compact_artifact_draws_as_the_fine_tuned_unet(dreambooth_run, tmp_path):
    from huggingface_hub import ModelCard
    from safetensors import safe_open
    from safetensors.torch import load_file

    from engine.models.loading import load_base_pipeline
    from engine.stages.finetune.delta import DELTA_FILES
    from engine.stages.finetune.trainer import ARTIFACT_DIR, OUTCOME_FILE, STATE_FILE, UnitTrainer
    from engine.stages.generate.sampler import UnitModels

    cfg, run, manifest = dreambooth_run
    unit = next(u for u in manifest["units"] if u["unit"] == "g0")
    assert unit["artifact_kind"] == "svd_delta" and unit_record(run, "dreambooth", "g0")["resumed_at"] == 2
    folder = run.root / unit["artifact"]
    stored = folder / DELTA_FILES["unet"]
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", DELTA_FILES["unet"], "unit.json"]
    card = ModelCard.load(folder / "README.md")
    assert {"dreambooth", "fairsynth"} <= set(card.data.tags) and "lora" not in card.data.tags
    assert card.data.instance_prompt == "a photo of a landbird on land sks"
    assert f"at rank {cfg.finetune.delta_rank}" in card.text and "| finetune.prior_preservation | True |" in card.text
    with safe_open(stored, "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert {d for k, d in dtypes.items() if k.endswith((".up", ".down"))} == {"F16"}
    assert {d for k, d in dtypes.items() if not k.endswith((".up", ".down"))} == {"F32"}

    trainer = train_in_process(cfg, run, "dreambooth", "g0", tmp_path)
    # The step-2 checkpoint can resume training; the last one holds the artifact only, no fp32
    # weights or optimizer state.
    assert (tmp_path / "step2" / STATE_FILE).is_file()
    assert sorted(p.name for p in (tmp_path / "step4").iterdir()) == [ARTIFACT_DIR, OUTCOME_FILE]
    # Resumed after a crash at step 3, the unit stores the very same weight changes.
    resumed, uninterrupted = load_file(stored), load_file(tmp_path / "step4" / ARTIFACT_DIR / DELTA_FILES["unet"])
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    # A trial restarted from its last checkpoint (the job stopped before Tune recorded it as
    # done) reports that checkpoint again without training.
    reports = []
    UnitTrainer(trainer.job, "cpu").run(lambda metrics, save: reports.append((metrics, save)),
                                        resume_from=tmp_path / "step4")
    (metrics, save), = reports
    assert metrics["finished"] and metrics["step"] == 4 and metrics["final_loss"] is not None
    save(tmp_path / "again")
    again = load_file(tmp_path / "again" / ARTIFACT_DIR / DELTA_FILES["unet"])
    assert all(torch.equal(again[k], uninterrupted[k]) for k in uninterrupted)

    # The generate stage's loader rebuilds the fine-tuned UNet from the base and the stored
    # changes: its noise predictions match the fp32 fine-tuned UNet's to 1e-3 of their scale.
    pipe = load_base_pipeline(cfg.model.base, "cpu")
    models = UnitModels(pipe, run.root, cfg.model.attention, cfg.model.allow_pickle)
    unet, _ = models.activate(unit["artifact"], "svd_delta")
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((4, 4, 8, 8), generator=generator)
    text = torch.randn((4, 77, pipe.text_encoder.config.hidden_size), generator=generator)
    steps = torch.tensor([10, 300, 600, 900])
    with torch.no_grad():
        fine_tuned = trainer.unet.eval()(latents, steps, text).sample
        rebuilt = unet(latents, steps, text).sample
        base = pipe.unet(latents, steps, text).sample
    error, scale = (rebuilt - fine_tuned).abs().max(), fine_tuned.abs().mean()
    assert error < 1e-3 * scale
    assert (base - fine_tuned).abs().max() > 100 * error  # the unit did change the UNet


def test_weight_changes_keep_the_best_rank_r_approximation():
    from engine.stages.finetune import delta

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(48, 40), torch.nn.Conv2d(8, 24, 3))
    base = delta.snapshot(module)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn_like(param) * 1e-3)
    changed = {k: v.detach().clone() for k, v in module.state_dict().items()}
    stored = delta.extract(module, base, rank=4)
    assert stored["0.weight.up"].shape == (40, 4) and stored["1.weight.down"].shape == (4, 72)
    assert stored["0.bias"].dtype == torch.float32  # vectors are kept whole
    module.load_state_dict(base)
    delta.apply(module, stored)
    for name in ("0.weight", "1.weight"):
        change = (changed[name] - base[name]).reshape(changed[name].shape[0], -1)
        tail = torch.linalg.svdvals(change)[4:].square().sum().sqrt()
        error = torch.linalg.norm((module.state_dict()[name] - changed[name]).reshape_as(change))
        assert float(error) == pytest.approx(float(tail), rel=1e-2)  # Eckart-Young, up to fp16 storage
    assert torch.allclose(module.state_dict()["0.bias"], changed["0.bias"], atol=1e-7)


@pytest.mark.slow  # 36 s; the default suite's gpu_smoke test checks one class-image set per prompt
def test_dreambooth_and_clustered_dreambooth_share_cached_class_images(dreambooth_run):
    cfg, run, manifest = dreambooth_run
    units = {u["unit"]: u for u in manifest["units"]}
    assert units["g0"]["artifact_kind"] == "svd_delta" and units["g0"]["prompt"] == "a photo of a landbird on land sks"
    assert units["g1"]["prompt"] == "a photo of a landbird on water" and units["g1"]["borrowed_from"] == "g0"
    class_images = sorted((run / "finetune/class_images").glob("*.npy"))
    assert len(class_images) == 2  # one per trained group's class prompt
    assert np.load(class_images[0]).shape == (4, 32, 32, 3)

    write_subtype_clusters(cfg, run)
    stamps = {p: p.stat().st_mtime_ns for p in class_images}
    clustered = run_finetune_stage(cfg, run, "clustered_dreambooth")
    units = {u["unit"]: u for u in clustered["units"]}
    assert sorted(u for u in units if units[u]["borrowed_from"] is None) == ["g0c0", "g0c1", "g3c0", "g3c1"]
    # The minority group mirrors its lender's clusters.
    assert {u: units[u]["borrowed_from"] for u in ("g1c0", "g1c1", "g2c0", "g2c1")} == {
        "g1c0": "g0c0", "g1c1": "g0c1", "g2c0": "g3c0", "g2c1": "g3c1"}
    assert units["g0c1"]["cluster"] == 1 and units["g0c1"]["n_real"] > 0
    assert {p: p.stat().st_mtime_ns for p in sorted((run / "finetune/class_images").glob("*.npy"))} == stamps


# --- the job, interrupted ---------------------------------------------------------------------


@pytest.mark.slow
def test_interrupted_job_resumes_the_experiment(tmp_path):
    """SIGTERM the job once Tune has taken a trial's second checkpoint (step 10); the re-run
    restores the Tune experiment and the trials continue from the latest checkpoints Tune
    had recorded when the signal came. (A checkpoint folder that is written but not yet
    reported is not one: the trial reports it, and Tune logs it in the trial's result.json.)"""
    settings = [f"--set={s}" for s in [*TEST_SETTINGS, "finetune.steps=40",
                                         "finetune.checkpoint_every=5"]]
    command = [sys.executable, str(ROOT / "jobs/finetune.py"), "--method", "lora", "--run-dir", str(tmp_path), *settings]
    env = {**os.environ, "RAY_ADDRESS": ""}
    job = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while (seen := _latest_recorded_step(tmp_path / "finetune/lora/tune")) < 10 and time.time() < deadline:
        time.sleep(0.5)
    job.terminate()
    assert job.wait(timeout=120) == 130  # stopped cleanly: Tune saved the experiment
    # Trials still report while Tune stops them, after it saved the experiment for the last time.
    reported = _latest_recorded_step(tmp_path / "finetune/lora/tune")
    assert 10 <= seen <= reported < 40
    assert not (tmp_path / "finetune/lora/manifest.json").exists()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    run = RunDir(tmp_path)
    assert seen <= max(unit_record(run, "lora", u)["resumed_at"] for u in ("g0", "g3")) <= reported


def _latest_recorded_step(tune_dir: Path) -> int:
    """The highest step any trial reported to Tune with its checkpoint (its result.json lines)."""
    steps = [0]
    for results in tune_dir.glob("*/*/result.json"):
        for line in results.read_text().splitlines():
            with contextlib.suppress(ValueError):
                steps.append(int(json.loads(line).get("step", 0)))
    return max(steps)


@pytest.mark.slow
def test_search_picks_a_learning_rate_and_step_count_per_unit(local_ray, tmp_path):
    cfg = make_cfg(tmp_path, "finetune.num_samples=3")
    run = prepared_run(cfg)
    run_finetune_stage(cfg, run, "lora")
    for unit in ("g0", "g3"):
        record = unit_record(run, "lora", unit)
        lr, factor = cfg.finetune.lora_learning_rate, cfg.finetune.search_lr_factor
        assert lr / factor <= record["learning_rate"] <= lr * factor and record["steps"] in (2, 4, 8)
        assert np.isfinite(record["heldout_loss"])
    # One search experiment for both units, deleted once the manifest lists them.
    assert len({unit_record(run, "lora", u)["experiment"] for u in ("g0", "g3")}) == 1
    assert not list((run / "finetune/lora/tune").iterdir())


def test_each_unit_is_searched_by_its_own_asha():
    """A unit's trial is stopped only for lagging its own unit's trials: unit b's losses are
    all above unit a's, and its first trial still continues."""
    from types import SimpleNamespace

    from engine.stages.finetune.per_unit_asha import PerUnitASHA

    scheduler = PerUnitASHA(time_attr="step", metric="heldout_loss", mode="min", max_t=8, grace_period=2,
                            reduction_factor=2)
    trials = {name: SimpleNamespace(trial_id=name, config={"unit": name[0]}) for name in ("a1", "a2", "b1", "b2")}
    for trial in trials.values():
        scheduler.on_trial_add(None, trial)

    def decide(name: str, loss: float) -> str:
        return scheduler.on_trial_result(None, trials[name], {"step": 2, "heldout_loss": loss})

    assert decide("a1", 1.0) == "CONTINUE"
    assert decide("b1", 5.0) == "CONTINUE"  # one ASHA for both units would stop it here
    assert decide("a2", 2.0) == "STOP"
    assert decide("b2", 4.0) == "CONTINUE"


def lora_jobs(cfg, run):
    from engine.stages.finetune.trainer import UnitJob, unit_seed

    units = [u for u in get_method("lora").plan_units(cfg, run_data_stage(cfg, run)) if u.trains]
    return [UnitJob(method="lora", unit=u.unit, sources=u.sources, train_prompt=u.train_prompt,
                    class_prompt=u.class_prompt, class_images=None, model=cfg.model, finetune=cfg.finetune,
                    seed=unit_seed(cfg.finetune.seed, u.unit)) for u in units]


def test_search_runs_every_units_trials_side_by_side_and_keeps_each_units_best(local_ray, tmp_path):
    from ray.tune import ExperimentAnalysis

    from engine.stages.finetune.tune import run_unit_trials

    # 2 units x 2 samples, 2 trial slots, 1 to 4 steps a trial; a trial of 2 steps or more
    # crashes once at step 2, after its step-1 checkpoint.
    cfg = failing_at_step(make_cfg(tmp_path, "finetune.num_samples=2", "finetune.steps=2",
                                   "finetune.checkpoint_every=1"), 2)
    jobs = lora_jobs(cfg, prepared_run(cfg))
    chosen = run_unit_trials(jobs, cfg.finetune, str(tmp_path / "tune"), prefix="search")
    assert sorted(chosen) == ["g0", "g3"]
    trials = [t.last_result for t in ExperimentAnalysis(chosen["g0"].experiment).trials]
    assert sorted(r["unit"] for r in trials) == ["g0", "g0", "g3", "g3"]
    assert all(r["resumed_at"] == 1 for r in trials if r.get("finished") and r["target_steps"] >= 2)
    # Every attempt's window (a crashed first attempt and its resumed retry each report when
    # they started), from all the trials' reports.
    attempts: dict[tuple[str, float], float] = {}
    for frame in ExperimentAnalysis(chosen["g0"].experiment).trial_dataframes.values():
        for unit, start, reported in zip(frame["unit"], frame["started_at"], frame["reported_at"]):
            attempts[(unit, start)] = max(reported, attempts.get((unit, start), reported))
    windows = {unit: [(s, e) for (u, s), e in attempts.items() if u == unit] for unit in chosen}
    # Units' trials overlap in time (searched one unit after another, none would), never
    # more than the 2 slots at once.
    assert any(s0 < e3 and s3 < e0 for s0, e0 in windows["g0"] for s3, e3 in windows["g3"])
    spans = [w for ws in windows.values() for w in ws]
    assert max(sum(s <= t < e for s, e in spans) for t, _ in spans) == 2
    for unit, result in chosen.items():
        finished = [r for r in trials if r["unit"] == unit and r.get("finished")]
        best = min(finished, key=lambda r: r["heldout_loss"])
        assert (result.heldout_loss, result.learning_rate, result.steps) == (
            best["heldout_loss"], best["learning_rate"], best["step"])
    # A re-run restores the finished experiment and chooses the same trials.
    again = run_unit_trials(jobs, cfg.finetune, str(tmp_path / "tune"), prefix="search")
    assert {u: (r.experiment, r.learning_rate, r.heldout_loss) for u, r in again.items()} == {
        u: (r.experiment, r.learning_rate, r.heldout_loss) for u, r in chosen.items()}


def test_the_base_models_fingerprint_follows_its_bytes_not_its_file_times(tmp_path):
    """A fresh clone or a copied model folder keeps trained units; re-trained weights do not."""
    import os
    import shutil

    from engine.config import load_config
    from engine.stages.finetune.stage import model_fingerprint

    folder = tmp_path / "base"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet/weights.safetensors").write_bytes(bytes(range(256)) * 20000)  # over 2 MiB
    (folder / "model_index.json").write_text("{}")

    def fingerprint(path):
        return model_fingerprint(load_config(None, [f"model.base={path}"])).split(":")[1]

    original = fingerprint(folder)
    shutil.copytree(folder, tmp_path / "copy")
    os.utime(tmp_path / "copy/unet/weights.safetensors", (1, 1))
    assert fingerprint(tmp_path / "copy") == original
    data = bytearray((folder / "unet/weights.safetensors").read_bytes())
    data[-5] ^= 0xFF  # a change in the last MiB, as re-trained weights make everywhere
    (folder / "unet/weights.safetensors").write_bytes(bytes(data))
    assert fingerprint(folder) != original
