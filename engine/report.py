"""The results of a whole job: a table laid out like the paper's, a JSON row per method and
severity, and per-group accuracy plots.

A job of several seeds (``seeds``) reports each row as the mean over its seeds, with the
sample standard deviation beside each metric (``<metric>_std``) and every seed's own row
under ``per_seed``; the table shows mean ± std, and a second table each seed's figures."""

from __future__ import annotations

import math
from pathlib import Path

from engine import storage
from engine.config import known_methods
from engine.generation_methods import get_method, is_generation_method
from engine.runs import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json

# Titles of the methods that generate nothing; a generation method carries its own.
METHOD_TITLES = {
    "chance": "Chance (a coin flip)",
    "erm": "ERM",
    "group_dro": "Group-DRO",
    "dfr": "DFR",
    "oracle": "Oracle (real renders)",
}
# The row that shows what guessing scores; results list it first.
CHANCE = "chance"


def method_title(method: str) -> str:
    if is_generation_method(method):
        return get_method(method).title
    return METHOD_TITLES.get(method, method)


def severity_tag(severity: float | str) -> str:
    """Folder name of one severity's run inside a job's run directory."""
    return f"severity-{severity}"


def seed_tag(seed: int) -> str:
    """Folder name of one seed's run inside a job's run directory."""
    return f"seed_{seed}"


# Metrics averaged over seeds, each with its sample standard deviation beside it.
SEED_METRICS = ("test_worst_group", "test_average_group", "val_worst_group", "val_average_group",
                "synthetic_only_test_worst_group", "synthetic_only_test_average_group")
# Per-group accuracies averaged over seeds, group by group.
PER_GROUP_METRICS = ("test_per_group", "val_per_group")


def _mean_std(values: list[float]) -> tuple[float, float]:
    clean = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not clean:
        return math.nan, math.nan
    mean = sum(clean) / len(clean)
    if len(clean) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in clean) / (len(clean) - 1))


def _mean_fidelity(rows: list[dict]) -> dict | None:
    """Overall fidelity over seeds: mean shares, and the lowest unit of any seed (units are
    per seed: a seed's clusters are its own, so per-unit figures stay in ``per_seed``)."""
    measured = [(r["seed"], r["synthetic_fidelity"]) for r in rows if r.get("synthetic_fidelity")]
    if not measured:
        return None
    worst = [(f["worst_unit_after"]["after"], seed, f["worst_unit_after"]["unit"])
             for seed, f in measured if f.get("worst_unit_after")]
    lowest = min(worst) if worst else None
    return {
        "judge": measured[0][1]["judge"],
        "before": _mean_std([f["before"] for _, f in measured])[0],
        "after": _mean_std([f["after"] for _, f in measured])[0],
        "worst_unit_after": None if lowest is None else {"after": lowest[0], "seed": lowest[1], "unit": lowest[2]},
    }


def aggregate_seeds(per_seed: dict[int, list[dict]]) -> list[dict]:
    """One row per (method, severity) over every seed's rows (``collect_rows`` of each seed's
    run): metric means, ``<metric>_std``, the mean per-group accuracy, and the seeds' rows."""
    keys = list(dict.fromkeys((r["method"], r["severity"]) for rows in per_seed.values() for r in rows))
    out = []
    for method, severity in keys:
        rows = [{"seed": seed, **r} for seed, seed_rows in per_seed.items()
                for r in seed_rows if (r["method"], r["severity"]) == (method, severity)]
        row = {"method": method, "severity": severity, "seeds": [r["seed"] for r in rows]}
        for metric in SEED_METRICS:
            row[metric], row[f"{metric}_std"] = _mean_std([r.get(metric) for r in rows])
        for spread in ("val_worst_group_spread", "test_worst_group_spread"):
            if spread in rows[0]:
                row[spread] = _mean_std([r[spread] for r in rows])[0]
        for metric in PER_GROUP_METRICS:
            n_groups = len(rows[0][metric])
            row[metric] = [_mean_std([r[metric][g] for r in rows])[0] for g in range(n_groups)]
        row["synthetic_images"] = max(r["synthetic_images"] for r in rows)
        row["group_names"] = rows[0].get("group_names")
        row["synthetic_fidelity"] = _mean_fidelity(rows)
        stages = list(dict.fromkeys(k for r in rows for k in r["stage_seconds"]))
        row["stage_seconds"] = {k: _mean_std([r["stage_seconds"].get(k) for r in rows])[0] for k in stages}
        row["per_seed"] = rows
        out.append(row)
    return out


# Stages run once per severity (and seed) for every method; each method's row repeats their time.
SHARED_STAGES = ("data", "cluster")
STAGE_ORDER = ("data", "cluster", "finetune", "generate", "filter", "train")


def in_run_order(stages) -> list[str]:
    """Stage names in the order the stages run (stage_seconds.json stores them sorted by name)."""
    return sorted(stages, key=lambda s: STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER))


def stage_totals(rows: list[dict]) -> dict[str, float]:
    """Wall seconds per stage over the job (a mean seed's, with several seeds)."""
    totals: dict[str, float] = {}
    for severity in dict.fromkeys(r["severity"] for r in rows):
        chosen = [r["stage_seconds"] for r in rows if r["severity"] == severity]
        for stage in dict.fromkeys(k for s in chosen for k in s):
            values = [s[stage] for s in chosen if s.get(stage) is not None]
            totals[stage] = totals.get(stage, 0.0) + (max(values) if stage in SHARED_STAGES else sum(values))
    return {stage: totals[stage] for stage in in_run_order(totals)}


def console_summary(rows: list[dict], table: str, run_root) -> str:
    """What a finished job prints: the results table (results.md has the per-seed and per-unit
    tables too), where the report is, and the time each stage took."""
    head = "\n\n".join(table.split("\n\n")[:2]).rstrip()
    per = " per seed" if any("seeds" in r for r in rows) else ""
    times = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in stage_totals(rows).items())
    return (f"{head}\n\nreport: {run_root}/report.html (results, plots, sample grids, timings, config)\n"
            f"stage time{per}: {times}")


def severity_title(severity: float | str) -> str:
    return "orig" if severity == "original" else str(severity)


def collect_rows(run_root: Path, severities: list, methods: list[str], stage_seconds: dict) -> list[dict]:
    """One row per (method, severity) from each run's train/<method>/metrics.json, after a
    chance row per severity (``chance_row``)."""
    rows = []
    for severity in severities:
        sub = storage.as_path(run_root) / severity_tag(severity)
        guess = chance_row(sub, severity)
        rows += [guess] if guess else []
        for method in methods:
            metrics = read_json(sub / "train" / method / "metrics.json")
            only = metrics.get("synthetic_only") or {}
            rows.append(
                {
                    "method": method,
                    "severity": severity,
                    "test_worst_group": metrics["test"]["worst_group"],
                    "test_average_group": metrics["test"]["average_group"],
                    "test_per_group": metrics["test"]["per_group"],
                    "val_worst_group": metrics["val"]["worst_group"],
                    "val_average_group": metrics["val"]["average_group"],
                    "val_per_group": metrics["val"]["per_group"],
                    "synthetic_only_test_worst_group": only.get("test", {}).get("worst_group"),
                    "synthetic_only_test_average_group": only.get("test", {}).get("average_group"),
                    "synthetic_images": metrics.get("synthetic_images", 0),
                    "group_names": metrics.get("group_names"),
                    "synthetic_fidelity": read_fidelity(sub, method),
                    "stage_seconds": stage_seconds.get(str(severity), {}).get(method, {}),
                }
            )
    return rows


def chance_row(run_root, severity) -> dict | None:
    """What guessing scores on this run's val and test splits (``engine.metrics.chance`` of
    their group sizes): the line every accuracy is read against. None without a data stage."""
    from engine.metrics import chance
    from engine.runs import RunDir
    from engine.stages.data.stage import load_run_dataset

    if not storage.exists(storage.as_path(run_root) / "data/groups.json"):
        return None
    dataset = load_run_dataset(RunDir(run_root))
    figures = {split: chance(dataset.group_counts(split), dataset.n_classes) for split in ("val", "test")}
    row = {"method": CHANCE, "severity": severity, "synthetic_images": 0, "synthetic_fidelity": None,
           "group_names": [dataset.group_name(g) for g in range(dataset.n_groups)], "stage_seconds": {},
           "synthetic_only_test_worst_group": None, "synthetic_only_test_average_group": None}
    for split, f in figures.items():
        row[f"{split}_worst_group"] = f["worst_group"]
        row[f"{split}_worst_group_spread"] = f["worst_group_std"]  # over guesses, not seeds
        row[f"{split}_average_group"] = f["average_group"]
        row[f"{split}_per_group"] = [f["average_group"]] * dataset.n_groups
    return row


def read_fidelity(run_root, method: str) -> dict | None:
    """A generative method's synthetic group fidelity, as its filter stage measured it
    (engine.stages.generate.fidelity); None for other methods and for runs filtered before it existed."""
    path = storage.as_path(run_root) / "filter" / method / "summary.json"
    if not is_generation_method(method) or not storage.exists(path):
        return None
    return read_json(path).get("fidelity")


def _fidelity_cell(fidelity: dict | None) -> str:
    """'kept (all), worst unit kept' in percent: the share read as the unit's group after and
    before filtering, and the lowest unit's share after."""
    if not fidelity:
        return "-"
    worst = fidelity.get("worst_unit_after")
    seed = f" (seed {worst['seed']})" if worst and "seed" in worst else ""
    tail = f", worst unit {_pct(worst['after'])}{seed}" if worst else ""
    return f"{_pct(fidelity['after'])} ({_pct(fidelity['before'])}){tail}"


def fidelity_markdown(rows: list[dict]) -> str:
    """Per unit: the share of its kept (all) synthetic images the judge reads as its group
    (with several seeds, every seed's units, since each seed clusters and trains its own)."""
    rows = [s for r in rows for s in r.get("per_seed", [r])]
    measured = [r for r in rows if r.get("synthetic_fidelity")]
    if not measured:
        return ""
    judges = sorted({r["synthetic_fidelity"]["judge"] for r in measured})
    seeded = any("seed" in r for r in measured)
    lines = [
        f"Synthetic group fidelity per unit (%): images the {' / '.join(judges)} judge reads as the unit's "
        "class and attribute, kept by the filter (all generated); class and attribute alone, kept",
        "",
        f"| Method | Severity |{' Seed |' if seeded else ''} Unit | Group | Group fidelity | Class | Attribute | Kept / generated |",
        "|---" * (8 + seeded) + "|",
    ]
    for r in measured:
        seed = f" {r['seed']} |" if seeded else ""
        for unit, u in r["synthetic_fidelity"]["per_unit"].items():
            lines.append(
                f"| {method_title(r['method'])} | {severity_title(r['severity'])} |{seed} {unit} | {u['name']} | "
                f"{_pct(u['after'])} ({_pct(u['before'])}) | {_pct(u['class_after'])} | "
                f"{_pct(u['attribute_after'])} | {u['kept']} / {u['images']} |"
            )
    return "\n".join(lines) + "\n"


def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def metric_cell(row: dict, metric: str) -> str:
    """A metric in percent, '± std' after it when the row is a mean over seeds (one seed's
    std is None: nothing to show)."""
    std = row.get(f"{metric}_std")
    return _pct(row[metric]) + (f" ± {_pct(std)}" if "seeds" in row and std is not None else "")


def per_seed_markdown(rows: list[dict]) -> str:
    """Each seed's test WGA / AGA beside the mean ± std, one line per method and severity."""
    seeds = list(dict.fromkeys(s for r in rows for s in r.get("seeds", [])))
    if not seeds:
        return ""
    lines = [
        f"Test worst-group / average-group accuracy (%) per seed, and mean ± sample std over {len(seeds)} seeds",
        "",
        "| Method | Severity | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |",
        "|---" * (len(seeds) + 3) + "|",
    ]
    for r in rows:
        if r["method"] == CHANCE:
            continue
        by_seed = {p["seed"]: p for p in r["per_seed"]}
        cells = [
            f"{_pct(by_seed[s]['test_worst_group'])} / {_pct(by_seed[s]['test_average_group'])}" if s in by_seed else "-"
            for s in seeds
        ]
        mean = f"{metric_cell(r, 'test_worst_group')} / {metric_cell(r, 'test_average_group')}"
        lines.append(f"| {method_title(r['method'])} | {severity_title(r['severity'])} | " + " | ".join(cells) + f" | {mean} |")
    return "\n".join(lines) + "\n"


def accuracy_cell(row: dict, split: str) -> str:
    """'WGA / AGA' on a split in percent; a chance row's WGA carries its spread over guesses."""
    if row["method"] == CHANCE:
        spread = row.get(f"{split}_worst_group_spread")
        wga = _pct(row[f"{split}_worst_group"]) + (f" ± {_pct(spread)}" if spread is not None else "")
        return f"{wga} / {_pct(row[f'{split}_average_group'])}"
    return f"{metric_cell(row, f'{split}_worst_group')} / {metric_cell(row, f'{split}_average_group')}"


def _synthetic_only_cell(row: dict) -> str:
    value = row.get("synthetic_only_test_worst_group")
    if value is None or math.isnan(value):
        return "-"
    return f"{_pct(row['synthetic_only_test_worst_group'])} / {_pct(row['synthetic_only_test_average_group'])}"


def _row_order(rows: list[dict]) -> list[str]:
    return [m for m in (CHANCE, *known_methods()) if any(r["method"] == m for r in rows)]


def results_markdown(rows: list[dict], title: str) -> str:
    """One table per severity: each method's worst-group / average-group accuracy on val and
    test, its test accuracy per group, its classifier on synthetic images alone, and its
    synthetic group fidelity, under a chance row (with several seeds: mean ± std, then each
    seed's figures)."""
    seeds = list(dict.fromkeys(s for r in rows for s in r.get("seeds", [])))
    over = f", mean ± sample std over seeds {', '.join(map(str, seeds))}" if seeds else ""
    tables = []
    for severity in dict.fromkeys(r["severity"] for r in rows):
        chosen = {r["method"]: r for r in rows if r["severity"] == severity}
        names = next((r["group_names"] for r in chosen.values() if r.get("group_names")), None) or []
        lines = [
            f"{title} {severity_title(severity)}: worst-group / average-group accuracy (%){over}. Chance: what "
            "guessing scores (± its spread over guesses). Synthetic only: the classifier after stage 1, trained on "
            "synthetic images alone, on test. Group fidelity: the share of kept (all generated) synthetic images "
            "that an independent judge reads as their unit's group, and the lowest unit's (%)",
            "",
            "| Method | val (the epoch chosen on it) | test | test per group: " + " / ".join(names) + " | synthetic only | group fidelity | synthetic images |",
            "|---" * 7 + "|",
        ]
        for method in _row_order(list(chosen.values())):
            r = chosen[method]
            per_group = " / ".join(_pct(a) for a in r["test_per_group"])
            lines.append(f"| {method_title(method)} | {accuracy_cell(r, 'val')} | {accuracy_cell(r, 'test')} | "
                         f"{per_group} | {_synthetic_only_cell(r)} | {_fidelity_cell(r.get('synthetic_fidelity'))} | "
                         f"{r['synthetic_images'] or '-'} |")
        tables.append("\n".join(lines) + "\n")
    extra = [t for t in (per_seed_markdown(rows), fidelity_markdown(rows)) if t]
    return "\n".join(tables + extra)


def _save_figure(fig, path: Path) -> None:
    import io

    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_per_group(rows: list[dict], path: Path, severity) -> None:
    """Grouped bars: test accuracy of each group, one colour per method; chance as a line."""
    import numpy as np

    plt = _pyplot()
    chosen = [r for r in rows if r["severity"] == severity and r["method"] != CHANCE]
    if not chosen:
        return
    guess = next((r for r in rows if r["severity"] == severity and r["method"] == CHANCE), None)
    n_groups = len(chosen[0]["test_per_group"])
    names = chosen[0].get("group_names") or [f"group {g}" for g in range(n_groups)]
    width = 0.8 / len(chosen)
    fig, ax = plt.subplots(figsize=(max(8, 2.0 * n_groups), 4.2), dpi=110)
    x = np.arange(n_groups)
    for i, r in enumerate(chosen):
        values = [0 if (v is None or math.isnan(v)) else 100 * v for v in r["test_per_group"]]
        ax.bar(x + (i - (len(chosen) - 1) / 2) * width, values, width, label=method_title(r["method"]))
    if guess is not None:
        ax.axhline(100 * guess["test_average_group"], color="black", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Per-group test accuracy, severity {severity_title(severity)}")
    ax.legend(fontsize=7, ncol=min(len(chosen) + 1, 5), loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    _save_figure(fig, path)


def plot_worst_group(rows: list[dict], path: Path, severity) -> None:
    """One bar per method: test worst-group accuracy (± std over seeds) beside val's, against
    the band a coin flip scores."""
    import numpy as np

    plt = _pyplot()
    chosen = [r for r in rows if r["severity"] == severity and r["method"] != CHANCE]
    guess = next((r for r in rows if r["severity"] == severity and r["method"] == CHANCE), None)
    if not chosen:
        return
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(chosen) + 1.6), dpi=110)
    y = np.arange(len(chosen))[::-1]
    for offset, split, colour in ((0.2, "val", "#9ecae1"), (-0.2, "test", "#3182bd")):
        values = [100 * (r[f"{split}_worst_group"] or 0) for r in chosen]
        errors = [100 * (r.get(f"{split}_worst_group_std") or 0) for r in chosen]
        ax.barh(y + offset, values, 0.38, xerr=errors, color=colour, label=f"{split} worst-group", capsize=2)
    if guess is not None:
        mean, spread = 100 * guess["test_worst_group"], 100 * guess["test_worst_group_spread"]
        ax.axvspan(mean - 2 * spread, mean + 2 * spread, color="grey", alpha=0.2, label="chance (± 2 spread)")
    ax.set_yticks(y, [method_title(r["method"]) for r in chosen], fontsize=9)
    ax.set_xlim(0, 100)
    ax.set_xlabel("worst-group accuracy (%)")
    ax.set_title(f"Worst-group accuracy, severity {severity_title(severity)}")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    _save_figure(fig, path)


def write_results(run_root: Path, rows: list[dict], dataset_title: str) -> str:
    run_root = storage.as_path(run_root)
    atomic_write_json(run_root / "results.json", rows)
    table = results_markdown(rows, dataset_title)
    atomic_write_text(run_root / "results.md", table)
    for severity in dict.fromkeys(r["severity"] for r in rows):
        plot_per_group(rows, run_root / "plots" / f"per_group_{severity_tag(severity)}.png", severity)
        plot_worst_group(rows, run_root / "plots" / f"worst_group_{severity_tag(severity)}.png", severity)
    return table
