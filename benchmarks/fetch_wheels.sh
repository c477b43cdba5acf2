#!/usr/bin/env bash
# Downloads into .whl/ (ignored by git: .git/info/exclude) the wheels that benchmarks/gpu_check.sh
# needs on the lent GPU machine beyond its image (Python 3.12, torch 2.11, numpy, scipy, pillow,
# pyyaml, tqdm, psutil are there; see BENCHMARKS.md, "GPU check"). Pure-Python wheels, ~0.4 MB.
# The device tool carries them: run(..., carry=[".whl"]); gpu_check.sh installs them to /tmp.
#
#   bash benchmarks/fetch_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
WHEELS=(omegaconf==2.4.0 webdataset==1.0.2 braceexpand==0.1.7)  # versions of pyproject.toml's pins
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${WHEELS[@]}"
ls -l .whl && du -ch .whl/*.whl | tail -1
