"""Kernel benchmarks of the fused ops, each case measured in one run against the same
expression in eager PyTorch, under torch.compile, and the copy floor.

    python -m pytest benchmarks/bench_ops.py --benchmark-only \\
        --benchmark-json=benchmarks/results/ops_<machine>_raw.json
    python -m bespoke_ext.bench.report_ops benchmarks/results/ops_<machine>_raw.json

(`bespoke-ext bench --only kernels` does both, in one process: bespoke_ext/bench/kernels.py.)

A case is (op, shape, k, dtype, shared or per-sample coefficients, threads); its variants:
  fused_out      rk_update_out into a preallocated buffer (the steady state of a sampling loop)
  fused          the allocating op (what autograd code calls)
  eager_inplace  the in-place eager chain torch.mul(out=), addcmul_, ... into the same buffer
  eager          the allocating eager expression sum_j c_j * T_j
  compiled       that expression under torch.compile (inductor), allocating
  copy           a plain copy moving as many bytes as the update, (k + 1) * numel elements (half
                 read, half written): the copy bandwidth at the update's own footprint (the same
                 cache level), from which the report derives the floor (k + 1) * numel * elem_size
                 bytes / bandwidth
Backward cases compare the fused backward op with eager autograd of the same expression;
residual cases the fused RMS with its eager expression.

Shapes cover every way of grouping elements into samples: flat [L] (one element per sample),
[N, 2], [N, 64], [N, 3072], [1, L] and images [B, 3, 32, 32]. Timings are steady-state loops
(buffers reused, pages already touched), except the allocating variants, which pay fresh
allocations as callers do.

Environment: BENCH_DEVICE (cpu or cuda), BENCH_THREADS (CPU thread counts, default "1,2"),
BENCH_FLAT_SIZES (the flat sweep, default "1e4,1e6,4.2e6,1.7e7"), BENCH_SCALE (multiplies the
number of samples of the other shapes, e.g. 16 on a GPU).
"""

import os

import pytest
import torch

from bespoke_ext import ops

DEVICE = os.environ.get("BENCH_DEVICE", "cpu")
ON_CPU = DEVICE == "cpu"
THREADS = [int(t) for t in os.environ.get("BENCH_THREADS", "1,2").split(",")] if ON_CPU else [0]
FLAT_SIZES = [int(float(s)) for s in os.environ.get("BENCH_FLAT_SIZES", "1e4,1e6,4.2e6,1.7e7").split(",")]
SCALE = int(os.environ.get("BENCH_SCALE", "1"))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _case(shape, k=3, dtype="fp32", coeffs="shared"):
    return pytest.param((tuple(shape), k, dtype, coeffs), id=f"{'x'.join(map(str, shape))}-k{k}-{dtype}-{coeffs}")


# (shape, k, dtype, coefficients): about 1M elements each unless the shape says otherwise
UPDATE_CASES = (
    [_case((n,)) for n in FLAT_SIZES]
    + [_case((1 << 20,), coeffs="per_sample"), _case((1 << 22,), k=2), _case((1 << 22,), k=8),
       _case((1 << 22,), dtype="bf16")]
    + [_case((4096 * SCALE, 2), coeffs=c) for c in ("shared", "per_sample")]
    + [_case(((1 << 19) * SCALE, 2), coeffs=c) for c in ("shared", "per_sample")]
    + [_case((16384 * SCALE, 64), coeffs=c) for c in ("shared", "per_sample")]
    + [_case((16384 * SCALE, 64), dtype="bf16", coeffs="per_sample"), _case((16384 * SCALE, 64), k=8, coeffs="per_sample")]
    + [_case((342 * SCALE, 3072), coeffs=c) for c in ("shared", "per_sample")]
    + [_case((1, (1 << 22) * SCALE))]
    + [_case((256 * SCALE, 3, 32, 32), coeffs=c) for c in ("shared", "per_sample")]
)
REDUCE_CASES = [
    _case((1 << 22,)),
    _case(((1 << 19) * SCALE, 2), coeffs="per_sample"),
    _case((16384 * SCALE, 64), coeffs="per_sample"),
    _case((8 * SCALE, 16384)),
    _case((256 * SCALE, 3, 32, 32), coeffs="per_sample"),
]


def _sync():
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def _inputs(shape, k, dtype, coeffs):
    gen = torch.Generator().manual_seed(sum(shape) + k)
    terms = [torch.randn(shape, generator=gen).to(dtype=DTYPES[dtype], device=DEVICE) for _ in range(k)]
    n = shape[0]
    c = torch.randn((n, k) if coeffs == "per_sample" else (k,), generator=gen).to(DEVICE)
    # the same coefficients as eager operands: broadcastable per-sample columns or 0-dim scalars
    bshape = (-1,) + (1,) * (len(shape) - 1)
    cols = [c[:, j].reshape(bshape).to(DTYPES[dtype]) if c.dim() == 2 else c[j].to(DTYPES[dtype]) for j in range(k)]
    return terms, c, cols


def _eager(terms, cols):
    out = terms[0] * cols[0]
    for j in range(1, len(terms)):
        out = out + terms[j] * cols[j]
    return out


def _eager_inplace(terms, cols, out):
    torch.mul(terms[0], cols[0], out=out)
    for j in range(1, len(terms)):
        out.addcmul_(terms[j], cols[j])
    return out


# one compiled function per rank, k and coefficient layout (dynamic shapes: no recompile per size)
_compiled = torch.compile(_eager, dynamic=True)


def _residual_eager(terms, cols, target):
    r = (_eager(terms, cols) - target).float()
    return r.pow(2).reshape(r.shape[0], -1).mean(1).sqrt()


_residual_compiled = torch.compile(_residual_eager, dynamic=True)


def _run(benchmark, fn, numel, threads):
    if ON_CPU:
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)

    def timed():
        fn()
        _sync()

    try:
        timed()  # warm-up: compilation, page faults
        rounds = (20 if numel <= 1 << 20 else 7) if ON_CPU else 100
        benchmark.pedantic(timed, rounds=rounds, warmup_rounds=2, iterations=1)
    finally:
        if ON_CPU:
            torch.set_num_threads(saved)


def _info(benchmark, op, case, variant, threads, elem_size):
    shape, k, dtype, coeffs = case
    numel = 1
    for d in shape:
        numel *= d
    benchmark.group = f"{op} {'x'.join(map(str, shape))} k={k} {dtype} {coeffs} threads={threads}"
    benchmark.extra_info.update(op=op, shape=list(shape), size=numel, k=k, dtype=dtype, coeffs=coeffs,
                                threads=threads, variant=variant, elem_size=elem_size, device=DEVICE,
                                load1=os.getloadavg()[0])  # the machine is shared: say how busy it was
    return numel


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("case", UPDATE_CASES)
@pytest.mark.parametrize("variant", ["fused_out", "fused", "eager_inplace", "eager", "compiled", "copy"])
def test_update(benchmark, variant, case, threads):
    terms, c, cols = _inputs(*case)
    numel = _info(benchmark, "rk_update", case, variant, threads, terms[0].element_size())
    out = torch.empty_like(terms[0])
    copy_numel = (case[1] + 1) * numel // 2 if variant == "copy" else 0
    src, dst = (torch.empty(copy_numel, dtype=terms[0].dtype, device=DEVICE).fill_(1.0) for _ in range(2))
    benchmark.extra_info["copy_numel"] = copy_numel
    fns = {
        "fused_out": lambda: ops.rk_update_out(terms, c, out),
        "fused": lambda: ops.rk_update(terms, c),
        "eager_inplace": lambda: _eager_inplace(terms, cols, out),
        "eager": lambda: _eager(terms, cols),
        "compiled": lambda: _compiled(terms, cols),
        "copy": lambda: dst.copy_(src),
    }
    with torch.inference_mode():
        _run(benchmark, fns[variant], numel, threads)


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("case", REDUCE_CASES)
@pytest.mark.parametrize("variant", ["fused", "eager", "compiled"])
def test_residual(benchmark, variant, case, threads):
    terms, c, cols = _inputs(*case)
    target = torch.randn_like(terms[0])
    numel = _info(benchmark, "rk_residual", case, variant, threads, terms[0].element_size())
    fns = {
        "fused": lambda: ops.rk_residual(terms, c, target),
        "eager": lambda: _residual_eager(terms, cols, target),
        "compiled": lambda: _residual_compiled(terms, cols, target),
    }
    with torch.inference_mode():
        _run(benchmark, fns[variant], numel, threads)


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("case", REDUCE_CASES)
@pytest.mark.parametrize("variant", ["fused", "eager"])
def test_update_backward(benchmark, variant, case, threads):
    """Gradients of all terms and the coefficients, given the output gradient."""
    terms, c, _ = _inputs(*case)
    numel = _info(benchmark, "rk_update_backward", case, variant, threads, terms[0].element_size())
    grad = torch.randn_like(terms[0])
    if variant == "fused":
        fn = lambda: torch.ops.bespoke_ext.rk_update_backward(grad, terms, c, True, True)  # noqa: E731
    else:
        terms = [t.requires_grad_() for t in terms]
        c = c.requires_grad_()
        bshape = (-1,) + (1,) * (terms[0].dim() - 1)
        cols = [c[:, j].reshape(bshape) if c.dim() == 2 else c[j] for j in range(len(terms))]
        out = _eager(terms, [x.to(terms[0].dtype) for x in cols])
        fn = lambda: torch.autograd.grad(out, [*terms, c], grad, retain_graph=True)  # noqa: E731
    _run(benchmark, fn, numel, threads)
