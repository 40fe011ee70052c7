"""Eval memory: peak memory of each DDP worker while it evaluates a CelebA-sized split
(19,867 images at 224 px, CelebA's val split; 2.8 GiB decoded). Target: every worker under
1.5 GB while the split is streamed.

The script writes its own fixture: JPEG files and a manifest.csv in the engine's manifest
format, read by ``engine.stages.data.datasets.load_manifest``. The train stage's own call then
decodes the split into the object store (``engine.stages.train.data.eval_split_refs``, a block per
worker at least), and one TorchTrainer of 2 workers per mode evaluates it:
- ``streamed``: the train loop's evaluation (``engine.stages.train.loop.WorkerRun.evaluate``): each
  worker fetches its blocks one at a time and the per-group counts are all-reduced;
- ``whole`` (with ``--whole``, the default): what every worker did before, kept here as the
  baseline: concatenate every block of the split, then predict every world-th image.
Each mode runs in fresh worker processes. A thread in each worker samples /proc/self/status
every 10 ms: private memory (RssAnon, what the worker itself allocates), the object-store
pages it has mapped (RssShmem, shared with the store and every other reader) and mapped files
(RssFile: mostly torch's and Ray's libraries, shared by every worker); VmHWM is the kernel's
peak RSS, all three together. Ray's memory monitor counts a worker's RSS less its shared
pages, i.e. close to the private figure. ``eval_growth_mb`` is the private peak less the
private memory before evaluation began: what evaluation itself adds. Both modes' metrics must
agree.
Prints a markdown row, then, as the last line, one JSON object.

    python benchmarks/eval_memory.py [--images 19867] [--no-whole] [--set train.batch_size=128]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")

LIMIT_MB = 1536  # 1.5 GB
SIDE = 224
CELEBA_VAL = 19867
# CelebA's val split, class Blond_Hair x attribute Male: the group shares of the paper's setting.
GROUP_SHARES = (0.44, 0.41, 0.14, 0.01)


def write_fixture(root: Path, n_images: int, seed: int = 0) -> Path:
    """n JPEGs of SIDE px (smooth random colour fields: distinct images that compress like
    photos) and a manifest.csv listing them as the val split."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    rng = np.random.default_rng(seed)
    groups = rng.choice(len(GROUP_SHARES), n_images, p=GROUP_SHARES)
    (root / "images").mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_images):
        path = f"images/{i:06d}.jpg"
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((SIDE, SIDE), Image.BILINEAR).save(root / path, quality=85)
        paths.append(path)
    manifest = pd.DataFrame({"path": paths, "label": groups // 2, "attribute": groups % 2, "split": "val"})
    manifest.to_csv(root / "manifest.csv", index=False)
    return root


class MemorySampler:
    """Peak private (RssAnon) and shared (RssShmem) memory of this process, sampled."""

    FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")

    def __init__(self, every_s: float = 0.01, progress: Path | None = None):
        self.every_s, self.peak = every_s, dict.fromkeys(self.FIELDS, 0)
        # Peaks so far, written twice a second: a worker the OOM killer stops leaves them.
        self.progress = progress
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @classmethod
    def read(cls) -> dict:
        """The fields of /proc/self/status, in MB."""
        values = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in cls.FIELDS:
                values[key] = int(rest.split()[0]) / 1024  # kB
        return values

    def _run(self) -> None:
        last_write = 0.0
        while not self._stop.is_set():
            for key, value in self.read().items():
                self.peak[key] = max(self.peak[key], value)
            if self.progress is not None and time.monotonic() - last_write > 0.5:
                self.progress.write_text(json.dumps(self.peak))
                last_write = time.monotonic()
            self._stop.wait(self.every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        for key, value in self.read().items():
            self.peak[key] = max(self.peak[key], value)


def whole_split_counts(module, refs: list, batch_size: int, n_groups: int, device, rank: int, world: int):
    """The baseline: what evaluation did before streaming. Every worker concatenated the
    whole split, predicted every world-th image; here its counts are summed as the engine's."""
    import numpy as np
    import ray
    import torch

    from engine.stages.train.loop import _autocast, to_input

    blocks = [b for b in ray.get(list(refs)) if len(b["label"])]
    split = {k: np.concatenate([b[k] for b in blocks]) for k in ("image", "label", "group")}
    del blocks
    mine = slice(rank, None, world)
    images, labels, groups = split["image"][mine], split["label"][mine], split["group"][mine]
    module.eval()
    preds = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
            with _autocast(device):
                preds.append(module(to_input(batch, device))[0].argmax(1).cpu().numpy())
    right = np.concatenate(preds) == labels
    return np.stack([np.bincount(groups[right], minlength=n_groups), np.bincount(groups, minlength=n_groups)])


def eval_worker(config: dict) -> dict:
    """A TorchTrainer worker: one evaluation of the val split, with its memory sampled."""
    import torch.distributed as dist

    from engine.stages.train.backbones import build_classifier
    from engine.stages.train.loop import WorkerRun, all_reduce_sum, seed_torch, summarize_counts

    run = WorkerRun.from_config(config, {"method": "erm"})
    seed_torch(run.cfg.seed, run.cfg.deterministic)
    module = build_classifier(run.cfg.backbone, run.n_classes).to(run.device)
    before = MemorySampler.read()
    started = time.perf_counter()
    progress = Path(config["progress_dir"]) / f"{config['mode']}-{run.rank}.json"
    with MemorySampler(progress=progress) as sampler:
        if config["mode"] == "streamed":
            metrics = run.evaluate(module, "val")
        else:
            refs = config["eval_refs"]["val"]
            counts = whole_split_counts(module, refs, run.per_worker_batch * 4, run.n_groups, run.device, run.rank, run.world)
            metrics = summarize_counts(all_reduce_sum(counts, run.device), run.n_groups)
    mine = {
        "rank": run.rank,
        "seconds": round(time.perf_counter() - started, 1),
        "before_rss_mb": round(before["VmRSS"], 1),
        "before_private_mb": round(before["RssAnon"], 1),
        "peak_private_mb": round(sampler.peak["RssAnon"], 1),
        "eval_growth_mb": round(sampler.peak["RssAnon"] - before["RssAnon"], 1),
        "peak_object_store_mb": round(sampler.peak["RssShmem"], 1),
        "peak_file_mb": round(sampler.peak["RssFile"], 1),
        "peak_rss_mb": round(sampler.peak["VmHWM"], 1),
    }
    everyone = [None] * run.world
    dist.all_gather_object(everyone, mine)
    return {"workers": everyone, "metrics": metrics}


def evaluate_once(cfg, dataset, refs: list, mode: str, storage: str) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t = cfg.train
    trainer = TorchTrainer(
        eval_worker,
        train_loop_config={
            "mode": mode,
            "train": t,
            "n_groups": dataset.n_groups,
            "n_classes": dataset.n_classes,
            "train_group_counts": [1] * dataset.n_groups,
            "eval_refs": {"val": refs},
            "progress_dir": storage,
        },
        scaling_config=ScalingConfig(num_workers=t.num_workers, resources_per_worker={"CPU": t.cpus_per_worker}),
        run_config=RunConfig(name=f"eval-memory-{mode}-{int(time.time())}", storage_path=storage),
    )
    try:
        return trainer.fit().return_value
    except Exception as exc:  # e.g. the whole split's workers killed by Ray's OOM monitor
        workers = [
            {"rank": rank, "peak_rss_mb_before_failure": round(peak["VmHWM"], 1),
             "peak_private_mb_before_failure": round(peak["RssAnon"], 1)}
            for rank, file in enumerate(sorted(Path(storage).glob(f"{mode}-*.json")))
            for peak in [json.loads(file.read_text())]
        ]
        return {"error": f"{exc.__class__.__name__}: {str(exc).strip().splitlines()[0]}", "workers": workers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=CELEBA_VAL, help="images in the split")
    parser.add_argument("--no-whole", dest="whole", action="store_false", help="skip the whole-split baseline")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fairsynth-eval-memory-"))
    try:
        measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(args, work: Path) -> None:
    import ray

    from engine.config import load_config
    from engine.raylib import init_ray
    from engine.stages.data.datasets import load_manifest
    from engine.stages.train import data as train_data

    started = time.perf_counter()
    root = write_fixture(work / "data", args.images)
    written = time.perf_counter() - started
    cfg = load_config(None, [
        "data.name=manifest", f"data.root={root}", f"train.image_size={SIDE}", "train.num_workers=2",
        "train.cpus_per_worker=1", "ray.num_cpus=2", *args.overrides,
    ])
    dataset = load_manifest(cfg.data)
    init_ray(cfg.ray)
    t = cfg.train
    started = time.perf_counter()
    refs = train_data.eval_split_refs(dataset.split("val"), t.image_size, t.num_workers)
    decoded = time.perf_counter() - started
    modes = ["streamed", "whole"] if args.whole else ["streamed"]
    (work / "ray").mkdir()
    results = {}
    for mode in modes:
        results[mode] = evaluate_once(cfg, dataset, refs, mode, str(work / "ray"))
        print(f"{mode}: {json.dumps(results[mode]['workers'])}", flush=True)
    report(args, cfg, results, len(refs), written, decoded)
    ray.shutdown()


def _cells(result: dict | None) -> str:
    if result is None:
        return "not run"
    if "error" in result:
        before = " ; ".join(
            f"{w['peak_private_mb_before_failure']:.0f} / {w['peak_rss_mb_before_failure']:.0f}" for w in result["workers"]
        )
        return f"failed ({result['error'][:80]}); peaks until then: {before or 'none recorded'}"
    return " ; ".join(
        f"{w['peak_private_mb']:.0f} (+{w['eval_growth_mb']:.0f}) / {w['peak_rss_mb']:.0f}" for w in result["workers"]
    )


def report(args, cfg, results: dict, n_blocks: int, written: float, decoded: float) -> None:
    t = cfg.train
    if "error" in results["streamed"]:
        raise SystemExit(f"error: the streamed evaluation failed: {results['streamed']['error']}")
    streamed, whole = results["streamed"]["workers"], (results.get("whole") or {}).get("workers")
    under = [w["peak_private_mb"] < LIMIT_MB for w in streamed]
    # None where the baseline did not finish (killed for memory): nothing to compare.
    finished = [r for r in results.values() if "metrics" in r]
    equal = all(r["metrics"] == results["streamed"]["metrics"] for r in finished) if len(finished) == len(results) else None
    print("| benchmark | split | workers | streamed, per worker: private peak (+ during eval) / RSS peak, MB "
          "| whole split, the same | target |")
    print("|---|---|---|---|---|---|")
    print(
        f"| eval_memory | {args.images} x {t.image_size} px, {n_blocks} blocks | {t.num_workers} | {_cells(results['streamed'])} | "
        f"{_cells(results.get('whole'))} | private < {LIMIT_MB} |"
    )
    print(json.dumps({
        "benchmark": "eval_memory",
        "metric": "peak_private_mb_per_worker",
        "value": max(w["peak_private_mb"] for w in streamed),
        "target": LIMIT_MB,
        "device": "cpu",
        "under_1_5_gb": under,
        "all_under_1_5_gb": all(under),
        "rss_under_1_5_gb": [w["peak_rss_mb"] < LIMIT_MB for w in streamed],
        "metrics_equal": equal,
        "streamed": streamed,
        "whole": whole,
        "whole_error": (results.get("whole") or {}).get("error"),
        "val_metrics": results["streamed"]["metrics"],
        "images": args.images,
        "image_size": t.image_size,
        "decoded_gib": round(args.images * t.image_size**2 * 3 / 2**30, 2),
        "blocks": n_blocks,
        "eval_batch": max(2, t.batch_size // t.num_workers) * 4,
        "backbone": t.backbone,
        "fixture_seconds": round(written, 1),
        "decode_seconds": round(decoded, 1),
        "cpu_count": os.cpu_count(),
        "host": platform.node(),
    }))


if __name__ == "__main__":
    main()
