"""The cost planner: FLOP counts against independent hand and formula counts, the stage
arithmetic and scheduling, benchmark-measured MFU, the job's table and JSON, and the
comparison with a finished run's stage times."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.config import PRESET_DIR, load_config
from engine.errors import FairsynthError
from engine.planning import flops as F
from engine.planning.counts import group_counts
from engine.planning.hardware import Device, device_kind, resolve_device
from engine.planning.plan import compare_with_run, format_plan, plan_job
from engine.planning.stages import StageCost, schedule

ROOT = Path(__file__).resolve().parents[1]
JOB = [sys.executable, str(ROOT / "jobs" / "plan.py")]


def formula_flops(model: torch.nn.Module, *args, **kwargs) -> int:
    """FLOPs of one forward by formula from the shapes each layer sees: 2*in*out per token
    for a Linear, 2*Cout*H*W*Cin/groups*kh*kw per image for a Conv2d, and 2*Lq*Lk*d for
    each of an attention's two products (scores, weighted values)."""
    from diffusers.models.attention_processor import Attention

    total = 0
    handles = []

    def conv(m, inputs, out):
        nonlocal total
        b, c_out, h, w = out.shape
        total += 2 * b * c_out * h * w * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear(m, inputs, out):
        nonlocal total
        total += 2 * (out.numel() // m.out_features) * m.in_features * m.out_features

    def attention(m, args, kwargs):
        nonlocal total
        hidden = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states")
        if context is None:
            context = args[1] if len(args) > 1 and args[1] is not None else hidden
        tokens = lambda x: x.shape[1] if x.ndim == 3 else x.shape[2] * x.shape[3]  # noqa: E731
        total += 2 * 2 * hidden.shape[0] * tokens(hidden) * tokens(context) * m.to_q.out_features

    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            handles.append(module.register_forward_hook(conv))
        elif isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_hook(linear))
        elif isinstance(module, Attention):
            handles.append(module.register_forward_pre_hook(attention, with_kwargs=True))
    with torch.no_grad():
        model(*args, **kwargs)
    for handle in handles:
        handle.remove()
    return total


def unet_inputs(shapes: F.DiffusionShapes, latent: int):
    cfg = shapes.config("unet")
    x = torch.empty(1, cfg["in_channels"], latent, latent, device="meta")
    context = torch.empty(1, shapes.text_length, cfg["cross_attention_dim"], device="meta")
    return x, torch.ones(1, device="meta"), context


@pytest.fixture(scope="module")
def tiny_cfg():
    return load_config("tiny")


@pytest.fixture(scope="module")
def tiny_shapes(tiny_cfg):
    return F.diffusion_shapes(tiny_cfg.model)


def test_counter_matches_hand_counts_of_linear_and_conv():
    linear = torch.nn.Linear(7, 5, device="meta")
    x = torch.empty(3, 11, 7, device="meta")
    assert F.count_flops(lambda: linear(x)) == 2 * 3 * 11 * 7 * 5

    conv = torch.nn.Conv2d(6, 8, kernel_size=3, stride=2, padding=1, groups=2, device="meta")
    y = torch.empty(2, 6, 10, 10, device="meta")
    # out 5x5; each output value takes 6/2 * 3 * 3 multiply-adds
    assert F.count_flops(lambda: conv(y)) == 2 * 2 * 8 * 5 * 5 * 3 * 3 * 3

    # Backward of a Linear: input and weight gradients, one product each.
    w = torch.nn.Linear(7, 5, device="meta")
    z = torch.empty(4, 7, device="meta", requires_grad=True)
    assert F.count_flops(lambda: w(z).sum().backward()) == 3 * 2 * 4 * 7 * 5


def test_tiny_unet_count_matches_formula(tiny_shapes):
    latent = tiny_shapes.native_size // tiny_shapes.vae_scale
    unet = F.build_unet(tiny_shapes.unet)
    x, t, context = unet_inputs(tiny_shapes, latent)
    expected = formula_flops(unet, x, t, encoder_hidden_states=context)
    assert expected > 0
    assert F.unet_forward(tiny_shapes, latent) == expected


def test_sd15_shapes_are_the_real_ones_and_count_matches_formula():
    shapes = F.diffusion_shapes(load_config("waterbirds").model)
    assert "sd15" in shapes.source and shapes.native_size == 512 and shapes.vae_scale == 8
    unet = F.build_unet(shapes.unet)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # Stable Diffusion 1.5's UNet
    assert sum(p.numel() for p in F.build_vae(shapes.vae).parameters()) == 83_653_863
    assert sum(p.numel() for p in F.build_text_encoder(shapes.text_encoder).parameters()) == 123_060_480
    x, t, context = unet_inputs(shapes, 64)
    assert F.unet_forward(shapes, 64) == formula_flops(unet, x, t, encoder_hidden_states=context)


def test_training_counts_follow_what_is_trained(tiny_shapes):
    latent = tiny_shapes.native_size // tiny_shapes.vae_scale
    forward = F.unet_forward(tiny_shapes, latent)
    full = F.unet_train_step(tiny_shapes, latent, None, False)
    lora = F.unet_train_step(tiny_shapes, latent, 4, False)
    checkpointed = F.unet_train_step(tiny_shapes, latent, None, True)
    # Backward costs two forwards (input and weight gradients), less the first layer's
    # input gradient; LoRA skips the frozen weights' gradients; checkpointing re-runs blocks.
    assert 2.6 * forward < full <= 3.0 * forward
    assert 1.8 * forward < lora < full
    assert full < checkpointed < full + forward * 1.01


def test_known_split_sizes_with_severity():
    wb = load_config("waterbirds_0999")
    counts = group_counts(wb, 0.999)
    # FFR's rule: round(n_aligned * 0.001 / 0.999) conflicting images per class.
    assert counts.train == [3498, 4, 1, 1057]
    assert (counts.val, counts.test) == (1199, 5794)
    celeba = group_counts(load_config("celeba"), "original")
    assert celeba.n_train == 162_770 and celeba.train[3] == 1387
    with pytest.raises(FairsynthError, match="Blond_Hair"):
        group_counts(load_config("celeba", ["data.target=Smiling"]), "original")


def test_schedule_spreads_tasks_in_waves():
    device = Device("h100", 1e15, "test", {"finetune": 0.5, "cluster": 0.5}, {"finetune": "t", "cluster": "t"})
    # 25 one-GPU trials, 8 at once: 4 waves on 8 GPUs, 7 waves on 4 GPUs.
    trials = lambda: StageCost("s", "finetune", "dreambooth", 25 * 1e15, 25, 8, 1.0)  # noqa: E731
    eight, four = schedule(trials(), device, 8), schedule(trials(), device, 4)
    assert (eight.concurrent, eight.waves, four.waves) == (8, 4, 7)
    assert eight.wall_seconds == pytest.approx(4 * 1e15 / 0.5e15)
    assert four.wall_seconds == pytest.approx(7 * 2.0)
    assert eight.device_seconds == four.device_seconds == pytest.approx(50.0)
    # Four quarter-GPU actors share one GPU: as fast as one actor holding it.
    actors = schedule(StageCost("s", "cluster", "", 1e15, 40, 4, 0.25), device, 8)
    assert actors.devices == 1 and actors.wall_seconds == pytest.approx(2.0)
    # On CPU cores a half-CPU task still runs one thread on a core of its own.
    cores = Device("cpu", 1e10, "test", {"train": 0.5}, {"train": "t"}, cpus=2)
    workers = schedule(StageCost("s", "train", "erm", 1e11, 2, 2, 0.5), cores, cores.units(1))
    assert workers.devices == 2 and workers.wall_seconds == pytest.approx(1e11 / 2 / 0.5e10)
    # A task larger than the cluster is flagged.
    too_big = schedule(StageCost("s", "finetune", "lora", 1e15, 1, 1, 2.0), device, 1)
    assert too_big.notes and "asks for 2" in too_big.notes[0]


def test_tiny_plan_multiplies_counted_flops_by_the_configs_counts(tiny_cfg, tiny_shapes):
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.methods = ["erm", "lora", "dreambooth"]
    plan = plan_job(cfg, "cpu", 1, peak_tflops=1.0)
    counts = plan.counts["0.999"]
    assert counts.train == [950, 1, 1, 950]
    latent = tiny_shapes.native_size // tiny_shapes.vae_scale
    gen = cfg.generate
    per_image = gen.steps * 2 * F.unet_forward(tiny_shapes, latent) + F.vae_decode(tiny_shapes, latent)
    rows = {(r.stage, r.method, r.part): r for r in plan.rows}
    assert rows[("generate", "lora", "")].flops == 4 * gen.images_per_group * per_image
    encoder = F.encoder_shapes(cfg.model)
    assert rows[("filter", "lora", "")].flops == 4 * gen.images_per_group * F.image_encoder_forward(encoder)
    # Two groups have under finetune.min_real_images and borrow: two LoRA trials.
    ft = cfg.finetune
    # Fine-tuning runs at the generator's native side, whatever data.image_size is.
    step = ft.batch_size * F.unet_train_step(tiny_shapes, latent, ft.lora_rank, False)
    encode = F.vae_encode(tiny_shapes, tiny_shapes.native_size)
    text = 2 * F.text_encoder_forward(tiny_shapes)
    lora = rows[("finetune", "lora", "")]
    assert lora.tasks == 2
    assert lora.flops == pytest.approx(2 * (ft.steps * step + text) + 1900 * encode)
    # Class images are planned only when DreamBooth preserves the prior (on by default).
    assert ("finetune", "dreambooth", "class images") in rows
    cfg.finetune.prior_preservation = False
    without_prior = {(r.stage, r.method, r.part) for r in plan_job(cfg, "cpu", 1, peak_tflops=1.0).rows}
    assert ("finetune", "dreambooth", "class images") not in without_prior
    cfg.finetune.prior_preservation = True
    # A search runs every unit's trials in one experiment: 2 units x 3 samples on 6 slots are
    # one wave of six trials, not one search per unit after another.
    slots = cfg.finetune.max_concurrent_trials
    cfg.finetune.num_samples, cfg.finetune.max_concurrent_trials = 3, 6
    search = next(r for r in plan_job(cfg, "cpu", 8, peak_tflops=1.0).rows if (r.stage, r.method) == ("finetune", "lora"))
    assert (search.tasks, search.concurrent, search.waves) == (6, 6, 1)
    cfg.finetune.num_samples, cfg.finetune.max_concurrent_trials = 1, slots
    # ERM trains epochs x real images and evaluates; no synthetic stage for it.
    assert not any(r.method == "erm" and r.stage != "train" for r in plan.rows)
    totals = plan.stage_totals()
    assert plan.wall_seconds == pytest.approx(sum(t["wall_seconds"] for t in totals.values()))
    assert plan.bottleneck == max(totals, key=lambda s: totals[s]["wall_seconds"])
    text_table = format_plan(plan, "tiny")
    assert "bottleneck" in text_table and "finetune" in text_table


def test_benchmark_results_replace_config_mfu(tmp_path, tiny_cfg):
    (tmp_path / "sampling_throughput.json").write_text(json.dumps(
        {"benchmark": "sampling_throughput", "metric": "images_per_s", "value": 3.0, "device": "cpu (2 threads)", "mfu": 0.4}
    ))
    (tmp_path / "plan_mfu.json").write_text(json.dumps(
        {"benchmark": "plan_mfu", "device": "NVIDIA H100 80GB HBM3", "achieved_tflops": {"train": 98.9}}
    ))
    (tmp_path / "train_throughput.json").write_text(json.dumps(
        {"benchmark": "train_throughput", "device": "cpu (2 threads)", "achieved_tflops": 0.5}
    ))
    cpu = resolve_device(tiny_cfg, "cpu", peak_tflops=1.0, results_dir=tmp_path)
    assert cpu.mfu["generate"] == 0.4 and "sampling_throughput.json" in cpu.mfu_source["generate"]
    assert cpu.mfu["train"] == pytest.approx(0.25)  # two threads' throughput, per core
    assert cpu.mfu["finetune"] == tiny_cfg.plan.cpu_mfu.finetune
    h100 = resolve_device(tiny_cfg, "h100", results_dir=tmp_path)
    assert h100.mfu["train"] == pytest.approx(0.1) and h100.mfu["generate"] == tiny_cfg.plan.gpu_mfu.generate
    assert device_kind("NVIDIA A10G") == "a10g" and device_kind("NVIDIA H100 PCIe") == "h100-pcie"


def test_compare_reports_actual_over_predicted(tmp_path, tiny_cfg):
    from engine.report import severity_tag
    from engine.runs import RunDir
    from engine.stages.data.stage import run_data_stage

    cfg = tiny_cfg.model_copy(deep=True)
    cfg.methods = ["erm", "lora"]
    cfg.run_dir = str(tmp_path / "run")
    root = RunDir(cfg.run_dir)
    root.prepare(cfg)
    sub = cfg.model_copy(deep=True)
    sub.data.severity = 0.999
    run_data_stage(sub, RunDir(Path(cfg.run_dir) / severity_tag(0.999)))
    stages = {"data": 1.0, "cluster": 30.0}
    (Path(cfg.run_dir) / "stage_seconds.json").write_text(json.dumps({"0.999": {
        "erm": {**stages, "train": 100.0},
        "lora": {**stages, "finetune": 400.0, "generate": 200.0, "filter": 20.0, "train": 50.0},
    }}))
    plan, rows = compare_with_run(cfg.run_dir, "cpu", 1, peak_tflops=0.01)
    by = {(r["method"], r["stage"]): r for r in rows}
    assert [r["stage"] for r in rows].count("cluster") == 2  # once for the run, once in the totals
    predicted = {(r.method, r.stage): r.wall_seconds for r in plan.rows}
    assert by[("lora", "generate")]["ratio"] == pytest.approx(200.0 / predicted[("lora", "generate")])
    assert by[("", "cluster")]["actual_seconds"] == 30.0
    assert by[("all", "train")]["actual_seconds"] == 150.0
    assert by[("all", "train")]["predicted_seconds"] == pytest.approx(
        predicted[("erm", "train")] + predicted[("lora", "train")]
    )


def test_job_prints_json_and_rejects_unknown_gpu(tmp_path):
    out = subprocess.run(
        [*JOB, "--gpus", "8", "--gpu-type", "h100", "--json", "--set", "methods=[erm,lora]"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    plan = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(plan["stages"]) == {"cluster", "finetune", "generate", "filter", "train"}
    assert plan["device"]["count"] == 8 and plan["device"]["peak_tflops"] == 989.0
    assert plan["total"]["wall_seconds"] > 0
    assert plan["total"]["billed_device_hours"] == pytest.approx(8 * plan["total"]["wall_seconds"] / 3600)
    assert any("asks for no GPU" in n for n in plan["notes"])  # the tiny config is CPU-only
    bad = subprocess.run([*JOB, "--gpu-type", "h1000"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: unknown --gpu-type 'h1000'")


@pytest.mark.slow
def test_every_preset_plans_on_eight_gpus():
    for path in sorted(PRESET_DIR.glob("*.yaml")):
        cfg = load_config(path.stem)
        plan = plan_job(cfg, "h100", 8)
        totals = plan.stage_totals()
        assert plan.wall_seconds > 0 and math.isfinite(plan.wall_seconds)
        assert all(totals[s]["flops"] > 0 for s in ("cluster", "finetune", "generate", "filter", "train"))
        assert "bottleneck" in format_plan(plan, path.stem)
        if cfg.data.name == "waterbirds":
            shapes = F.diffusion_shapes(cfg.model)
            per_image = 25 * 2 * F.unet_forward(shapes, 64) + F.vae_decode(shapes, 64)
            generate = [r for r in plan.rows if r.stage == "generate"]
            assert all(r.flops == 4 * 2000 * per_image for r in generate)


def test_plan_reports_disk_per_stage_and_the_dreambooth_units_of_waterbirds_0999_fit_in_30_gb():
    from engine.planning.disk import png_bytes
    from engine.stages.finetune import delta

    cfg = load_config("waterbirds_0999")
    plan = plan_job(cfg, "h100", 8)
    disk = plan.disk()
    rows = {(r.method, r.part): r for r in plan.rows if r.stage == "finetune"}
    dreambooth, clustered = rows[("dreambooth", "")], rows[("clustered_dreambooth", "")]
    # Each unit keeps its layers' changes at rank finetune.delta_rank, counted on SD 1.5's shapes.
    per_unit = delta.artifact_bytes(F.build_unet(F.diffusion_shapes(cfg.model).unet), cfg.finetune.delta_rank)
    assert 250e6 < per_unit < 300e6
    assert dreambooth.disk_bytes % per_unit == 0 and clustered.disk_bytes % per_unit == 0
    assert 0 < dreambooth.disk_bytes + clustered.disk_bytes <= 30e9
    # Resumable checkpoints (fp32 UNet, 8-bit Adam moments) of the trials running at once.
    assert clustered.scratch_bytes == clustered.concurrent * 3 * 859_520_964 * (4 + 2)
    assert disk["finetune"]["in_flight_bytes"] == clustered.scratch_bytes
    assert disk["generate"]["kept_bytes"] == 4 * 4 * 2000 * png_bytes(512)
    text = format_plan(plan, "waterbirds_0999")
    assert "kept in run_dir" in text and "in flight (peak)" in text
    # Stored whole in fp16, the same units would not fit.
    whole = plan_job(load_config("waterbirds_0999", ["finetune.dreambooth_store=unet"]), "h100", 8)
    assert sum(r.disk_bytes for r in whole.rows if r.stage == "finetune" and "dreambooth" in r.method
               and not r.part) > 30e9


def test_measure_steps_each_method_family_as_the_methods_train(monkeypatch):
    """measure.py trains what each method's own make_trainable sets up, once per family, with
    the prior-preservation term where the method uses it."""
    from engine import generation_methods as gm
    from engine.planning.measure import Bench, measure_finetune

    cfg = load_config(None, ["methods=[lora,dreambooth,clustered_dreambooth]", "finetune.prior_preservation=true",
                             "finetune.batch_size=2", "finetune.lora_alpha=8"])
    prepared = []
    for cls in (gm.Lora, gm.DreamBooth):
        def spy(self, unet, text_encoder, ft, make=cls.make_trainable):
            params = make(self, unet, text_encoder, ft)
            prepared.append((self.name, unet.peft_config["default"].lora_alpha if self.trains_lora(ft) else None))
            return params
        monkeypatch.setattr(cls, "make_trainable", spy)
    shapes = F.diffusion_shapes(cfg.model)
    seconds, flops, details = measure_finetune(cfg, shapes, Bench("cpu", torch.float32, 0.0, True))
    assert prepared == [("lora", 8.0), ("dreambooth", None)]
    latent = shapes.native_size // shapes.vae_scale
    ft = cfg.finetune
    assert details["lora"]["flops_per_step"] == ft.batch_size * F.unet_train_step(shapes, latent, ft.lora_rank, False)
    assert details["dreambooth"]["flops_per_step"] == 2 * ft.batch_size * F.unet_train_step(shapes, latent, None, False)
    assert flops == details["lora"]["flops_per_step"] + details["dreambooth"]["flops_per_step"] and seconds > 0
