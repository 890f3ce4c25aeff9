#!/usr/bin/env bash
# One prepared GPU run (under 8 minutes: the step timeouts add up to 479 s: 150 build + 97 tests + 30 emulation
# cases on CUDA + 4 x 15 op benchmarks + 80 supernet + 15 CUDA graphs + 12 host cost per edge + 20 torchrun NCCL
# smoke + 15 collectives per step): build the extension with CUDA kernels, run the GPU
# tests (every backend against the reference, fused supernet, no host sync), run the op
# benchmarks and the supernet comparison (peak memory, largest batch, step time), the eager against the
# CUDA-graph search step (--cuda-graphs), a 1-GPU torchrun search
# under NCCL (smoke test) and the collectives of a data-parallel search step.
# Results land in $OUT (default benchmarks/results/device): suite.log, tests.log, tests_emulated_cases.log,
# bench_*_cuda.json, supernet_cuda.json/png, graphs_step_cuda.json, host_overhead_cuda.json, ddp_smoke.log, distributed_cuda.json/md.
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
# No first-use build in this suite: a failed or timed-out build above must show as such, not
# start a second (untimed) CUDA compilation inside the next step.
export ADARTS_JIT=0
start=$(date +%s)
timeout 150 $PY setup.py build_ext --inplace > /tmp/adarts_build.log 2>&1
rc=$?
log "build rc=$rc in $(( $(date +%s) - start ))s"; tail -25 /tmp/adarts_build.log | tee -a "$OUT/suite.log"
$PY -c "import adarts_kernels; print(adarts_kernels.backends())" 2>&1 | tee -a "$OUT/suite.log"

log "tests (the GPU-marked cases: every op on the cuda and triton backends, fused supernet)"
timeout 97 $PY -m pytest -q -ra -m gpu tests/ops/ tests/test_gpu_supernet.py > "$OUT/tests.log" 2>&1
log "tests rc=$?"; tail -15 "$OUT/tests.log" | tee -a "$OUT/suite.log"

log "the emulated kernels' case list on the real CUDA kernels (tests/test_cuda_emulated.py, device cuda)"
timeout 30 $PY -m pytest -q -ra -m gpu tests/test_cuda_emulated.py > "$OUT/tests_emulated_cases.log" 2>&1
log "emulated cases on cuda rc=$?"; tail -8 "$OUT/tests_emulated_cases.log" | tee -a "$OUT/suite.log"

for op in attention_score attention_gather attention_writeback mixed_sum; do
  log "bench $op"
  timeout 15 $PY benchmarks/bench_$op.py --out "$OUT" > "$OUT/bench_$op.log" 2>&1
  log "bench $op rc=$?"; tail -14 "$OUT/bench_$op.log" | tee -a "$OUT/suite.log"
done
rm -f "$OUT"/bench_*.log "$OUT"/bench_*.png

log "supernet side by side (batch 64 and 256, largest batch)"
timeout 80 $PY benchmarks/supernet.py --device cuda --reps 3 --max-batch-limit 2048 \
  --variants darts pcdarts adarts adarts-fused adarts-fused-recompute \
  --max-batch-variants pcdarts adarts-fused adarts-fused-recompute --out "$OUT" \
  > "$OUT/supernet.log" 2>&1
log "supernet rc=$?"; tail -12 "$OUT/supernet.log" | tee -a "$OUT/suite.log"
rm -f "$OUT/supernet.log"

log "search step eager against CUDA graphs (pcdarts, adarts-fused; batch 64, then 256; the JSON keeps each row)"
timeout 15 $PY benchmarks/graphs_step.py --reps 3 --out "$OUT/graphs_step_cuda.json" > "$OUT/graphs_step.log" 2>&1
log "graphs step rc=$?"; tail -6 "$OUT/graphs_step.log" | tee -a "$OUT/suite.log"

log "host cost per edge forward + backward with CUDA tensors (every variant; negligible arithmetic: launches)"
timeout 12 $PY benchmarks/host_overhead.py --device cuda --rounds 8 --reps 3 --no-network \
  --out "$OUT/host_overhead_cuda.json" > "$OUT/host_overhead.log" 2>&1
log "host overhead rc=$?"; tail -8 "$OUT/host_overhead.log" | tee -a "$OUT/suite.log"

log "torchrun, 1 GPU, NCCL: a short search (smoke test of the data-parallel path)"
timeout 20 $PY -m torch.distributed.run --standalone --nproc_per_node=1 python/search.py --dataset digits --limit 128 \
  --batch-size 32 --epochs 1 --warmup-epochs 0 --no-progress --device cuda --out /tmp/adarts_ddp_smoke \
  > "$OUT/ddp_smoke.log" 2>&1
log "torchrun smoke rc=$?"; tail -4 "$OUT/ddp_smoke.log" | tee -a "$OUT/suite.log"
head -1 /tmp/adarts_ddp_smoke/log.jsonl >> "$OUT/ddp_smoke.log" 2>/dev/null

log "collectives of a data-parallel search step (1 rank, NCCL; C=16, 8 cells, 32x32, batch 64)"
timeout 15 $PY benchmarks/distributed_step.py --device cuda --ranks 1 --only-ranks --batch 64 --C 16 --layers 8 \
  --image 32 --steps 3 --out "$OUT/distributed_cuda" > /dev/null 2>&1
log "distributed bench rc=$?"; cat "$OUT/distributed_cuda.md" 2>/dev/null | tee -a "$OUT/suite.log"
log "done"
