#!/usr/bin/env bash
# The one prepared device call: install the carried wheels (scripts/gpu_wheels.sh), then run
# benchmarks/gpu_check.py and benchmarks/gpu_quant.py, each under its own time limit, writing
# $OUT/gpu_check.json, $OUT/gpu_quant.json and both logs. Run it through the device tool with
# carry [".whl"], e.g. command "bash scripts/gpu_run.sh", timeout_s 590.
#   CHECK_S / QUANT_S: per-script limits in seconds (default 330 / 210)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"; export OUT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed: run scripts/gpu_wheels.sh here and carry .whl"; exit 2; }
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device.csv" 2>&1
python3 -c "import torch, zarr; print('torch', torch.__version__, 'zarr', zarr.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/versions.txt"
timeout "${CHECK_S:-330}" python3 benchmarks/gpu_check.py --workdir /tmp/gpu_work 2>&1 | tee "$OUT/gpu_check.log"
echo "gpu_check rc=${PIPESTATUS[0]}" | tee -a "$OUT/gpu_check.log"
rm -rf /tmp/gpu_work
timeout "${QUANT_S:-210}" python3 benchmarks/gpu_quant.py --workdir /tmp/gpu_quant 2>&1 | tee "$OUT/gpu_quant.log"
echo "gpu_quant rc=${PIPESTATUS[0]}" | tee -a "$OUT/gpu_quant.log"
