#!/usr/bin/env bash
# Compiles the CUDA kernels against the CUDA build of torch (no GPU needed) in a separate
# venv and build folder, then checks that every op has a CUDA kernel registered.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${BESPOKE_EXT_CUDA_VENV:-$ROOT/.venv-cuda}"
BUILD="$ROOT/build-cuda"
if [[ -z "${CUDA_HOME:-}" ]]; then
  # the toolkit's own root (nvcc on PATH may be a wrapper script elsewhere)
  for d in /usr/local/cuda /usr/local/cuda-13.0; do
    [[ -x "$d/bin/nvcc" && -d "$d/include" ]] && { CUDA_HOME="$d"; break; }
  done
fi
[[ -n "${CUDA_HOME:-}" ]] || { echo "cuda_compile_check: no CUDA toolkit found; set CUDA_HOME" >&2; exit 1; }
export CUDA_HOME
[[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q torch==2.14.1 numpy ninja setuptools wheel
rm -rf "$BUILD"
TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" BESPOKE_EXT_FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-2}" \
  "$VENV/bin/python" setup.py -q build_ext --build-lib "$BUILD/lib" --build-temp "$BUILD/tmp"
"$VENV/bin/python" - "$BUILD" <<'PY'
import glob, sys, torch
so = glob.glob(f"{sys.argv[1]}/lib/bespoke_ext/_C*.so")
assert len(so) == 1, f"expected one built library, found {so}"
torch.ops.load_library(so[0])
ops = ["rk_update", "rk_update_out", "rk_residual", "rk_update_backward", "rk_residual_backward"]
missing = [op for op in ops for key in ("CPU", "CUDA")
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"bespoke_ext::{op}", key)]
assert not missing, f"ops without a kernel: {missing}"
print(f"cuda_compile_check: {len(ops)} ops have CPU and CUDA kernels (torch {torch.__version__}, CUDA {torch.version.cuda})")
PY
