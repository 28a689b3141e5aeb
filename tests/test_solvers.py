"""Solvers: the Bespoke parametrization and formulas, the fixed-step methods' orders, DPM-Solver++."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from bespoke_ext.sampling import sample
from bespoke_ext.solvers import TABLEAUS, BespokeSolver

F64 = torch.float64


def smooth_field(x, t):
    """A nonlinear, time-dependent velocity field (float64-friendly)."""
    return torch.sin(3 * x) * torch.cos(2 * t) + x * t - 0.5


def randomize(solver: BespokeSolver, scale: float = 0.4, seed: int = 0) -> BespokeSolver:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in solver.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64) * scale)
    return solver


# -- construction --------------------------------------------------------------------------------


@pytest.mark.parametrize("steps, order, count", [(1, 1, 3), (10, 1, 39), (1, 2, 7), (10, 2, 79), (5, 2, 39)])
def test_parameter_count_is_exact(steps, order, count):
    s = BespokeSolver(steps, order)
    assert s.num_parameters == count == (4 * steps - 1 if order == 1 else 8 * steps - 1)
    assert sum(p.numel() for p in s.parameters() if p.requires_grad) == count
    assert s.nfe == order * steps and s.steps == steps and s.order == order


@pytest.mark.parametrize("steps, order", [(0, 2), (-1, 1), (2.0, 2), (True, 1), (3, 3), (3, 0), (3, "2"), (3, 2.0), (3, 1.0)])
def test_invalid_construction(steps, order):
    with pytest.raises(ValueError, match="steps|order"):
        BespokeSolver(steps, order)


@pytest.mark.parametrize("order", [1, 2])
def test_identity_initialisation_is_exact(order):
    n = 7
    s = BespokeSolver(n, order)
    g = s.grid()
    r = torch.arange(n + 1, dtype=F64) / n
    assert torch.equal(g.t, r)
    assert torch.equal(g.dt, torch.ones(n, dtype=F64)) and torch.equal(g.ds, torch.zeros(n, dtype=F64))
    assert torch.equal(g.s, torch.ones(n + 1, dtype=F64))
    c = s.step_coefficients()
    h = 1.0 / n
    if order == 1:
        assert g.tm is None and c.mid is None
        assert torch.equal(c.update, torch.tensor([[1.0, h]] * n, dtype=F64))
        assert torch.equal(c.stage_times[:, 0], r[:-1])
    else:
        assert torch.equal(g.tm, (torch.arange(n, dtype=F64) + 0.5) / n)
        assert torch.equal(g.sm, torch.ones(n, dtype=F64)) and torch.equal(g.dsm, torch.zeros(n, dtype=F64))
        assert torch.equal(c.mid, torch.tensor([[1.0, h / 2]] * n, dtype=F64))
        assert torch.equal(c.update, torch.tensor([[1.0, 0.0, h]] * n, dtype=F64))
        assert torch.equal(s.eval_times(), torch.stack([r[:-1], g.tm], 1).reshape(-1))
    assert torch.equal(s.times(), r)


@settings(max_examples=150, deadline=None)
@given(
    order=st.sampled_from([1, 2]),
    steps=st.integers(1, 12),
    raw=arrays(np.float64, 200, elements=st.floats(allow_nan=False, allow_infinity=False, width=64)),
)
def test_any_real_parameters_give_valid_times_and_scales(order, steps, raw):
    s = BespokeSolver(steps, order)
    with torch.no_grad():
        offset = 0
        for p in s.parameters():
            p.copy_(torch.from_numpy(np.resize(raw[offset:], p.numel())).reshape(p.shape))
            offset += p.numel()
    g = s.grid()
    times = torch.stack([g.t[:-1], g.tm], 1).reshape(-1) if order == 2 else g.t[:-1]
    times = torch.cat([times, g.t[-1:]])
    assert times[0] == 0.0 and times[-1] == 1.0
    assert bool((times[1:] > times[:-1]).all()), times
    for positive in (g.s, g.dt) + ((g.sm, g.dtm) if order == 2 else ()):
        assert bool(torch.isfinite(positive).all()) and bool((positive > 0).all())
    assert g.s[0] == 1.0


def test_coefficients_are_differentiable_in_every_raw_parameter():
    s = randomize(BespokeSolver(4, 2))
    c = s.step_coefficients()
    (c.update.square().sum() + c.mid.square().sum() + c.stage_times.square().sum() + s.lipschitz().sum()).backward()
    for name, p in s.named_parameters():
        assert p.grad is not None and bool((p.grad != 0).all()), name


# -- the update formulas are the base method on the transformed field ----------------------------


class Hermite:
    """Piecewise cubic Hermite function through (knots, values, slopes): value and derivative."""

    def __init__(self, knots, values, slopes):
        self.k, self.v, self.d = knots, values, slopes

    def __call__(self, r):
        j = min(max(int(np.searchsorted(self.k, r, side="right")) - 1, 0), len(self.k) - 2)
        width = self.k[j + 1] - self.k[j]
        a = (r - self.k[j]) / width
        v0, v1, d0, d1 = self.v[j], self.v[j + 1], self.d[j] * width, self.d[j + 1] * width
        value = (1 + 2 * a) * (1 - a) ** 2 * v0 + a * (1 - a) ** 2 * d0 + a * a * (3 - 2 * a) * v1 + a * a * (a - 1) * d1
        slope = (6 * a * a - 6 * a) * v0 + (3 * a * a - 4 * a + 1) * d0 + (6 * a - 6 * a * a) * v1 + (3 * a * a - 2 * a) * d1
        return value, slope / width


def base_method_on_transformed_field(solver: BespokeSolver, u, x0: torch.Tensor) -> torch.Tensor:
    """Euler / midpoint in r on ubar(y, r) = (s'/s) y + t' s u(y / s, t), y = s x, mapped back.

    t(r), s(r) are smooth interpolants through the solver's grid values and derivatives; nothing
    here uses the solver's update formulas.
    """
    n, h = solver.steps, 1.0 / solver.steps
    g = {k: (v.detach().numpy() if v is not None else None) for k, v in vars(solver.grid()).items()}
    if solver.order == 1:
        knots = np.arange(n + 1) * h
        t_val, s_val = g["t"], g["s"]
        dt_val, ds_val = np.append(g["dt"], 1.0), np.append(g["ds"], 0.0)  # r = 1: never evaluated
    else:
        knots = np.arange(2 * n + 1) * (h / 2)
        t_val = np.empty(2 * n + 1); t_val[0::2], t_val[1::2] = g["t"], g["tm"]
        s_val = np.empty(2 * n + 1); s_val[0::2], s_val[1::2] = g["s"], g["sm"]
        dt_val = np.empty(2 * n + 1); dt_val[0:-1:2], dt_val[1::2], dt_val[-1] = g["dt"], g["dtm"], 1.0
        ds_val = np.empty(2 * n + 1); ds_val[0:-1:2], ds_val[1::2], ds_val[-1] = g["ds"], g["dsm"], 0.0
    t_of, s_of = Hermite(knots, t_val, dt_val), Hermite(knots, s_val, ds_val)

    def ubar(y, r):
        (t, dt), (s, ds) = t_of(r), s_of(r)
        return (ds / s) * y + dt * s * u(y / s, torch.tensor(t, dtype=F64))

    y = s_of(0.0)[0] * x0
    for i in range(n):
        r = i * h
        if solver.order == 1:
            y = y + h * ubar(y, r)
        else:
            y = y + h * ubar(y + (h / 2) * ubar(y, r), r + h / 2)
    return y / s_of(1.0)[0]


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_update_formulas_equal_base_method_on_transformed_field(order, seed):
    solver = randomize(BespokeSolver(6, order), scale=0.5, seed=seed)
    x0 = torch.randn(32, 3, dtype=F64, generator=torch.Generator().manual_seed(seed))
    expected = base_method_on_transformed_field(solver, smooth_field, x0)
    got = sample(smooth_field, x0, solver=solver)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-10), (got - expected).abs().max()


@pytest.mark.parametrize("order", [1, 2])
def test_lipschitz_bounds_the_step_on_linear_fields(order):
    """For u = lam x with |lam| <= L_tau the step is x -> M x, and |M| <= L_i must hold."""
    solver = randomize(BespokeSolver(5, order), scale=0.6, seed=3)
    L_tau = 1.7
    bound = solver.lipschitz(L_tau).detach()
    c = solver.step_coefficients()
    for lam in (-L_tau, -0.3, 0.0, 0.9, L_tau):
        if order == 1:
            m = c.update[:, 0] + c.update[:, 1] * lam
        else:
            xm = c.mid[:, 0] + c.mid[:, 1] * lam
            m = c.update[:, 0] + (c.update[:, 1] + c.update[:, 2] * lam) * xm
        assert bool((m.detach().abs() <= bound * (1 + 1e-12)).all()), (lam, m, bound)
    identity = BespokeSolver(5, order).lipschitz(L_tau)
    h = 0.2
    expected = 1 + h * L_tau if order == 1 else 1 + h * L_tau * (1 + h / 2 * L_tau)
    assert torch.allclose(identity, torch.full((5,), expected, dtype=F64), rtol=0, atol=1e-15)


def test_lipschitz_rejects_bad_l_tau():
    with pytest.raises(ValueError, match="L_tau"):
        BespokeSolver(3).lipschitz(-1.0)


# -- fixed-step methods: order of convergence ---------------------------------------------------


def riccati(x, t):
    """dx/dt = -(1 + t) x^2: nonlinear and time-dependent; 1/x(t) = 1/x(a) + (t + t^2/2) - (a + a^2/2)."""
    return -(1 + t) * x * x


def riccati_solution(x_a, a: float, b: float):
    return 1 / (1 / x_a + (b + b * b / 2) - (a + a * a / 2))


@pytest.mark.parametrize("method, steps", [
    ("euler", (16, 32, 64)),
    ("midpoint", (8, 16, 32)),
    ("heun", (8, 16, 32)),
    ("heun3", (8, 16, 32)),
    ("rk4", (8, 16, 32)),
])
def test_order_of_convergence(method, steps):
    tableau = TABLEAUS[method]
    x0 = torch.linspace(0.5, 1.5, 32, dtype=F64)[:, None]
    exact = riccati_solution(x0, 0.0, 1.0)
    errors = [(sample(riccati, x0, method=method, nfe=n * tableau.stages) - exact).abs().max().item() for n in steps]
    rates = [math.log2(a / b) for a, b in zip(errors[:-1], errors[1:])]
    assert all(abs(r - tableau.order) < 0.3 for r in rates), (errors, rates)


def test_dpm_solver_converges_at_second_order():
    """On a grid uniform in log-SNR (the paper's), inside (0, 1). (On a t-uniform grid over [0, 1]
    the log-SNR steps next to t = 0 and t = 1 do not shrink with n; rates reach 2 only slowly.)"""
    a, b = 0.05, 0.95
    x_a = torch.linspace(0.5, 1.5, 32, dtype=F64)[:, None]
    exact = riccati_solution(x_a, a, b)
    lam = (math.log(a / (1 - a)), math.log(b / (1 - b)))
    errors = []
    for n in (8, 16, 32, 64):
        grid = torch.sigmoid(torch.linspace(*lam, n + 1, dtype=F64))
        errors.append((sample(riccati, x_a, method="dpm++2m", time_grid=grid) - exact).abs().max().item())
    rates = [math.log2(p / q) for p, q in zip(errors[:-1], errors[1:])]
    assert all(abs(r - 2) < 0.3 for r in rates), (errors, rates)


# -- DPM-Solver++(2M) against the paper's formulas in log-SNR form -------------------------------


def dpm_solver_pp_2m_reference(u, x0: torch.Tensor, ts) -> torch.Tensor:
    """DPM-Solver++(2M), Lu et al. 2022 Algorithm 2, in lambda = log(alpha / sigma), written out
    plainly (numpy infinities at t = 0 and t = 1). OT path: alpha = t, sigma = 1 - t; data
    prediction x1_hat = x + sigma u. A final step onto sigma = 0 is first order."""
    ts = np.asarray(ts, dtype=np.float64)
    alpha, sigma = ts, 1 - ts
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)
    x, d_prev, h_prev = x0, None, None
    for i in range(len(ts) - 1):
        d = x + sigma[i] * u(x, torch.tensor(ts[i], dtype=F64))
        h = lam[i + 1] - lam[i]
        if d_prev is None or sigma[i + 1] == 0:
            d_hat = d
        else:
            r = h_prev / h
            d_hat = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * d_prev
        x = (sigma[i + 1] / sigma[i]) * x - alpha[i + 1] * np.expm1(-h) * d_hat
        d_prev, h_prev = d, h
    return x


@pytest.mark.parametrize("ts", [
    np.linspace(0, 1, 11),
    np.linspace(0.05, 0.95, 8),
    np.array([0.0, 0.1, 0.15, 0.3, 0.6, 0.8, 0.97, 1.0]),
])
def test_dpm_solver_matches_reference(ts):
    x0 = torch.randn(16, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    expected = dpm_solver_pp_2m_reference(smooth_field, x0, ts)
    got, stats = sample(smooth_field, x0, method="dpm++2m", time_grid=torch.tensor(ts), return_stats=True)
    assert stats.nfe == len(ts) - 1
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12), (got - expected).abs().max()


def test_dpm_solver_first_step_is_euler():
    x0 = torch.randn(8, 2, dtype=F64)
    one = sample(smooth_field, x0, method="dpm++2m", time_grid=[0.0, 0.4])
    assert torch.allclose(one, sample(smooth_field, x0, method="euler", time_grid=[0.0, 0.4]), rtol=0, atol=1e-15)


@pytest.mark.parametrize("cast", [lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.float()],
                         ids=["half", "to-bf16", "float"])
def test_dtype_casts_leave_learned_solvers_in_float64(cast):
    # a solver held next to a half-precision network is cast with it: its numbers must not be rounded (a
    # trained solver would drift from what was validated, a fresh non-stationary one would leave midpoint)
    from bespoke_ext.solvers import NonStationarySolver

    g = torch.Generator().manual_seed(0)
    trained = BespokeSolver(5, 2)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    for solver in (trained, NonStationarySolver.from_solver(trained), NonStationarySolver(20, "midpoint")):
        before = {k: v.clone() for k, v in solver.state_dict().items()}
        holder = torch.nn.Module()
        holder.solver, holder.net = solver, torch.nn.Linear(2, 2)
        cast(holder)
        assert holder.net.weight.dtype != torch.float64                       # the network is cast as asked
        for k, v in solver.state_dict().items():
            assert v.dtype == torch.float64 and torch.equal(v, before[k]), k   # the solver is not
        assert all(p.requires_grad for p in solver.parameters())              # still trainable
    x0 = torch.randn(4, 3, generator=g)
    fresh = NonStationarySolver(20, "midpoint").half()
    field = lambda x, t: torch.sin(3 * x) * (1 + t)
    assert torch.equal(sample(field, x0, solver=fresh), sample(field, x0, method="midpoint", nfe=20))
