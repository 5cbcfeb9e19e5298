#!/usr/bin/env bash
# Build and install Horovod 0.28.1 (gloo, PyTorch; no MPI/TF/MXNet) into the given Python's environment.
#
# Why a script: 0.28.1 is the newest release, ships only as an sdist, and its CMake files ask for
# C++14, which current PyTorch headers refuse ("C++17 or later compatible compiler is required").
# Upstream fixed it (CMAKE_CXX_STANDARD 17) but never released the fix, so we patch the two
# CMakeLists.txt files the same way. The build takes about 4 minutes on 2 cores; the wheel is
# cached per torch version under $HOROVOD_WHEEL_CACHE, so later installs take seconds.
#
# Needs: cmake and a C++17 g++ on PATH, torch already installed in the target environment.
# Usage: scripts/build_horovod.sh [python]     (default: python3)
set -euo pipefail
PY="${1:-python3}"
VERSION=0.28.1
TORCH_VERSION="$("$PY" -c 'import torch; print(torch.__version__)')"
CACHE="${HOROVOD_WHEEL_CACHE:-$HOME/.cache/pipeline-wheels}/horovod-$VERSION-torch-$TORCH_VERSION"

if "$PY" -c 'import horovod.torch' 2>/dev/null; then
  echo "horovod: already installed"; exit 0
fi
wheel="$(ls "$CACHE"/horovod-*.whl 2>/dev/null | head -1 || true)"
if [ -z "$wheel" ]; then
  for tool in cmake g++; do
    command -v "$tool" >/dev/null || { echo "horovod: '$tool' is needed to build Horovod $VERSION" >&2; exit 1; }
  done
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  echo "horovod: building $VERSION against torch $TORCH_VERSION (about 4 minutes on 2 cores)"
  "$PY" -m pip download --quiet --no-deps --no-binary :all: "horovod==$VERSION" -d "$work"
  tar -xzf "$work"/horovod-$VERSION.tar.gz -C "$work"
  src="$work/horovod-$VERSION"
  sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
  grep -q 'CMAKE_CXX_STANDARD 17' "$src/horovod/torch/CMakeLists.txt" || {
    echo "horovod: could not patch the C++ standard in $src/horovod/torch/CMakeLists.txt" >&2; exit 1; }
  "$PY" -m pip install --quiet cloudpickle psutil pyyaml packaging cffi
  mkdir -p "$CACHE"
  HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_WITHOUT_TENSORFLOW=1 \
    HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS="-j$(nproc)" \
    "$PY" -m pip wheel --quiet --no-deps --no-build-isolation "$src" -w "$work/wheel"
  mv "$work"/wheel/horovod-*.whl "$CACHE"/
  wheel="$(ls "$CACHE"/horovod-*.whl | head -1)"
fi
"$PY" -m pip install --quiet "$wheel"
"$PY" -c 'import horovod.torch as hvd; assert hvd.gloo_built(), "built without gloo"; print("horovod: ready", hvd.__version__ if hasattr(hvd, "__version__") else "")'
