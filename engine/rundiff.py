"""Compare a finished run with an undisturbed run of the same config, and look for damage.

A run that was stopped and resumed, lost nodes, or rode out storage errors must end with the
same outputs as a run nothing disturbed: the same shard bytes, the same filter decisions, the
same fine-tuned tensors and the same metrics apart from clocks and paths. And nothing in it may
be half-written or counted twice. The chaos benchmark and the fault tests ask these two
questions; each answer is a list of lines, empty when all is well. Local and S3 run directories
alike (``engine.storage``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from engine import storage
from engine.runs import read_json
from engine.storage import RunPath

# Metrics fields that say when or where, not what was learnt.
CLOCKS_AND_PATHS = frozenset({"checkpoint_dir", "stage_seconds", "images_per_second", "epoch_seconds"})
SCORE_TOLERANCE = 1e-5  # the filter's scores, computed on different processes' threads
COMPLETE = "_COMPLETE.json"


def comparable_metrics(metrics: dict) -> dict:
    """A metrics.json without its clocks and paths."""
    out = {k: v for k, v in metrics.items() if k not in CLOCKS_AND_PATHS}
    out["epochs"] = [{k: v for k, v in e.items() if k not in CLOCKS_AND_PATHS} for e in metrics.get("epochs", [])]
    return out


def experiments(run: RunPath) -> Iterator[RunPath]:
    """Each severity folder of a run (under seed_<s>/ too, for a multi-seed run)."""
    for child in run.iterdir():
        if child.name.startswith("severity-"):
            yield child
        elif child.name.startswith("seed_"):
            yield from experiments(child)


def shard_rows(folder: RunPath):
    """A synthetic folder's shard names and its rows in (unit, seed) order."""
    import pandas as pd

    paths = sorted(folder.glob("part-*.parquet"))
    if not paths:
        return [], pd.DataFrame()
    frame = pd.concat([storage.read_parquet(p).to_pandas() for p in paths], ignore_index=True)
    return [p.name for p in paths], frame.sort_values(["unit", "seed"]).reset_index(drop=True)


def unit_tensors(units: RunPath) -> dict[str, dict[str, np.ndarray]]:
    """Every fine-tuned tensor by file and name (a file's JSON header may order its keys
    differently from run to run, so bytes would not do)."""
    from safetensors.numpy import load

    return {str(p.relative_to(units)): load(p.read_bytes()) for p in sorted(units.rglob("*.safetensors"))}


def differences(run_dir: str, reference_dir: str) -> list[str]:
    """What in ``run_dir`` differs from ``reference_dir``, a finished run of the same config."""
    run, reference = storage.as_path(run_dir), storage.as_path(reference_dir)
    found = [f"{name}: not in the reference" for name in sorted(_outputs(run) - _outputs(reference))]
    for ref_exp in experiments(reference):
        exp = run / str(ref_exp.relative_to(reference))
        found += _shard_differences(exp, ref_exp) + _tensor_differences(exp, ref_exp) + _metric_differences(exp, ref_exp)
    return found


def _outputs(run: RunPath) -> set[str]:
    """The outputs the comparison reads, by path under the run: so one the reference lacks
    shows as a difference too, not only one the run lacks."""
    kinds = ("synthetic/*/" + COMPLETE, "finetune/*/manifest.json", "train/*/metrics.json")
    return {str(p.relative_to(run)) for exp in experiments(run) for kind in kinds for p in exp.glob(kind)}


def _shard_differences(exp: RunPath, ref_exp: RunPath) -> list[str]:
    found = []
    for ref_folder in sorted((ref_exp / "synthetic").iterdir()) if (ref_exp / "synthetic").exists() else []:
        where = f"{exp.name}/synthetic/{ref_folder.name}"
        names, rows = shard_rows(exp / "synthetic" / ref_folder.name)
        ref_names, ref_rows = shard_rows(ref_folder)
        if names != ref_names:
            found.append(f"{where}: shards {names} != {ref_names}")
            continue
        if list(rows.columns) != list(ref_rows.columns) or len(rows) != len(ref_rows):
            found.append(f"{where}: {len(rows)} rows of {list(rows.columns)} != {len(ref_rows)} of {list(ref_rows.columns)}")
            continue
        exact = [c for c in ref_rows.columns if c != "score"]
        unequal = [c for c in exact if not rows[c].equals(ref_rows[c])]
        if unequal:
            found.append(f"{where}: columns {unequal} differ")
        if "score" in rows and not np.allclose(rows["score"], ref_rows["score"], rtol=0, atol=SCORE_TOLERANCE,
                                               equal_nan=True):
            found.append(f"{where}: filter scores differ by more than {SCORE_TOLERANCE}")
    return found


def _tensor_differences(exp: RunPath, ref_exp: RunPath) -> list[str]:
    found = []
    finetune = ref_exp / "finetune"
    for ref_method in sorted(finetune.iterdir()) if finetune.exists() else []:
        if not (ref_method / "units").exists():
            continue
        where = f"{exp.name}/finetune/{ref_method.name}/units"
        tensors, ref_tensors = unit_tensors(exp / "finetune" / ref_method.name / "units"), unit_tensors(ref_method / "units")
        if tensors.keys() != ref_tensors.keys():
            found.append(f"{where}: weight files {sorted(tensors)} != {sorted(ref_tensors)}")
            continue
        for name, ref in ref_tensors.items():
            if tensors[name].keys() != ref.keys() or not all(np.array_equal(tensors[name][k], ref[k]) for k in ref):
                found.append(f"{where}/{name}: tensors differ")
    return found


def _metric_differences(exp: RunPath, ref_exp: RunPath) -> list[str]:
    found = []
    for ref_metrics in sorted((ref_exp / "train").glob("*/metrics.json")) if (ref_exp / "train").exists() else []:
        method = ref_metrics.parent.name
        mine = exp / "train" / method / "metrics.json"
        if not mine.exists():
            found.append(f"{exp.name}/train/{method}: no metrics.json")
        elif comparable_metrics(read_json(mine)) != comparable_metrics(read_json(ref_metrics)):
            found.append(f"{exp.name}/train/{method}/metrics.json: differs beyond clocks and paths")
    return found


def damage(run_dir: str) -> list[str]:
    """Half-written files left behind, and outputs counted twice or missing, in ``run_dir``."""
    run = storage.as_path(run_dir)
    found = [f"half-written: {p.relative_to(run)}" for p in run.rglob("*.tmp")]
    for exp in experiments(run):
        found += _shard_damage(exp) + _unit_damage(exp) + _train_damage(exp)
    return found


def _shard_damage(exp: RunPath) -> list[str]:
    found = []
    for folder in sorted(p.parent for p in exp.glob("synthetic/*/" + COMPLETE)):
        where = f"{exp.name}/synthetic/{folder.name}"
        if not (folder / "_summary.json").exists():
            found.append(f"{where}: marked complete without _summary.json")
            continue
        summary = read_json(folder / "_summary.json")
        names, rows = shard_rows(folder)
        if len(names) != summary["shards"] or len(rows) != summary["images"]:
            found.append(f"{where}: {len(names)} shards and {len(rows)} rows, its summary says "
                         f"{summary['shards']} and {summary['images']}")
        elif rows.duplicated(["unit", "seed"]).any():
            found.append(f"{where}: a (unit, seed) row written twice")
    return found


def _unit_damage(exp: RunPath) -> list[str]:
    found = []
    for manifest in sorted(exp.glob("finetune/*/manifest.json")):
        for unit in read_json(manifest)["units"]:
            artifact = unit.get("artifact")
            if artifact and not (exp / artifact / "unit.json").exists():
                found.append(f"{exp.name}/{artifact}: in the manifest without its unit.json")
    return found


def _train_damage(exp: RunPath) -> list[str]:
    return [f"{exp.name}/train/{marker.parent.name}: marked complete without metrics.json"
            for marker in sorted(exp.glob("train/*/" + COMPLETE)) if not (marker.parent / "metrics.json").exists()]
