#!/usr/bin/env bash
# The wheels that the lent GPU machine (Python 3.12, torch already there, no network) lacks
# to run this project, into .whl/ (ignored by git; carry it with the run, then
# scripts/gpu_checks.sh installs it): detectron2 (the repacked pure-Python republish),
# fvcore, iopath, yacs, omegaconf, antlr4-python3-runtime, termcolor and pycocotools.
# Pure-Python packages published only as source are built into wheels here.
#
#   bash scripts/download_gpu_wheels.sh [DEST]        (default .whl; about 2 MiB)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=${1:-.whl}
DETECTRON2_REPUBLISH=${DETECTRON2_REPUBLISH:-sal-detectron2==0.7.2}
mkdir -p "$DEST"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# compiled: the build for CPython 3.12 on manylinux
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" pycocotools==2.0.11
# pure Python: wheels, built from source where only source is published
"$PY" -m pip wheel -q --no-deps -w "$DEST" \
    fvcore==0.1.5.post20221221 iopath==0.1.10 yacs==0.1.8 omegaconf==2.3.0 \
    antlr4-python3-runtime==4.9.3 termcolor==3.3.0
# detectron2, as make setup installs it where GitHub is out of reach
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.10 \
    --platform any --implementation cp -d "$work/src" "$DETECTRON2_REPUBLISH"
"$PY" scripts/repack_detectron2.py "$work"/src/*.whl "$DEST" > /dev/null
ls -1 "$DEST"
du -sh "$DEST"
