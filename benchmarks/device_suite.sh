#!/usr/bin/env bash
# One prepared GPU run (under 8 minutes: the step timeouts add up to 480 s: 150 build + 110 tests + 40 emulation
# cases on CUDA + 4 x 20 op benchmarks + 100 supernet): build the extension with CUDA kernels, run the GPU
# tests (every backend against the reference, fused supernet, no host sync), run the op
# benchmarks and the supernet comparison (peak memory, largest batch, step time).
# Results land in $OUT (default benchmarks/results/device): suite.log, tests.log, tests_emulated_cases.log,
# bench_*_cuda.json, supernet_cuda.json/png.
#   OUT=/tmp/out bash benchmarks/device_suite.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/device}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$OUT/suite.log"; }

log "device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null)"
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1 | tee -a "$OUT/suite.log"
log "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

log "build (FORCE_CUDA=1, sm_90)"
export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
start=$(date +%s)
timeout 150 $PY setup.py build_ext --inplace > /tmp/adarts_build.log 2>&1
rc=$?
log "build rc=$rc in $(( $(date +%s) - start ))s"; tail -25 /tmp/adarts_build.log | tee -a "$OUT/suite.log"
$PY -c "import adarts_kernels; print(adarts_kernels.backends())" 2>&1 | tee -a "$OUT/suite.log"

log "tests (the GPU-marked cases: every op on the cuda and triton backends, fused supernet)"
timeout 110 $PY -m pytest -q -ra -m gpu tests/ops/ tests/test_gpu_supernet.py > "$OUT/tests.log" 2>&1
log "tests rc=$?"; tail -15 "$OUT/tests.log" | tee -a "$OUT/suite.log"

log "the emulated kernels' case list on the real CUDA kernels (tests/test_cuda_emulated.py, device cuda)"
timeout 40 $PY -m pytest -q -ra -m gpu tests/test_cuda_emulated.py > "$OUT/tests_emulated_cases.log" 2>&1
log "emulated cases on cuda rc=$?"; tail -8 "$OUT/tests_emulated_cases.log" | tee -a "$OUT/suite.log"

for op in attention_score attention_gather attention_writeback mixed_sum; do
  log "bench $op"
  timeout 20 $PY benchmarks/bench_$op.py --out "$OUT" > "$OUT/bench_$op.log" 2>&1
  log "bench $op rc=$?"; tail -14 "$OUT/bench_$op.log" | tee -a "$OUT/suite.log"
done
rm -f "$OUT"/bench_*.log "$OUT"/bench_*.png

log "supernet side by side (batch 64 and 256, largest batch)"
timeout 100 $PY benchmarks/supernet.py --device cuda --reps 3 --max-batch-limit 2048 \
  --max-batch-variants pcdarts adarts-fused adarts-fused-recompute --out "$OUT" \
  > "$OUT/supernet.log" 2>&1
log "supernet rc=$?"; tail -12 "$OUT/supernet.log" | tee -a "$OUT/suite.log"
rm -f "$OUT/supernet.log"
log "done"
