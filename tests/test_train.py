"""The train stage: Group-DRO and SupCon match hand-computed values; ERM, Group-DRO and a
generative method train through Ray Train with 2 DDP workers on the built-in benchmark and
write their metrics (the other generative methods, which differ only in their shard folder,
and the other stage-2 modes run with `-m slow`); a method trained in a fit shared with another
gets the metrics of a fit of its own; a worker lost mid-run is restored from its checkpoint;
bad input is one line."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from PIL import Image

from engine.config import load_config
from engine.errors import FairsynthError
from engine.raylib import local_ray
from engine.runs import RunDir
from engine.stages.data import builtin
from engine.stages.data.stage import load_run_dataset, run_data_stage
from engine.stages.generate.oracle import images_per_group
from engine.stages.generate.shards import synthetic_dir, write_shard_table
from engine.stages.train.data import (
    _reflect_pad,
    augment_images,
    balanced_weights,
    block_count,
    resample_groups,
)
from engine.stages.train.loop import CHECKPOINT_FIELDS, read_checkpoint_state
from engine.stages.train.losses import GroupDROLoss, supcon_per_sample
from engine.stages.train.methods import get_method
from engine.stages.train.stage import train_hash

ROOT = Path(__file__).resolve().parents[1]
# A small benchmark keeps each Ray Train run to seconds on 2 cores.
SMALL = [
    "data.builtin.n_train=240",
    "data.builtin.n_val=40",
    "data.builtin.n_test=40",
    "data.severity=0.9",
    "train.epochs=1",
    "train.pretrain_epochs=1",
    "train.batch_size=32",
    "train.num_workers=2",
    "train.cpus_per_worker=0.5",
    "ray.num_cpus=2",
]


# --- losses against hand-computed values -----------------------------------------------------


def test_group_dro_weights_and_loss_match_hand_computation():
    # Batch: groups 0, 0, 1, 2; group 3 absent. Training counts 4, 1, 16, 9; C = 1; eta = 0.1.
    loss_fn = GroupDROLoss(4, [4, 1, 16, 9], eta=0.1, adjustment=1.0)
    losses = torch.tensor([1.0, 2.0, 3.0, 0.5], requires_grad=True)
    groups = torch.tensor([0, 0, 1, 2])
    robust = loss_fn(losses, groups)

    # Group means 1.5, 3.0, 0.5, 0 (empty); plus C / sqrt(n_g) = 0.5, 1, 0.25, 1/3.
    adjusted = [2.0, 4.0, 0.75, 1.0 / 3.0]
    unnorm = [0.25 * math.exp(0.1 * a) for a in adjusted]
    q = [u / sum(unnorm) for u in unnorm]
    assert loss_fn.q.tolist() == pytest.approx(q, rel=1e-6)
    assert robust.item() == pytest.approx(sum(qi * a for qi, a in zip(q, adjusted, strict=True)), rel=1e-6)
    # q is a constant: d loss / d loss_i = q_g / (batch count of g).
    robust.backward()
    assert losses.grad.tolist() == pytest.approx([q[0] / 2, q[0] / 2, q[1], q[2]], rel=1e-6)

    # The next step starts from the updated q, and the state survives a checkpoint.
    restored = GroupDROLoss(4, [4, 1, 16, 9], eta=0.1, adjustment=1.0)
    restored.load_state_dict(loss_fn.state_dict())
    step2 = torch.tensor([0.0, 0.0, 0.0, 2.0])
    expected = [qi * math.exp(0.1 * a) for qi, a in zip(q, [0.5, 1.0, 0.25, 2.0 + 1.0 / 3.0], strict=True)]
    for fn in (loss_fn, restored):
        fn(step2, torch.tensor([0, 1, 2, 3]))
        assert fn.q.tolist() == pytest.approx([e / sum(expected) for e in expected], rel=1e-6)


def test_group_dro_without_adjustment_is_the_plain_exponentiated_update():
    loss_fn = GroupDROLoss(2, [5, 0], eta=1.0)
    loss_fn(torch.tensor([2.0, 4.0]), torch.tensor([0, 0]))
    # Group 0 mean 3, group 1 empty (0); an empty training group gets no 1/sqrt(0) adjustment.
    assert loss_fn.q.tolist() == pytest.approx([math.exp(3) / (math.exp(3) + 1), 1 / (math.exp(3) + 1)])


def test_supcon_matches_hand_computation():
    features = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])  # normalised inside
    labels = torch.tensor([0, 0, 1])
    per_sample = supcon_per_sample(features, labels, temperature=1.0)
    anchor = -(1.0 - math.log(math.e + 1.0))  # positive at cos 1, negative at cos 0
    assert per_sample.tolist() == pytest.approx([anchor, anchor, 0.0], rel=1e-6)


def test_balanced_resampling_draws_groups_equally_often():
    counts = [900, 100, 0, 25]
    weights = balanced_weights(counts)
    assert weights[2] == 0.0
    groups = np.repeat([0, 1, 3], [900, 100, 25])
    batch = {"group": groups, "label": groups // 2, "image": np.zeros((len(groups), 2, 2, 3), np.uint8)}
    drawn = np.concatenate([resample_groups(batch, weights)["group"] for _ in range(20)])
    per_group = np.bincount(drawn, minlength=4) / 20
    target = sum(counts) / 3
    for g in (0, 1, 3):
        assert per_group[g] == pytest.approx(target, rel=0.05)


def test_augmentation_keeps_shape_and_moves_pixels():
    images = np.random.default_rng(0).integers(0, 255, (16, 8, 8, 3), dtype=np.uint8)
    out = augment_images({"image": images, "label": np.zeros(16)}, pad=2)["image"]
    assert out.shape == images.shape and out.dtype == np.uint8
    assert (out != images).any()


def test_fast_reflect_padding_equals_numpys():
    images = np.random.default_rng(0).integers(0, 255, (3, 9, 13, 3), dtype=np.uint8)
    for pad in (1, 3, 4):
        expected = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
        assert np.array_equal(_reflect_pad(images, pad), expected)


def test_block_count_follows_bytes_and_workers():
    assert block_count(1902, 32, min_blocks=2) == 2  # 5.8 MB: one block per worker
    assert block_count(4795, 224, min_blocks=2) == 22  # 722 MB in ~32 MiB blocks
    assert block_count(1, 32, min_blocks=4) == 1


def test_a_generative_classifier_trains_again_only_when_its_kept_images_change(tmp_path):
    """Its key names the filter stage's marker (plan hash and filter settings), not the config
    sections upstream: a sampler's batch size leaves the images, and the classifier, as they were."""
    cfg = load_config(None, [f"run_dir={tmp_path}"])
    run = RunDir(tmp_path)
    unfiltered = train_hash(cfg, run, "lora")
    run.mark_complete("filter/lora", "plan-a-filter-1-judge-1", kept_hash="plan-a-filter-1")
    first = train_hash(cfg, run, "lora")
    assert first != unfiltered
    assert train_hash(load_config(None, [f"run_dir={tmp_path}", "generate.batch_size=3"]), run, "lora") == first
    assert train_hash(load_config(None, [f"run_dir={tmp_path}", "train.epochs=3"]), run, "lora") != first
    run.mark_complete("filter/lora", "plan-b-filter-1-judge-1", kept_hash="plan-b-filter-1")
    second = train_hash(cfg, run, "lora")
    assert second != first
    # The filter's own marker also covers the fidelity judge; the kept set's hash does not.
    run.mark_complete("filter/lora", "plan-b-filter-1-judge-1", kept_hash="plan-b-filter-1")
    assert train_hash(cfg, run, "lora") == second
    run.mark_complete("filter/lora", "plan-b-filter-1-judge-2", kept_hash="plan-b-filter-1")
    assert train_hash(cfg, run, "lora") == second
    erm = train_hash(cfg, run, "erm")  # reads no synthetic image
    run.mark_complete("filter/lora", "plan-c-filter-1-judge-1", kept_hash="plan-c-filter-1")
    assert train_hash(cfg, run, "erm") == erm


def test_a_method_override_retrains_that_method_alone(tmp_path):
    """train.method_overrides scopes a hyperparameter to one method (as the baseline search
    chooses them): its classifier's key moves, the others' stay."""
    run = RunDir(tmp_path)
    # Setting method_overrides replaces the default's whole block (its tuned baselines).
    base = load_config(None, [f"run_dir={tmp_path}", "train.method_overrides={}"])
    tuned = load_config(None, [f"run_dir={tmp_path}", "train.method_overrides={erm: {learning_rate: 0.004}}"])
    assert tuned.train.for_method("erm").learning_rate == 0.004
    assert tuned.train.for_method("group_dro").learning_rate == base.train.learning_rate
    assert train_hash(tuned, run, "erm") != train_hash(base, run, "erm")
    assert train_hash(tuned, run, "group_dro") == train_hash(base, run, "group_dro")
    # The same value set for every method, or per method, trains the same classifier.
    shared = load_config(None, [f"run_dir={tmp_path}", "train.learning_rate=0.004"])
    assert train_hash(shared, run, "erm") == train_hash(tuned, run, "erm")
    erm_phase, = get_method("erm").phases(tuned.train.for_method("erm"))
    assert erm_phase.learning_rate == 0.004
    for bad, needle in (("{erm: {epochs: 3}}", "erm.epochs cannot be set per method"),
                        ("{nope: {learning_rate: 0.1}}", "unknown method 'nope'"),
                        ("{erm: {learning_rate: -1}}", "must be a positive number")):
        with pytest.raises(FairsynthError, match=needle):
            load_config(None, [f"train.method_overrides={bad}"])


def test_stage2_modes_choose_what_trains():
    def phases(mode):
        return get_method("dreambooth").phases(load_config(None, [f"train.stage2={mode}"]).train)

    cfg = load_config().train
    pretrain, last = phases("last_layer")
    assert (pretrain.dataset, pretrain.sample_loss, pretrain.trainable) == ("synthetic", "ce_supcon", "all")
    # SupCon acts on the encoder's features: where the encoder is frozen it is left out.
    assert (last.dataset, last.trainable, last.sample_loss) == ("train", "head", "ce")
    assert (pretrain.objective(cfg), last.objective(cfg)) == ("0.5 CE + 0.5 SupCon", "CE")
    assert (phases("full")[1].trainable, phases("full")[1].sample_loss) == ("all", "ce_supcon")
    assert phases("group_dro")[1].aggregate == "group_dro"
    assert phases("group_dro")[1].objective(cfg) == "Group-DRO over CE"
    assert [p.name for p in phases("none")] == ["pretrain"]  # synthetic images alone
    # Stage 2 reads the real set group-balanced in every mode, as Group-DRO does; stage 1's
    # synthetic set is balanced by construction.
    assert [phases(m)[1].balanced for m in ("last_layer", "full", "group_dro")] == [True] * 3
    assert not pretrain.balanced
    as_is = get_method("dreambooth").phases(load_config(None, ["train.group_balanced_sampling=false"]).train)
    assert not as_is[1].balanced
    erm, = get_method("erm").phases(load_config().train)
    assert (erm.aggregate, erm.balanced) == ("mean", False)


def test_dfr_reads_the_real_set_as_it_is_then_group_balanced():
    """DFR's two phases both read the real set, once as it is and once group-balanced: two
    views, where one view per dataset would train its last layer on the biased set."""
    cfg = load_config().train
    erm, last = get_method("dfr").phases(cfg)
    assert (erm.dataset, erm.trainable, erm.balanced, erm.view) == ("train", "all", False, "train")
    assert (last.dataset, last.trainable, last.balanced, last.view) == ("train", "head", True, "train_balanced")
    # The generative methods' stage 2, on an encoder that learnt from the real set alone.
    stage2 = get_method("lora").phases(cfg)[-1]
    assert (last.epochs, last.learning_rate, last.sample_loss) == (stage2.epochs, stage2.learning_rate, stage2.sample_loss)
    assert get_method("oracle").uses_synthetic and get_method("oracle").synthetic_stage == "oracle"
    assert [p.name for p in get_method("oracle").phases(cfg)] == ["pretrain", "finetune"]


def test_phase_fields_are_keywords_from_closed_sets():
    """A phase is built by name: positional fields, a value outside its set, or SupCon on a
    frozen encoder fail where the phase is built."""
    from engine.stages.train.methods import Phase

    good = {"name": "p", "dataset": "train", "epochs": 1, "learning_rate": 1e-3, "trainable": "all", "sample_loss": "ce"}
    assert (Phase(**good).aggregate, Phase(**good).balanced) == ("mean", False)
    with pytest.raises(TypeError):
        Phase("p", "train", 1, 1e-3, "all", "ce", "mean", False)
    with pytest.raises(ValueError, match="trainable='ce'; valid: all, head"):
        Phase(**{**good, "trainable": "ce"})
    with pytest.raises(ValueError, match="dataset='all'"):
        Phase(**{**good, "dataset": "all"})
    with pytest.raises(ValueError, match="frozen encoder"):
        Phase(**{**good, "trainable": "head", "sample_loss": "ce_supcon"})


def _random_batches(n_batches: int, size: int = 32, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {"image": torch.from_numpy(rng.integers(0, 255, (16, size, size, 3), dtype=np.uint8)),
         "label": torch.from_numpy(rng.integers(0, 2, 16)), "group": torch.from_numpy(rng.integers(0, 4, 16))}
        for _ in range(n_batches)
    ]


def test_last_layer_phase_leaves_every_encoder_weight_bit_identical():
    """Stage 2 ``last_layer``, set up as the loop sets up a phase (start_phase): the head
    trains on plain CE and the encoder, BatchNorm statistics included, does not move by a bit."""
    from engine.stages.train.backbones import build_classifier
    from engine.stages.train.loop import start_phase, train_epoch

    torch.manual_seed(0)
    module = build_classifier("tiny_resnet", 2, None)
    cfg = load_config().train
    pretrain, finetune = get_method("vanilla").phases(cfg)
    assert (pretrain.trainable, finetune.trainable) == ("all", "head")
    device = torch.device("cpu")
    # Stage 1 first, so stage 2 starts from an encoder that has trained (and whose
    # BatchNorm statistics have moved).
    stage1 = start_phase(module, pretrain, 0, cfg, 4, [1] * 4, distributed=False)
    train_epoch(stage1.model, module, _random_batches(2, seed=1), pretrain, stage1.sample_loss, stage1.aggregate,
                stage1.optimizer, device)
    encoder_before = {k: v.clone() for k, v in module.encoder.state_dict().items()}
    head_before = {k: v.clone() for k, v in module.head.state_dict().items()}
    stage2 = start_phase(module, finetune, 1, cfg, 4, [1] * 4, distributed=False)
    stats = train_epoch(stage2.model, module, _random_batches(3), finetune, stage2.sample_loss, stage2.aggregate,
                        stage2.optimizer, device)
    assert stats["images"] == 48
    after = module.encoder.state_dict()
    assert any("running_mean" in k for k in after)  # BatchNorm statistics are compared too
    assert all(torch.equal(encoder_before[k], after[k]) for k in encoder_before)
    assert any(not torch.equal(head_before[k], v) for k, v in module.head.state_dict().items())
    # The logged loss is the cross-entropy that trained, not CE plus a constant SupCon term.
    assert finetune.objective(cfg) == "CE"
    with pytest.raises(ValueError, match="frozen encoder"):
        dataclasses.replace(finetune, sample_loss="ce_supcon")


def test_group_counts_give_summarize_figures_bit_for_bit():
    """Evaluation sums per-group counts instead of gathering predictions: the same figures,
    to the last bit, for any split (a group with no images included)."""
    from engine.metrics import summarize
    from engine.stages.train.loop import summarize_counts

    rng = np.random.default_rng(3)
    n = 997
    preds, labels = rng.integers(0, 3, n), rng.integers(0, 3, n)
    groups = rng.choice([0, 1, 2, 4], n, p=[0.5, 0.3, 0.15, 0.05])  # group 3: no images
    counts = np.stack([np.bincount(groups[preds == labels], minlength=5), np.bincount(groups, minlength=5)])
    train_counts = [500, 30, 20, 0, 7]
    expected = summarize(preds, labels, groups, 5, train_counts)
    got = summarize_counts(counts, 5, train_counts)
    assert math.isnan(got["per_group"][3])
    assert [x for x in got["per_group"] if x == x] == [x for x in expected["per_group"] if x == x]
    assert {k: got[k] for k in ("worst_group", "average_group", "accuracy", "weighted_average")} == {
        k: expected[k] for k in ("worst_group", "average_group", "accuracy", "weighted_average")
    }


def test_streamed_evaluation_equals_whole_split_prediction(ray_session):
    """Two workers' shares of the blocks, streamed and counted, sum to the counts of every
    image's prediction (what the workers used to gather)."""
    import ray

    from engine.stages.train.backbones import build_classifier
    from engine.stages.train.loop import count_correct, to_input, worker_blocks

    torch.manual_seed(0)
    module = build_classifier("tiny_resnet", 2, None).eval()
    rng = np.random.default_rng(0)
    blocks = [
        {"image": rng.integers(0, 255, (n, 16, 16, 3), dtype=np.uint8), "label": rng.integers(0, 2, n),
         "group": rng.integers(0, 4, n)}
        for n in (13, 7, 11)
    ]
    refs = [ray.put(b) for b in blocks]
    shares = [worker_blocks(refs, rank, 2) for rank in range(2)]
    assert [len(s) for s in shares] == [2, 1]
    # A batch holds a whole block here, so both sides run the very same forward passes.
    streamed = sum(count_correct(module, share, 16, 4, torch.device("cpu")) for share in shares)
    with torch.no_grad():
        preds = np.concatenate([
            module(to_input(torch.from_numpy(b["image"]), torch.device("cpu")))[0].argmax(1).numpy() for b in blocks
        ])
    labels, groups = (np.concatenate([b[k] for b in blocks]) for k in ("label", "group"))
    assert streamed.tolist() == [np.bincount(groups[preds == labels], minlength=4).tolist(),
                                 np.bincount(groups, minlength=4).tolist()]


def test_a_damaged_training_checkpoint_is_not_resumed_from(tmp_path, monkeypatch, caplog):
    """A checkpoint cut short (a full disk, a copy interrupted) was unpickled on resume and
    failed the fit; the run trains that method from the start instead."""
    import ray.train

    from engine.stages.train import loop

    whole = {field: 0 for field in loop.CHECKPOINT_FIELDS}
    torch.save(whole, tmp_path / loop.STATE_FILE)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint.from_directory(str(tmp_path)))
    assert loop._latest_state(0).keys() == whole.keys()

    damaged = tmp_path / loop.STATE_FILE
    damaged.write_bytes(damaged.read_bytes()[:100])
    with caplog.at_level("WARNING", logger=loop.__name__):
        assert loop._latest_state(0) is None
    assert f"the latest checkpoint {damaged} is damaged" in caplog.text and "training from the start" in caplog.text


# --- Ray Train runs ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_session():
    with local_ray(num_cpus=2, ignore_reinit_error=True):
        yield


def _prepare(run_dir: Path, extra=()):
    cfg = load_config(None, [*SMALL, *extra])
    cfg.run_dir = str(run_dir)
    run = RunDir(run_dir)
    run.prepare(cfg)
    run_data_stage(cfg, run)
    return cfg, run


def write_synthetic_fixture(run: RunDir, method: str, per_group: int, dropped_per_group: int) -> None:
    """Synthetic shards in the generate stage's schema: benchmark renders, PNG-encoded, with
    ``dropped_per_group`` rows per group marked not kept."""
    rows = []
    rng = np.random.default_rng(1)
    for group in range(4):
        label, attribute = divmod(group, 2)
        for i in range(per_group + dropped_per_group):
            obj = builtin.OBJECT_SUBTYPES[label][i % 3]
            bg = builtin.BACKGROUND_SUBTYPES[attribute][i % 2]
            seed = int(rng.integers(0, 2**31 - 1))
            buffer = io.BytesIO()
            Image.fromarray(builtin.render(obj, bg, seed, "benchmark", 32)).save(buffer, format="PNG")
            rows.append(
                {
                    "image": buffer.getvalue(), "label": label, "attribute": attribute, "group": group,
                    "unit": f"g{group}", "cluster": -1, "seed": seed, "prompt": f"a photo of a {obj} on {bg}",
                    "negative_prompt": "", "method": method, "base_model": "tiny",
                    "score": float(i), "kept": i >= dropped_per_group,
                }
            )
    frame = pd.DataFrame(rows)
    for group, part in frame.groupby("group"):
        path = synthetic_dir(run, method) / f"part-fixture-{group:05d}.parquet"
        write_shard_table(path, pa.Table.from_pandas(part, preserve_index=False))


def _check_metrics(metrics: dict, cfg, run: RunDir, method: str) -> None:
    on_disk = json.loads((run / f"train/{method}/metrics.json").read_text())
    assert on_disk["method"] == method
    for split in ("val", "test"):
        result = on_disk[split]
        assert len(result["per_group"]) == 4 and all(0.0 <= a <= 1.0 for a in result["per_group"])
        assert result["worst_group"] == min(result["per_group"])
        assert result["average_group"] == pytest.approx(sum(result["per_group"]) / 4)
        # The benchmark's val/test are group-balanced, so accuracy is the group average.
        assert result["accuracy"] == pytest.approx(result["average_group"])
    assert run.is_complete(f"train/{method}", train_hash(cfg, run, method))
    assert metrics["test"] == on_disk["test"]


def test_every_training_block_holds_every_class(ray_session):
    """Records arrive sorted by class and each worker streams whole blocks: unmixed blocks
    would give a worker one class (and one class's BatchNorm statistics)."""
    import ray

    from engine.stages.train.data import real_images

    records = pd.DataFrame({
        "source": [f"builtin://{'sparrow' if y == 0 else 'duck'}/forest/{i}" for i, y in enumerate([0] * 60 + [1] * 60)],
        "label": [0] * 60 + [1] * 60,
        "group": [0] * 60 + [2] * 60,
    })
    blocks = ray.get(real_images(records, 8, cache=True, min_blocks=2).to_numpy_refs())
    assert len(blocks) == 2
    assert all(set(b["label"].tolist()) == {0, 1} for b in blocks)


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory, ray_session):
    cfg, run = _prepare(tmp_path_factory.mktemp("train-run"))
    for method in ("vanilla", "lora", "dreambooth", "clustered_dreambooth"):
        write_synthetic_fixture(run, method, per_group=12, dropped_per_group=4)
    return cfg, run


# Synthetic-then-real training also runs in the gpu_smoke test (LoRA, clustered DreamBooth).
@pytest.mark.parametrize("method", ["erm", pytest.param("vanilla", marks=pytest.mark.slow)])
def test_each_method_trains_one_epoch_with_two_ddp_workers(shared_run, method):
    from engine.stages.train import run_train_stage

    cfg, run = shared_run
    metrics = run_train_stage(cfg, run, method)
    _check_metrics(metrics, cfg, run, method)
    assert metrics["num_workers"] == 2
    phases = [e["phase"] for e in metrics["epochs"]]
    if method == "vanilla":
        assert phases == ["pretrain", "finetune"]
        # Kept rows only: 12 of the 16 per group.
        assert metrics["synthetic_images"] == 48 and metrics["synthetic_group_counts"] == [12] * 4
        # Stage 1 is no candidate: the best checkpoint is a fine-tuned one.
        assert metrics["best_epoch"] == 1
        # Stage 2 (last_layer) trains the head on CE, and logs that: the encoder saved after
        # pretraining and after fine-tuning is the same, bit for bit.
        assert [e["objective"] for e in metrics["epochs"]] == ["0.5 CE + 0.5 SupCon", "CE"]
        states = {}
        for path in Path(metrics["checkpoint_dir"]).rglob("state.pt"):
            state = read_checkpoint_state(path.read_bytes(), str(path))
            states[state["epoch"]] = state["model"]
        assert sorted(states) == [1, 2]
        encoder = [k for k in states[1] if k.startswith("encoder.")]
        assert encoder and all(torch.equal(states[1][k], states[2][k]) for k in encoder)
        assert not torch.equal(states[1]["head.weight"], states[2]["head.weight"])
    else:
        assert phases == ["train"] and metrics["synthetic_images"] == 0
        # The real checkpoints load with weights_only: tensors and plain values only.
        states = [read_checkpoint_state(p.read_bytes(), str(p)) for p in Path(metrics["checkpoint_dir"]).rglob("state.pt")]
        assert states and all(CHECKPOINT_FIELDS <= set(s) for s in states)
        assert states[-1]["history"][0]["phase"] == "train" and "model" in states[-1]["best"]
    # A second call finds the completion marker and trains nothing.
    again = run_train_stage(cfg, run, method)
    assert again["stage_seconds"] == metrics["stage_seconds"]


def test_dfr_and_the_oracle_train_on_views_of_their_own(shared_run):
    """DFR's last layer reads a group-balanced view of the real set beside its ERM phase's; the
    oracle pretrains on fresh real renders and reports the classifier they alone left."""
    from engine.stages.generate.oracle import run_oracle_stage
    from engine.stages.train import run_train_stages
    from engine.stages.train.stage import _fit_datasets, _method_inputs

    cfg, run = shared_run
    run_oracle_stage(cfg, run)
    dataset = load_run_dataset(run)
    inputs = _method_inputs(cfg, run, ["dfr"], dataset)
    views, _ = _fit_datasets(cfg.train, run, inputs, dataset.records, dataset.group_counts("train"))
    assert set(views) == {"dfr.train", "dfr.train_balanced"}
    groups = [np.bincount(views[name].to_pandas()["group"], minlength=4) for name in ("dfr.train", "dfr.train_balanced")]
    assert groups[0].tolist() == dataset.group_counts("train")  # as it is: the bias intact
    assert groups[1].min() >= 0.5 * groups[1].max()  # resampled to groups of about one size

    metrics = run_train_stages(cfg, run, ["dfr", "oracle"])
    assert [e["phase"] for e in metrics["dfr"]["epochs"]] == ["train", "finetune"]
    assert metrics["dfr"]["synthetic_only"] is None
    oracle = metrics["oracle"]
    assert [e["phase"] for e in oracle["epochs"]] == ["pretrain", "finetune"]
    assert oracle["synthetic_images"] == 4 * images_per_group(cfg, dataset.group_counts("train"))
    only = oracle["synthetic_only"]
    assert set(only) == {"val", "test"} and 0.0 <= only["test"]["worst_group"] <= only["test"]["average_group"] <= 1.0
    assert only == next(e["synthetic_only"] for e in oracle["epochs"] if "synthetic_only" in e)


@pytest.mark.slow  # 40 s and more; tests/test_reliability.py loses workers in the default suite too
def test_group_dro_survives_a_lost_worker(shared_run):
    """Group-DRO's short run, with a worker process killed after its first epoch: Ray Train
    restores the workers from that epoch's checkpoint and the run completes."""
    from engine.stages.train import run_train_stages

    cfg, run = shared_run
    cfg = cfg.model_copy(deep=True)
    cfg.train.epochs, cfg.train._inject_failure_at_epoch = 2, 1  # the test hook, outside the schema
    # ERM shares the fit: the restored workers go on to train it too.
    both = run_train_stages(cfg, run, ["group_dro", "erm"])
    metrics = both["group_dro"]
    _check_metrics(metrics, cfg, run, "group_dro")
    _check_metrics(both["erm"], cfg, run, "erm")
    assert [e["epoch"] for e in both["erm"]["epochs"]] == [0, 1]
    assert (Path(metrics["checkpoint_dir"]) / "injected_failure").exists(), "the failure hook did not fire"
    # The restored workers went on with epoch 1, with epoch 0's history (and q) from the
    # checkpoint, instead of starting over.
    assert [e["epoch"] for e in metrics["epochs"]] == [0, 1]
    q = [[e[f"q_{g}"] for g in range(4)] for e in metrics["epochs"]]
    assert all(sum(row) == pytest.approx(1.0) for row in q)
    assert q[0] != [0.25] * 4 and q[1] != q[0]


def test_a_failed_fit_gives_back_the_methods_its_latest_checkpoint_finished(tmp_path):
    """A fit that fails keeps the methods it finished: the driver reads them from the
    experiment's latest checkpoint (checkpoint folders sort by their time stamps)."""
    from engine.stages.train.stage import _finished_in_latest_checkpoint, _latest_checkpoint_state

    experiment = tmp_path / "methods-abc"
    for stamp, finished in (("2026-01-01_10-00-00.1", {}), ("2026-01-01_10-00-09.5", {"erm": {"best_epoch": 3}})):
        (experiment / f"checkpoint_{stamp}").mkdir(parents=True)
        torch.save({"finished": finished}, experiment / f"checkpoint_{stamp}" / "state.pt")
    assert _finished_in_latest_checkpoint(str(experiment)) == {"erm": {"best_epoch": 3}}
    assert _finished_in_latest_checkpoint(str(tmp_path / "none-yet")) == {}
    # Train's own record of its checkpoints sorts after them, and is not one.
    (experiment / "checkpoint_manager_snapshot.json").write_text("{}")
    assert _finished_in_latest_checkpoint(str(experiment)) == {"erm": {"best_epoch": 3}}
    assert _latest_checkpoint_state(str(experiment)) == {"finished": {"erm": {"best_epoch": 3}}}


class _Payload:
    """Unpickling this creates ``marker``: what a planted checkpoint would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_planted_in_a_checkpoint_is_refused_and_never_run(tmp_path):
    """A checkpoint under the run directory is loaded with weights_only: a planted payload is
    refused in one line before any worker starts, and its code never runs."""
    import ray.train

    from engine.stages.train import run_train_stage
    from engine.stages.train.loop import _load_state
    from engine.stages.train.stage import _finished_in_latest_checkpoint, _storage

    cfg, run = _prepare(tmp_path / "run")
    storage_path, name = _storage(cfg, run, {"erm": train_hash(cfg, run, "erm")})
    checkpoint = Path(storage_path) / name / "checkpoint_2026-01-01_10-00-00.1"
    checkpoint.mkdir(parents=True)
    marker = tmp_path / "payload-ran"
    torch.save({"method": "erm", "finished": {}, "model": _Payload(marker)}, checkpoint / "state.pt")

    with pytest.raises(FairsynthError, match=r"state.pt is not a checkpoint this version wrote \(Unsupported global") as err:
        run_train_stage(cfg, run, "erm")
    assert "\n" not in str(err.value)
    with pytest.raises(FairsynthError, match="not a checkpoint this version wrote"):
        _load_state(ray.train.Checkpoint.from_directory(str(checkpoint)))
    assert _finished_in_latest_checkpoint(str(checkpoint.parent)) == {}
    assert not marker.exists(), "the planted payload ran"
    assert not (run / "train/erm/metrics.json").exists()


def _without_timings(metrics: dict) -> dict:
    timing = {"stage_seconds", "images_per_second", "epoch_seconds", "checkpoint_dir"}
    clean = {k: v for k, v in metrics.items() if k not in timing}
    clean["epochs"] = [{k: v for k, v in e.items() if k not in timing} for e in metrics["epochs"]]
    return clean


# Slow: two fits of 40 s and more. In the default suite, tests/test_reliability.py's resumed job
# repeats an uninterrupted one's metrics, and the test below compares a shared fit with a lone one.
@pytest.mark.slow
def test_the_same_config_and_seed_repeat_every_metric(tmp_path, ray_session):
    """Two fresh runs of one config, with 2 DDP workers, a shuffled synthetic set, augmentation
    and group-balanced resampling (stage 2 group_dro): the same metrics.json, bit for bit. The
    second run trains the method after another one in the same fit, as the full job does."""
    from engine.stages.train import run_train_stage, run_train_stages

    cfg, run = _prepare(tmp_path / "alone", ["train.stage2=group_dro"])
    write_synthetic_fixture(run, "dreambooth", per_group=12, dropped_per_group=4)
    alone = run_train_stage(cfg, run, "dreambooth")
    cfg, run = _prepare(tmp_path / "shared", ["train.stage2=group_dro"])
    write_synthetic_fixture(run, "dreambooth", per_group=12, dropped_per_group=4)
    shared = run_train_stages(cfg, run, ["group_dro", "dreambooth"])
    assert [e["objective"] for e in alone["epochs"]] == ["0.5 CE + 0.5 SupCon", "Group-DRO over CE"]
    assert _without_timings(shared["dreambooth"]) == _without_timings(alone)


def test_a_method_sharing_a_fit_gets_the_metrics_of_a_fit_of_its_own(shared_run, tmp_path):
    """The full job trains every method in one fit. ERM trained second in a fresh run, after
    Group-DRO, repeats ERM trained alone (in the shared run) bit for bit: same seed, its own
    datasets and epoch counters, whatever shares the fit."""
    from engine.stages.train import run_train_stage, run_train_stages

    cfg, run = shared_run
    alone = run_train_stage(cfg, run, "erm")
    cfg, run = _prepare(tmp_path)
    shared = run_train_stages(cfg, run, ["group_dro", "erm"])
    assert _without_timings(shared["erm"]) == _without_timings(alone)
    assert "/train/ray/methods-" in shared["erm"]["checkpoint_dir"]
    assert shared["group_dro"]["checkpoint_dir"] == shared["erm"]["checkpoint_dir"]
    assert [e["phase"] for e in shared["group_dro"]["epochs"]] == ["train"]


@pytest.mark.slow  # the same code path as vanilla, with other shard folders and stage-2 modes
@pytest.mark.parametrize(
    "method,stage2", [("lora", "full"), ("dreambooth", "group_dro"), ("clustered_dreambooth", "last_layer")]
)
def test_other_generative_methods_and_stage2_modes(shared_run, method, stage2):
    from engine.stages.train import run_train_stage

    cfg, run = shared_run
    cfg = cfg.model_copy(deep=True)
    cfg.train.stage2 = stage2
    metrics = run_train_stage(cfg, run, method)
    _check_metrics(metrics, cfg, run, method)
    assert [e["phase"] for e in metrics["epochs"]] == ["pretrain", "finetune"]
    assert metrics["phases"][-1]["trainable"] == ("head" if stage2 == "last_layer" else "all")


# --- bad input ---------------------------------------------------------------------------------


def test_generative_method_without_synthetic_images_is_one_line(tmp_path):
    cfg, run = _prepare(tmp_path / "run")
    from engine.stages.train import run_train_stage

    with pytest.raises(FairsynthError, match="no synthetic shards in .*jobs/full.py"):
        run_train_stage(cfg, run, "lora")
    assert not (run / "train/lora/metrics.json").exists()


def test_missing_pretrained_weights_file_is_one_line(tmp_path):
    cfg, run = _prepare(tmp_path / "run", ["train.backbone=resnet18", f"train.pretrained_weights={tmp_path}/nope.pth"])
    from engine.stages.train import run_train_stage

    with pytest.raises(FairsynthError, match="nope.pth does not exist"):
        run_train_stage(cfg, run, "erm")


def test_train_job_reports_missing_synthetic_images_with_exit_code_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs/train.py"), "--method", "dreambooth", "--run-dir", str(tmp_path / "run"),
         *[a for s in SMALL for a in ("--set", s)]],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no synthetic shards in") and "Traceback" not in proc.stderr


# --- Group-DRO's known regime ------------------------------------------------------------------


@pytest.mark.slow  # two full-size trainings (2000 images): minutes on 2 cores
def test_group_dro_beats_erm_at_severity_095(tmp_path, ray_session):
    """With the default 8 epochs both reach 1.0 on this benchmark; on a short budget ERM
    still leans on the background while Group-DRO already has the minority groups right.
    Test WGA after 1 epoch, two runs: ERM 0.10 and 0.295, Group-DRO 0.945 and 0.945. After
    2 epochs ERM has mostly caught up (ERM 0.54, 0.905, 0.94; Group-DRO 1.0, 0.925, 0.96),
    too close to assert on with training that is not bit-reproducible."""
    from engine.stages.train import run_train_stage

    cfg = load_config(None, ["data.severity=0.95", "ray.num_cpus=2", "train.epochs=1"])
    cfg.run_dir = str(tmp_path / "run")
    run = RunDir(cfg.run_dir)
    run.prepare(cfg)
    run_data_stage(cfg, run)
    erm = run_train_stage(cfg, run, "erm")["test"]
    group_dro = run_train_stage(cfg, run, "group_dro")["test"]
    assert group_dro["worst_group"] > erm["worst_group"], (erm, group_dro)
