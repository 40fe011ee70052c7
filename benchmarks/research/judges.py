"""Group fidelity of a finished run's synthetic sets under every judge, side by side.

The filter stage records one judge's reading (``fidelity.judge``; on the built-in benchmark
the learned one). This reads each generative method's shards again and scores every image
with the learned judge, the renderer's shape rule and zero-shot CLIP, so one run shows how
far the judges agree. Prints the share of images read as their own group, before and after
filtering, per method and judge; the last line is JSON.

    python benchmarks/research/judges.py --run-dir runs/final/seed_10/severity-0.999
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

JUDGES = ("learned", "renderer", "clip")


def method_fidelity(run, method: str, judges: dict, n_attributes: int) -> dict:
    import numpy as np

    from engine.stages.generate.shards import decode_png, read_synthetic

    rows = read_synthetic(run, method, columns=["image", "group", "kept"])
    images = [decode_png(b) for b in rows["image"]]
    group = rows["group"].to_numpy(np.int64)
    kept = rows["kept"].to_numpy(bool)
    label, attribute = np.divmod(group, n_attributes)
    out = {}
    for name, judge in judges.items():
        read_label, read_attribute = judge.read(images)
        right = (np.asarray(read_label) == label) & (np.asarray(read_attribute) == attribute)
        out[name] = {"before": float(right.mean()), "after": float(right[kept].mean()), "kept": int(kept.sum())}
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="one finished severity directory (RUN/seed_S/severity-P)")
    args = p.parse_args(argv)

    from engine.cli import run_job

    run_job(lambda: report(Path(args.run_dir)))


def report(path: Path) -> None:
    from engine.config import load_config
    from engine.errors import FairsynthError
    from engine.generation_methods import is_generation_method
    from engine.runs import RunDir
    from engine.stages.data.stage import load_run_dataset

    if not (path / "config.yaml").exists():
        raise FairsynthError(f"{path} has no config.yaml; pass one severity directory of a finished run")
    cfg = load_config(path / "config.yaml")
    run = RunDir(path)
    dataset = load_run_dataset(run)
    from engine.models.encoders import load_encoder
    from engine.stages.generate import fidelity

    prompts = fidelity.judge_prompts(cfg, dataset.class_names, dataset.attribute_names)
    encoder = load_encoder(cfg.model.encoder, device="cpu")
    judges = {n: fidelity.make_judge(n, encoder, prompts) for n in JUDGES}
    results = {}
    for method in [m for m in cfg.methods if is_generation_method(m)]:
        results[method] = method_fidelity(run, method, judges, dataset.n_attributes)
        cells = "  ".join(f"{n} {v['before']:.3f} -> {v['after']:.3f}" for n, v in results[method].items())
        print(f"{method:22s} {cells}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
