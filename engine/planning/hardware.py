"""What a device can do: peak throughput per GPU type, this CPU's measured matmul peak, and
the achieved fraction of peak (MFU) each stage reaches on it.

A stage's MFU comes from ``benchmarks/results/<name>.json`` when a benchmark measured one on
the same kind of device, else from the config's ``plan.gpu_mfu`` / ``plan.cpu_mfu`` defaults.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from engine.config import REPO_ROOT, Config
from engine.errors import FairsynthError

log = logging.getLogger(__name__)

# Dense (no structured sparsity) fp16/bf16 tensor-core peaks, TFLOP/s, from each card's
# datasheet: the figures there marked "with sparsity" are twice these.
GPU_PEAK_TFLOPS = {
    "h200": 989.0,  # NVIDIA H200 Tensor Core GPU datasheet (SXM): 1,979 with sparsity
    "h100": 989.0,  # NVIDIA H100 Tensor Core GPU datasheet, H100 SXM: 1,979 with sparsity
    "h100-pcie": 756.0,  # same datasheet, H100 PCIe: 1,513 with sparsity
    "a100": 312.0,  # NVIDIA A100 Tensor Core GPU datasheet (40 and 80 GB): 624 with sparsity
    "l40s": 362.0,  # NVIDIA L40S datasheet: 733 with sparsity
    "a10": 125.0,  # NVIDIA A10 Tensor Core GPU datasheet: 250 with sparsity
    # AWS's A10G has no NVIDIA datasheet; AWS partners list 70 TFLOP/s fp16 tensor (about
    # half the A10's). Replace it with a measured MFU from a benchmark run on a g5 instance.
    "a10g": 70.0,
    "l4": 121.0,  # NVIDIA L4 Tensor Core GPU datasheet: 242 with sparsity
    "v100": 125.0,  # NVIDIA V100 Tensor Core GPU datasheet, SXM2 (Volta has no sparsity mode)
}
CPU = "cpu"
DEVICE_TYPES = (*GPU_PEAK_TFLOPS, CPU)
STAGES = ("cluster", "finetune", "generate", "filter", "train")

# Which stage a benchmark measures, for result files that do not say so in a "stage" field.
BENCHMARK_STAGES = {
    "sampling_throughput": "generate",
    "finetune_scaling": "finetune",
    "train_throughput": "train",
    "cluster_speed": "cluster",
    "filter_throughput": "filter",
}
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


@dataclass
class Device:
    """One device of the cluster being planned: its kind, peak and per-stage MFU."""

    kind: str
    peak_flops: float  # FLOP/s
    peak_source: str
    mfu: dict[str, float] = field(default_factory=dict)
    mfu_source: dict[str, str] = field(default_factory=dict)
    cpus: int = 1  # cores of one machine: the units a "cpu" plan schedules on

    @property
    def is_gpu(self) -> bool:
        return self.kind != CPU

    def units(self, machines: int) -> int:
        """What tasks are placed on: GPUs, or the cores of ``machines`` CPU machines."""
        return machines if self.is_gpu else machines * self.cpus

    def rate(self, stage: str) -> float:
        """Achieved FLOP/s of one GPU (or one CPU core) on ``stage``'s work."""
        return self.peak_flops * self.mfu[stage]


def device_kind(name: str) -> str | None:
    """A device description ("NVIDIA H100 80GB HBM3", "cpu (2 threads)") -> a key of
    DEVICE_TYPES, or None when it names none of them."""
    text = str(name).lower().replace(" ", "-")
    if text.startswith(CPU):
        return CPU
    # Longer keys first, so "a10g" is not read as "a10" nor "h100-pcie" as "h100".
    for key in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True):
        if key in text:
            return key
    return None


@lru_cache(maxsize=1)
def cpu_matmul_peak(size: int = 512, seconds: float = 1.0, min_reps: int = 20) -> float:
    """One core's fp32 matmul throughput (FLOP/s): the "peak" that CPU MFUs are measured
    against. CPU tasks run one PyTorch thread per whole CPU Ray gives them, so the planner
    counts a CPU machine as cores. The best of many short products, so that time the process
    spends descheduled on a busy machine does not count."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = torch.randn(size, size)
        b = torch.randn(size, size)
        a @ b  # first call allocates and picks a kernel
        best, reps = float("inf"), 0
        deadline = time.perf_counter() + seconds
        while reps < min_reps or time.perf_counter() < deadline:
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
            reps += 1
    finally:
        torch.set_num_threads(threads)
    return 2.0 * size**3 / best


def _stage_of(result: dict, path: Path) -> str | None:
    stage = result.get("stage") or BENCHMARK_STAGES.get(str(result.get("benchmark") or path.stem))
    return stage if stage in STAGES else None


def _threads(result: dict) -> int:
    """Threads a CPU result was measured with: its "threads" field or "cpu (N threads)"."""
    if isinstance(result.get("threads"), int) and result["threads"] > 0:
        return result["threads"]
    match = re.search(r"(\d+) threads?", str(result.get("device", "")))
    return int(match.group(1)) if match else 1


def measured_mfu(kind: str, peak_flops: float, results_dir: Path | None = None) -> dict[str, tuple[float, str]]:
    """MFU per stage from benchmark results measured on ``kind``: stage -> (mfu, source).

    A result gives ``achieved_tflops`` (absolute, preferred: it does not depend on how the
    benchmark defined peak; on a CPU, per thread as "cpu (N threads)" or "threads" says) or
    ``mfu`` (on a CPU, of one core's :func:`cpu_matmul_peak`); either may be a number for the
    benchmark's stage or a mapping stage -> number (a whole-pipeline benchmark)."""
    folder = Path(results_dir) if results_dir is not None else RESULTS_DIR
    found: dict[str, tuple[float, str]] = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            log.warning("skipping unreadable benchmark result %s", path)
            continue
        if not isinstance(result, dict) or device_kind(result.get("device", "")) != kind:
            continue
        # A CPU plan schedules on cores: a CPU result measured with several threads counts
        # per thread.
        threads = _threads(result) if kind == CPU else 1
        for key, scale in (("achieved_tflops", 1e12 / peak_flops / threads), ("mfu", 1.0)):
            value = result.get(key)
            if isinstance(value, dict):
                items = {s: v for s, v in value.items() if s in STAGES}
            elif isinstance(value, (int, float)) and _stage_of(result, path):
                items = {_stage_of(result, path): value}
            else:
                continue
            for stage, number in items.items():
                if isinstance(number, (int, float)) and number > 0 and stage not in found:
                    found[stage] = (min(float(number) * scale, 1.0), f"{path.name} ({key})")
    return found


def resolve_device(
    cfg: Config, kind: str, peak_tflops: float | None = None, results_dir: Path | None = None
) -> Device:
    """The planned device: peak from the table (or measured, for the CPU), MFU per stage."""
    kind = kind.lower()
    if kind not in DEVICE_TYPES and peak_tflops is None:
        raise FairsynthError(
            f"unknown --gpu-type {kind!r}; valid: {', '.join(DEVICE_TYPES)} (or give --peak-tflops for another card)"
        )
    if peak_tflops is not None:
        peak, source = peak_tflops * 1e12, "--peak-tflops"
    elif kind == CPU:
        peak, source = cpu_matmul_peak(), "one core's measured fp32 matmul"
    else:
        peak, source = GPU_PEAK_TFLOPS[kind] * 1e12, "datasheet, dense fp16/bf16"
    defaults = (cfg.plan.cpu_mfu if kind == CPU else cfg.plan.gpu_mfu).model_dump()
    measured = measured_mfu(kind, peak, results_dir)
    mfu, mfu_source = {}, {}
    for stage in STAGES:
        if stage in measured:
            mfu[stage], mfu_source[stage] = measured[stage]
        else:
            mfu[stage] = float(defaults[stage])
            mfu_source[stage] = f"config plan.{'cpu' if kind == CPU else 'gpu'}_mfu.{stage}"
    cpus = int(cfg.ray.num_cpus or os.cpu_count() or 1)
    return Device(kind, peak, source, mfu, mfu_source, cpus)
