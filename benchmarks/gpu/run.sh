#!/usr/bin/env bash
# The prepared check for a lent GPU machine (bare: Python 3.12, CUDA torch, nvcc, pytest,
# pytest-benchmark, torchdiffeq; no network). One call does everything and writes its table
# last; full results go under $OUT (or benchmarks/results/gpu-<date> without $OUT):
#   1. builds the extension for the local GPU (TORCH_CUDA_ARCH_LIST defaults to 9.0),
#   2. runs the CUDA tests (tests marked `cuda`, plus the op tests on the device),
#   3. kernel benchmarks on the device against eager, torch.compile and copy bandwidth,
#   4. sampling wall-clock with and without CUDA-graph capture against torchdiffeq and a
#      plain PyTorch loop (benchmarks/gpu/sampling.py).
# Usage on the device tool:  bash benchmarks/gpu/run.sh   (about 6-8 minutes on an H100)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/benchmarks/results/gpu-$(date +%Y%m%d)}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log() { echo "[gpu] $*" | tee -a "$OUT/summary.txt"; }

# the lent machine has no network: safetensors, tqdm and torchdiffeq must be there or be carried as
# wheels (a .whl folder named in the device call's carry, installed with --no-index first)
if [[ -d .whl ]]; then python -m pip install -q --no-index --no-deps .whl/*.whl; fi
python -c "import safetensors, tqdm, torchdiffeq" || log "missing python packages: carry their wheels in .whl"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/device.txt"
start=$SECONDS
python -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
  || TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" BESPOKE_EXT_FORCE_CUDA=1 python setup.py -q build_ext --inplace >> "$OUT/build.log" 2>&1
log "build: rc=$? in $((SECONDS - start)) s"
python -c "import torch, bespoke_ext.ops; print('cuda kernels:', torch._C._dispatch_has_kernel_for_dispatch_key('bespoke_ext::rk_update', 'CUDA'))" | tee -a "$OUT/summary.txt"

start=$SECONDS
python -m pytest -q -p no:cacheprovider tests -m cuda 2>&1 | tee "$OUT/tests_cuda.log" | tail -3
log "cuda tests in $((SECONDS - start)) s: $(tail -1 "$OUT/tests_cuda.log")"

start=$SECONDS
# flat sweep up to 2^28 elements; the other shapes 16x the CPU sample counts (16M-element cases)
BENCH_DEVICE=cuda BENCH_FLAT_SIZES="1e4,1e6,1.7e7,6.7e7,2.7e8" BENCH_SCALE=16 python -m pytest -q -p no:cacheprovider benchmarks/bench_ops.py \
  --benchmark-only --benchmark-json="$OUT/ops_gpu_raw.json" > "$OUT/bench_ops.log" 2>&1
python -m bespoke_ext.bench.report_ops "$OUT/ops_gpu_raw.json" --out "$OUT/ops_gpu" > /dev/null
log "kernel benchmarks in $((SECONDS - start)) s"

if [[ -f benchmarks/gpu/sampling.py ]]; then
  start=$SECONDS
  python benchmarks/gpu/sampling.py --out "$OUT/sampling_gpu.json" > "$OUT/sampling_gpu.md" 2> "$OUT/sampling_gpu.log"
  log "sampling benchmarks in $((SECONDS - start)) s"
fi

echo
cat "$OUT/ops_gpu.md" 2>/dev/null
cat "$OUT/sampling_gpu.md" 2>/dev/null
cat "$OUT/summary.txt"
