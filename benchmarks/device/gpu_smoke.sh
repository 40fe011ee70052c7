#!/usr/bin/env bash
# One call on a lent GPU machine (shared/device/README.md): the dependencies carried in
# .device/bundle are unpacked, then configs/gpu_smoke.yaml runs end to end with per-stage
# time, GPU-busy share, peak GPU memory and disk measured (benchmarks/gpu_smoke_run.py).
# Everything lands under $OUT: the JSON, the job's log, results.md and the sample grids.
#
#   bash benchmarks/device/gpu_smoke.sh [--set key=value ...]
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
[ -x .device/bundle/unpack.sh ] && bash .device/bundle/unpack.sh
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -c "import ray, diffusers, faiss" || { echo "dependencies missing: carry .device/bundle (both parts)"; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
df -h /tmp | tee -a "$out/gpu.txt"
run=/tmp/gpu_smoke
python3 benchmarks/gpu_smoke_run.py --run-dir "$run" --out "$out/gpu_smoke.json" "$@" 2>&1 | tee "$out/gpu_smoke.log"
status=${PIPESTATUS[0]}
cp "$run/results.md" "$out/" 2>/dev/null
mkdir -p "$out/grids" && cp "$run"/grids/*.png "$out/grids/" 2>/dev/null
exit "$status"
