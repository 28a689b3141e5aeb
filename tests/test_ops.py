"""The fused ops against a float64 reference, under opcheck, gradcheck, torch.compile,
hypothesis, and with bad inputs. Runs on the CPU everywhere and on CUDA where available."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bespoke_ext import ops

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# relative tolerance of one result element: output rounding of the dtype plus float32 math
RTOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def ref_update(terms, coeffs):
    """sum_j c[..., j] T_j in float64."""
    t64 = [t.double() for t in terms]
    c = coeffs.double()
    if c.dim() == 1:
        return sum(c[j] * t64[j] for j in range(len(terms)))
    shape = (-1,) + (1,) * (terms[0].dim() - 1)
    return sum(c[:, j].reshape(shape) * t64[j] for j in range(len(terms)))


def ref_residual(terms, coeffs, target):
    r = ref_update(terms, coeffs) - target.double()
    return r.pow(2).reshape(r.shape[0], -1).mean(1).sqrt()


def scale_of(terms, coeffs):
    """A bound on |sum_j c_j T_j| elementwise, for error tolerances."""
    c = coeffs.double().abs()
    if c.dim() == 1:
        return sum(c[j] * t.double().abs() for j, t in enumerate(terms))
    shape = (-1,) + (1,) * (terms[0].dim() - 1)
    return sum(c[:, j].reshape(shape) * t.double().abs() for j, t in enumerate(terms))


def make_terms(k, shape, dtype, device, strided=False, gen=None):
    terms = []
    for _ in range(k):
        if strided:
            # every other element along the last dimension of a wider tensor: neither contiguous nor dense
            # (sliced after the dtype and device change, which would otherwise make it contiguous)
            big = torch.randn(*shape[:-1], 2 * shape[-1], generator=gen, dtype=torch.float64)
            t = big.to(dtype=dtype, device=device)[..., ::2]
            assert t.numel() <= 1 or not t.is_contiguous()
        else:
            t = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
        terms.append(t)
    return terms


def make_coeffs(k, n, per_sample, cdtype, device, gen=None):
    shape = (n, k) if per_sample else (k,)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype=cdtype, device=device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", range(1, 9))
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("strided", [False, True])
def test_update_matches_float64_reference(device, dtype, k, per_sample, strided):
    gen = torch.Generator().manual_seed(1000 * k + 10 * per_sample + strided)
    terms = make_terms(k, (7, 3, 37), dtype, device, strided, gen)
    coeffs = make_coeffs(k, 7, per_sample, torch.float64 if k % 2 else torch.float32, device, gen)
    out = ops.rk_update(terms, coeffs)
    assert out.dtype == dtype and out.shape == terms[0].shape and out.device == terms[0].device
    assert out.is_contiguous()
    expected = ref_update(terms, coeffs)
    err = (out.double() - expected).abs()
    tol = RTOL[dtype] * (scale_of(terms, coeffs) + expected.abs()) + 1e-30
    assert bool((err <= tol).all()), f"max error {err.max().item():.3g}"


@pytest.mark.parametrize("k", [2, 4, 5, 8, 9, 12, 17])
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_update_sums_terms_left_to_right_in_float32(device, k, per_sample):
    # the CPU loops combine groups of terms (eight for shared coefficients, vector intrinsics for float32),
    # the CUDA kernels vectors of elements, but every element is the float32 sum c_0 T_0 + c_1 T_1 + ...
    # taken left to right, each product and sum rounded (no FMA): the same bits as that chain of torch ops,
    # whatever the grouping and tile boundaries, on every device
    gen = torch.Generator().manual_seed(50 + k + 100 * per_sample)
    shape = (7, 1031)  # tiles of 512 cross sample boundaries; 1031 leaves a remainder of 7 below a vector
    terms = [torch.randn(shape, generator=gen).to(device) for _ in range(k)]
    coeffs = make_coeffs(k, shape[0], per_sample, torch.float64, "cpu", gen).to(device)
    c = coeffs.float()
    col = (lambda j: c[:, j:j + 1]) if per_sample else (lambda j: c[j])
    expected = col(0) * terms[0]
    for j in range(1, k):
        expected = expected + col(j) * terms[j]
    out = ops.rk_update(terms, coeffs)
    assert torch.equal(out, expected)
    # a perfect fit has a residual of exactly 0: the residual combines in the update's order
    assert torch.equal(ops.rk_residual(terms, coeffs, out), torch.zeros(shape[0], device=device))


def test_update_keeps_the_sign_of_zero(device):
    # the sum starts from the first product, not from +0: -0.0 * 1 stays -0.0 as in torch's own ops
    x = torch.tensor([-0.0, 0.0, -0.0], device=device)
    out = ops.rk_update([x], torch.tensor([1.0], dtype=torch.float64, device=device))
    assert torch.equal(torch.signbit(out), torch.signbit(x))


@pytest.mark.parametrize("shape", [(70001,), (70001, 1), (3,)], ids=["flat", "column", "tiny"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_residual_of_one_element_samples(shape, per_sample, dtype):
    # samples of one element take an elementwise path over flat tiles (no per-sample sums): their RMS is
    # |c_0 T_0 + ... + c_k T_k - y|, the combination in float32 left to right and rounded once to the dtype
    gen = torch.Generator().manual_seed(7 + 10 * per_sample + len(shape))
    k = 3
    terms = [torch.randn(shape, generator=gen).to(dtype) for _ in range(k)]
    target = torch.randn(shape, generator=gen).to(dtype)
    coeffs = make_coeffs(k, shape[0], per_sample, torch.float64, "cpu", gen)
    terms[0].view(-1)[1] = float("nan")
    terms[1].view(-1)[2] = float("inf")
    c = coeffs.float()
    col = (lambda j: c[:, j].reshape((-1,) + (1,) * (len(shape) - 1))) if per_sample else (lambda j: c[j])
    x = col(0) * terms[0].float()
    for j in range(1, k):
        x = x + col(j) * terms[j].float()
    expected = (x - target.float()).abs().to(dtype).reshape(shape[0])
    rms = ops.rk_residual(terms, coeffs, target)
    assert rms.shape == (shape[0],) and rms.dtype == dtype
    assert torch.isnan(rms[1]) and torch.isinf(rms[2])
    torch.testing.assert_close(rms, expected, rtol=0, atol=0, equal_nan=True)
    # the same samples as a strided column of a wider tensor give the same bits
    wide = [torch.stack([t, torch.zeros_like(t)], -1)[..., 0] for t in terms]
    torch.testing.assert_close(ops.rk_residual(wide, coeffs, target), rms, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("strided", [False, True])
def test_residual_matches_float64_reference(device, dtype, per_sample, strided):
    gen = torch.Generator().manual_seed(7 + per_sample + 2 * strided)
    k = 3
    terms = make_terms(k, (5, 4, 33), dtype, device, strided, gen)
    target = make_terms(1, (5, 4, 33), dtype, device, strided, gen)[0]
    coeffs = make_coeffs(k, 5, per_sample, torch.float32, device, gen)
    out = ops.rk_residual(terms, coeffs, target)
    assert out.shape == (5,) and out.dtype == dtype
    expected = ref_residual(terms, coeffs, target)
    torch.testing.assert_close(out.double().cpu(), expected.cpu(), rtol=max(RTOL[dtype], 1e-7) * 4, atol=1e-12)


def test_large_rows_use_several_reduction_blocks(device):
    # more than one reduction chunk per sample (16384 elements) and an odd tail
    gen = torch.Generator().manual_seed(3)
    terms = make_terms(2, (2, 40001), torch.float32, device, gen=gen)
    target = make_terms(1, (2, 40001), torch.float32, device, gen=gen)[0]
    coeffs = make_coeffs(2, 2, True, torch.float64, device, gen)
    torch.testing.assert_close(
        ops.rk_residual(terms, coeffs, target).double().cpu(), ref_residual(terms, coeffs, target).cpu(), rtol=1e-5, atol=0
    )


def test_update_out_writes_in_place_and_into_strided_out(device):
    gen = torch.Generator().manual_seed(5)
    x, u = make_terms(2, (6, 10), torch.float32, device, gen=gen)
    c = torch.tensor([0.5, -2.0], device=device)
    expected = ref_update([x, u], c)
    x_alias = x.clone()
    assert ops.rk_update_out([x_alias, u], c, x_alias) is x_alias  # x <- a x + b u in place
    torch.testing.assert_close(x_alias.double(), expected)
    out = torch.zeros(10, 6, device=device).t()  # non-contiguous destination
    ops.rk_update_out([x, u], c, out)
    torch.testing.assert_close(out.double(), expected)


@pytest.mark.parametrize("shape", [(0, 3), (0,), (4, 0), (3, 0, 2)])
def test_empty_inputs(device, shape):
    terms = [torch.randn(shape, device=device) for _ in range(2)]
    n = shape[0]
    for coeffs in (torch.ones(2, device=device), torch.ones(n, 2, device=device)):
        out = ops.rk_update(terms, coeffs)
        assert out.shape == shape
        rms = ops.rk_residual(terms, coeffs, terms[0])
        assert rms.shape == (n,)
        # the mean over zero elements is NaN, as torch's mean() gives
        assert bool(torch.isnan(rms).all()) if n > 0 else rms.numel() == 0
        cg = coeffs.clone().requires_grad_()
        tg = [t.clone().requires_grad_() for t in terms]
        ops.rk_update(tg, cg).sum().backward()
        assert cg.grad.shape == cg.shape and bool((cg.grad == 0).all())


def test_zero_dim_terms(device):
    a, b = torch.tensor(2.0, device=device), torch.tensor(3.0, device=device)
    out = ops.rk_update([a, b], torch.tensor([1.5, -1.0], device=device))
    assert out.shape == () and out.item() == pytest.approx(0.0)


# ---------------------------------------------------------------------------------------------
# gradients


def _leaf(ts):
    return [t.detach().clone().requires_grad_() for t in ts]


@pytest.mark.parametrize("per_sample", [False, True])
def test_update_gradcheck(device, per_sample):
    gen = torch.Generator().manual_seed(11)
    terms = _leaf(make_terms(3, (4, 5), torch.float64, device, gen=gen))
    coeffs = make_coeffs(3, 4, per_sample, torch.float64, device, gen).requires_grad_()
    assert torch.autograd.gradcheck(lambda c, *t: ops.rk_update(list(t), c), (coeffs, *terms))


@pytest.mark.parametrize("per_sample", [False, True])
def test_residual_gradcheck(device, per_sample):
    gen = torch.Generator().manual_seed(12)
    terms = _leaf(make_terms(3, (4, 2, 3), torch.float64, device, gen=gen))
    target = _leaf(make_terms(1, (4, 2, 3), torch.float64, device, gen=gen))[0]
    coeffs = make_coeffs(3, 4, per_sample, torch.float64, device, gen).requires_grad_()
    assert torch.autograd.gradcheck(lambda c, y, *t: ops.rk_residual(list(t), c, y), (coeffs, target, *terms))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_have_input_dtypes_and_match_autograd_reference(device, dtype):
    gen = torch.Generator().manual_seed(13)
    terms = _leaf(make_terms(3, (6, 50), dtype, device, gen=gen))
    target = _leaf(make_terms(1, (6, 50), dtype, device, gen=gen))[0]
    coeffs = make_coeffs(3, 6, True, torch.float64, device, gen).requires_grad_()
    w = torch.rand(6, generator=gen, dtype=torch.float64).to(device)
    (ops.rk_residual(terms, coeffs, target).double() * w).sum().backward()
    # reference: the same expression in float64 through torch autograd
    t64 = _leaf([t.double() for t in terms])
    y64 = _leaf([target.double()])[0]
    c64 = coeffs.detach().clone().requires_grad_()
    (ref_residual(t64, c64, y64) * w).sum().backward()
    assert coeffs.grad.dtype == torch.float64 and terms[0].grad.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(coeffs.grad, c64.grad, rtol=tol, atol=tol)
    for t, r in zip(terms + [target], t64 + [y64]):
        torch.testing.assert_close(t.grad.double(), r.grad, rtol=tol, atol=tol)


def test_only_requested_gradients_are_computed():
    terms = [torch.randn(4, 3), torch.randn(4, 3)]
    gt, gc = torch.ops.bespoke_ext.rk_update_backward(torch.ones(4, 3), terms, torch.ones(2), False, True)
    assert gt == [] and gc.shape == (2,)
    gt, gc = torch.ops.bespoke_ext.rk_update_backward(torch.ones(4, 3), terms, torch.ones(2), True, False)
    assert len(gt) == 2 and gc.numel() == 0


def test_coefficient_gradients_are_deterministic_across_thread_counts():
    gen = torch.Generator().manual_seed(14)
    terms = make_terms(3, (3, 100_003), torch.float32, "cpu", gen=gen)
    coeffs = make_coeffs(3, 3, False, torch.float32, "cpu", gen)
    grad = torch.randn(3, 100_003, generator=gen)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, threads, 1):
            torch.set_num_threads(n)
            results.append(torch.ops.bespoke_ext.rk_update_backward(grad, terms, coeffs, False, True)[1])
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        assert torch.equal(r, results[0])


# ---------------------------------------------------------------------------------------------
# opcheck and torch.compile


def _opcheck_samples(device):
    gen = torch.Generator().manual_seed(15)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for per_sample in (False, True):
            terms = make_terms(3, (4, 6), dtype, device, gen=gen)
            coeffs = make_coeffs(3, 4, per_sample, torch.float32, device, gen)
            target = make_terms(1, (4, 6), dtype, device, gen=gen)[0]
            yield terms, coeffs, target


def test_opcheck_all_ops(device):
    o = torch.ops.bespoke_ext
    for terms, coeffs, target in _opcheck_samples(device):
        rg = terms[0].dtype != torch.bfloat16  # gradcheck-style checks need float32/64
        tl = [t.clone().requires_grad_(rg) for t in terms]
        torch.library.opcheck(o.rk_update.default, (tl, coeffs.clone().requires_grad_(rg)))
        torch.library.opcheck(
            o.rk_residual.default, (tl, coeffs.clone().requires_grad_(rg), target.clone().requires_grad_(rg))
        )
        torch.library.opcheck(o.rk_update_out.default, (terms, coeffs, torch.empty_like(terms[0])))
        grad = torch.randn_like(terms[0])
        torch.library.opcheck(o.rk_update_backward.default, (grad, terms, coeffs, True, True))
        rms = o.rk_residual(terms, coeffs, target)
        g = torch.rand_like(rms)
        torch.library.opcheck(o.rk_residual_backward.default, (g, rms, terms, coeffs, target, True, True, True))
        torch.library.opcheck(o.rk_residual_backward.default, (g, rms, terms, coeffs, target, False, True, False))


def test_torch_compile_fullgraph_parity(device):
    gen = torch.Generator().manual_seed(16)
    terms = _leaf(make_terms(3, (5, 8), torch.float32, device, gen=gen))
    target = make_terms(1, (5, 8), torch.float32, device, gen=gen)[0]
    coeffs = make_coeffs(3, 5, True, torch.float32, device, gen).requires_grad_()

    def f(terms, coeffs, target):
        x = ops.rk_update(terms, coeffs)
        return ops.rk_residual([x, terms[1]], coeffs[:, :2], target).sum()

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    eager_loss = f(terms, coeffs, target)
    eager_grads = torch.autograd.grad(eager_loss, [coeffs, *terms])
    comp_loss = compiled(terms, coeffs, target)
    comp_grads = torch.autograd.grad(comp_loss, [coeffs, *terms])
    torch.testing.assert_close(comp_loss, eager_loss)
    for a, b in zip(comp_grads, eager_grads):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# property test


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 6),
    inner=st.lists(st.integers(1, 9), min_size=0, max_size=3),
    k=st.integers(1, 8),
    dtype=st.sampled_from(DTYPES),
    per_sample=st.booleans(),
    transpose=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_update_and_residual(n, inner, k, dtype, per_sample, transpose, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (n, *inner)
    terms = []
    for _ in range(k):
        t = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        if transpose and t.dim() >= 3:
            t = t.transpose(1, 2).contiguous().transpose(1, 2)  # same values, permuted strides
        terms.append(t)
    coeffs = make_coeffs(k, n, per_sample, torch.float64, "cpu", gen)
    out = ops.rk_update(terms, coeffs)
    expected = ref_update(terms, coeffs)
    tol = RTOL[dtype] * (scale_of(terms, coeffs) + expected.abs()) + 1e-30
    assert bool(((out.double() - expected).abs() <= tol).all())
    if math.prod(inner) > 0 and n > 0:
        target = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        rms = ops.rk_residual(terms, coeffs, target)
        torch.testing.assert_close(rms.double(), ref_residual(terms, coeffs, target), rtol=8 * RTOL[dtype] + 1e-9, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# bad inputs: clear errors that name the argument


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ops.rk_update([], torch.ones(0)), "at least one tensor"),
        (lambda: ops.rk_update([torch.ones(2, 3), torch.ones(2, 4)], torch.ones(2)), "terms[1] has shape"),
        (lambda: ops.rk_update([torch.ones(2, 3), torch.ones(2, 3).double()], torch.ones(2)), "share one dtype"),
        (lambda: ops.rk_update([torch.ones(2, 3, dtype=torch.int32)], torch.ones(1)), "float16, bfloat16, float32 or float64"),
        (lambda: ops.rk_update([torch.ones(2, 3)] * 2, torch.ones(3)), "k = len(terms) = 2"),
        (lambda: ops.rk_update([torch.ones(2, 3)] * 2, torch.ones(3, 2)), "per-sample `coeffs` must have shape [N, k] = [2, 2]"),
        (lambda: ops.rk_update([torch.ones(2, 3)] * 2, torch.ones(2, 2, 1)), "`coeffs` must have shape [k] or [N, k]"),
        (lambda: ops.rk_update([torch.ones(2, 3)] * 2, torch.ones(2, dtype=torch.float16)), "`coeffs` must be float32 or float64"),
        (lambda: ops.rk_update([torch.ones(2, 3)] * 129, torch.ones(129)), "at most 128 terms"),
        (lambda: ops.rk_update_out([torch.ones(2, 3)], torch.ones(1), torch.ones(3, 2)), "`out` must have the terms' shape"),
        (lambda: ops.rk_update_out([torch.ones(2, 3)], torch.ones(1), torch.ones(2, 3).double()), "`out` must have the terms' dtype"),
        (lambda: ops.rk_residual([torch.ones(2, 3)], torch.ones(1), torch.ones(2, 4)), "`target` must have the terms' shape"),
        (lambda: ops.rk_residual([torch.tensor(1.0)], torch.ones(1), torch.tensor(1.0)), "leading sample dimension"),
    ],
)
def test_bad_inputs_raise_clear_errors(make, message):
    with pytest.raises(RuntimeError) as info:
        make()
    assert message in str(info.value)


@pytest.mark.cuda
def test_coeffs_on_another_device_are_refused():
    with pytest.raises(RuntimeError, match="`coeffs` must be on the terms' device"):
        ops.rk_update([torch.ones(2, 3, device="cuda")], torch.ones(1))


@pytest.mark.cuda
def test_cuda_graph_capture_of_update():
    x, u = torch.randn(64, 100, device="cuda"), torch.randn(64, 100, device="cuda")
    c = torch.tensor([1.0, 0.1], device="cuda")
    out = torch.empty_like(x)
    ops.rk_update_out([x, u], c, out)  # warm up outside capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ops.rk_update_out([x, u], c, out)
    c.copy_(torch.tensor([2.0, -1.0], device="cuda"))
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, 2 * x - u)


@pytest.mark.parametrize("op", ["update", "residual"])
def test_gradient_for_coefficients_alone(device, op):
    # terms are data (no gradient), only the coefficients learn: the ground-truth readers' case
    gen = torch.Generator().manual_seed(17)
    terms = make_terms(2, (3, 4), torch.float64, device, gen=gen)
    coeffs = make_coeffs(2, 3, True, torch.float64, device, gen).requires_grad_()
    if op == "update":
        out = ops.rk_update(terms, coeffs).sum()
    else:
        out = ops.rk_residual(terms, coeffs, torch.zeros_like(terms[0])).sum()
    (g,) = torch.autograd.grad(out, [coeffs])
    c64 = coeffs.detach().clone().requires_grad_()
    ref = ref_update(terms, c64).sum() if op == "update" else ref_residual(terms, c64, torch.zeros_like(terms[0])).sum()
    (g_ref,) = torch.autograd.grad(ref, [c64])
    torch.testing.assert_close(g, g_ref)


# ---------------------------------------------------------------------------------------------
# every op at the shapes that stress the work split, against float64 references


def ref_update_backward(grad, terms, coeffs):
    """dT_j = c[n?, j] g,  dc_j = sum_i g T_j (per sample over the non-leading dims, or in all)."""
    g = grad.double()
    c = coeffs.double()
    shape = (-1,) + (1,) * (terms[0].dim() - 1)
    cj = (lambda j: c[j]) if c.dim() == 1 else (lambda j: c[:, j].reshape(shape))
    gterms = [cj(j) * g for j in range(len(terms))]
    prods = [g * t.double() for t in terms]
    if c.dim() == 1:
        gc = torch.stack([p.sum() for p in prods])
        gc_scale = torch.stack([p.abs().sum() for p in prods])
    else:
        gc = torch.stack([p.reshape(p.shape[0], -1).sum(1) for p in prods], 1)
        gc_scale = torch.stack([p.abs().reshape(p.shape[0], -1).sum(1) for p in prods], 1)
    return gterms, gc, gc_scale


def ref_residual_grad(grad, terms, coeffs, target):
    """g_r = grad[n] r / (len rms[n]) with r = sum_j c_j T_j - y: the gradient of the combination;
    and a bound on |g_r| that its rounding errors scale with (r may cancel to near 0)."""
    r = ref_update(terms, coeffs) - target.double()
    n = r.shape[0]
    length = r[0].numel()
    rms = r.pow(2).reshape(n, -1).mean(1).sqrt()
    f = torch.where(rms > 0, grad.double() / (length * rms), torch.zeros_like(rms))
    f = f.reshape((-1,) + (1,) * (r.dim() - 1))
    return f * r, f.abs() * (scale_of(terms, coeffs) + target.double().abs())


def assert_all_ops_match_reference(terms, coeffs, target, out=None, rtol=2e-6, atol=1e-30):
    """Every op on one input set against float64; sums within rtol of the sum of magnitudes (gradients also
    within atol: float16 gradients can be subnormal, spaced 2^-24)."""
    o = torch.ops.bespoke_ext
    expected = ref_update(terms, coeffs)
    bound = scale_of(terms, coeffs) + expected.abs()
    out = torch.empty_like(terms[0]) if out is None else out
    ops.rk_update_out(terms, coeffs, out)
    assert bool(((out.double() - expected).abs() <= rtol * bound).all()), "rk_update_out"
    assert bool(((ops.rk_update(terms, coeffs).double() - expected).abs() <= rtol * bound).all()), "rk_update"

    rms = ops.rk_residual(terms, coeffs, target)
    ref_rms = ref_residual(terms, coeffs, target)
    # the residual may cancel to near 0: errors scale with the RMS of the magnitudes
    mag = bound + target.double().abs()
    rms_bound = 4 * rtol * mag.pow(2).reshape(mag.shape[0], -1).mean(1).sqrt()
    assert bool(((rms.double() - ref_rms).abs() <= rms_bound).all()), "rk_residual"

    grad = torch.randn(terms[0].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(99))
    grad = grad.to(terms[0])
    gterms, gc = o.rk_update_backward(grad, terms, coeffs, True, True)
    r_gterms, r_gc, gc_scale = ref_update_backward(grad, terms, coeffs)
    for j, (a, b) in enumerate(zip(gterms, r_gterms)):
        assert bool(((a.double() - b).abs() <= rtol * b.abs() + atol).all()), f"rk_update_backward dT_{j}"
    assert bool(((gc.double() - r_gc).abs() <= 4 * rtol * gc_scale + atol).all()), "rk_update_backward dc"

    w = torch.rand(rms.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(98)).to(rms)
    gterms, gc, gy = o.rk_residual_backward(w, rms, terms, coeffs, target, True, True, True)
    g_r, g_mag = ref_residual_grad(w, terms, coeffs, target)
    r_gterms, r_gc, _ = ref_update_backward(g_r, terms, coeffs)
    # bounds: the same formulas on magnitudes
    b_gterms, _, gc_scale = ref_update_backward(g_mag, [t.abs() for t in terms], coeffs.abs())
    assert bool(((gy.double() + g_r).abs() <= 4 * rtol * g_mag + atol).all()), "rk_residual_backward d target"
    for j, (a, b, m) in enumerate(zip(gterms, r_gterms, b_gterms)):
        assert bool(((a.double() - b).abs() <= 4 * rtol * m + atol).all()), f"rk_residual_backward dT_{j}"
    assert bool(((gc.double() - r_gc).abs() <= 8 * rtol * gc_scale + atol).all()), "rk_residual_backward dc"


SHAPES = [
    pytest.param((8, 16384), id="8x16384"),
    pytest.param((64, 3072), id="64x3072"),
    pytest.param((3, 40001), id="3x40001-multichunk"),
    pytest.param((1 << 20, 2), id="2^20x2"),
    pytest.param((1 << 20,), id="flat-2^20"),
    # samples shorter than the kernels' short length (tiles of whole samples), and the first length above it
    pytest.param((4001, 7), id="4001x7-short"),
    pytest.param((2049, 3, 5), id="2049x3x5-short"),
    pytest.param((1500, 8), id="1500x8"),
    pytest.param((1 << 20, 64), id="2^20x64", marks=pytest.mark.slow),
    pytest.param((1, 1 << 24), id="1x2^24", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_all_ops_at_work_split_shapes(device, shape, per_sample):
    gen = torch.Generator().manual_seed(hash(shape) % 1000 + per_sample)
    k = 2
    terms = [torch.randn(shape, generator=gen).to(device) for _ in range(k)]
    target = torch.randn(shape, generator=gen).to(device)
    coeffs = make_coeffs(k, shape[0], per_sample, torch.float32, device, gen)
    assert_all_ops_match_reference(terms, coeffs, target)


@pytest.mark.parametrize("length", range(1, 9))
@pytest.mark.parametrize("k", [3, 6], ids=["k3-one-group", "k6-two-groups"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_all_ops_with_per_sample_coefficients_on_short_samples(device, length, k, dtype):
    # every short length has its own compiled loop (the length and the row of k coefficients known to
    # the compiler); 1037 samples do not fill whole tiles
    gen = torch.Generator().manual_seed(100 * length + k)
    shape = (1037, length)
    terms = [torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(k)]
    target = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    coeffs = make_coeffs(k, shape[0], True, torch.float32, device, gen)
    assert_all_ops_match_reference(terms, coeffs, target, rtol=RTOL[dtype], atol=2.0**-24)


def _misaligned(shape, device, gen, offset=1):
    """A contiguous view that starts `offset` elements into its buffer (not 16-byte aligned)."""
    n = math.prod(shape)
    return torch.randn(n + offset, generator=gen).to(device)[offset:].view(shape)


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
@pytest.mark.parametrize("shape", [(5, 1003), (40, 8)])
def test_all_ops_on_misaligned_views(device, shape, per_sample):
    gen = torch.Generator().manual_seed(21 + per_sample)
    k = 3
    terms = [_misaligned(shape, device, gen, offset=1 + j) for j in range(k)]
    target = _misaligned(shape, device, gen, offset=3)
    out = _misaligned(shape, device, gen, offset=2)
    assert any(t.data_ptr() % 16 for t in terms) and out.data_ptr() % 16
    coeffs = make_coeffs(k, shape[0], per_sample, torch.float32, device, gen)
    assert_all_ops_match_reference(terms, coeffs, target, out=out)


@pytest.mark.parametrize("k", [16, 65, 128])
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_many_terms_in_every_op(device, k, per_sample):
    # a non-stationary solver at NFE 64 combines 65 terms; 128 is the limit
    gen = torch.Generator().manual_seed(k + per_sample)
    shape = (6, 3, 37)
    terms = [torch.randn(shape, generator=gen).double().to(device) for _ in range(k)]
    target = torch.randn(shape, generator=gen).double().to(device)
    coeffs = make_coeffs(k, shape[0], per_sample, torch.float64, device, gen)
    assert_all_ops_match_reference(terms, coeffs, target, rtol=1e-12)
    f32 = [t.float() for t in terms]
    # float32 rounding of a k-term sum grows with k
    assert_all_ops_match_reference(f32, coeffs.float(), target.float(), rtol=1e-6 * k)


# ---------------------------------------------------------------------------------------------
# determinism: the same bits run to run and at every thread count


def _all_outputs(terms, coeffs, target):
    o = torch.ops.bespoke_ext
    grad = torch.linspace(-1, 1, terms[0].numel()).reshape(terms[0].shape).to(terms[0])
    rms = o.rk_residual(terms, coeffs, target)
    gt, gc = o.rk_update_backward(grad, terms, coeffs, True, True)
    rt, rc, ry = o.rk_residual_backward(torch.ones_like(rms), rms, terms, coeffs, target, True, True, True)
    return [o.rk_update(terms, coeffs), rms, *gt, gc, *rt, rc, ry]


@pytest.mark.parametrize("shape", [(3, 100_003), (20_000, 3), (100_003,), (700, 257), (30_001, 11), (50_001, 5)])
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_every_op_is_bitwise_equal_across_runs_and_thread_counts(shape, per_sample):
    gen = torch.Generator().manual_seed(14)
    terms = make_terms(3, shape, torch.float32, "cpu", gen=gen)
    target = make_terms(1, shape, torch.float32, "cpu", gen=gen)[0]
    coeffs = make_coeffs(3, shape[0], per_sample, torch.float32, "cpu", gen)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3, 1):
            torch.set_num_threads(n)
            results.append(_all_outputs(terms, coeffs, target))
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        for a, b in zip(r, results[0]):
            assert torch.equal(a, b)


@pytest.mark.cuda
def test_cuda_ops_are_bitwise_equal_run_to_run():
    gen = torch.Generator().manual_seed(15)
    for shape, per_sample in [((3, 100_003), False), ((20_000, 3), True), ((8, 16384), True)]:
        terms = [t.cuda() for t in make_terms(3, shape, torch.float32, "cpu", gen=gen)]
        target = torch.randn(shape, generator=gen).cuda()
        coeffs = make_coeffs(3, shape[0], per_sample, torch.float32, "cuda", gen)
        first = _all_outputs(terms, coeffs, target)
        for _ in range(2):
            for a, b in zip(_all_outputs(terms, coeffs, target), first):
                assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# out overlapping a term


def test_out_partially_overlapping_a_term_is_refused(device):
    buf = torch.randn(101, device=device)
    x, shifted = buf[:100].view(10, 10), buf[1:].view(10, 10)
    u = torch.randn(10, 10, device=device)
    c = torch.tensor([0.5, 2.0], device=device)
    with pytest.raises(RuntimeError, match=r"`out` partially overlaps terms\[0\]"):
        ops.rk_update_out([x, u], c, shifted)
    with pytest.raises(RuntimeError, match=r"`out` partially overlaps terms\[1\]"):
        ops.rk_update_out([u, x], c, x.t())  # the same memory in another layout


def test_out_may_be_any_term_itself(device):
    gen = torch.Generator().manual_seed(23)
    for j in range(3):
        terms = [t.to(device) for t in make_terms(3, (33, 65), torch.float32, "cpu", gen=gen)]
        c = torch.tensor([0.5, -1.0, 2.0], device=device)
        expected = ref_update(terms, c)
        ops.rk_update_out(terms, c, terms[j])
        torch.testing.assert_close(terms[j].double(), expected, rtol=2e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# CUDA: streams, graph capture, 64-bit sizes


@pytest.mark.cuda
def test_cuda_ops_run_on_the_current_stream():
    gen = torch.Generator().manual_seed(24)
    terms = [t.cuda() for t in make_terms(3, (64, 3072), torch.float32, "cpu", gen=gen)]
    target = torch.randn(64, 3072, generator=gen).cuda()
    coeffs = make_coeffs(3, 64, True, torch.float32, "cuda", gen)
    expected = _all_outputs(terms, coeffs, target)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # the kernels must queue behind this, not run on stream 0
        got = _all_outputs(terms, coeffs, target)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_cuda_graph_capture_of_every_op(per_sample):
    gen = torch.Generator().manual_seed(25)
    shape = (16, 3000)
    terms = [t.cuda() for t in make_terms(3, shape, torch.float32, "cpu", gen=gen)]
    target = torch.randn(shape, generator=gen).cuda()
    coeffs = make_coeffs(3, 16, per_sample, torch.float32, "cuda", gen)
    out = torch.empty_like(terms[0])

    def step():
        ops.rk_update_out(terms, coeffs, out)
        return [out, *_all_outputs(terms, coeffs, target)]

    step()  # warm up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    # new inputs in the same buffers: the replay must see them
    for t in terms + [target]:
        t.copy_(torch.randn(t.shape, generator=gen).cuda())
    coeffs.copy_(make_coeffs(3, 16, per_sample, torch.float32, "cpu", gen).cuda())
    expected = [x.clone() for x in step()]
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, expected):
        assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.slow
def test_cuda_more_than_2_pow_31_elements_in_fp16():
    n = (1 << 31) + 4099
    a = torch.full((n,), 1.0, dtype=torch.float16, device="cuda")
    b = torch.full((n,), 2.0, dtype=torch.float16, device="cuda")
    b[-5:] = 3.0
    c = torch.tensor([0.5, 0.25], device="cuda")
    out = torch.empty_like(a)
    ops.rk_update_out([a, b], c, out)
    assert float(out[0]) == 1.0 and float(out[(1 << 31) + 10]) == 1.0 and float(out[-1]) == 1.25
    gt, gc = torch.ops.bespoke_ext.rk_update_backward(a, [a, b], c, False, True)
    assert gc.tolist() == pytest.approx([n, 2.0 * (n - 5) + 15.0], rel=1e-6)
    two = a.view(1, n)
    rms = ops.rk_residual([two], torch.ones(1, device="cuda"), torch.zeros_like(two))
    assert float(rms[0]) == pytest.approx(1.0, rel=1e-6)
    del gt
