"""The fused ops' contracts beyond their values: in-place updates into any term, aliasing, what
autograd sees of rk_update_out, higher-order and forward-mode differentiation, meta-tensor checks."""

import pytest
import torch

from bespoke_ext import ops

F64 = torch.float64


def _terms(k, shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=F64).to(device=device, dtype=dtype) for _ in range(k)]


def _coeffs(k, n, per_sample, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, k) if per_sample else (k,), generator=g, dtype=F64).to(device=device, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("k, shape, per_sample", [(9, (5, 40), False), (17, (33,), False), (5, (4, 3), True),
                                                  (9, (6, 2), True), (12, (3, 70), True)],
                         ids=["shared-k9", "flat-k17", "short-k5", "short-k9", "long-k12"])
def test_update_out_into_any_term_equals_the_allocating_update(device, dtype, k, shape, per_sample):
    # x <- sum_j c_j T_j with x = T_j for every j: terms after the kernel's first group of four were
    # read after the partial sum had been written into them
    terms = _terms(k, shape, dtype, device)
    c = _coeffs(k, shape[0], per_sample, device)
    want = ops.rk_update(terms, c)
    for j in range(k):
        ts = [t.clone() for t in terms]
        ops.rk_update_out(ts, c, ts[j])
        assert torch.equal(ts[j], want), f"out = terms[{j}]"


@pytest.mark.parametrize("per_sample, n", [(False, 9), (True, 4)])
def test_update_out_into_the_coefficients_storage(device, per_sample, n):
    k = 9 if not per_sample else 3
    shape = (n, k) if per_sample else (k,)
    terms = _terms(k, shape, device=device)
    c = _coeffs(k, n, per_sample, device)
    want = ops.rk_update(terms, c)
    out = c.clone()
    ops.rk_update_out(terms, out, out)   # the coefficients are read after early tiles were written
    assert torch.equal(out, want)


def test_update_out_refuses_inputs_that_require_grad_and_bumps_the_version():
    a = torch.tensor([1.0, 2.0], requires_grad=True)
    z = a * 2
    with pytest.raises(RuntimeError, match="rk_update_out: .*requires grad.*rk_update"):
        ops.rk_update_out([z], torch.tensor([3.0]), z)
    loss = (z * z).sum()                 # saves z
    with torch.no_grad():
        before = z._version
        ops.rk_update_out([z], torch.tensor([3.0]), z)
        assert z._version == before + 1
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()                  # not a silently wrong gradient from the new z
    with torch.inference_mode():
        t = torch.ones(3)
    with pytest.raises(RuntimeError, match="inference tensor"):
        ops.rk_update_out([t], torch.tensor([2.0]), t)
    with torch.inference_mode():
        ops.rk_update_out([t], torch.tensor([2.0]), t)
    assert torch.equal(t, torch.full((3,), 2.0))


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_double_backward(per_sample):
    terms = [t.requires_grad_() for t in _terms(3, (4, 5), F64)]
    c = _coeffs(3, 4, per_sample).to(F64).requires_grad_()
    target = _terms(1, (4, 5), F64, seed=7)[0].requires_grad_()
    assert torch.autograd.gradgradcheck(lambda *a: ops.rk_update(list(a[:3]), a[3]), (*terms, c))
    assert torch.autograd.gradgradcheck(lambda *a: ops.rk_residual(list(a[:3]), a[3], a[4]), (*terms, c, target))


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per_sample"])
def test_double_backward_of_an_empty_batch(per_sample):
    terms = [torch.zeros(0, 3, requires_grad=True) for _ in range(2)]
    c = _coeffs(2, 0, per_sample).requires_grad_()
    for f in (lambda: ops.rk_update(terms, c).sum(), lambda: ops.rk_residual(terms, c, torch.zeros(0, 3)).sum()):
        grads = torch.autograd.grad(f(), [*terms, c], create_graph=True)
        assert [tuple(g.shape) for g in grads] == [(0, 3), (0, 3), tuple(c.shape)]


def test_first_order_gradients_agree_with_and_without_create_graph():
    terms = [t.requires_grad_() for t in _terms(4, (6, 30))]
    c = _coeffs(4, 6, True).requires_grad_()
    target = _terms(1, (6, 30), seed=3)[0]
    for f in (lambda: ops.rk_update(terms, c).pow(2).sum(), lambda: ops.rk_residual(terms, c, target).sum()):
        fused = torch.autograd.grad(f(), [*terms, c])
        eager = torch.autograd.grad(f(), [*terms, c], create_graph=True)
        for a, b in zip(fused, eager):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_forward_mode_ad_is_refused_not_silently_zero():
    x, u = _terms(2, (3, 4), F64)
    c = torch.tensor([0.5, 2.0], dtype=F64)
    with pytest.raises(RuntimeError, match="forward-mode AD"):
        torch.func.jvp(lambda x: ops.rk_update([x, u], c), (x,), (torch.ones_like(x),))
    with pytest.raises(RuntimeError, match="forward-mode AD"):
        torch.func.jacfwd(lambda c: ops.rk_residual([x, u], c, u))(c)
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        with pytest.raises(RuntimeError, match="forward-mode AD"):
            ops.rk_update([fwAD.make_dual(x, torch.ones_like(x)), u], c)
        assert torch.equal(ops.rk_update([x, u], c), 0.5 * x + 2 * u)   # no dual input: fine


@pytest.mark.parametrize("make, message", [
    (lambda m: ([m((3, 4)), m((3, 5))], m((2,), torch.float32), None), "terms\\[1\\] must match"),
    (lambda m: ([m((3, 4)), m((3, 4), F64)], m((2,), torch.float32), None), "terms\\[1\\] must match"),
    (lambda m: ([m((3, 4))], m((2,), torch.float32), None), "k = 1 columns"),
    (lambda m: ([m((3, 4))], m((2, 1), torch.float32), None), "N = the terms' leading size"),
    (lambda m: ([m((3, 4))], m((1,), torch.int64), None), "float32 or float64"),
    (lambda m: ([m((3, 4))], torch.ones(1), None), "on the terms' device"),
    (lambda m: ([m((3, 4))], m((1,), torch.float32), m((3, 5))), "target / out must match"),
    (lambda m: ([m((3, 4))] * (ops.MAX_TERMS + 1), m((ops.MAX_TERMS + 1,), torch.float32), None), "at most"),
])
def test_meta_tensors_are_checked_like_real_ones(make, message):
    def meta(shape, dtype=torch.float32):
        return torch.empty(shape, dtype=dtype, device="meta")
    terms, c, other = make(meta)
    with pytest.raises(RuntimeError, match=message):
        if other is None:
            ops.rk_update(terms, c)
        else:
            ops.rk_residual(terms, c, other)
    good = ops.rk_update([meta((3, 4))], meta((1,)))
    assert good.shape == (3, 4) and good.device.type == "meta"


def test_max_terms_is_the_compiled_limit():
    k = ops.MAX_TERMS
    ops.rk_update_out([torch.zeros(1)] * k, torch.zeros(k), torch.empty(1))
    with pytest.raises(RuntimeError):
        ops.rk_update_out([torch.zeros(1)] * (k + 1), torch.zeros(k + 1), torch.empty(1))
