"""The generate and filter stages on the tiny model and the built-in benchmark.

End to end, for every method: a small group-balanced set is generated through Ray Data,
read back with plain pyarrow and checked (per-group counts equal the plan, (unit, seed)
unique, every image decodes, filtering keeps the configured share per group, a second run
adds nothing, a lost shard is redrawn identically). LoRA and DreamBooth artifacts are made
here with plain peft / diffusers calls on the base model, so these tests do not wait for
fine-tuning; the units, prompts and borrowing come from the finetune stage's own planner.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from huggingface_hub import DatasetCard
from PIL import Image

from engine.config import load_config
from engine.errors import FairsynthError
from engine.raylib import local_ray
from engine.runs import RunDir, atomic_write_json, read_json
from engine.stages import FORMAT_VERSION
from engine.stages.filter.stage import filter_prompts, keep_count, select_top_fraction
from engine.stages.finetune.stage import load_manifest
from engine.stages.generate.plan import GroupBalancedPlan, split_proportionally

ROOT = Path(__file__).resolve().parents[1]
BASE_MODEL = "tiny"
ENCODER = "tiny"
IMAGES_PER_GROUP = 6
STEPS = 2


def small_config(run_dir, *extra):
    return load_config(None, [
        f"run_dir={run_dir}", f"model.base={BASE_MODEL}", f"model.encoder={ENCODER}", "ray.num_cpus=2",
        # Severity 0.99 leaves each minority group 2 real images: below finetune.min_real_images,
        # so those groups borrow their class's aligned model.
        "data.severity=0.99", "data.builtin.n_train=400", "data.builtin.n_val=8", "data.builtin.n_test=8",
        "cluster.k=2", "cluster.min_cluster_size=4",
        f"generate.images_per_group={IMAGES_PER_GROUP}", f"generate.steps={STEPS}",
        "generate.batch_size=8", "generate.rows_per_shard=5", "generate.actor_num_cpus=1",
        "filter.keep_fraction=0.5", "filter.batch_size=16",
        *extra,
    ])


# --- the plan ---------------------------------------------------------------------------------


def _unit(unit, group, n_real, cluster=-1, borrowed_from=None, artifact=None, kind="base"):
    return {
        "unit": unit, "group": group, "cluster": cluster, "label": group // 2, "attribute": group % 2,
        "n_real": n_real, "artifact": artifact, "artifact_kind": kind, "prompt": f"prompt {unit}",
        "negative_prompt": "", "borrowed_from": borrowed_from, "steps": 3, "final_loss": 0.1,
    }


def test_split_proportionally_is_exact_and_deterministic():
    assert split_proportionally(10, [3, 1]) == [8, 2]  # 7.5 / 2.5: the tie goes to the first unit
    assert split_proportionally(7, [0, 0, 0]) == [3, 2, 2]
    assert sum(split_proportionally(101, [5, 17, 2, 9])) == 101
    assert split_proportionally(5, []) == []


def test_plan_balances_groups_and_weighs_borrowed_units_by_their_source():
    manifest = {"method": "clustered_dreambooth", "base_model": "tiny", "units": [
        _unit("g0c0", 0, 30, 0, artifact="a0", kind="unet"), _unit("g0c1", 0, 10, 1, artifact="a1", kind="unet"),
        # Minority group 1 borrows group 0's clusters: split 3:1 like the source, not by its own 1 image.
        # (The finetune stage names the source's artifact; a manifest without it works too.)
        _unit("g1c0", 1, 1, 0, borrowed_from="g0c0", artifact="a0", kind="unet"),
        _unit("g1c1", 1, 1, 1, borrowed_from="g0c1"),
        _unit("g2", 2, 0, borrowed_from="g3"), _unit("g3", 3, 50),  # a lender with no fine-tuning
    ]}
    config = load_config(None, ["generate.images_per_group=8", "generate.rows_per_shard=3"])
    cfg = config.generate
    plan = GroupBalancedPlan.build(manifest, [40, 2, 0, 50], config)
    rows = plan.rows
    assert rows.groupby("group").size().to_dict() == {0: 8, 1: 8, 2: 8, 3: 8}
    assert rows.groupby("unit").size().to_dict() == {"g0c0": 6, "g0c1": 2, "g1c0": 6, "g1c1": 2, "g2": 8, "g3": 8}
    # A borrowed unit with no artifact of its own draws with its source's model, at
    # generate.borrowed_strength of its fine-tuning; a unit with its own model (or borrowing the
    # base model) at all of it.
    assert set(rows.loc[rows["unit"] == "g1c1", "artifact"]) == {"a1"}
    strengths = rows.groupby("unit")["model_strength"].unique().map(list).to_dict()
    assert strengths == {"g0c0": [1.0], "g0c1": [1.0], "g1c0": [0.5], "g1c1": [0.5], "g2": [1.0], "g3": [1.0]}
    assert not rows.duplicated(["unit", "seed"]).any()
    assert plan.n_shards == 11 and rows["shard"].str.contains(plan.hash).all()
    again = GroupBalancedPlan.build(manifest, [40, 2, 0, 50], config)
    assert again.hash == plan.hash and again.rows.equals(rows)
    cfg.steps += 1
    assert GroupBalancedPlan.build(manifest, [40, 2, 0, 50], config).hash != plan.hash
    cfg.steps -= 1
    cfg.batch_size += 1  # how fast it draws, not what
    assert GroupBalancedPlan.build(manifest, [40, 2, 0, 50], config).hash == plan.hash
    cfg.borrowed_strength = 1.0
    full = GroupBalancedPlan.build(manifest, [40, 2, 0, 50], config)
    assert full.hash != plan.hash
    # A unit trained again under other hashes (say, stored at another rank) into the same steps
    # and loss is another model: another plan.
    retrained = {**manifest, "units": [{**u, "trained_under": ["h2", "u1"]} if u.get("artifact") else u
                                       for u in manifest["units"]]}
    assert GroupBalancedPlan.build(retrained, [40, 2, 0, 50], config).hash not in (full.hash, plan.hash)
    cfg.borrowed_strength = 0.0  # none of the lender's fine-tuning: a borrowed unit is a base row
    base_rows = GroupBalancedPlan.build(manifest, [40, 2, 0, 50], config).rows.set_index("unit")
    assert set(base_rows.loc[["g1c0", "g1c1"], "artifact_kind"]) == {"base"}
    assert set(base_rows.loc[["g1c0", "g1c1"], "model_strength"]) == {1.0}
    cfg.borrowed_strength = 0.5

    fill = load_config(None, ["generate.images_per_group=fill"])
    assert GroupBalancedPlan.build(manifest, [40, 2, 0, 50], fill).per_group == {0: 50, 1: 50, 2: 50, 3: 50}


def test_plan_refuses_a_manifest_without_a_group():
    manifest = {"method": "lora", "units": [_unit("g0", 0, 5), _unit("g1", 1, 5), _unit("g3", 3, 5)]}
    with pytest.raises(FairsynthError, match="no unit for group 2"):
        GroupBalancedPlan.build(manifest, [5, 5, 5, 5], load_config())


def test_top_fraction_per_group():
    scores = pd.DataFrame({
        "group": [0] * 4 + [1] * 3, "unit": ["g0"] * 4 + ["g1"] * 3, "seed": [1, 2, 3, 4, 1, 2, 3],
        "score": [0.1, 0.9, 0.5, 0.3, 0.2, 0.8, 0.8],
    })
    kept = select_top_fraction(scores, 0.5)
    assert kept.tolist() == [False, True, True, False, False, True, True]
    assert [keep_count(n, 0.75) for n in (0, 1, 2, 4, 6, 48)] == [0, 1, 2, 3, 5, 36]


# --- the sampling core ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe():
    from engine.stages.generate.sampler import load_base_pipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a sampler actor with one CPU
    yield load_base_pipeline(BASE_MODEL, "cpu", "sdpa", False)
    torch.set_num_threads(threads)


def test_sampler_draws_what_diffusers_draws_whatever_the_batch(pipe):
    from engine.stages.generate.sampler import PromptEncoder, make_scheduler, sample_images

    prompts = ["a photo of a landbird on water", "a photo of a waterbird on land", "a photo of a landbird on land"]
    seeds = [11, 12, 13]
    scheduler = make_scheduler("dpm_solver_multistep", pipe.scheduler.config)
    encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder, pipe.device)
    batched = sample_images(pipe.unet, pipe.vae, scheduler, encoder, prompts, [""] * 3, seeds, 3, 7.5)
    single = sample_images(pipe.unet, pipe.vae, scheduler, encoder, prompts[1:2], [""], seeds[1:2], 3, 7.5)
    pipe.scheduler = make_scheduler("dpm_solver_multistep", pipe.scheduler.config)
    reference = pipe(prompts[1], num_inference_steps=3, guidance_scale=7.5,
                     generator=torch.Generator().manual_seed(seeds[1]), output_type="np").images[0]
    reference = (reference * 255).round().astype(np.uint8)
    assert batched.shape == (3, 32, 32, 3) and batched.dtype == np.uint8
    assert np.abs(single[0].astype(int) - batched[1].astype(int)).max() <= 1
    assert np.abs(reference.astype(int) - single[0].astype(int)).max() <= 1
    assert np.abs(batched[0].astype(int) - batched[1].astype(int)).mean() > 1  # not one image


def _lora_artifact(pipe, folder: Path, seed: int) -> None:
    """A diffusers LoRA file with random (non-zero) weights, as the finetune stage saves one."""
    import copy

    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet = copy.deepcopy(pipe.unet)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers,
                                              unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())


def _unet_artifact(pipe, folder: Path, seed: int) -> None:
    """A DreamBooth-style unit folder: ``unet/`` with perturbed weights, as the finetune stage saves one."""
    import copy

    torch.manual_seed(seed)
    unet = copy.deepcopy(pipe.unet)
    with torch.no_grad():
        for param in unet.parameters():
            param.add_(0.05 * torch.randn_like(param))
    unet.save_pretrained(folder / "unet", safe_serialization=True)


def test_unit_models_switch_cheaply_and_back(pipe, tmp_path):
    from engine.stages.generate.sampler import (
        UnitModels,
        load_base_pipeline,
        make_scheduler,
        sample_images,
    )

    _lora_artifact(pipe, tmp_path / "lora_a", 1)
    _lora_artifact(pipe, tmp_path / "lora_b", 2)
    for i in range(3):
        _unet_artifact(pipe, tmp_path / f"db{i}", 10 + i)
    own = load_base_pipeline(BASE_MODEL, "cpu", "sdpa", False)  # adapters load into this copy only
    models = UnitModels(own, tmp_path, "sdpa", False, max_unets=2)
    scheduler = make_scheduler("dpm_solver_multistep", own.scheduler.config)

    def draw(artifact, kind):
        unet, prompts = models.activate(artifact, kind)
        return sample_images(unet, own.vae, scheduler, prompts, ["a photo of a landbird on land"], [""], [5], 2, 7.5)[0]

    base = draw("", "base")
    lora_a, lora_b = draw("lora_a", "lora"), draw("lora_b", "lora")
    db = [draw(f"db{i}", "unet") for i in range(3)]
    assert np.abs(lora_a.astype(int) - base.astype(int)).mean() > 0.5
    assert np.abs(lora_a.astype(int) - lora_b.astype(int)).mean() > 0.5
    assert np.abs(db[0].astype(int) - db[1].astype(int)).mean() > 0.5
    # Back to each earlier model: same pixels, nothing left over from the switches in between.
    assert np.array_equal(draw("", "base"), base)
    assert np.array_equal(draw("lora_a", "lora"), lora_a)
    assert np.array_equal(draw("db0", "unet"), db[0])  # evicted from the 2-UNet cache, reloaded
    assert len(models._unets) == 2 and models.switches == 9
    with pytest.raises(FairsynthError, match="missing"):
        models.activate("nowhere", "unet")


def _write_unit_as_the_finetune_stage_does(pipe, folder: Path, method: str, settings: list[str]):
    """A unit's artifact written by its fine-tuning strategy (``save_artifact``, as a finished
    trial writes it), after a stand-in for training moved every trainable weight; returns the
    manifest's artifact_kind and the "trained" (UNet, text encoder) in memory."""
    import copy

    from engine.generation_methods import get_method

    ft = load_config(None, settings).finetune
    strategy = get_method(method)
    unet, text_encoder = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    torch.manual_seed(0)  # LoRA's Gaussian A
    params = strategy.prepare(unet, text_encoder, ft)
    with torch.no_grad():
        for param in params:  # LoRA's B starts at zero: any move changes the model
            param.add_(0.05 * torch.randn_like(param) * (param.abs().mean() + 0.5))
    folder.mkdir(parents=True)
    strategy.save_artifact(unet, text_encoder, folder, ft)
    return strategy.artifact_kind(ft), unet.eval(), text_encoder.eval()


# lora_alpha != lora_rank: a loader that ignored the stored alpha would scale the update wrongly.
@pytest.mark.parametrize("method, settings", [
    ("lora", ["finetune.lora_alpha=8"]),
    ("dreambooth", ["finetune.dreambooth_store=lora_delta", "finetune.train_text_encoder=true", "finetune.lora_alpha=2"]),
    ("dreambooth", ["finetune.dreambooth_store=svd_delta", "finetune.train_text_encoder=true"]),
    ("dreambooth", ["finetune.dreambooth_store=unet", "finetune.train_text_encoder=true"]),
])
def test_units_load_through_the_generate_loader_as_they_were_trained(pipe, tmp_path, method, settings):
    from engine.stages.generate.sampler import UnitModels, load_base_pipeline

    kind, trained_unet, trained_text = _write_unit_as_the_finetune_stage_does(
        pipe, tmp_path / "finetune/unit", method, settings)
    own = load_base_pipeline(BASE_MODEL, "cpu", "sdpa", False)
    models = UnitModels(own, tmp_path, "sdpa", False, max_unets=1)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((2, 4, 8, 8), generator=generator)
    context = torch.randn((2, 77, own.text_encoder.config.hidden_size), generator=generator)
    steps = torch.tensor([100, 700])
    prompt = "a photo of a landbird on land sks"

    def trained_reading(text: str) -> torch.Tensor:
        """The trained text encoder's reading of ``text``, as the finetune stage left it."""
        ids = own.tokenizer([text], padding="max_length", max_length=own.tokenizer.model_max_length,
                            return_tensors="pt").input_ids
        return trained_text(ids)[0][0]

    def outputs(unet, prompts):
        with torch.no_grad():
            return unet(latents, steps, context).sample, prompts([prompt])[0]

    base_noise, base_text = outputs(*models.activate("", "base"))
    noise, text = outputs(*models.activate("finetune/unit", kind))
    with torch.no_grad():
        want_noise, want_text = trained_unet(latents, steps, context).sample, trained_reading(prompt)
    # The loaded unit is the trained model (up to fp16 storage), far from the base. Measured:
    # the loaded-vs-trained gap is at most 0.1% of the trained-vs-base change (0 for LoRA, 0.05-0.1%
    # for svd_delta and unet); the change is 1.1% (LoRA at alpha / rank = 0.5) to 53% (full weights)
    # of the output's mean size.
    assert (noise - want_noise).abs().max() < 0.02 * (want_noise - base_noise).abs().max()
    assert (want_noise - base_noise).abs().mean() > 0.005 * base_noise.abs().mean()
    if method == "lora":  # a UNet-only LoRA leaves the prompts as the base model reads them
        assert torch.equal(text, base_text)
    else:
        assert (text - want_text).abs().max() < 0.02 * (want_text - base_text).abs().max()
        assert (want_text - base_text).abs().mean() > 0.005 * base_text.abs().mean()
    # At strength 0 the unit is the base model; at 0.5 its outputs sit between the two.
    zero_noise, zero_text = outputs(*models.activate("finetune/unit", kind, 0.0))
    assert torch.allclose(zero_noise, base_noise, atol=1e-5) and torch.allclose(zero_text, base_text, atol=1e-5)
    half_noise, half_text = outputs(*models.activate("finetune/unit", kind, 0.5))
    share = (half_noise - base_noise).abs().mean() / (noise - base_noise).abs().mean()
    assert 0.3 < share < 0.7, share
    if method != "lora":  # a trained text encoder is scaled too, with its own prompt cache
        text_share = (half_text - base_text).abs().mean() / (text - base_text).abs().mean()
        assert 0.3 < text_share < 0.7, text_share
    # Back to full strength: nothing of the half-strength model is left over. One UNet slot
    # (max_unets=1), so the whole-UNet kinds load it again, and a prompt no cache holds yet.
    unet, prompts = models.activate("finetune/unit", kind, 1.0)
    other = "a photo of a waterbird on water sks"
    with torch.no_grad():
        full_noise, full_text = unet(latents, steps, context).sample, prompts([other])[0]
        want_other = trained_reading(other)
    assert torch.allclose(full_noise, noise, atol=1e-6)
    assert (full_text - want_other).abs().max() < 0.02 * (want_text - base_text).abs().max() + 1e-6
    with pytest.raises(FairsynthError, match=r"outside \[0, 1\]; set generate.borrowed_strength"):
        models.activate("finetune/unit", kind, 1.5)
    # And back to the base: nothing of the unit is left switched on.
    again_noise, again_text = outputs(*models.activate("", "base"))
    assert torch.equal(again_noise, base_noise) and torch.equal(again_text, base_text)


def test_a_blend_lies_between_base_and_fine_tuned_weights_in_the_base_dtype():
    from engine.generation_methods import _blend_with_base

    torch.manual_seed(0)
    base, tuned = torch.nn.Linear(4, 3).half(), torch.nn.Linear(4, 3)
    want = base.weight.float() + 0.25 * (tuned.weight.detach() - base.weight.float())
    blended = _blend_with_base(tuned, base, 0.25, Path("finetune/unit"))
    assert blended.weight.dtype == torch.float16
    assert torch.allclose(blended.weight.float(), want, atol=1e-3)
    with pytest.raises(FairsynthError, match=r"finetune/unit: 'weight' does not match the base"):
        _blend_with_base(torch.nn.Linear(4, 5), base, 0.25, Path("finetune/unit"))


# --- the stages, end to end ---------------------------------------------------------------


def _manifest_with_artifacts(cfg, run, pipe, method: str) -> dict:
    """The finetune stage's units for ``method``, with artifacts made here instead of trained."""
    from engine.generation_methods import get_method
    from engine.stages.cluster.stage import load_assignments
    from engine.stages.data.stage import load_run_dataset
    from engine.stages.finetune.stage import artifact_fingerprint

    dataset = load_run_dataset(run)
    generation = get_method(method)
    units = generation.plan_units(cfg, dataset, load_assignments(run) if generation.per_cluster else None)
    trained = {u.unit: i for i, u in enumerate(units) if u.trains}
    entries = []
    for unit in units:
        lender = unit.borrowed_from or unit.unit
        folder = f"finetune/{method}/units/{lender}"
        if not (run / folder).exists():
            if method == "lora":
                _lora_artifact(pipe, run / folder, trained[lender])
            else:
                _unet_artifact(pipe, run / folder, trained[lender])
            # The unit's record, as the stage writes it: generation checks the artifact against it.
            atomic_write_json(run / folder / "unit.json", {"unit": lender, "artifact_files": artifact_fingerprint(run / folder)})
        entries.append({
            "unit": unit.unit, "group": unit.group, "cluster": unit.cluster, "label": unit.label,
            "attribute": unit.attribute, "n_real": unit.n_real, "prompt": unit.prompt,
            "negative_prompt": unit.negative_prompt, "borrowed_from": unit.borrowed_from,
            "artifact": folder, "artifact_kind": "lora" if method == "lora" else "unet",
            "steps": 1, "final_loss": 0.0,
        })
    manifest = {"method": method, "base_model": cfg.model.base, "units": entries}
    atomic_write_json(run / f"finetune/{method}/manifest.json", manifest)
    return manifest


@pytest.fixture(scope="module")
def prepared_run(tmp_path_factory, pipe):
    """A run with data, clusters and a finetune manifest for every method, on a local Ray."""
    import ray

    from engine.stages.cluster.stage import run_cluster_stage
    from engine.stages.data.stage import run_data_stage
    from engine.stages.finetune import run_finetune_stage

    root = tmp_path_factory.mktemp("generate_run")
    cfg = small_config(root)
    run = RunDir(root)
    run.prepare(cfg)
    if ray.is_initialized():
        ray.shutdown()
    with local_ray(num_cpus=2, log_to_driver=False):
        run_data_stage(cfg, run)
        run_cluster_stage(cfg, run)
        run_finetune_stage(cfg, run, "vanilla")
        for method in ("lora", "dreambooth", "clustered_dreambooth"):
            _manifest_with_artifacts(cfg, run, pipe, method)
        yield cfg, run


@pytest.mark.parametrize("method", [
    "vanilla", "lora", "clustered_dreambooth",
    # DreamBooth's path (UNet artifacts, one unit per group) is a subset of clustered
    # DreamBooth's; `make test-slow` runs it end to end too.
    pytest.param("dreambooth", marks=pytest.mark.slow),
])
def test_generate_and_filter_each_method(prepared_run, method):
    from engine.stages.filter import run_filter_stage
    from engine.stages.generate import run_generate_stage
    from engine.stages.generate.stage import build_plan

    cfg, run = prepared_run
    plan = build_plan(cfg, run, method)
    summary = run_generate_stage(cfg, run, method)
    assert summary["images"] == 4 * IMAGES_PER_GROUP and summary["shards_written"] == plan.n_shards

    folder = run / "synthetic" / method
    table = read_folder(folder).to_pandas()  # plain pyarrow, the whole folder
    card = DatasetCard.load(folder / "README.md")
    assert [f["name"] for f in card.data.dataset_info["features"]] == list(table.columns)
    assert "Not filtered yet" in card.text
    assert table.groupby("group").size().to_dict() == plan.per_group
    assert table.groupby("unit").size().to_dict() == plan.rows.groupby("unit").size().to_dict()
    assert not table.duplicated(["unit", "seed"]).any()
    for png in table["image"]:
        assert Image.open(io.BytesIO(png["bytes"])).convert("RGB").size == (32, 32)  # {bytes, path}
    assert set(table["method"]) == {method} and set(table["base_model"]) == {BASE_MODEL}
    if method != "vanilla":
        units = {u["unit"]: u for u in load_manifest(run, method)["units"]}
        borrowed = table[[units[u]["borrowed_from"] is not None for u in table["unit"]]]
        assert len(borrowed) and "sks" not in " ".join(borrowed["prompt"])  # minority groups borrow
        # The paper's negative (the lender's attribute) for borrowed units; the other group's
        # words for units drawing with their own model.
        assert set(borrowed["negative_prompt"]) == {"land", "water"}
        assert set(table.drop(borrowed.index)["negative_prompt"]) == {"waterbird water", "landbird land"}

    filtered = run_filter_stage(cfg, run, method)
    marker = read_json(run.marker(f"filter/{method}"))
    assert marker["kept_hash"] != marker["hash"] and marker["format"] == FORMAT_VERSION
    table = read_folder(folder).to_pandas()
    assert table["score"].notna().all()
    kept = table.groupby("group")["kept"].sum().to_dict()
    assert kept == {g: keep_count(IMAGES_PER_GROUP, cfg.filter.keep_fraction) for g in plan.per_group}
    assert filtered["kept"] == sum(kept.values())
    for _, part in table.groupby("group"):  # the kept ones are the best scored
        assert part.loc[part["kept"], "score"].min() >= part.loc[~part["kept"], "score"].max()
    assert Image.open(run / "grids" / f"{method}.png").size[0] > 8 * 32
    # The filter stage updates the set's card with its keep rate and group fidelity.
    card = DatasetCard.load(folder / "README.md")
    assert f"{filtered['kept']} of {filtered['images']} images" in card.text
    assert f"is {filtered['fidelity']['before']:.3f} over all images" in card.text
    for group, count in kept.items():
        assert re.search(rf"^\| {group} \| [^|]+ \| {IMAGES_PER_GROUP} \| {count} \| [0-9.]+ \| [0-9.]+ \|$",
                         card.text, re.M), group

    # A second run adds nothing and rewrites nothing.
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.parquet")}
    assert run_generate_stage(cfg, run, method)["plan_hash"] == plan.hash
    run_filter_stage(cfg, run, method)
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.parquet")} == before


def read_folder(folder: Path):
    """A method's synthetic folder as one table, stepping over its dataset card (README.md)."""
    return pq.read_table(folder, ignore_prefixes=[".", "_", "README"])


def test_a_lost_shard_is_redrawn_identically_and_alone(prepared_run):
    from engine.stages.generate import run_generate_stage

    cfg, run = prepared_run
    method = "vanilla"
    run_generate_stage(cfg, run, method)
    folder = run / "synthetic" / method
    shards = sorted(folder.glob("part-*.parquet"))
    lost = shards[1]
    original = pq.read_table(lost).to_pandas()
    lost.unlink()  # a node died before this shard landed
    others = {p.name: p.stat().st_mtime_ns for p in shards if p != lost}

    summary = run_generate_stage(cfg, run, method)
    assert summary["shards_written"] == 1
    assert {p.name: p.stat().st_mtime_ns for p in shards if p != lost} == others
    redrawn = pq.read_table(lost).to_pandas()
    assert redrawn[["unit", "seed", "prompt"]].equals(original[["unit", "seed", "prompt"]])
    for a, b in zip(original["image"], redrawn["image"], strict=True):
        pixels_a = np.asarray(Image.open(io.BytesIO(a["bytes"])), dtype=int)
        pixels_b = np.asarray(Image.open(io.BytesIO(b["bytes"])), dtype=int)
        assert np.abs(pixels_a - pixels_b).max() <= 1
    # New rows invalidate the filtering: it must run again over the whole set, and the set's
    # card no longer reports the old keep rate.
    assert not run.marker(f"filter/{method}").exists()
    assert "Not filtered yet" in DatasetCard.load(folder / "README.md").text


def test_a_truncated_shard_is_refused_by_training_and_drawn_again_by_the_next_run(prepared_run):
    from engine.stages.filter import run_filter_stage
    from engine.stages.generate import run_generate_stage
    from engine.stages.train.data import kept_synthetic_counts

    cfg, run = prepared_run
    method = "vanilla"
    run_generate_stage(cfg, run, method)
    run_filter_stage(cfg, run, method)
    folder = run / "synthetic" / method
    damaged = sorted(folder.glob("part-*.parquet"))[0]
    original = pq.read_table(damaged).to_pandas()
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # a copy cut short

    with pytest.raises(FairsynthError, match=rf"synthetic shard {damaged} is damaged \(ArrowInvalid\); re-run"):
        kept_synthetic_counts([damaged], 4)
    summary = run_generate_stage(cfg, run, method)  # the stage was marked complete
    assert summary["shards_written"] == 1
    assert pq.read_table(damaged).to_pandas()[["unit", "seed"]].equals(original[["unit", "seed"]])
    assert not run.marker(f"filter/{method}").exists()  # the filter ranks the whole set again


def test_job_without_a_manifest_fails_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "generate.py"), "--method", "lora", "--run-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: missing") and "finetune/lora/manifest.json" in error and "jobs/finetune.py" in error


def test_filter_prompts_name_the_class_or_the_whole_group():
    """The paper's filter scores against the class prompt, the same for both groups of a
    class; a template naming the attribute gives every group its own prompt."""
    from types import SimpleNamespace

    dataset = SimpleNamespace(class_names=["landbird", "waterbird"], attribute_names=["land", "water"],
                              n_attributes=2, n_groups=4)
    assert filter_prompts("a photo of a {class_name}", dataset) == [
        "a photo of a landbird", "a photo of a landbird", "a photo of a waterbird", "a photo of a waterbird"]
    assert filter_prompts("a photo of a {class_name} on {attribute_name}", dataset) == [
        "a photo of a landbird on land", "a photo of a landbird on water",
        "a photo of a waterbird on land", "a photo of a waterbird on water"]


def test_half_written_shards_are_swept_and_whole_ones_kept(tmp_path):
    """A writer killed between its temporary write and the rename leaves a dot-file; the
    stage sweeps those (before and after its pipeline) and never touches finished shards."""
    from engine.stages.generate.shards import remove_partial_shards

    whole = tmp_path / "part-abc-00000.parquet"
    whole.write_bytes(b"whole")
    partial = tmp_path / ".part-abc-00001.parquet.x1y2z3.tmp"
    partial.write_bytes(b"half")
    bookkeeping = tmp_path / "_summary.json"
    bookkeeping.write_text("{}")
    assert remove_partial_shards(tmp_path) == [partial.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([whole.name, bookkeeping.name])
    assert remove_partial_shards(tmp_path / "absent") == []
