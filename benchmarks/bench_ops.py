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

One test per case measures all its variants side by side: pytest-benchmark times the fused op, and
before each of its rounds every other variant runs once, timed into extra_info["side_by_side"]
(see _run). Variants measured in separate tests, minutes apart, saw different loads from the
machine's other tenants and gave ratios that moved 2-3x between runs of the same code.

Shapes cover every way of grouping elements into samples: flat [L] (one element per sample),
[N, 2], [N, 64], [N, 3072], [1, L] and images [B, 3, 32, 32]. Timings are steady-state loops
(buffers reused, pages already touched), except the allocating variants, which pay fresh
allocations as callers do.

Caches (CPU): every timed call of a case larger than the L2 (1 MiB here) starts cold, after a
64 MiB buffer (twice this machine's L3) is written, untimed. Most cases fit in L3 (1M fp32
elements and k = 3 terms are 16 MiB with the output), so a call right after another variant that
read the same terms ran up to 2x faster than one after the copy variant had evicted them: with the
order of variants rotating round by round, the medians then depended on which variant happened to
precede which. Cold is also what a sampling loop gives the update of a large state, whose model
evaluation in between touches far more memory; cases within the L2 stay warm (evicting them too
would time DRAM latency, not the op). BENCH_CACHE=warm times back-to-back calls throughout.

Environment: BENCH_DEVICE (cpu or cuda), BENCH_CACHE (cold or warm, CPU only), BENCH_THREADS (CPU thread counts, default "1,2"),
BENCH_FLAT_SIZES (the flat sweep, default "1e4,1e6,4.2e6,1.7e7"), BENCH_SCALE (multiplies the
number of samples of the other shapes, e.g. 16 on a GPU).
"""

import os
import time

import pytest
import torch

from bespoke_ext import ops

DEVICE = os.environ.get("BENCH_DEVICE", "cpu")
ON_CPU = DEVICE == "cpu"
THREADS = [int(t) for t in os.environ.get("BENCH_THREADS", "1,2").split(",")] if ON_CPU else [0]
FLAT_SIZES = [int(float(s)) for s in os.environ.get("BENCH_FLAT_SIZES", "1e4,1e6,4.2e6,1.7e7").split(",")]
SCALE = int(os.environ.get("BENCH_SCALE", "1"))
COLD = ON_CPU and os.environ.get("BENCH_CACHE", "cold") == "cold"
if os.environ.get("BENCH_CACHE", "cold") not in ("cold", "warm"):
    raise ValueError(f"BENCH_CACHE must be cold or warm, got {os.environ['BENCH_CACHE']!r}")
_EVICT = torch.empty(16 << 20) if COLD else None  # 64 MiB of float32, written before each timed call
_L2_BYTES = 1 << 20  # this machine's L2 (both cores): cases that fit stay there whatever ran before
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


def _footprint(terms):
    """Bytes of a case's terms and its output or target."""
    return (len(terms) + 1) * terms[0].numel() * terms[0].element_size()


def _run(benchmark, fns, numel, threads, main, footprint):
    """Times every variant of ``fns`` side by side, round by round: before each of pytest-benchmark's rounds
    of ``main`` (its setup, not timed by it) every other variant runs once, timed here, in an order that
    rotates from round to round. The others' times go to extra_info["side_by_side"]: on a shared machine a
    variant measured a minute later may see another load, so ratios come only from interleaved rounds."""
    if ON_CPU:
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
    others = [name for name in fns if name != main]
    times = {name: [] for name in others}

    cold = COLD and footprint > _L2_BYTES

    def evict():
        if cold:
            _EVICT.fill_(0.0)  # untimed: evicts the previous call's data from every cache level

    def timed(fn):
        evict()
        started = time.perf_counter()
        fn()
        _sync()
        return time.perf_counter() - started

    def others_once():
        r = len(times[others[0]]) if others else 0  # rounds so far
        for i in range(len(others)):
            name = others[(r + i) % len(others)]
            times[name].append(timed(fns[name]))
        evict()  # pytest-benchmark times the main variant right after this setup

    def main_once():
        fns[main]()
        _sync()

    try:
        for _ in range(2):  # warm-up: compilation, page faults, caches
            for fn in fns.values():
                timed(fn)
        rounds = (20 if numel <= 1 << 20 else 7) if ON_CPU else 100
        benchmark.pedantic(main_once, setup=others_once, rounds=rounds, iterations=1)
    finally:
        if ON_CPU:
            torch.set_num_threads(saved)
    benchmark.extra_info["side_by_side"] = times


def _info(benchmark, op, case, main, threads, elem_size):
    shape, k, dtype, coeffs = case
    numel = 1
    for d in shape:
        numel *= d
    benchmark.group = f"{op} {'x'.join(map(str, shape))} k={k} {dtype} {coeffs} threads={threads}"
    benchmark.extra_info.update(op=op, shape=list(shape), size=numel, k=k, dtype=dtype, coeffs=coeffs,
                                threads=threads, variant=main, elem_size=elem_size, device=DEVICE,
                                cache="cold" if COLD else "warm",  # cases within the L2: warm either way
                                load1=os.getloadavg()[0])  # the machine is shared: say how busy it was
    return numel


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("case", UPDATE_CASES)
def test_update(benchmark, case, threads):
    terms, c, cols = _inputs(*case)
    numel = _info(benchmark, "rk_update", case, "fused_out", threads, terms[0].element_size())
    out = torch.empty_like(terms[0])
    copy_numel = (case[1] + 1) * numel // 2
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
        _run(benchmark, fns, numel, threads, "fused_out", _footprint(terms))


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("case", REDUCE_CASES)
def test_residual(benchmark, case, threads):
    terms, c, cols = _inputs(*case)
    target = torch.randn_like(terms[0])
    numel = _info(benchmark, "rk_residual", case, "fused", threads, terms[0].element_size())
    fns = {
        "fused": lambda: ops.rk_residual(terms, c, target),
        "eager": lambda: _residual_eager(terms, cols, target),
        "compiled": lambda: _residual_compiled(terms, cols, target),
    }
    with torch.inference_mode():
        _run(benchmark, fns, numel, threads, "fused", _footprint(terms))


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("case", REDUCE_CASES)
def test_update_backward(benchmark, case, threads):
    """Gradients of all terms and the coefficients, given the output gradient."""
    terms, c, _ = _inputs(*case)
    numel = _info(benchmark, "rk_update_backward", case, "fused", threads, terms[0].element_size())
    grad = torch.randn_like(terms[0])
    leaves = [t.detach().clone().requires_grad_() for t in terms]
    c_leaf = c.detach().clone().requires_grad_()
    bshape = (-1,) + (1,) * (terms[0].dim() - 1)
    cols = [c_leaf[:, j].reshape(bshape) if c_leaf.dim() == 2 else c_leaf[j] for j in range(len(terms))]
    out = _eager(leaves, [x.to(terms[0].dtype) for x in cols])
    fns = {
        "fused": lambda: torch.ops.bespoke_ext.rk_update_backward(grad, terms, c, True, True),
        "eager": lambda: torch.autograd.grad(out, [*leaves, c_leaf], grad, retain_graph=True),
    }
    _run(benchmark, fns, numel, threads, "fused", _footprint(terms))
