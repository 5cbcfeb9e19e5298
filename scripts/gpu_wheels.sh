#!/usr/bin/env bash
# The wheels a lent GPU machine lacks, gathered here in .whl/ for scripts/gpu_session.sh.
#
#   bash scripts/gpu_wheels.sh [VENV_PYTHON]      # from the repository root; default .venv/bin/python
#
# Why: the GPU machines have CUDA torch, Triton and transformers but not the project's config
# stack (Hydra, OmegaConf, pydantic), DeepSpeed or torchao, and cannot reach a package registry.
# A lease is minutes long, so the wheels are built beforehand, on this side, for the machine's
# Python (3.12, manylinux x86_64), at the versions this project's venv was tested with.
# DeepSpeed and antlr4 come only as source archives: they are built into pure-Python wheels here
# (DeepSpeed with DS_BUILD_OPS=0: its CUDA ops are compiled on first use, if ever; the project
# needs none of them). .whl/ is kept out of git (.git/info/exclude); the device call carries it.
set -euo pipefail
PY=${1:-.venv/bin/python}
PYVER=${GPU_PYTHON_VERSION:-3.12}
OUT=.whl
# version of NAME in the venv, or DEFAULT when it is not installed there (torchao is a GPU extra)
pinned() { "$PY" -m pip show "$1" 2>/dev/null | awk '/^Version:/ {print $2}' | grep . || echo "$2"; }

rm -rf "$OUT.tmp" && mkdir -p "$OUT.tmp"
binary=(pydantic pydantic_core annotated_types typing_inspection typing_extensions hjson hydra-core omegaconf)
specs=()
for name in "${binary[@]}"; do specs+=("$name==$(pinned "$name" "")"); done
specs+=("torchao==$(pinned torchao 0.18.0)")
platforms=()
for n in 2_17 2_24 2_27 2_28 2_31 2_34; do platforms+=(--platform "manylinux_${n}_x86_64"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  "${platforms[@]}" --platform manylinux2014_x86_64 --platform any -d "$OUT.tmp" "${specs[@]}"
# source-only packages: pure Python, so a wheel built here installs there
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT.tmp" \
  "antlr4-python3-runtime==$(pinned antlr4-python3-runtime 4.9.3)" "deepspeed==$(pinned deepspeed 0.19.8)"
rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
ls -1 "$OUT"
du -sh "$OUT"
