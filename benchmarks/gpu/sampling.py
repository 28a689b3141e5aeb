"""GPU sampling benchmark, run by benchmarks/gpu/run.sh on a lent GPU machine (and with --device cpu anywhere,
as a smoke test).

Small models at NFE 10, same noise, every call timed to its last kernel (torch.cuda.synchronize inside the
timed region), interleaved rounds after warm-up rounds (the first call of a cuda_graph contender captures
its graph; warm-up keeps that out of the medians):

    bespoke_ext.sample (midpoint and Bespoke order 2) with and without cuda_graph=True
    torchdiffeq odeint on the same fixed grid, a plain PyTorch loop, the model-evaluation floor
    (NFE model calls alone, eager and captured in one CUDA graph), and flow_matching / diffusers where
    installed (the lent machine is bare: they usually drop out with a note)

The models are the embedded models' architectures with seeded random weights (the cost per evaluation does
not depend on the weights, and no weights file is read): the 2-D MLP (small, launch-bound on a GPU) and
the MNIST U-Net. The contenders, timing and statistics are the package's own
(bespoke_ext/bench/wallclock.py, timing.py), the same code as the CPU suite.

    python benchmarks/gpu/sampling.py --out "$OUT/sampling_gpu.json" > "$OUT/sampling_gpu.md"
    python benchmarks/gpu/sampling.py --device cpu --quick --out /tmp/sampling_cpu_smoke.json

Prints a markdown table (stdout) and writes JSON to --out; `bespoke-ext bench --report-only --out
benchmarks/results` includes the JSON in
REPORT.md once it is committed under benchmarks/results/gpu-<date>/.
"""

import argparse
import json
import sys
from pathlib import Path

try:
    import torch

    import bespoke_ext.sampling  # noqa: F401  (imports every dependency sampling needs: fail here, clearly)
    from bespoke_ext.bench.report import wallclock_markdown
    from bespoke_ext.bench.timing import machine_info
    from bespoke_ext.bench.wallclock import run_wallclock
except ImportError as exc:  # the lent machine is bare: say exactly what is missing
    sys.exit(f"benchmarks/gpu/sampling.py: cannot import {exc.name!r} ({exc}); the package must be installed "
             f"(pip install --no-build-isolation -e .) with its dependencies (safetensors, numpy, tqdm, torchdiffeq)")

# name -> (model, batch, NFEs, rounds): the "small model at NFE 10", and a model-bound one
GPU_WORKLOADS = {"mlp2d-b4096": ("moons2d", 4096, (10,), 50), "unet-mnist-b256": ("mnist", 256, (10,), 20)}
QUICK_WORKLOADS = {"mlp2d-b256": ("moons2d", 256, (10,), 3), "unet-mnist-b8": ("mnist", 8, (10,), 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke test: no CUDA-graph contenders)")
    ap.add_argument("--out", required=True, help="JSON results file")
    ap.add_argument("--quick", action="store_true", help="tiny batches and rounds (smoke test)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu/sampling.py: no CUDA device visible; run it on the lent GPU machine or pass --device cpu",
              file=sys.stderr)
        return 2
    section = run_wallclock(quick=args.quick, workloads=QUICK_WORKLOADS if args.quick else GPU_WORKLOADS,
                            device=device, warmup=1 if args.quick else 3,
                            say=lambda text: print(text, file=sys.stderr, flush=True))
    results = {"kind": "bespoke_ext.gpu_sampling", "machine": machine_info(str(device)), "quick": args.quick,
               "threads": torch.get_num_threads(), **section}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    info = results["machine"]
    title = f"{info.get('gpu', info['cpu'])}, torch {info['torch']}"
    lines = wallclock_markdown(title, results, None)
    lines += ["", *(f"- target {'met' if t['met'] else 'MISSED'}: {t['target']}: {t['value']:.2f}x"
                    for t in results["targets"])]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
