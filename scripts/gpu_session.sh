#!/usr/bin/env bash
# Everything this project measures on a GPU, in one prepared run with a time box per part:
# a GPU machine is lent for minutes, so nothing here waits on anything it does not need.
#
#   bash scripts/gpu_session.sh            # on a CUDA machine, from the repository root
#   OUT=/tmp/gpu-out PARTS="tests bench" bash scripts/gpu_session.sh
#
# Parts (PARTS, default all, in this order): env, tests (`tests/gpu`, the CUDA suite),
# mp (tensor/pipeline-parallel code paths at world size 1), sharded (FSDP2 sharded init of the
# 1B and 7B presets against the planner), bench (tokens/s and MFU of the 1B preset: eager vs
# compile, bf16 vs fp8), loss (the 1B preset compiled, its loss eager against compiled:
# trainer.compile_loss, bf16 and fp8, each at the planner's micro-batch), loss18 (the same in bf16 at micro-batch
# 18, the one measured before the compiled loss: the loss's own effect, apart from a larger micro-batch), apex (Apex's FusedAdam and fused norms against torch's), small (the 125M
# and 350M presets, compiled, bf16 and fp8), acfull (the 1B preset with activation checkpointing by
# operator and full), gen (the served LM's batched generation against one prompt at a time; named only, not in the
# default list). Logs and JSON go to $OUT.
#
# What it assumes of the machine: python3 with a CUDA torch, Triton and transformers (the
# project's other needs for these parts are pure Python). Missing packages come as wheels in
# .whl/ (hydra-core, omegaconf, pydantic, deepspeed, torchao, ...), installed into /tmp/site;
# `bash scripts/gpu_wheels.sh` gathers them beforehand on a machine with a package registry.
# Apex is on no registry: when .apex/ holds its source (`apex/` and `csrc/` of NVIDIA/apex), its
# two extensions the project uses (amp_C for FusedAdam, fused_layer_norm_cuda for the norms) are
# built for this GPU's architecture only, in the background while the tests run.
set -u
OUT=${OUT:-/tmp/gpu-out}
PARTS=${PARTS:-"env tests mp sharded bench loss apex small acfull"}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOG="$OUT/session.log"
say() { echo "== $(date +%T) $*" | tee -a "$LOG"; }
has() { [[ " $PARTS " == *" $1 "* ]]; }
# part NAME SECONDS COMMAND...: run with a time limit, its output into the session log (the device
# tool brings back at most 8 files: session.log, the JSON files and apex.log)
part() {
  local name=$1 limit=$2; shift 2
  say "$name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  say "$name exited $?"
}

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >> "$LOG" 2>&1 && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

APEX_BUILD=/tmp/apex-build
if has apex && [ -d .apex/csrc ]; then
  arch=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  say "building apex extensions for sm_$arch in the background"
  : > "$OUT/apex.log"
  build_ext() {  # name flags sources...
    local name=$1 flags=$2; shift 2
    TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=12 python3 - "$name" "$flags" "$@" <<'EOF'
import os, sys, time
from torch.utils import cpp_extension
name, flags, sources = sys.argv[1], sys.argv[2].split(), sys.argv[3:]
directory = f"/tmp/apex-build/{name}"
os.makedirs(directory, exist_ok=True)
t = time.time()
cpp_extension.load(name, [f".apex/csrc/{s}" for s in sources], extra_cflags=["-O3"], extra_cuda_cflags=flags,
                   build_directory=directory)
print(f"{name} built in {time.time() - t:.0f} s")
EOF
  }
  (build_ext amp_C "-lineinfo -O3 --use_fast_math" amp_C_frontend.cpp multi_tensor_sgd_kernel.cu \
     multi_tensor_scale_kernel.cu multi_tensor_axpby_kernel.cu multi_tensor_l2norm_kernel.cu \
     multi_tensor_l2norm_kernel_mp.cu multi_tensor_l2norm_scale_kernel.cu multi_tensor_lamb_stage_1.cu \
     multi_tensor_lamb_stage_2.cu multi_tensor_adam.cu multi_tensor_adagrad.cu multi_tensor_novograd.cu \
     multi_tensor_lamb.cu multi_tensor_lamb_mp.cu update_scale_hysteresis.cu >> "$OUT/apex.log" 2>&1 &
   build_ext fused_layer_norm_cuda "-maxrregcount=50 -O3 --use_fast_math" layer_norm_cuda.cpp \
     layer_norm_cuda_kernel.cu >> "$OUT/apex.log" 2>&1 &
   wait) &
  APEX_PID=$!
fi

if has env; then
  { date -u; nvidia-smi; python3 -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', \
torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))"; \
    python3 -m pip list 2>/dev/null | grep -i -E "^(torch|triton|transformers|torchao|deepspeed|pydantic) "; } \
    >> "$LOG" 2>&1
fi
has tests && part tests "${TESTS_LIMIT:-150}" python3 -m pytest -p no:cacheprovider -q -rfEs -m gpu tests/gpu \
  -k "not apex" --timeout 120
has mp && part mp "${MP_LIMIT:-40}" python3 benchmarks/gpu_model_parallel.py --device cuda --steps 10
has sharded && part sharded "${SHARDED_LIMIT:-100}" python3 benchmarks/gpu_sharded_init.py --json "$OUT/sharded.json"
has bench && part bench "${BENCH_LIMIT:-230}" python3 benchmarks/gpu.py --presets gpt_1b --compile none,blocks \
  --precision bf16,fp8 --ac none --steps 10 --warmup 3 --profile --json "$OUT/bench.json"
has loss && part loss "${LOSS_LIMIT:-200}" python3 benchmarks/gpu.py --presets gpt_1b \
  --compile blocks:eager-loss,blocks --precision bf16,fp8 --ac none --steps 10 --warmup 3 --json "$OUT/bench_loss.json"
has loss18 && part loss18 "${LOSS18_LIMIT:-110}" python3 benchmarks/gpu.py --presets gpt_1b \
  --compile blocks:eager-loss,blocks --precision bf16 --ac none --micro-batch 18 --steps 10 --warmup 3 \
  --json "$OUT/bench_loss18.json"
if has apex && [ -n "${APEX_PID:-}" ]; then
  say "waiting for the apex build"
  timeout 40 tail --pid="$APEX_PID" -f /dev/null
  export PYTHONPATH="$PYTHONPATH:$APEX_BUILD/amp_C:$APEX_BUILD/fused_layer_norm_cuda:$PWD/.apex"
  part apex_test "${APEX_LIMIT:-40}" python3 -m pytest -p no:cacheprovider -q -rfEs -m gpu tests/gpu -k apex
fi
has small && part small "${SMALL_LIMIT:-150}" python3 benchmarks/gpu.py --presets gpt_125m,gpt_350m --compile blocks \
  --precision bf16,fp8 --ac none --steps 10 --warmup 3 --json "$OUT/bench_small.json"
has gen && part gen "${GEN_LIMIT:-60}" python3 benchmarks/generation.py --device cuda --rounds 3
has acfull && part acfull "${ACFULL_LIMIT:-150}" python3 benchmarks/gpu.py --presets gpt_1b --compile blocks \
  --precision bf16 --ac op,full --steps 10 --warmup 3 --json "$OUT/bench_acfull.json"
say "done"
