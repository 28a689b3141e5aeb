"""Kernel benchmarks of the fused ops, each measured side by side in one run against the same
expression in eager PyTorch, under torch.compile, and the memory-bandwidth floor.

    python -m pytest benchmarks/bench_ops.py --benchmark-only \
        --benchmark-json=benchmarks/results/ops_<machine>_raw.json
    python benchmarks/report_ops.py benchmarks/results/ops_<machine>_raw.json

Groups are (op, dtype, size); within a group:
  fused        the op, allocating its output (what autograd code calls)
  fused_out    rk_update_out into a preallocated buffer (steady state of a sampling loop)
  eager        the same expression in eager PyTorch
  compiled     the same expression under torch.compile (inductor)
  copy         out.copy_(terms[0]) on the same size: measures copy bandwidth, from which the
               report derives the floor (k + 1) * N * elem_size bytes / bandwidth
Backward groups compare the fused backward op with eager autograd of the same expression.
Set BENCH_SIZES (comma-separated element counts) to change the sweep.
"""

import os

import pytest
import torch

from bespoke_ext import ops

K = 3
SIZES = [int(float(s)) for s in os.environ.get("BENCH_SIZES", "1e4,1e6,1.6e7,6.7e7").split(",")]
BACKWARD_SIZES = [s for s in SIZES if 1e5 <= s <= 2e7] or SIZES[:1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEVICE = os.environ.get("BENCH_DEVICE", "cpu")


def _sync():
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def _inputs(size, dtype, k=K):
    gen = torch.Generator().manual_seed(size % 1000)
    terms = [torch.randn(size // 64, 64, generator=gen).to(dtype=dtype, device=DEVICE) for _ in range(k)]
    coeffs = torch.tensor([1.0, 0.25, -0.5, 0.125, 2.0, -1.0, 0.5, 0.75][:k], device=DEVICE)
    return terms, coeffs


def _eager(terms, coeffs):
    out = terms[0] * coeffs[0]
    for j in range(1, len(terms)):
        out = out + terms[j] * coeffs[j]
    return out


_compiled = torch.compile(_eager, dynamic=False)


def _run(benchmark, fn):
    def timed():
        fn()
        _sync()

    timed()  # warm-up (compilation, page faults)
    benchmark.pedantic(timed, rounds=15 if DEVICE == "cpu" else 100, warmup_rounds=2, iterations=1)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("variant", ["fused", "fused_out", "eager", "compiled", "copy"])
def test_update(benchmark, variant, dtype, size):
    terms, coeffs = _inputs(size, DTYPES[dtype])
    benchmark.group = f"rk_update k={K} {dtype} n={size:.1e}"
    benchmark.extra_info.update(op="rk_update", k=K, dtype=dtype, size=size, variant=variant,
                                elem_size=terms[0].element_size(), device=DEVICE)
    out = torch.empty_like(terms[0])
    fns = {
        "fused": lambda: ops.rk_update(terms, coeffs),
        "fused_out": lambda: ops.rk_update_out(terms, coeffs, out),
        "eager": lambda: _eager(terms, coeffs),
        "compiled": lambda: _compiled(terms, coeffs),
        "copy": lambda: out.copy_(terms[0]),
    }
    with torch.inference_mode():
        _run(benchmark, fns[variant])


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("variant", ["fused", "eager", "compiled"])
def test_residual(benchmark, variant, dtype, size):
    terms, coeffs = _inputs(size, DTYPES[dtype])
    target = torch.randn_like(terms[0])
    benchmark.group = f"rk_residual k={K} {dtype} n={size:.1e}"
    benchmark.extra_info.update(op="rk_residual", k=K, dtype=dtype, size=size, variant=variant,
                                elem_size=terms[0].element_size(), device=DEVICE)

    def eager():
        return (_eager(terms, coeffs) - target).float().pow(2).mean(1).sqrt()

    compiled = torch.compile(eager, dynamic=False)
    fns = {"fused": lambda: ops.rk_residual(terms, coeffs, target), "eager": eager, "compiled": compiled}
    with torch.inference_mode():
        _run(benchmark, fns[variant])


@pytest.mark.parametrize("size", BACKWARD_SIZES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("variant", ["fused", "eager"])
def test_update_backward(benchmark, variant, dtype, size):
    """Gradients for all terms and the (shared) coefficients, given the output gradient."""
    terms, coeffs = _inputs(size, DTYPES[dtype])
    terms = [t.requires_grad_() for t in terms]
    coeffs = coeffs.requires_grad_()
    grad = torch.randn_like(terms[0])
    benchmark.group = f"rk_update backward k={K} {dtype} n={size:.1e}"
    benchmark.extra_info.update(op="rk_update_backward", k=K, dtype=dtype, size=size, variant=variant,
                                elem_size=terms[0].element_size(), device=DEVICE)
    if variant == "fused":
        fn = lambda: torch.ops.bespoke_ext.rk_update_backward(grad, terms, coeffs, True, True)  # noqa: E731
    else:
        out = _eager(terms, coeffs)
        fn = lambda: torch.autograd.grad(out, [*terms, coeffs], grad, retain_graph=True)  # noqa: E731
    _run(benchmark, fn)
