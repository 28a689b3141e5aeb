"""The least-squares start of a non-stationary solver (training/least_squares_start.py) and its setters."""

from __future__ import annotations

import math

import pytest
import torch

import bespoke_ext as bx
from bespoke_ext.solvers.nonstationary import NonStationarySolver
from bespoke_ext.training.distributed import DistContext
from bespoke_ext.training.least_squares_start import WARPS, fit_coefficients, least_squares_start, warped

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


def _truth(model, x0, times):
    """Exact-enough x(t) at ``times`` (dopri5 at 1e-10), as target(t)."""
    grid = torch.unique(torch.as_tensor(times, dtype=F64))
    states = bx.sample(model, x0, method="dopri5", time_grid=grid, return_intermediates=True, atol=1e-10, rtol=1e-10)

    def target(t):
        return states[int(torch.argmin((grid - t).abs()))]

    return target


@pytest.fixture(scope="module")
def problem(mixture):
    m = mixture(3, std=0.2, seed=1).double()
    x0 = torch.randn(96, 3, generator=torch.Generator().manual_seed(5), dtype=F64)
    return m, x0


@pytest.mark.parametrize("nfe, base, p", [(6, "euler", 1.7), (8, "midpoint", 0.6), (5, "euler", 1.0)])
def test_setters_invert_the_parametrisation(nfe, base, p):
    s = NonStationarySolver(nfe, base)
    t = warped(s.times(), p)
    s.set_times(t)
    torch.testing.assert_close(s.times(), t, rtol=0, atol=1e-14)
    g = torch.Generator().manual_seed(nfe)
    a, b = torch.randn(nfe, generator=g, dtype=F64), torch.randn(nfe, nfe, generator=g, dtype=F64)
    s.set_coefficients(a, b)
    got_a, got_b = s.coefficients()
    torch.testing.assert_close(got_a, a, rtol=0, atol=1e-14)
    torch.testing.assert_close(got_b, torch.tril(b), rtol=0, atol=1e-14)
    torch.testing.assert_close(s.times(), t, rtol=0, atol=1e-14)   # coefficients leave the times alone
    with pytest.raises(ValueError, match="increasing strictly"):
        s.set_times(torch.linspace(0, 1, nfe + 1).flip(0))
    with pytest.raises(ValueError, match="shape"):
        s.set_coefficients(a[:-1], b)


def test_last_row_minimises_the_final_error(problem):
    """Given the velocities, the final sample is linear in the last row: the fit is its least-squares optimum,
    so moving any of its coefficients raises the fit set's final error."""
    m, x0 = problem
    s = NonStationarySolver(6)
    target = _truth(m, x0, s.times())
    mse = fit_coefficients(s, m, x0, target, ctx=DistContext())
    final = lambda: float((bx.sample(m, x0, solver=s) - target(1.0)).pow(2).mean())  # noqa: E731
    assert final() == pytest.approx(mse, rel=1e-9)
    n = s.nfe
    for k in [0, *range(n * (n + 1) // 2 - n, n * (n + 1) // 2)]:   # a_{n-1} and the last row of b
        param = s.a_delta if k == 0 else s.b_delta
        index = n - 1 if k == 0 else k
        for eps in (1e-3, -1e-3):
            with torch.no_grad():
                param[index] += eps
            assert final() > mse
            with torch.no_grad():
                param[index] -= eps


def test_fitted_start_beats_its_base_and_the_search_keeps_the_best(problem):
    m, x0 = problem
    s = NonStationarySolver(6)
    euler = float((bx.sample(m, x0, solver=s) - bx.sample(m, x0, method="dopri5", atol=1e-10, rtol=1e-10))
                  .pow(2).mean())
    target = _truth(m, x0, torch.cat([warped(s.times(), p) for p in WARPS]))
    report = least_squares_start(s, m, x0, target, ctx=DistContext())
    assert report["warp"] in WARPS and 1.0 in report["searched"] and len(report["searched"]) >= 2
    assert report["mse"] == min(report["searched"].values())
    assert report["mse"] < 0.2 * euler
    torch.testing.assert_close(s.times(), warped(torch.linspace(0, 1, 7, dtype=F64), report["warp"]), rtol=0, atol=1e-14)
    # held-out noise: the fit generalises (it is a handful of numbers per row against 96 x 3 equations)
    x_new = torch.randn(64, 3, generator=torch.Generator().manual_seed(9), dtype=F64)
    truth = bx.sample(m, x_new, method="dopri5", atol=1e-10, rtol=1e-10)
    err = lambda **kw: float((bx.sample(m, x_new, **kw) - truth).pow(2).mean())  # noqa: E731
    assert err(solver=s) < 0.3 * err(method="euler", nfe=6)


def test_non_finite_velocities_leave_the_solver_as_given(problem):
    m, x0 = problem
    bad = lambda x, t: m(x, t) * (float("nan") if float(t) > 0.4 else 1.0)  # noqa: E731
    s = NonStationarySolver(5)
    before = {k: v.clone() for k, v in s.state_dict().items()}
    assert math.isnan(fit_coefficients(s, bad, x0, _truth(m, x0, s.times()), ctx=DistContext()))
    with pytest.warns(RuntimeWarning, match="least-squares start was skipped"):
        report = least_squares_start(s, bad, x0, _truth(m, x0, torch.cat([warped(s.times(), p) for p in WARPS])),
                                     ctx=DistContext())
    assert math.isnan(report["mse"])
    for k, v in s.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("gt", ["cached", "online"])
def test_train_validates_before_and_after_the_fit(mixture, gt, tmp_path):
    m = mixture(3, std=0.2, seed=2).double()
    kw = dict(shape=(3,), batch_size=8, lr=1e-3, loss="log_mse", cache_samples=64, fit_samples=48, val_size=64,
              val_every=2, gt=gt, dtype=F64, progress=False, cache_dir=str(tmp_path / "cache"))
    s = bx.train(m, NonStationarySolver(5), iterations=2, **kw)
    h = s.history
    assert h.val_iteration[:3] == [0, 0, 2] and h.fitted_rmse == h.val_rmse[1] < 0.5 * h.base_rmse
    assert h.fit_warp == 1.0 and h.fit_seconds > 0   # the grid as given unless a search is asked for
    torch.testing.assert_close(s.history.val_times[1], s.history.val_times[0], rtol=0, atol=1e-14)
    assert s.metadata["training"]["fitted_val_rmse"] == h.fitted_rmse
    alone = bx.train(m, NonStationarySolver(5), iterations=0, **kw)   # the fit alone
    assert alone.history.val_iteration == [0, 0] and alone.history.fitted_rmse < 0.5 * alone.history.base_rmse
    searched = bx.train(m, NonStationarySolver(5), iterations=2, fit_warps=WARPS, **kw).history
    assert searched.fit_warp in WARPS and searched.val_iteration[:2] == [0, 0]
    plain = bx.train(m, NonStationarySolver(5), iterations=2, fit_start=False, **kw).history
    assert plain.val_iteration == [0, 2] and plain.fitted_rmse is None and plain.fit_warp is None


def test_fit_start_is_refused_where_it_does_not_apply(mixture):
    m = mixture(2, seed=0)
    with pytest.raises(ValueError, match="fit_start=True needs a solver"):
        bx.train(m, bx.BespokeSolver(3), shape=(2,), iterations=1, batch_size=4, fit_start=True, progress=False)
    with pytest.raises(ValueError, match="fit_start must be"):
        bx.train(m, NonStationarySolver(3), shape=(2,), iterations=1, batch_size=4, fit_start="yes", progress=False)
    for bad in ((), (2.0, 1.0), (1.0, -1.0), 1.0):
        with pytest.raises(ValueError, match="fit_warps"):
            bx.train(m, NonStationarySolver(3), shape=(2,), iterations=1, batch_size=4, fit_warps=bad, progress=False)
    with pytest.raises(ValueError, match="fit_samples"):
        bx.train(m, NonStationarySolver(3), shape=(2,), iterations=1, batch_size=4, fit_samples=0, progress=False)


def test_the_default_lr_follows_the_solver_and_the_fit():
    from bespoke_ext.training.options import TrainOptions, solver_defaults

    general = TrainOptions().lr
    lr = lambda solver, **given: TrainOptions.from_kwargs(**solver_defaults(solver, given)).lr
    assert lr(NonStationarySolver(20)) == lr(NonStationarySolver(20), lr=None) == 1e-2 / 20
    assert lr(NonStationarySolver(8), fit_start=True) == 1e-2 / 8
    assert lr(NonStationarySolver(20), fit_start=False) == general   # far from its optimum: the general lr
    assert lr(NonStationarySolver(20), lr=3e-3) == 3e-3               # given: kept
    assert lr(bx.BespokeSolver(5, 2)) == lr(bx.BespokeSolver(5, 2), lr=None) == general
    with pytest.raises(ValueError, match="lr must be"):
        lr(NonStationarySolver(20), lr=0.0)


def test_training_after_the_fit_at_nfe_20_improves_on_it_with_the_default_lr():
    # the general lr (5e-3) moved every raw number ~5e-3 a step against b ~ 1/20: the fitted solver only got
    # worse (this run: fit 0.0023, last 0.0091, keep_best returning the fit); 1e-2 / nfe improves on it
    from bespoke_ext.models.embedded import load_embedded

    model = load_embedded("moons2d")
    s = bx.train(model, NonStationarySolver(20), shape=(2,), iterations=100, batch_size=16, cache_samples=256,
                 val_size=128, val_every=25, progress=False)
    h = s.history
    assert h.options["lr"] == 1e-2 / 20
    assert h.best_iteration > 0 and h.val_rmse[-1] < h.fitted_rmse
