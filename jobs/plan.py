"""Plan a job before paying for it: FLOPs, GPU-hours, wall time and disk of every stage on N GPUs.

    python jobs/plan.py [--config PRESET] [--set key=value ...] --gpus N --gpu-type h100 [--json]
    python jobs/plan.py --compare RUN [--gpu-type cpu --gpus 1]   # predicted vs RUN/stage_seconds.json
    python jobs/plan.py --measure [--config PRESET] [--save]      # measure each stage's MFU here

FLOPs are counted with PyTorch's FLOP counter over the configured models built on the meta
device (no weights, no GPU); wall time divides them by the device's peak times each stage's
achieved fraction (config plan.gpu_mfu / plan.cpu_mfu, or a benchmark's measurement) and
spreads trials, shards and workers over the GPUs as the stages do. Disk per stage: bytes its
outputs keep in the run directory (fine-tuned units from the models' shapes, synthetic PNGs)
and the peak its running tasks hold besides (fine-tuning checkpoints in flight). --gpu-type cpu plans this
machine, at its measured matmul peak. ``fairsynth plan`` is the same function
(engine.commands.plan_command).
"""

import sys

import _path  # noqa: F401

from engine.cli import run_job
from engine.commands import plan_command

if __name__ == "__main__":
    run_job(lambda: plan_command(sys.argv[1:], prog="plan.py"))
