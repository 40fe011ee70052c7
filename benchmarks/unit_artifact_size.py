"""Bytes on disk of one fine-tuned DreamBooth unit at Stable Diffusion 1.5 shapes, saved by the
real code path, against the planner's count.

Builds the SD 1.5 UNet and text encoder from ``engine/models/sd15`` with random weights on the CPU,
lets the DreamBooth strategy make them trainable (which keeps the fp32 base it takes the
change from), moves every trainable weight a little as training would, and saves the unit's
artifact with ``strategy.save_artifact`` into a temporary folder. Prints the files' bytes,
the planner's figure (``engine/planning/disk.py``) and the seconds the save took, as one JSON
object. The byte count does not depend on the weights (the rank per layer is fixed). Needs
about 8 GB of memory (the fp32 UNet, its fp32 base copy, SVD workspace).

    python benchmarks/unit_artifact_size.py [--config waterbirds_0999] [--set finetune.delta_rank=64]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="waterbirds_0999", help="preset whose finetune section is used")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--change", type=float, default=1e-4, help="std of the change added to every weight")
    args = parser.parse_args()

    import torch

    from engine.config import load_config
    from engine.generation_methods import get_method
    from engine.models.shapes import build_text_encoder, build_unet, sd15_configs
    from engine.planning import disk
    from engine.planning.flops import diffusion_shapes

    cfg = load_config(args.config, args.overrides)
    ft = cfg.finetune
    configs = sd15_configs()
    torch.manual_seed(0)
    started = time.perf_counter()
    unet, text_encoder = build_unet(configs["unet"], "cpu"), build_text_encoder(configs["text_encoder"], "cpu")
    built = time.perf_counter() - started
    strategy = get_method("dreambooth")
    strategy.prepare(unet, text_encoder, ft)
    with torch.no_grad():
        for param in unet.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param), alpha=args.change)
    with tempfile.TemporaryDirectory(prefix="fairsynth-unit-") as folder:
        tick = time.perf_counter()
        strategy.save_artifact(unet, text_encoder, Path(folder), ft)
        saved = time.perf_counter() - tick
        files = {p.name: p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()}
        blocks = sum(p.stat().st_blocks * 512 for p in Path(folder).rglob("*") if p.is_file())
    planned = disk.unit_artifact_bytes(diffusion_shapes(cfg.model), ft, "dreambooth")
    measured = sum(files.values())
    print(json.dumps({
        "benchmark": "unit_artifact_size", "metric": "bytes_per_dreambooth_unit", "value": measured,
        "disk_blocks_bytes": blocks, "planned_bytes": planned, "files": files,
        "store": ft.dreambooth_store, "delta_rank": ft.delta_rank, "train_text_encoder": ft.train_text_encoder,
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "whole_unet_fp16_bytes": 2 * sum(p.numel() for p in unet.parameters()),
        "build_seconds": round(built, 1), "save_seconds": round(saved, 1), "threads": torch.get_num_threads(),
        "config": args.config,
    }))


if __name__ == "__main__":
    main()
