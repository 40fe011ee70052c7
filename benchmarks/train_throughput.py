"""Train throughput: images/s of the Ray Train loop fed by Ray Data vs the same loop fed from
tensors already in memory. Is the data path the bottleneck? Target: at least 0.9.

One TorchTrainer with the train stage's workers, DDP, model, optimizer, loss and training step
(``engine.stages.train.loop.train_epoch``) on the built-in benchmark's training split trains epochs
that alternate between two sources of batches, and differ only in that:
- ``ray_data``: the stage's own pipeline (``engine.stages.train.data``: decoded once into the object
  store, then block shuffling, random crops and flips in Ray Data tasks each epoch), read
  through ``get_dataset_shard`` and ``epoch_batches`` as the stage reads it;
- ``in_memory``: the same decoded images as uint8 tensors in each worker, sliced into
  shuffled batches (no augmentation: the ideal the data path is measured against).
The first epoch from each source (start-up) is left out; images/s counts every worker's
images. Alternating makes the ratio hold up on a shared machine whose load drifts.
Prints a markdown row, then, as the last line, one JSON object.

    python benchmarks/train_throughput.py [--epochs 6] [--quick] [--gpu] [--set train.batch_size=128]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")


def bench_loop(config: dict) -> dict:
    """A TorchTrainer worker: the train stage's step over Ray Data or in-memory batches."""
    import numpy as np
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from engine.stages.train.backbones import build_classifier
    from engine.stages.train.loop import build_optimizer, epoch_batches, set_trainable, train_epoch
    from engine.stages.train.methods import get_method

    cfg = config["train"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    per_worker_batch = max(2, cfg.batch_size // world)
    phase = get_method("erm").phases(cfg)[0]
    torch.manual_seed(cfg.seed)
    module = build_classifier(cfg.backbone, config["n_classes"]).to(device)
    set_trainable(module, phase.trainable)
    model = ray.train.torch.prepare_model(module, move_to_device=False) if world > 1 else module
    optimizer = build_optimizer(module, phase, cfg.weight_decay)
    sample_loss = phase.build_sample_loss(cfg)
    aggregate = phase.build_aggregate(cfg, config["n_groups"], config["train_group_counts"])

    shard = ray.train.get_dataset_shard("train")

    def from_ray_data(epoch):
        return epoch_batches(shard, cfg, per_worker_batch, epoch, rank)

    arrays = ray.get(config["arrays"][0])
    # This worker's half, as the split would give it, held as tensors before timing.
    images, labels, groups = (torch.from_numpy(np.ascontiguousarray(a[rank::world])) for a in arrays)
    generator = torch.Generator().manual_seed(cfg.seed + rank)

    def from_memory(epoch):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order) - per_worker_batch + 1, per_worker_batch):
            index = order[start : start + per_worker_batch]
            yield {"image": images[index], "label": labels[index], "group": groups[index]}

    # Epochs alternate between the two sources, so a machine whose load drifts (other jobs
    # on a shared box) slows both alike.
    timings = {"ray_data": [], "in_memory": []}
    for epoch in range(2 * config["epochs"]):
        source = "ray_data" if epoch % 2 == 0 else "in_memory"
        batches = from_ray_data(epoch // 2) if source == "ray_data" else from_memory(epoch // 2)
        started = time.perf_counter()
        stats = train_epoch(model, module, batches, phase, sample_loss, aggregate, optimizer, device)
        timings[source].append((time.perf_counter() - started, stats["images"] * world))
    return timings


def run(cfg, dataset, extra: dict, epochs: int) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t = cfg.train
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    trainer = TorchTrainer(
        bench_loop,
        train_loop_config={"train": t, "epochs": epochs, **extra},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=f"train-throughput-{int(time.time())}", storage_path=extra["storage"]),
        datasets={"train": dataset},
    )
    out = trainer.fit().return_value
    result = {}
    for source, epochs_done in out.items():
        timed = epochs_done[1:]  # the first epoch of each source starts things up
        result[source] = {
            "images_per_s": sum(n for _, n in timed) / sum(s for s, _ in timed),
            "epoch_seconds": [round(s, 2) for s, _ in epochs_done],
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6, help="epochs per source; the first is not timed")
    parser.add_argument("--quick", action="store_true", help="3 epochs")
    parser.add_argument("--gpu", action="store_true", help="one GPU worker (train.use_gpu, num_workers=1)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    epochs = 3 if args.quick else max(2, args.epochs)

    import tempfile

    import numpy as np
    import ray

    from engine.config import load_config
    from engine.raylib import init_ray
    from engine.resources import train_workers, use_gpu
    from engine.stages.data.prepare import load_dataset
    from engine.stages.train import data as train_data

    gpu = ["train.use_gpu=true", "train.num_workers=1", "train.cpus_per_worker=2"] if args.gpu else []
    cfg = load_config(None, ["data.severity=0.999", *gpu, *args.overrides])
    dataset = load_dataset(cfg.data)
    train = dataset.split("train")
    init_ray(cfg.ray)
    # 'auto' workers resolve as the train stage resolves them, on this Ray.
    t = cfg.train.model_copy(update={"num_workers": train_workers(cfg), "use_gpu": use_gpu(cfg)})
    cfg = cfg.model_copy(update={"train": t})

    base = train_data.real_images(train, t.image_size, True, t.num_workers, t.seed)
    view = train_data.training_view(base, image_size=t.image_size, augment=t.augment, weights=None)
    decoded = train_data.decode_sources(train, t.image_size)
    arrays = ray.put((decoded["image"], decoded["label"], decoded["group"]))
    extra = {
        "n_classes": dataset.n_classes,
        "n_groups": dataset.n_groups,
        "train_group_counts": dataset.group_counts("train"),
        # Wrapped in a list so Ray hands the reference itself to the workers.
        "arrays": [arrays],
        "storage": tempfile.mkdtemp(prefix="fairsynth-train-throughput-"),
    }
    result = run(cfg, view, extra, epochs)
    fed, in_memory = result["ray_data"], result["in_memory"]
    ratio = fed["images_per_s"] / in_memory["images_per_s"]

    device = "cpu"
    if t.use_gpu:
        import torch

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "gpu"
    print("| benchmark | backbone | workers | batch | Ray Data img/s | in-memory img/s | ratio | target |")
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| train_throughput | {t.backbone} {t.image_size}px | {t.num_workers} x {t.cpus_per_worker} CPU"
        f"{' + GPU' if t.use_gpu else ''} | {t.batch_size} | {fed['images_per_s']:.0f} | "
        f"{in_memory['images_per_s']:.0f} | {ratio:.2f} | 0.9 |"
    )
    print(json.dumps({
        "benchmark": "train_throughput",
        "metric": "ray_data_over_in_memory_images_per_s",
        "value": round(ratio, 3),
        "target": 0.9,
        "device": device,
        "ray_data_images_per_s": round(fed["images_per_s"], 1),
        "in_memory_images_per_s": round(in_memory["images_per_s"], 1),
        "ray_data_epoch_seconds": fed["epoch_seconds"],
        "in_memory_epoch_seconds": in_memory["epoch_seconds"],
        "backbone": t.backbone,
        "image_size": t.image_size,
        "batch_size": t.batch_size,
        "num_workers": t.num_workers,
        "cpus_per_worker": t.cpus_per_worker,
        "augment": t.augment,
        "train_images": int(len(train)),
        "epochs_timed": epochs - 1,
        "cpu_count": os.cpu_count(),
        "host": platform.node(),
        "numpy": np.__version__,
    }))
    ray.shutdown()


if __name__ == "__main__":
    main()
