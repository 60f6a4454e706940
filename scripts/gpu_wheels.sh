#!/usr/bin/env bash
# Download, on this machine, the wheels the GPU machine lacks so that benchmarks/gpu_check.py and
# benchmarks/gpu_quant.py run there in one call. The device image (Python 3.12, its own torch, numpy,
# safetensors, tokenizers, xarray, pyyaml, tqdm, einops) has no zarr; zarr 3 needs numcodecs, donfig and
# google-crc32c. The wheels go to .whl/ (git-ignored via .git/info/exclude), carried with `carry: [".whl"]`;
# scripts/gpu_run.sh installs them there. Versions are those of our venv, so both sides write the same stores.
#   scripts/gpu_wheels.sh            # once, here (needs PyPI)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
mkdir -p .git/info
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
rm -rf .whl && mkdir -p .whl
for pkg in zarr numcodecs donfig google-crc32c; do
  spec="$pkg==$(ver "$pkg")"
  echo "downloading $spec for cp312 manylinux x86_64"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    --platform any -d .whl "$spec"
done
ls -l .whl
du -sh .whl
