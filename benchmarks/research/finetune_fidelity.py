"""Does fine-tuning move generated images toward their unit? Per unit, the image-encoder
distance (1 - cosine) from generated images to the unit's real-image centroid, drawn by the
base model with the group's plain prompt (before) and by the unit's fine-tuned model with its
manifest prompt (after; a borrowed unit's lender at ``generate.borrowed_strength``, as the
generate stage draws it), same seeds. Borrowing units (minority groups) are scored against
their group's validation images, since they have (almost) no training images. The group's
validation images against the same centroid give the distance real images sit at. On the
built-in benchmark it also reads each drawn image's background family from its border colour
(``engine.stages.data.builtin.read_background_attribute``) and reports the share that shows the
unit's own attribute, before and after: the check that a borrowing minority unit draws its
own background and not its lender's.

Runs the data, (cluster,) and fine-tune stages through their own entry points on the
embedded default (or a preset), then draws ``--images`` per unit. Prints a markdown table, then,
as the last line, one JSON object (value: mean relative distance reduction over trained units;
also the bytes each method's unit artifacts take on disk).

    python benchmarks/research/finetune_fidelity.py --methods lora,dreambooth
    # DreamBooth stored whole vs as rank-r weight changes, same seeds:
    python benchmarks/research/finetune_fidelity.py --methods dreambooth --set finetune.dreambooth_store=unet
    python benchmarks/research/finetune_fidelity.py --methods dreambooth --set finetune.delta_rank=8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="lora,dreambooth,clustered_dreambooth")
    parser.add_argument("--images", type=int, default=24, help="images drawn per unit, before and after")
    parser.add_argument("--config", default=None, help="preset (default: the embedded tiny default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--run-dir", default=None, help="reuse a run directory (default: a temporary one)")
    args = parser.parse_args()

    import numpy as np
    import torch

    from engine.config import load_config
    from engine.generation_methods import get_method
    from engine.models.encoders import load_encoder
    from engine.models.loading import load_base_pipeline
    from engine.raylib import init_ray
    from engine.runs import RunDir
    from engine.stages.data.datasets import load_image
    from engine.stages.data.stage import run_data_stage
    from engine.stages.finetune import run_finetune_stage
    from engine.stages.finetune.units import PromptBook
    from engine.stages.generate.plan import drawing_model
    from engine.stages.generate.sampler import UnitModels, make_scheduler, sample_images

    cfg = load_config(args.config, args.overrides)
    if cfg.data.severity == "original" and not any(o.startswith("data.severity=") for o in args.overrides):
        cfg.data.severity = cfg.severities[0]  # the severity the default run reports
    cfg.run_dir = args.run_dir or tempfile.mkdtemp(prefix="fairsynth-ftfid-")
    run = RunDir(cfg.run_dir)
    run.prepare(cfg)
    init_ray(cfg.ray)
    dataset = run_data_stage(cfg, run)
    prompts = PromptBook(cfg, dataset)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    device = "cuda" if cfg.model.device != "cpu" and torch.cuda.is_available() else "cpu"
    encoder = load_encoder(cfg.model.encoder, device=device)

    def embed(images: np.ndarray) -> np.ndarray:
        e = np.asarray(encoder.encode_images(images), dtype=np.float32)
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    def centroid(sources: list[str]) -> np.ndarray:
        c = embed(np.stack([load_image(s, cfg.data.image_size) for s in sources])).mean(axis=0)
        return c / np.linalg.norm(c)

    def method_sampler():
        """The generate stage's own loader and sampler, on a base pipeline of one method's: as in
        generate, methods never share one (a DreamBooth unit's weight changes apply to the base
        UNet's own weights, not to one that holds another method's LoRA adapters)."""
        pipe = load_base_pipeline(cfg.model.base, device, cfg.model.attention, cfg.model.allow_pickle)
        models = UnitModels(pipe, run.root, cfg.model.attention, cfg.model.allow_pickle)
        return pipe, make_scheduler(cfg.generate.scheduler, pipe.scheduler.config), models

    def draw(sampler, artifact: str | None, kind: str, prompt: str, negative: str, seed: int,
             strength: float = 1.0) -> np.ndarray:
        pipe, scheduler, models = sampler
        unet, encode = models.activate(artifact, kind, strength)
        n = args.images
        return sample_images(unet, pipe.vae, scheduler, encode, [prompt] * n, [negative] * n,
                             [seed + i for i in range(n)], cfg.generate.steps, cfg.generate.guidance_scale,
                             height=cfg.data.image_size, width=cfg.data.image_size)

    def distance(images: np.ndarray, c: np.ndarray) -> float:
        return float(np.mean(1.0 - embed(images) @ c))

    def background_match(images: np.ndarray, attribute: int) -> float | None:
        if cfg.data.name != "builtin":
            return None
        from engine.stages.data.builtin import read_background_attribute

        return float(np.mean([read_background_attribute(im) == attribute for im in images]))

    train, val = dataset.split("train"), dataset.split("val")
    rows, finetune_seconds, artifact_bytes = [], {}, {}
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        start = time.perf_counter()
        manifest = run_finetune_stage(cfg, run, method)
        finetune_seconds[method] = round(time.perf_counter() - start, 1)
        sampler = method_sampler()
        folders = {u["artifact"] for u in manifest["units"] if u["artifact"]}
        artifact_bytes[method] = {f: sum(p.stat().st_size for p in (run.root / f).rglob("*")
                                         if p.is_file() and p.name != "unit.json") for f in sorted(folders)}
        cluster_of = None
        if get_method(method).per_cluster:
            from engine.stages.cluster.stage import load_assignments

            a = load_assignments(run)
            cluster_of = dict(zip(a["image_id"], a["cluster"], strict=True))
        by_id = {u["unit"]: u for u in manifest["units"]}
        for unit in manifest["units"]:
            group = int(unit["group"])
            if unit["borrowed_from"] is None:
                members = train[train["group"] == group]
                if cluster_of is not None:
                    members = members[members["image_id"].map(cluster_of) == unit["cluster"]]
                reference = "train"
            else:
                members, reference = val[val["group"] == group], "val"
            c = centroid(members["source"].tolist())
            # Where real images sit: the group's validation images against the same centroid.
            held_out = val[val["group"] == group]["source"].tolist()[: args.images]
            floor = distance(np.stack([load_image(x, cfg.data.image_size) for x in held_out]), c)
            seed = 1000 + group * 100 + max(int(unit["cluster"]), 0)
            attribute = int(unit["attribute"])
            drawn_before = draw(sampler, None, "base", prompts.plain(int(unit["label"]), attribute), "", seed)
            before = distance(drawn_before, c)
            # Drawn as the generate stage draws it (a borrowed unit at generate.borrowed_strength).
            model, strength = drawing_model(unit, by_id, cfg.generate.borrowed_strength)
            drawn_after = draw(sampler, model["artifact"], model["artifact_kind"], unit["prompt"],
                               unit["negative_prompt"], seed, strength)
            after = distance(drawn_after, c)
            rows.append({"method": method, "unit": unit["unit"], "borrowed_from": unit["borrowed_from"],
                         "n_real": unit["n_real"], "reference": reference, "real": round(floor, 4),
                         "before": round(before, 4),
                         "after": round(after, 4), "reduction": round((before - after) / before, 4),
                         "background_before": background_match(drawn_before, attribute),
                         "background_after": background_match(drawn_after, attribute)})

    def share(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.0f}%"

    print("| method | unit | borrows | n_real | centroid of | real val images | before | after | reduction "
          "| own background before | after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['unit']} | {r['borrowed_from'] or '-'} | {r['n_real']} | {r['reference']} "
              f"| {r['real']:.4f} | {r['before']:.4f} | {r['after']:.4f} | {100 * r['reduction']:+.1f}% "
              f"| {share(r['background_before'])} | {share(r['background_after'])} |")
    matches = [r["background_after"] for r in rows if r["background_after"] is not None]
    trained = [r for r in rows if r["borrowed_from"] is None]
    value = float(np.mean([r["reduction"] for r in trained])) if trained else float("nan")
    print(json.dumps({
        "benchmark": "finetune_fidelity", "metric": "mean_relative_distance_reduction", "value": round(value, 4),
        "target": 0.0, "device": device, "images_per_unit": args.images, "severity": cfg.data.severity,
        "units_closer": sum(r["after"] < r["before"] for r in trained), "units_trained": len(trained),
        "own_background_after": round(float(np.mean(matches)), 4) if matches else None,
        "finetune_seconds": finetune_seconds, "artifact_bytes": artifact_bytes,
        "store": cfg.finetune.dreambooth_store, "delta_rank": cfg.finetune.delta_rank, "rows": rows,
    }))


if __name__ == "__main__":
    main()
