"""A whole job's plan: every stage's FLOPs, device-hours and wall time on N devices, the
bottleneck, and how a finished run's stage times compare with the prediction."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from engine.config import REPO_ROOT, Config, PlanConfig
from engine.errors import FairsynthError
from engine.planning import flops as F
from engine.planning.counts import GroupCounts, clusters_per_group, from_groups_json, group_counts
from engine.planning.hardware import STAGES, Device, resolve_device
from engine.planning.stages import STAGE_COSTS, PlanContext, StageCost, schedule


@dataclass
class JobPlan:
    device: Device
    n_devices: int
    rows: list[StageCost]
    counts: dict[str, GroupCounts]
    models: dict[str, str]
    notes: list[str] = field(default_factory=list)

    def stage_totals(self) -> dict[str, dict[str, float]]:
        totals = {s: {"flops": 0.0, "device_hours": 0.0, "wall_seconds": 0.0} for s in STAGES}
        for row in self.rows:
            t = totals[row.stage]
            t["flops"] += row.flops
            t["device_hours"] += row.device_seconds / 3600
            t["wall_seconds"] += row.wall_seconds
        return totals

    def disk(self) -> dict[str, dict[str, float]]:
        """Per stage: bytes its outputs keep in the run directory, and the most its running
        tasks hold at once besides (stages run one after another, so the peak is one row's)."""
        disk = {s: {"kept_bytes": 0.0, "in_flight_bytes": 0.0} for s in STAGES}
        for row in self.rows:
            disk[row.stage]["kept_bytes"] += row.disk_bytes
            disk[row.stage]["in_flight_bytes"] = max(disk[row.stage]["in_flight_bytes"], row.scratch_bytes)
        return disk

    @property
    def wall_seconds(self) -> float:
        return sum(r.wall_seconds for r in self.rows)

    @property
    def device_hours(self) -> float:
        return sum(r.device_seconds for r in self.rows) / 3600

    @property
    def units(self) -> int:
        """GPUs, or the cores of the CPU machines: what tasks are placed on."""
        return self.device.units(self.n_devices)

    @property
    def billed_device_hours(self) -> float:
        """What holding every GPU (or core) for the whole job costs."""
        return self.wall_seconds * self.units / 3600

    @property
    def bottleneck(self) -> str:
        totals = self.stage_totals()
        return max(STAGES, key=lambda s: totals[s]["wall_seconds"])

    def to_dict(self) -> dict:
        totals = self.stage_totals()
        return {
            "device": {
                "kind": self.device.kind,
                "count": self.n_devices,
                "units": self.units,
                "peak_tflops": self.device.peak_flops / 1e12,
                "peak_source": self.device.peak_source,
                "mfu": self.device.mfu,
                "mfu_source": self.device.mfu_source,
            },
            "models": self.models,
            "data": {
                sev: {"train_per_group": c.train, "val": c.val, "test": c.test, "source": c.source}
                for sev, c in self.counts.items()
            },
            "stages": {
                s: {**totals[s], "share_of_wall": totals[s]["wall_seconds"] / self.wall_seconds if self.wall_seconds else 0.0}
                for s in STAGES
            },
            "rows": [
                {
                    "severity": r.severity, "stage": r.stage, "method": r.method, "part": r.part,
                    "flops": r.flops, "tasks": r.tasks, "concurrent": r.concurrent, "waves": r.waves,
                    "devices": r.devices, "device_hours": r.device_seconds / 3600, "wall_seconds": r.wall_seconds,
                    "mfu": r.mfu, "mfu_source": r.mfu_source, "disk_bytes": r.disk_bytes,
                    "in_flight_bytes": r.scratch_bytes,
                }
                for r in self.rows
            ],
            "total": {
                "flops": sum(r.flops for r in self.rows),
                "device_hours": self.device_hours,
                "wall_seconds": self.wall_seconds,
                "billed_device_hours": self.billed_device_hours,
            },
            "bottleneck": self.bottleneck,
            "disk": {**self.disk(), "total": {"kept_bytes": sum(r.disk_bytes for r in self.rows)}},
            "notes": self.notes,
        }


def plan_job(
    cfg: Config,
    device_kind: str = "cpu",
    n_devices: int = 1,
    peak_tflops: float | None = None,
    counts: dict[str, GroupCounts] | None = None,
    clusters: dict[str, list[int]] | None = None,
    results_dir: Path | None = None,
) -> JobPlan:
    """Plan every severity, method and stage of ``cfg`` on ``n_devices`` of ``device_kind``.

    ``counts`` / ``clusters`` (by ``str(severity)``) replace what the planner would work out
    from the config, e.g. with what a finished run recorded."""
    if n_devices < 1:
        raise FairsynthError(f"--gpus {n_devices}: the cluster needs at least one device")
    folder = results_dir if results_dir is not None else REPO_ROOT / cfg.plan.results_dir
    device = resolve_device(cfg, device_kind, peak_tflops, folder)
    shapes, encoder = F.diffusion_shapes(cfg.model), F.encoder_shapes(cfg.model)
    rows: list[StageCost] = []
    notes: list[str] = []
    used_counts: dict[str, GroupCounts] = {}
    for severity in cfg.severities:
        key = str(severity)
        sub = cfg.model_copy(deep=True)
        sub.data.severity = severity
        group = (counts or {}).get(key) or group_counts(sub, severity)
        used_counts[key] = group
        per_group = (clusters or {}).get(key) or clusters_per_group(sub, group)
        ctx = PlanContext(sub, key, group, device, device.units(n_devices), shapes, encoder, per_group)
        for stage in STAGES:
            rows.extend(STAGE_COSTS[stage].costs(ctx))
        notes.extend(group.notes + ctx.notes)
    for row in rows:
        schedule(row, device, device.units(n_devices))
        notes.extend(row.notes)
    if cfg.cluster.k == "auto" and not clusters:
        notes.append(f"cluster.k = auto: counted k_max = {cfg.cluster.k_max} per group (capped by min_cluster_size), an upper bound")
    notes.append("FLOPs count matrix products and convolutions; data loading, image decoding and model loading are not planned")
    models = {
        "diffusion": shapes.source,
        "encoder": encoder.source,
        "classifier": f"{cfg.train.backbone} at {cfg.train.image_size} px",
    }
    return JobPlan(device, n_devices, rows, used_counts, models, list(dict.fromkeys(notes)))


# --- text -----------------------------------------------------------------------------------


def format_flops(x: float) -> str:
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g} FLOP" if x else "0"


def format_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "never"
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m {int(s % 60):02d}s"
    if s < 86400 * 2:
        return f"{int(s // 3600)}h {int(s % 3600 // 60):02d}m"
    return f"{s / 86400:.1f}d"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))  # noqa: E731
    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def format_plan(plan: JobPlan, title: str = "") -> str:
    dev = plan.device
    unit = "GPU" if dev.is_gpu else "core"
    cluster = (
        f"{plan.n_devices} x {dev.kind}" if dev.is_gpu
        else f"{plan.n_devices} x this machine ({plan.units} cores)"
    )
    out = [
        f"plan{' for ' + title if title else ''}: {cluster}, {dev.peak_flops / 1e12:.4g} TFLOP/s peak per {unit} "
        f"({dev.peak_source})",
        *(f"  {k}: {v}" for k, v in plan.models.items()),
    ]
    for sev, c in plan.counts.items():
        out.append(f"  severity {sev}: {c.n_train} training images, per group {c.train}; val {c.val}, test {c.test}")
    out.append("")
    totals = plan.stage_totals()
    wall = plan.wall_seconds or 1.0
    rows = [
        [s, format_flops(t["flops"]), f"{plan.device.mfu[s]:.3g}", f"{t['device_hours']:.3g}",
         format_seconds(t["wall_seconds"]), f"{100 * t['wall_seconds'] / wall:.0f}%"]
        for s, t in totals.items()
    ]
    rows.append(["total", format_flops(sum(t["flops"] for t in totals.values())), "",
                 f"{plan.device_hours:.3g}", format_seconds(plan.wall_seconds), "100%"])
    out += _table(["stage", "FLOPs", "MFU", f"{unit}-hours", "wall", "of wall"], rows)
    out += [
        "",
        f"whole job: {format_seconds(plan.wall_seconds)} on {cluster}; {plan.device_hours:.3g} {unit}-hours "
        f"of compute, {plan.billed_device_hours:.3g} {unit}-hours held ({plan.units} x wall); "
        f"bottleneck: {plan.bottleneck} ({100 * totals[plan.bottleneck]['wall_seconds'] / wall:.0f}% of wall)",
        "",
    ]
    detail = [
        [r.severity, r.stage, r.method + (f" ({r.part})" if r.part else ""), str(r.tasks),
         f"{r.concurrent} on {r.devices:g}" if r.tasks else "-", str(r.waves) if r.tasks else "-",
         format_flops(r.flops), f"{r.device_seconds / 3600:.3g}", format_seconds(r.wall_seconds)]
        for r in plan.rows
    ]
    out += _table(["severity", "stage", "method", "tasks", f"at once on {unit}s", "waves", "FLOPs",
                   f"{unit}-h", "wall"], detail)
    out += ["", *format_disk(plan)]
    sources = sorted({f"{s}: {plan.device.mfu_source[s]}" for s in STAGES})
    out += ["", "MFU from: " + "; ".join(sources)]
    out += [f"note: {n}" for n in plan.notes]
    return "\n".join(out)


def format_bytes(x: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.0f} B" if x else "0"


def format_disk(plan: JobPlan) -> list[str]:
    """Disk per stage: kept in the run directory, and held in flight (fine-tuning checkpoints)."""
    disk = plan.disk()
    rows = [[s, format_bytes(d["kept_bytes"]), format_bytes(d["in_flight_bytes"])] for s, d in disk.items()]
    rows.append(["total", format_bytes(sum(d["kept_bytes"] for d in disk.values())),
                 format_bytes(max(d["in_flight_bytes"] for d in disk.values()))])
    by_method = [[r.severity, r.label, format_bytes(r.disk_bytes), format_bytes(r.scratch_bytes)]
                 for r in plan.rows if r.disk_bytes or r.scratch_bytes]
    return [*_table(["disk", "kept in run_dir", "in flight (peak)"], rows), "",
            *_table(["severity", "stage", "kept", "in flight"], by_method)]


# --- checking a plan against a finished run ------------------------------------------------


def _run_config(run_dir: Path) -> Config:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FairsynthError(f"--compare {run_dir}: no config.yaml there; point it at a run directory of jobs/full.py")
    return Config.model_validate(yaml.safe_load(path.read_text()) or {})


def _recorded_counts(run_dir: Path, cfg: Config) -> tuple[dict, dict]:
    from engine.report import severity_tag

    counts, clusters = {}, {}
    for severity in cfg.severities:
        sub = run_dir / severity_tag(severity)
        if (sub / "data/groups.json").is_file():
            counts[str(severity)] = from_groups_json(sub / "data/groups.json")
        assignments = sub / "cluster/assignments.parquet"
        if assignments.is_file() and str(severity) in counts:
            import pandas as pd

            frame = pd.read_parquet(assignments, columns=["group", "cluster"])
            per_group = frame[frame["cluster"] >= 0].groupby("group")["cluster"].nunique()
            clusters[str(severity)] = [int(per_group.get(g, 0)) for g in range(counts[str(severity)].n_groups)]
    return counts, clusters


def compare_with_run(run_dir: str | Path, device_kind: str = "cpu", n_devices: int = 1,
                     peak_tflops: float | None = None, plan_settings: PlanConfig | None = None,
                     ) -> tuple[JobPlan, list[dict]]:
    """Plan the run's own config (with the group and cluster counts it recorded) and set each
    stage's predicted seconds beside RUN/stage_seconds.json; returns the plan and one row per
    (severity, method, stage) plus per-stage totals (method "all"). The planner's own settings
    (MFU, results folder) are today's, ``plan_settings``, not those the run was written with."""
    from engine.runs import read_json

    run_dir = Path(run_dir)
    seconds_path = run_dir / "stage_seconds.json"
    if not seconds_path.is_file():
        raise FairsynthError(f"--compare {run_dir}: no stage_seconds.json; it is written when jobs/full.py finishes")
    cfg = _run_config(run_dir)
    cfg.plan = plan_settings if plan_settings is not None else PlanConfig()
    counts, clusters = _recorded_counts(run_dir, cfg)
    plan = plan_job(cfg, device_kind, n_devices, peak_tflops, counts=counts, clusters=clusters)
    actual = read_json(seconds_path)
    predicted: dict[tuple[str, str, str], float] = defaultdict(float)
    for row in plan.rows:
        predicted[(row.severity, row.method, row.stage)] += row.wall_seconds
    rows = []
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for severity, methods in actual.items():
        shared_done = set()
        for method, stages in methods.items():
            for stage, seconds in stages.items():
                if stage not in STAGES:
                    continue
                shared = stage == "cluster"
                if shared and stage in shared_done:
                    continue  # every method's record repeats the shared stage's time
                shared_done.add(stage)
                guess = predicted.get((severity, "" if shared else method, stage), 0.0)
                rows.append({"severity": severity, "method": "" if shared else method, "stage": stage,
                             "predicted_seconds": guess, "actual_seconds": float(seconds),
                             "ratio": float(seconds) / guess if guess > 0 else None})
                totals[stage][0] += guess
                totals[stage][1] += float(seconds)
    for stage in STAGES:
        if stage in totals:
            guess, seconds = totals[stage]
            rows.append({"severity": "all", "method": "all", "stage": stage, "predicted_seconds": guess,
                         "actual_seconds": seconds, "ratio": seconds / guess if guess > 0 else None})
    return plan, rows


def format_comparison(rows: list[dict]) -> str:
    table = [
        [r["severity"], r["method"] or "(shared)", r["stage"], format_seconds(r["predicted_seconds"]),
         format_seconds(r["actual_seconds"]), f"{r['ratio']:.2f}" if r["ratio"] is not None else "-"]
        for r in rows
    ]
    return "\n".join(_table(["severity", "method", "stage", "predicted", "actual", "actual/predicted"], table))
