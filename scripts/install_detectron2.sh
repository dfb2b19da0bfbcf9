#!/usr/bin/env bash
# Install detectron2 into the given Python: from GitHub source when reachable,
# else the repacked pure-Python PyPI republish.
set -euo pipefail
PY=$1
REPUBLISH=${2:-sal-detectron2==0.7.2}
DETECTRON2_GIT=git+https://github.com/facebookresearch/detectron2.git

if timeout 20 git ls-remote https://github.com/facebookresearch/detectron2.git HEAD >/dev/null 2>&1; then
    "$PY" -m pip install --no-build-isolation "$DETECTRON2_GIT"
    exit 0
fi

echo "GitHub unreachable: installing detectron2 from the PyPI republish $REPUBLISH"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.10 \
    --platform any --implementation cp -d "$work/src" "$REPUBLISH"
wheel=$("$PY" "$(dirname "$0")/repack_detectron2.py" "$work"/src/*.whl "$work/dst")
"$PY" -m pip install "$wheel" "numpy<2" "setuptools<81"
