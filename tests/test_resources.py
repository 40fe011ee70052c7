"""One resources model for every stage: presets ask GPU stages for GPUs, 'auto' follows the
cluster, and a fixed cluster's declared GPUs are filled (ray.cluster_utils.Cluster)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.config import PRESET_DIR, load_config
from engine.errors import FairsynthError
from engine.raylib import local_cluster
from engine.resources import (
    actor_resources,
    check_cluster_supplies,
    max_concurrent_trials,
    resolve_count,
    train_workers,
    trial_bundle,
)

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
GPU_CLUSTER = {"CPU": 64.0, "GPU": 8.0}


def _preset(name: str, *overrides: str):
    return load_config(name, ["data.root=/data", *overrides])


@pytest.mark.parametrize("name", PRESETS)
def test_every_gpu_stage_of_a_cuda_preset_asks_for_a_gpu(name):
    cfg = _preset(name)
    if cfg.model.device != "cuda":
        assert all(share == 0 for share in cfg.gpu_shares().values()), name
        return
    shares = cfg.gpu_shares()
    assert set(shares) >= {"cluster.actor_num_gpus", "generate.actor_num_gpus", "filter.actor_num_gpus",
                           "finetune.trial_resources.GPU", "train.use_gpu"}
    assert all(share > 0 for share in shares.values()), shares
    for stage in ("cluster", "generate", "filter"):
        placed = actor_resources(cfg, stage, work=40, reachable=GPU_CLUSTER).map_batches_kwargs()
        # Ray Data refuses map_batches(batch_size=None) when GPUs are requested.
        assert placed["num_gpus"] > 0 and isinstance(placed["batch_size"], int), (stage, placed)
    assert trial_bundle(cfg.finetune, cfg.model.device)["GPU"] > 0
    check_cluster_supplies(cfg, GPU_CLUSTER)


def test_a_cuda_stage_without_a_gpu_share_is_refused_in_one_line():
    with pytest.raises(FairsynthError) as err:
        _preset("waterbirds_0999", "filter.actor_num_gpus=0")
    assert str(err.value) == (
        "config error: filter.actor_num_gpus = 0 but model.device = 'cuda': give the stage a GPU share "
        "(e.g. --set filter.actor_num_gpus=0.25) or set model.device=auto"
    )


def test_model_device_cpu_turns_every_gpu_share_off():
    cfg = _preset("waterbirds_0999", "model.device=cpu")
    cpu_only = {"CPU": 4.0}
    for stage in ("cluster", "generate", "filter"):
        assert actor_resources(cfg, stage, work=10, reachable=cpu_only).num_gpus == 0
    assert "GPU" not in trial_bundle(cfg.finetune, cfg.model.device)
    check_cluster_supplies(cfg, cpu_only)  # nothing asks for a GPU
    # 'auto' workers on CPU: 4 CPUs less one for the data tasks, 4 CPUs per worker.
    assert train_workers(cfg, cpu_only) == 1
    assert train_workers(cfg, {"CPU": 64.0}) == 15


def test_gpu_preset_on_a_machine_without_gpus_fails_at_start():
    with pytest.raises(FairsynthError, match=r"^cluster.actor_num_gpus asks for a GPU .* model.device=cpu"):
        check_cluster_supplies(_preset("waterbirds_0999"), {"CPU": 2.0})


def test_auto_expresses_the_whole_demand_and_a_number_caps_it():
    cfg = _preset("waterbirds_0999")
    assert cfg.generate.num_actors == cfg.finetune.max_concurrent_trials == cfg.train.num_workers == "auto"
    # GPU actors: as many as the work can use, whatever is there now (the autoscaler adds nodes).
    assert actor_resources(cfg, "generate", work=120, reachable={"CPU": 2.0, "GPU": 1.0}).max_actors == 120
    assert max_concurrent_trials(cfg.finetune) == 0  # Tune queues every trial
    assert train_workers(cfg, {"CPU": 256.0, "GPU": 16.0}) == 16
    assert train_workers(cfg, {"CPU": 256.0, "GPU": 8.0}) == 8
    capped = _preset("waterbirds_0999", "generate.num_actors=8", "finetune.max_concurrent_trials=8",
                     "train.num_workers=8")
    assert actor_resources(capped, "generate", work=120, reachable=GPU_CLUSTER).max_actors == 8
    assert actor_resources(capped, "generate", work=3, reachable=GPU_CLUSTER).max_actors == 3
    assert max_concurrent_trials(capped.finetune) == 8
    assert train_workers(capped, {"CPU": 256.0, "GPU": 16.0}) == 8


def test_a_cpu_only_pool_leaves_room_for_the_tasks_around_it():
    cfg = load_config(None, ["generate.num_actors=auto", "cluster.num_actors=auto"])
    # 2 CPUs, 1 CPU per sampler: one sampler, one CPU left for the shard writers.
    assert actor_resources(cfg, "generate", work=50, reachable={"CPU": 2.0}).max_actors == 1
    assert actor_resources(cfg, "cluster", work=50, reachable={"CPU": 2.0}).max_actors == 2
    assert resolve_count("auto", work=0, fit=4) == 1


@pytest.mark.parametrize("bad", ["0", "-2", "many", "1.5"])
def test_a_bad_concurrency_value_is_one_line(bad):
    with pytest.raises(FairsynthError, match=rf"^config error: generate.num_actors = .*{bad}.*'auto'"):
        load_config(None, [f"generate.num_actors={bad}"])


# --- a fixed cluster of declared GPUs --------------------------------------------------------


@pytest.fixture
def gpu_cluster():
    """A head with no CPUs and two nodes declaring 2 GPUs each (no real GPU: Ray schedules on
    declared resources and sets CUDA_VISIBLE_DEVICES to the ids it hands out)."""
    import ray

    with local_cluster(num_cpus=0, include_dashboard=False) as cluster:
        nodes = [cluster.add_node(num_cpus=1, num_gpus=2) for _ in range(2)]
        ray.init(address=cluster.address)
        yield cluster, nodes


def test_auto_trials_fill_every_declared_gpu(gpu_cluster, tmp_path):
    """Four GPUs and half a GPU per trial: all 8 trials run at once."""
    from ray import tune

    from engine.stages.finetune.tune import _fit

    cfg = load_config(None, ["finetune.max_concurrent_trials=auto", "finetune.trial_resources={GPU: 0.5, CPU: 0.1}"])
    ft = cfg.finetune
    barrier = str(tmp_path / "started")
    os.makedirs(barrier)

    def trial(config):
        Path(barrier, config["unit"]).write_text(os.environ.get("CUDA_VISIBLE_DEVICES", ""))
        deadline = time.time() + 120
        # Every trial waits until all 8 have started: it finishes only if they ran at once.
        while len(os.listdir(barrier)) < 8 and time.time() < deadline:
            time.sleep(0.2)
        tune.report({"together": len(os.listdir(barrier)), "finished": True, "step": 1})

    trainable = tune.with_resources(trial, tune.PlacementGroupFactory([trial_bundle(ft)]))
    units = [f"g{i}" for i in range(8)]
    grid, _ = _fit(trainable, "fill", str(tmp_path / "tune"), ft, {"unit": tune.grid_search(units)}, None, 0)
    assert [r.error for r in grid] == [None] * 8
    assert sorted(r.metrics["together"] for r in grid) == [8] * 8
    visible = sorted(Path(barrier, u).read_text() for u in units)
    assert all(v in {"0", "1"} for v in visible), visible  # one declared GPU id per trial


@pytest.mark.slow  # must outlast Ray Data's 20-second look at the cluster's size
def test_actor_pool_grows_onto_a_node_added_mid_stage(tmp_path):
    import ray

    class SlowEmbedder:  # defined here so that workers unpickle it by value
        def __call__(self, batch):
            time.sleep(0.75)
            return {"row": batch["row"], "node": [ray.get_runtime_context().get_node_id()] * len(batch["row"])}

    with local_cluster(num_cpus=0, include_dashboard=False) as cluster:
        cluster.add_node(num_cpus=1, num_gpus=1)
        ray.init(address=cluster.address)
        cfg = load_config(None, ["generate.num_actors=auto", "generate.actor_num_gpus=1",
                                 "generate.actor_num_cpus=0.25", "generate.batch_size=4"])
        # Ray Data re-reads the cluster's size every 20 s: the stage must outlast that.
        blocks = 48
        resources = actor_resources(cfg, "generate", work=blocks)
        assert (resources.min_actors, resources.max_actors) == (1, blocks)
        ds = ray.data.from_items([{"row": i} for i in range(blocks * 4)], override_num_blocks=blocks)
        ds = ds.map_batches(SlowEmbedder, batch_format="numpy", **resources.map_batches_kwargs())
        nodes = []
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            if not nodes:  # the stage is under way on one node: a second one joins
                cluster.add_node(num_cpus=1, num_gpus=1)
            nodes.extend(batch["node"])
        assert len(nodes) == blocks * 4
        assert len(set(nodes)) == 2, "the pool never placed an actor on the node that joined"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_gpu_preset_on_this_cpu_machine_stops_before_any_stage(tmp_path):
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "jobs/full.py", "--config", "waterbirds_0999", "--run-dir", str(run_dir),
         "--set", f"data.root={tmp_path}", "--set", "ray.address=null", "--set", "ray.num_cpus=1",
         "--set", "ray.dashboard=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "asks for a GPU" in last and "model.device=cpu" in last, last
    assert "] severity-" not in done.stdout, "a stage started before the check"
    assert not (run_dir / "severity-0.999").exists()


def test_the_planner_spreads_auto_stages_over_more_gpus_and_names_a_cap_that_idles_them():
    from engine.planning.plan import plan_job

    cfg = _preset("waterbirds_0999")
    on_8, on_16 = plan_job(cfg, "a100", 8), plan_job(cfg, "a100", 16)
    assert on_16.wall_seconds < on_8.wall_seconds
    for stage in ("finetune", "generate", "train"):
        assert on_16.stage_totals()[stage]["wall_seconds"] < on_8.stage_totals()[stage]["wall_seconds"], stage
    assert not [n for n in on_16.notes if "idle" in n]
    capped = _preset("waterbirds_0999", "finetune.max_concurrent_trials=8", "train.num_workers=8")
    notes = plan_job(capped, "a100", 16).notes
    assert "finetune clustered_dreambooth: 8 of 16 GPUs idle; finetune.max_concurrent_trials=8 caps it ('auto' uses them)" in notes
    assert any(n.startswith("train erm: 8 of 16 GPUs idle; train.num_workers=8 caps it") for n in notes)


def test_the_planner_resolves_concurrency_as_the_stages_do():
    from engine.planning.plan import plan_job

    cfg = load_config(None, ["generate.num_actors=auto", "filter.num_actors=auto", "cluster.num_actors=auto"])
    rows = {(r.stage, r.method): r for r in plan_job(cfg, "cpu", 1).rows}
    two_cores = {"CPU": 2.0}
    for stage, method in (("generate", "lora"), ("filter", "lora"), ("cluster", "")):
        row = rows[(stage, method)]
        assert row.slots == actor_resources(cfg, stage, row.tasks, reachable=two_cores).max_actors, stage
    # A GPU preset plans on CPUs as it would run there: with model.device=cpu, GPU shares off.
    cpu_plan = plan_job(_preset("waterbirds_0999"), "cpu", 2)
    assert cpu_plan.wall_seconds > 0
