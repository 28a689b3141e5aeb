"""NonStationarySolver (method.md §9): exact base methods, valid times, conversion, files, gradients."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bespoke_ext as bx
from bespoke_ext.program import Combine, Eval
from bespoke_ext.sampling.executor import execute
from bespoke_ext.solvers import BespokeSolver, SolverFileError
from bespoke_ext.solvers.files import read_solver_file, write_solver_file
from bespoke_ext.solvers.nonstationary import NonStationarySolver, convert_program, max_terms

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


class Field(torch.nn.Module):
    """A smooth nonlinear, time-dependent velocity field (bounded growth: no blow-up in float32)."""

    def forward(self, x, t):
        return torch.tanh(x) * (1 - t) + 0.5 * torch.sin(x.flip(-1) + 3 * t)


@pytest.fixture(scope="module")
def x0():
    return torch.randn(32, 3, generator=torch.Generator().manual_seed(0))


def perturbed(solver, scale=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in solver.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=F64))
    return solver


def count(nfe):
    return nfe * (nfe + 5) // 2 - 1


# -- a fresh solver is its base method ---------------------------------------------------------------


@pytest.mark.parametrize("base, nfe", [("euler", 4), ("euler", 10), ("euler", 33), ("euler", 32),
                                       ("midpoint", 4), ("midpoint", 10), ("midpoint", 32)])
def test_fresh_solver_samples_bitwise_like_its_base(x0, base, nfe):
    model = Field()
    solver = NonStationarySolver(nfe, base)
    got, stats = bx.sample(model, x0, solver=solver, return_stats=True)
    expected = bx.sample(model, x0, method=base, nfe=nfe)
    assert torch.equal(got, expected), (got - expected).abs().max()
    assert stats.nfe == nfe and stats.method == "bespoke-ns" and solver.method == "bespoke-ns"
    # float64 states too, and with combinations chained far below the op's limit
    assert torch.equal(bx.sample(model, x0.double(), solver=solver), bx.sample(model, x0.double(), method=base, nfe=nfe))
    chained, _, _ = execute(solver.program(max_terms=3), model, x0, {})
    assert torch.equal(chained, expected)


def test_fresh_solver_on_cuda(device, x0):
    model = Field()
    solver = NonStationarySolver(32, "euler").to(device)
    x = x0.to(device)
    assert torch.equal(bx.sample(model, x, solver=solver), bx.sample(model, x, method="euler", nfe=32))


def test_fresh_times_and_tables_are_the_base_grid():
    n = 10
    euler = NonStationarySolver(n, "euler")
    r = torch.arange(n + 1, dtype=F64) / n
    assert torch.equal(euler.times(), r) and torch.equal(euler.eval_times(), r[:-1])
    a, b = euler.coefficients()
    assert torch.equal(a, torch.ones(n, dtype=F64))
    h = r[1:] - r[:-1]
    assert torch.equal(b, torch.tril(h.expand(n, n)))
    mid = NonStationarySolver(n, "midpoint")
    assert torch.allclose(mid.times(), r, rtol=0, atol=1e-15)
    assert mid.refs == (0, 0, 2, 2, 4, 4, 6, 6, 8, 8) and euler.refs == tuple(range(n))
    _, bm = mid.coefficients()
    # x_{2m+1} = x_{2m} + (h/2) U_{2m};  x_{2m+2} = x_{2m} + h U_{2m+1}
    # (row i holds the coefficients of x_{i+1}; h = 0.2)
    for i, row in ((2, [0, 0.2, 0.1]), (3, [0, 0.2, 0, 0.2]), (4, [0, 0.2, 0, 0.2, 0.1])):
        expected = torch.tensor(row + [0] * (n - len(row)), dtype=F64)
        assert torch.allclose(bm[i], expected, rtol=0, atol=1e-15), (i, bm[i])


def test_invalid_construction():
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="nfe"):
            NonStationarySolver(bad)
    with pytest.raises(ValueError, match="even"):
        NonStationarySolver(5, "midpoint")
    with pytest.raises(ValueError, match="base"):
        NonStationarySolver(4, "heun")
    with pytest.raises(ValueError, match="time_scale"):
        NonStationarySolver(4, time_scale=0.0)


# -- shape of the family -----------------------------------------------------------------------------


@pytest.mark.parametrize("nfe", [1, 2, 3, 4, 7, 10, 16, 20, 33, 64])
def test_parameter_count(nfe):
    assert NonStationarySolver(nfe).num_parameters == count(nfe)
    if nfe % 2 == 0:
        assert NonStationarySolver(nfe, "midpoint").num_parameters == count(nfe)
    assert NonStationarySolver(nfe).nfe == nfe
    assert NonStationarySolver(10).num_parameters == 74  # method.md §9


@settings(max_examples=60, deadline=None)
@given(nfe=st.integers(1, 24), base=st.sampled_from(["euler", "midpoint", "bespoke"]),
       scale=st.sampled_from([0.1, 3.0, 50.0, 1e4]), seed=st.integers(0, 2**31 - 1),
       time_scale=st.sampled_from([0.3, 1.0, 10.0]))
def test_times_increase_strictly_for_any_parameters(nfe, base, scale, seed, time_scale):
    if base == "midpoint" and nfe % 2:
        nfe += 1
    if base == "bespoke":
        source = perturbed(BespokeSolver(max(1, nfe // 2), 2), scale=1.0, seed=seed)
        solver = NonStationarySolver.from_solver(source, time_scale=time_scale)
    else:
        solver = NonStationarySolver(nfe, base, time_scale=time_scale)
    perturbed(solver, scale=scale, seed=seed)
    t = solver.times()
    assert t[0].item() == 0.0 and t[-1].item() == 1.0
    assert bool((t[1:] > t[:-1]).all()), t
    a, b = solver.coefficients()
    assert bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())


# -- programs: chaining, the op's limit, memoisation -------------------------------------------------


def test_limit_is_the_ops_and_no_combination_exceeds_it():
    limit = max_terms()
    with pytest.raises(RuntimeError):
        bx.ops.rk_update([torch.zeros(1)] * (limit + 1), torch.zeros(limit + 1))
    bx.ops.rk_update([torch.zeros(1)] * limit, torch.zeros(limit))
    for nfe in (limit - 3, limit, 33, 64):
        program = NonStationarySolver(nfe).program()
        sizes = [len(op.srcs) for op in program.instructions if isinstance(op, Combine)]
        assert max(sizes) <= limit and program.nfe == nfe
        assert sum(isinstance(op, Eval) for op in program.instructions) == nfe
    with pytest.raises(ValueError, match="max_terms"):
        NonStationarySolver(4).program(max_terms=1)


@pytest.mark.parametrize("limit", [2, 3, 5])
def test_chained_program_equals_one_combination_per_step(x0, limit):
    model = Field()
    solver = perturbed(NonStationarySolver(12, "euler"), scale=0.3)
    whole = solver.program(max_terms=64)
    chained = solver.program(max_terms=limit)
    assert max(len(op.srcs) for op in chained.instructions if isinstance(op, Combine)) <= limit
    assert max(len(op.srcs) for op in whole.instructions if isinstance(op, Combine)) == 14
    a, _, _ = execute(whole, model, x0.double(), {})
    b, _, _ = execute(chained, model, x0.double(), {})
    torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    a32, _, _ = execute(whole, model, x0, {})
    b32, _, _ = execute(chained, model, x0, {})
    torch.testing.assert_close(a32, b32, rtol=1e-5, atol=1e-5)
    ga, _, _ = execute(whole, model, x0.double(), {}, enable_grad=True)
    torch.testing.assert_close(ga, a, rtol=1e-13, atol=1e-13)


def test_program_is_the_family_formula(x0):
    """The executor's run equals x_{i+1} = a_i x_0 + sum_j b_ij u(x_j, t_j) evaluated directly."""
    model = Field()
    solver = perturbed(NonStationarySolver(7, "euler"), scale=0.5, seed=3)
    t = solver.times()
    a, b = solver.coefficients()
    x = [x0.double()]
    us = []
    for i in range(7):
        us.append(model(x[i], t[i]))
        x.append(a[i] * x[0] + sum(b[i, j] * us[j] for j in range(i + 1)))
    traj = bx.sample(model, x0.double(), solver=solver, return_intermediates=True)
    torch.testing.assert_close(traj, torch.stack(x), rtol=1e-12, atol=1e-12)


def test_changes_are_seen_by_the_next_call(x0):
    model = Field()
    solver = NonStationarySolver(6)
    first = bx.sample(model, x0, solver=solver)
    solver.b_delta.data.add_(0.1)
    second = bx.sample(model, x0, solver=solver)
    assert not torch.equal(first, second)
    fresh = NonStationarySolver(6)
    fresh.load_state_dict(solver.state_dict())
    assert torch.equal(second, bx.sample(model, x0, solver=fresh))


def test_sample_rejects_a_wrong_nfe(x0):
    with pytest.raises(ValueError, match="nfe"):
        bx.sample(Field(), x0, solver=NonStationarySolver(4), nfe=6)


# -- conversion ------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps, order", [(1, 1), (6, 1), (1, 2), (5, 2), (16, 2)])
def test_bespoke_solver_converts_exactly(x0, steps, order):
    model = Field()
    source = perturbed(BespokeSolver(steps, order), scale=0.3, seed=steps)
    solver = NonStationarySolver.from_solver(source)
    assert solver.nfe == source.nfe and solver.num_parameters == count(source.nfe)
    # a non-uniform base grid is reproduced bitwise (the re-normalisation's rounding is corrected)
    assert torch.equal(solver.eval_times(), source.eval_times()) and torch.equal(solver.times(), solver.base_times)
    got64 = bx.sample(model, x0.double(), solver=solver)
    exp64 = bx.sample(model, x0.double(), solver=source)
    torch.testing.assert_close(got64, exp64, rtol=1e-12, atol=1e-12)
    got, exp = bx.sample(model, x0, solver=solver), bx.sample(model, x0, solver=source)
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)
    assert solver.metadata["initialised_from"] == source.method


@pytest.mark.parametrize("method, nfe", [("euler", 7), ("midpoint", 8), ("heun3", 9), ("dpm++2m", 10)])
def test_fixed_methods_convert_exactly(x0, method, nfe):
    model = Field()
    solver = NonStationarySolver.from_solver(method, nfe)
    got64 = bx.sample(model, x0.double(), solver=solver)
    torch.testing.assert_close(got64, bx.sample(model, x0.double(), method=method, nfe=nfe), rtol=1e-12, atol=1e-12)
    got = bx.sample(model, x0, solver=solver)
    expected = bx.sample(model, x0, method=method, nfe=nfe)
    if method in ("dpm++2m", "heun3"):   # other float32 summation order than the method's own program
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(got, expected)


def test_skewed_base_grid_is_kept_bitwise(x0):
    """Re-normalising this grid's increments rounds 0.9 to 0.9 + 1ulp; the solver must not."""
    from bespoke_ext.solvers.tableaus import TABLEAUS, fixed_step_program

    grid = torch.tensor([0.0, 0.003, 0.07, 0.31, 0.9, 1.0], dtype=F64)
    program = fixed_step_program(TABLEAUS["euler"], grid)
    solver = NonStationarySolver.from_solver(program)
    assert torch.equal(solver.times(), grid)
    model = Field()
    assert torch.equal(bx.sample(model, x0, solver=solver), bx.sample(model, x0, method="euler", time_grid=grid))


def test_trained_non_stationary_solver_converts_to_itself(x0):
    model = Field()
    source = perturbed(NonStationarySolver(9, "euler"), scale=0.3, seed=5)
    copy = NonStationarySolver.from_solver(source)
    assert copy.refs == source.refs
    torch.testing.assert_close(bx.sample(model, x0.double(), solver=copy), bx.sample(model, x0.double(), solver=source),
                               rtol=1e-12, atol=1e-12)


def test_non_members_and_bad_requests_are_refused():
    for method, nfe in (("heun", 4), ("heun2", 4), ("rk4", 8)):   # heun2: torchdiffeq's name of heun
        with pytest.raises(ValueError, match="not a member"):
            NonStationarySolver.from_solver(method, nfe)
    with pytest.raises(ValueError, match="nfe"):
        NonStationarySolver.from_solver("euler")
    with pytest.raises(ValueError, match="nfe"):
        NonStationarySolver.from_solver(BespokeSolver(3, 2), nfe=4)
    with pytest.raises(ValueError, match="unknown method"):
        NonStationarySolver.from_solver("nope", 4)
    with pytest.raises(TypeError):
        NonStationarySolver.from_solver(3.0)
    # a program whose first evaluation does not see x_0
    from bespoke_ext.program import ProgramBuilder

    b = ProgramBuilder("scaled")
    y, u = b.buffer(), b.velocity()
    b.combine(y, (b.input,), [2.0])
    b.eval(u, y, 0.0)
    b.combine(y, (y, u), [1.0, 1.0])
    with pytest.raises(ValueError, match="x_0"):
        convert_program(b.build(output=y))


# -- gradients ---------------------------------------------------------------------------------------


def _log_mse_loss(solver, model, x0, x1):
    x, _, _ = execute(solver.program(), model, x0, {}, enable_grad=True)
    return torch.log((x - x1).square().mean(dim=1)).mean()


def test_gradient_reaches_every_parameter_and_matches_finite_differences():
    model = Field()
    x0 = torch.randn(16, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    x1 = bx.sample(model, x0, method="dopri5", atol=1e-9, rtol=1e-9)
    solver = perturbed(NonStationarySolver(6, "midpoint"), scale=0.1, seed=2)
    loss = _log_mse_loss(solver, model, x0, x1)
    loss.backward()
    for name, p in solver.named_parameters():
        assert p.grad is not None and bool((p.grad != 0).all()), name
    eps = 1e-6
    for name, index in (("time_logits", 2), ("a_delta", 3), ("b_delta", 7), ("b_delta", 20)):
        p = getattr(solver, name)
        with torch.no_grad():
            p[index] += eps
            up = float(_log_mse_loss(solver, model, x0, x1))
            p[index] -= 2 * eps
            down = float(_log_mse_loss(solver, model, x0, x1))
            p[index] += eps
        fd = (up - down) / (2 * eps)
        assert math.isclose(float(p.grad[index]), fd, rel_tol=1e-5, abs_tol=1e-8), (name, index, float(p.grad[index]), fd)


def test_gradient_through_chained_combinations_above_the_op_limit():
    model = Field()
    nfe = max_terms() + 4  # the last steps need chaining
    solver = perturbed(NonStationarySolver(nfe), scale=0.05)
    x0 = torch.randn(8, 3, generator=torch.Generator().manual_seed(2))
    x, _, _ = execute(solver.program(), model, x0, {}, enable_grad=True)
    x.square().mean().backward()
    for name, p in solver.named_parameters():
        assert bool(torch.isfinite(p.grad).all()) and bool((p.grad != 0).all()), name


def test_bound_loss_hooks_say_what_to_use():
    solver = NonStationarySolver(4)
    for call in (solver.step_coefficients, solver.lipschitz):
        with pytest.raises(TypeError, match="loss='log_mse'"):
            call()
    assert solver.steps == 4 and solver.order == 1 and solver.history is None and solver.metadata == {}


# -- files -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda: NonStationarySolver(1), lambda: NonStationarySolver(10, "midpoint"),
                                  lambda: NonStationarySolver.from_solver(perturbed(BespokeSolver(4, 2), seed=9)),
                                  lambda: NonStationarySolver(20, time_scale=3.0, coeff_scale=0.5)])
def test_round_trip_is_exact(tmp_path, x0, make):
    solver = perturbed(make(), scale=0.2, seed=4)
    solver.metadata = {"model": "tag"}
    path = tmp_path / "ns.safetensors"
    solver.save(path, metadata={"note": "ok"})
    loaded = NonStationarySolver.load(path)
    assert (loaded.nfe, loaded.base, loaded.refs) == (solver.nfe, solver.base, solver.refs)
    assert (loaded.time_scale, loaded.coeff_scale) == (solver.time_scale, solver.coeff_scale)
    for (name, a), (_, b) in zip(solver.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b) and b.dtype == F64, name
    assert loaded.metadata == {"model": "tag", "note": "ok"}
    model = Field()
    assert torch.equal(bx.sample(model, x0, solver=loaded), bx.sample(model, x0, solver=solver))
    assert read_solver_file(path, kind="NonStationarySolver").config["nfe"] == solver.nfe


def test_foreign_solver_files_are_refused(tmp_path):
    bespoke, ns = tmp_path / "b.safetensors", tmp_path / "n.safetensors"
    BespokeSolver(5, 2).save(bespoke)
    NonStationarySolver(10).save(ns)
    with pytest.raises(SolverFileError, match="BespokeSolver"):
        NonStationarySolver.load(bespoke)
    with pytest.raises(SolverFileError, match="NonStationarySolver"):
        BespokeSolver.load(ns)


def test_damaged_files_are_refused(tmp_path):
    path = tmp_path / "n.safetensors"
    NonStationarySolver(6).save(path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(bytes(data))
    with pytest.raises(SolverFileError):
        NonStationarySolver.load(damaged)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(SolverFileError):
        NonStationarySolver.load(truncated)


def _write(path, solver, *, config=None, tensors=None):
    cfg = {"nfe": solver.nfe, "base": solver.base, "refs": list(solver.refs), "time_scale": 1.0, "coeff_scale": 1.0}
    ts = {k: v.detach() for k, v in solver.state_dict().items()}
    cfg.update(config or {})
    ts.update(tensors or {})
    write_solver_file(path, kind="NonStationarySolver", config=cfg, tensors=ts, info={})


@pytest.mark.parametrize("config, tensors, match", [
    ({"nfe": 7, "refs": list(range(7))}, None, "shape"),           # header nfe disagrees with the tensors
    ({"nfe": 7}, None, "refs"),
    ({"nfe": 0}, None, "nfe"),
    ({"refs": [0, 1, 2, 3, 5, 5]}, None, "refs"),                   # a reference state from the future
    ({"refs": [0, 1]}, None, "refs"),
    ({"time_scale": -1.0}, None, "time_scale"),
    ({"extra": 1}, None, "config keys"),
    (None, {"b_delta": torch.zeros(20, dtype=F64)}, "b_delta"),
    (None, {"a_delta": torch.tensor([0.0, math.inf, 0, 0, 0, 0], dtype=F64)}, "finite"),
    (None, {"base_times": torch.tensor([0, .5, .4, .6, .8, .9, 1], dtype=F64)}, "base_times"),
    (None, {"time_logits": torch.zeros(5, dtype=torch.int64)}, "float"),
    (None, {"stray": torch.zeros(1)}, "tensors"),
])
def test_schema_violations_are_refused_with_the_reason(tmp_path, config, tensors, match):
    path = tmp_path / "bad.safetensors"
    _write(path, NonStationarySolver(6), config=config, tensors=tensors)
    with pytest.raises(SolverFileError, match=match):
        NonStationarySolver.load(path)


def test_trains_through_bx_train_with_the_log_mse_loss(mixture, one_thread):
    """bx.train with the paper's loss (mean log-MSE of the final sample), the default for this solver,
    improves a fresh (Euler) solver on held-out noise; the bound loss, which needs per-step scale-time
    coefficients, is refused up front when asked for."""
    import bespoke_ext as bx

    m = mixture(4, std=0.15, seed=0).double()
    solver = bx.train(m, bx.NonStationarySolver(6), shape=(4,), iterations=60, batch_size=32,
                      lr=5e-3, cache_samples=128, val_size=64, val_every=20, dtype=torch.float64, progress=False)
    x0 = torch.randn(256, 4, generator=torch.Generator().manual_seed(2024), dtype=torch.float64)
    truth = bx.sample(m, x0, method="dopri5", atol=1e-10, rtol=1e-10)
    rms = lambda x: float((x - truth).pow(2).mean(1).sqrt().mean())  # noqa: E731
    assert rms(bx.sample(m, x0, solver=solver)) < 0.8 * rms(bx.sample(m, x0, method="euler", nfe=6))
    assert solver.history.options["loss"] == "log_mse"
    with pytest.raises(ValueError, match="log_mse"):
        bx.train(m, bx.NonStationarySolver(6), shape=(4,), iterations=1, batch_size=8, loss="bound", progress=False)


def test_log_mse_objective_is_the_mean_log_square_error():
    from bespoke_ext.sampling.executor import execute
    from bespoke_ext.training.loss import end_to_end_loss

    model = lambda x, t: -x + torch.sin(3 * x) * t  # noqa: E731
    solver = NonStationarySolver(4)
    x0 = torch.randn(10, 3, dtype=torch.float64)
    x1 = torch.randn(10, 3, dtype=torch.float64)
    xn = execute(solver.program(), model, x0, {})[0]
    expected = torch.log((xn - x1).pow(2).mean(1)).mean()
    got = end_to_end_loss(model, solver, x0, x1, objective="log_mse", chunk_size=4)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------ preconditioning

def test_preconditioned_start_is_euler_on_the_warped_grid(mixture):
    """sigma0-preconditioned Euler (method.md §9) equals Euler on t(r) = r / (r + sigma0 (1 - r)): the
    scale-time change of the path, undone at the end; sigma0 = 1 is plain Euler."""
    from bespoke_ext.solvers import preconditioned, preconditioned_grid

    m = mixture(dim=3, std=0.2, seed=4).double()
    x0 = torch.randn(7, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    r = torch.arange(9, dtype=F64) / 8
    for sigma0 in (0.5, 2.0, 5.0):
        grid = preconditioned_grid(8, sigma0)
        torch.testing.assert_close(grid, r / (r + sigma0 * (1 - r)), rtol=0, atol=1e-15)
        # x̄ = s x with s = r + sigma0 (1 - r): Euler steps in r, mapped back, are Euler steps on the grid
        s = r + sigma0 * (1 - r)
        x_bar, x = sigma0 * x0, x0
        for i in range(8):
            u_bar = (1 - sigma0) * x + s[i] * (sigma0 / s[i] ** 2) * m(x, grid[i])
            x_bar = x_bar + u_bar / 8
            x = x_bar / s[i + 1]
        solver = preconditioned(8, sigma0)
        torch.testing.assert_close(bx.sample(m, x0, solver=solver), x, rtol=1e-12, atol=1e-12)
        assert solver.num_parameters == 8 * 13 // 2 - 1 and "sigma0" in solver.metadata["initialised_from"]
    assert torch.equal(bx.sample(m, x0, solver=preconditioned(8, 1.0)), bx.sample(m, x0, method="euler", nfe=8))
    for bad in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="sigma0"):
            preconditioned_grid(8, bad)


class _ExactGaussianField(torch.nn.Module):
    """The exact OT velocity towards x(1) ~ N(2, 0.1^2) per coordinate: a field that a least-squares start
    fits to the last bit on some samples, whose final error is then exactly 0."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mu", torch.tensor(2.0))

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=x.dtype)
        t = t if t.dim() == 0 else t.reshape(-1, *([1] * (x.dim() - 1)))
        var = t * t * 0.01 + (1 - t) ** 2
        return self.mu + (t * 0.01 - (1 - t)) / var * (x - t * self.mu)


@pytest.mark.parametrize("loss", ["log_mse", "end_to_end"])
def test_samples_solved_exactly_give_zero_gradients_not_skipped_steps(tmp_path, loss):
    # the loss's per-sample RMS at an error of exactly 0 had a NaN gradient (sqrt at 0): every step was
    # skipped as non-finite and training stopped with NonFiniteTrainingError
    solver = bx.NonStationarySolver(4)
    bx.train(_ExactGaussianField(), solver, shape=(2,), iterations=12, batch_size=16, loss=loss, cache_samples=32,
             cache_grid=16, val_size=16, progress=False, cache_dir=str(tmp_path))
    assert solver.history.skipped_iterations == []
    assert all(math.isfinite(v) for v in solver.history.loss)


def test_changed_scales_are_not_sampled_from_a_stale_program():
    # time_scale and coeff_scale are plain attributes the tables are computed from: a program memoised before
    # they changed must not be reused after
    g = torch.Generator().manual_seed(0)
    ns = NonStationarySolver(6, "midpoint")
    with torch.no_grad():
        for p in ns.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    field = lambda x, t: torch.sin(2 * x) - t * x
    x0 = torch.randn(5, 3, generator=g)
    before = bx.sample(field, x0, solver=ns)
    ns.time_scale, ns.coeff_scale = 3.0, 2.0
    after = bx.sample(field, x0, solver=ns)
    assert not torch.equal(after, before)
    torch.testing.assert_close(ns.program().times, ns.times()[:-1].to(ns.program().times.dtype))
    rebuilt = NonStationarySolver(6, "midpoint")
    rebuilt.load_state_dict(ns.state_dict())
    rebuilt.time_scale, rebuilt.coeff_scale = 3.0, 2.0
    assert torch.equal(after, bx.sample(field, x0, solver=rebuilt))
