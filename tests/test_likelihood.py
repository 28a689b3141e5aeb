"""compute_likelihood(): agreement with flow_matching, closed-form likelihoods, gradients, inputs."""

import math

import pytest
import torch
from flow_matching.solver import ODESolver
from torch import Tensor, nn

import bespoke_ext as bx

pytestmark = pytest.mark.usefixtures("one_thread")


class MLP(nn.Module):
    """A small velocity field with a full (non-diagonal) Jacobian; extras: scale, shift."""

    def __init__(self, dim: int = 2, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(torch.randn(dim + 1, 16, generator=g) / 2)
        self.w2 = nn.Parameter(torch.randn(16, dim, generator=g) / 4)

    def forward(self, x, t, scale=1.0, shift=None, **extras):
        h = torch.tanh(torch.cat([x, t.expand(x.shape[0], 1).to(x.dtype)], dim=1) @ self.w1.to(x.dtype))
        u = scale * (h @ self.w2.to(x.dtype)) - 0.5 * x
        return u if shift is None else u + shift


class GaussianFlow(nn.Module):
    """x_t = (1 - t) x0 + t (mu + sigma x0), x0 ~ N(0, I): p_1 = N(mu, diag(sigma^2)) exactly.
    u(x, t) = mu + (sigma - 1) (x - t mu) / (1 - t + t sigma)."""

    def __init__(self, mu, sigma):
        super().__init__()
        self.mu = nn.Parameter(torch.as_tensor(mu, dtype=torch.float64))
        self.sigma = nn.Parameter(torch.as_tensor(sigma, dtype=torch.float64))

    def forward(self, x, t, **extras):
        mu, sigma = self.mu.to(x.dtype), self.sigma.to(x.dtype)
        return mu + (sigma - 1.0) * (x - t * mu) / (1.0 - t + t * sigma)

    def log_p1(self, x):
        return log_normal((x - self.mu) / self.sigma) - torch.log(self.sigma).sum()


def log_normal(x: Tensor) -> Tensor:
    x = x.flatten(1)
    return -0.5 * (x ** 2).sum(1) - 0.5 * x.shape[1] * math.log(2 * math.pi)


def fm_likelihood(model, x_1, seed=None, **kwargs):
    if seed is not None:
        torch.manual_seed(seed)
    method = kwargs.pop("method", "euler")
    return ODESolver(model).compute_likelihood(x_1=x_1, log_p0=log_normal,
                                               method={"heun": "heun2"}.get(method, method), **kwargs)


def bx_likelihood(model, x_1, seed=None, **kwargs):
    if seed is not None:
        torch.manual_seed(seed)
    return bx.compute_likelihood(model, x_1, log_normal, **kwargs)


@pytest.fixture(scope="module")
def mlp():
    return MLP().requires_grad_(False)


@pytest.fixture(scope="module")
def x1():
    return torch.randn(6, 2, generator=torch.Generator().manual_seed(1))


# -- drop-in agreement with flow_matching ----------------------------------------------------------

STEPS = {"euler": 0.1, "midpoint": 0.1, "heun": 0.125, "rk4": 0.25, "heun3": 0.2, "explicit_adams": 0.1, "dopri5": None}
GRIDS = {
    "default": dict(),
    "points": dict(time_grid=torch.tensor([1.0, 0.75, 0.4, 0.0]), step_size=None),
    "points+step": dict(time_grid=torch.tensor([1.0, 0.63, 0.0]), return_intermediates=True),
}


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("exact", [True, False], ids=["exact", "hutchinson"])
@pytest.mark.parametrize("method", list(STEPS))
def test_matches_flow_matching(mlp, x1, method, exact, grid):
    kwargs = dict(method=method, step_size=STEPS[method], exact_divergence=exact)
    kwargs.update(GRIDS[grid])
    if method == "dopri5":
        kwargs["step_size"] = None
    want_x, want_ll = fm_likelihood(mlp, x1, seed=7, **kwargs)
    got_x, got_ll = bx_likelihood(mlp, x1, seed=7, **kwargs)
    assert got_x.shape == want_x.shape and got_ll.shape == (x1.shape[0],)
    torch.testing.assert_close(got_x, want_x, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(got_ll, want_ll, rtol=2e-6, atol=5e-6)


def test_exact_divergence_is_bitwise_flow_matching_on_an_embedded_model():
    # the moons2d network (SiLU, a sinusoidal time embedding): its plain backward formulas round otherwise than
    # the differentiable ones flow_matching's create_graph=True runs (4.8e-7 in Euler's log-likelihood, and
    # dopri5 took another step sequence: 416 against 422 evaluations, 8e-3 apart)
    from bespoke_ext.models.embedded import load_embedded

    model = load_embedded("moons2d").velocity
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(4))
    for method, step in (("euler", 0.1), ("dopri5", None)):
        want = fm_likelihood(model, x, method=method, step_size=step, exact_divergence=True)
        got = bx_likelihood(model, x, method=method, step_size=step, exact_divergence=True)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), method


def test_euler_and_midpoint_are_bitwise_flow_matching(mlp, x1):
    for method in ("euler", "midpoint"):
        for exact in (True, False):
            want = fm_likelihood(mlp, x1, seed=3, method=method, step_size=0.05, exact_divergence=exact)
            got = bx_likelihood(mlp, x1, seed=3, method=method, step_size=0.05, exact_divergence=exact)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (method, exact)


def test_model_extras_reach_the_model(mlp, x1):
    shift = torch.linspace(-1, 1, x1.numel()).reshape(x1.shape)  # per-sample, batch-leading
    for method, step in (("midpoint", 0.1), ("dopri5", None)):
        kwargs = dict(method=method, step_size=step, exact_divergence=True, scale=2.5, shift=shift)
        want = fm_likelihood(mlp, x1, **kwargs)
        got = bx_likelihood(mlp, x1, **kwargs)
        torch.testing.assert_close(got, want, rtol=2e-6, atol=5e-6)
        plain = bx_likelihood(mlp, x1, method=method, step_size=step, exact_divergence=True)
        assert (got[1] - plain[1]).abs().max() > 1e-3  # the extras changed the field


def test_hutchinson_seeding(mlp, x1):
    a = bx_likelihood(mlp, x1, seed=11, step_size=0.1)[1]
    b = bx_likelihood(mlp, x1, seed=11, step_size=0.1)[1]
    c = bx_likelihood(mlp, x1, seed=12, step_size=0.1)[1]
    exact = bx_likelihood(mlp, x1, step_size=0.1, exact_divergence=True)[1]
    assert torch.equal(a, b)                  # the same seed: the same z, the same numbers
    assert not torch.equal(a, c)              # another z: another estimate (the Jacobian is not diagonal)
    assert (a - exact).abs().max() > 1e-4
    # One z per call, drawn like flow_matching's: the global stream advanced by one randn_like(x_1).
    torch.manual_seed(5)
    bx_likelihood(mlp, x1, step_size=0.25)
    after_bx = torch.rand(3)
    torch.manual_seed(5)
    torch.randn_like(x1)
    assert torch.equal(after_bx, torch.rand(3))


def test_hutchinson_is_unbiased(mlp):
    point = torch.tensor([[0.3, -0.7]])
    exact = bx_likelihood(mlp, point, step_size=0.25, method="midpoint", exact_divergence=True)[1]
    many = bx_likelihood(mlp, point.expand(4000, 2).contiguous(), seed=0, step_size=0.25, method="midpoint")[1]
    assert many.std() > 1e-3                   # single estimates scatter...
    assert abs(float(many.mean() - exact)) < 4 * float(many.std()) / math.sqrt(4000) + 1e-6  # ...around the exact value


# -- closed-form likelihood -------------------------------------------------------------------------

GAUSS = dict(mu=[0.5, -1.0, 2.0], sigma=[0.3, 1.5, 0.8])


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "hutchinson"])
def test_gaussian_linear_flow_dopri5_is_analytic(exact):
    model = GaussianFlow(**GAUSS).requires_grad_(False)
    x_1 = model.mu + model.sigma * torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_0, ll = bx_likelihood(model, x_1, seed=0, method="dopri5", step_size=None, atol=1e-9, rtol=1e-9,
                            exact_divergence=exact)
    # The Jacobian is diagonal, so Hutchinson's estimate is exact here too.
    torch.testing.assert_close(ll, model.log_p1(x_1), rtol=0, atol=1e-4)
    torch.testing.assert_close(x_0, (x_1 - model.mu) / model.sigma, rtol=0, atol=1e-6)


def test_gaussian_error_shrinks_with_the_order():
    model = GaussianFlow(**GAUSS).requires_grad_(False)
    x_1 = model.mu + model.sigma * torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = {m: float((bx_likelihood(model, x_1, method=m, nfe=16, step_size=None, exact_divergence=True)[1]
                        - model.log_p1(x_1)).abs().max()) for m in ("euler", "midpoint", "rk4")}
    assert errors["rk4"] < errors["midpoint"] / 10 < errors["euler"] / 100, errors


# -- gradients --------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["rk4", "dopri5"])
def test_gradients_are_true_gradients(method):
    """d log p / d x_1 and d log p / d (mu, sigma): the analytic ones (through the divergence too)."""
    model = GaussianFlow(**GAUSS)
    x_1 = torch.tensor([[0.1, 0.2, 2.5], [1.0, -2.0, 1.2]], dtype=torch.float64, requires_grad=True)
    step = 0.05 if method == "rk4" else None
    _, ll = bx_likelihood(model, x_1, method=method, step_size=step, atol=1e-9, rtol=1e-9,
                          exact_divergence=True, enable_grad=True)
    ll.sum().backward()
    ref_model = GaussianFlow(**GAUSS)
    ref_x = x_1.detach().clone().requires_grad_(True)
    ref_model.log_p1(ref_x).sum().backward()
    torch.testing.assert_close(x_1.grad, ref_x.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.mu.grad, ref_model.mu.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.sigma.grad, ref_model.sigma.grad, rtol=1e-5, atol=1e-6)


def test_no_graph_without_enable_grad(mlp, x1):
    x = x1.clone().requires_grad_(True)
    x_0, ll = bx_likelihood(mlp, x, step_size=0.25, exact_divergence=True)
    assert not ll.requires_grad and not x_0.requires_grad
    with pytest.raises(RuntimeError):
        ll.sum().backward()


def test_hutchinson_gradient_matches_finite_differences():
    x = torch.tensor([[0.3, -0.2], [-1.0, 0.5]], dtype=torch.float64)
    model = MLP().double()
    f = lambda v: bx_likelihood(model, v, seed=4, method="midpoint", step_size=0.125)[1].sum()
    xg = x.clone().requires_grad_(True)
    torch.manual_seed(4)
    bx.compute_likelihood(model, xg, log_normal, method="midpoint", step_size=0.125, enable_grad=True)[1].sum().backward()
    eps = 1e-6
    fd = torch.zeros_like(x)
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            e = torch.zeros_like(x)
            e[i, j] = eps
            fd[i, j] = (f(x + e) - f(x - e)) / (2 * eps)
    torch.testing.assert_close(xg.grad, fd, rtol=1e-5, atol=1e-7)
    assert model.w1.grad is not None and float(model.w1.grad.abs().sum()) > 0


# -- flow_matching's own likelihood tests, pointed at bx through a thin shim ------------------------

class BxODESolver:
    """flow_matching's ODESolver interface on top of bx."""

    def __init__(self, velocity_model):
        self.velocity_model = velocity_model

    def sample(self, x_init, step_size, **kwargs):
        return bx.sample(self.velocity_model, x_init, step_size=step_size, **kwargs)

    def compute_likelihood(self, x_1, log_p0, step_size, **kwargs):
        return bx.compute_likelihood(self.velocity_model, x_1, log_p0, step_size=step_size, **kwargs)


from test_sampling_dropin import ConstantVelocityModel, DummyModel  # noqa: E402  (flow_matching's test models)


def test_fm_compute_likelihood():
    x_1 = torch.tensor([[0.0, 0.0]])
    _, log_likelihood = BxODESolver(DummyModel()).compute_likelihood(
        x_1=x_1, log_p0=lambda x: -0.5 * torch.sum(x ** 2, dim=1), step_size=0.1, exact_divergence=False)
    assert isinstance(log_likelihood, Tensor)
    assert x_1.shape[0] == log_likelihood.shape[0]
    with pytest.raises(RuntimeError):
        log_likelihood.backward()


def test_fm_compute_likelihood_gradients_non_zero():
    x_1 = torch.tensor([[0.0, 0.0]], requires_grad=True)
    _, log_likelihood = BxODESolver(DummyModel()).compute_likelihood(
        x_1=x_1, log_p0=lambda x: -0.5 * torch.sum(x ** 2, dim=1), step_size=0.1, exact_divergence=False,
        enable_grad=True)
    log_likelihood.backward()
    assert not torch.allclose(x_1.grad, torch.tensor([1.0, 1.0]), atol=1e-2)


def test_fm_compute_likelihood_exact_divergence():
    x_1 = torch.tensor([[0.0, 0.0]], requires_grad=True)

    def dummy_log_p(x):
        return -0.5 * torch.sum(x ** 2)

    x_0, log_likelihood = BxODESolver(ConstantVelocityModel()).compute_likelihood(
        x_1=x_1, log_p0=dummy_log_p, step_size=0.1, exact_divergence=True, enable_grad=True)
    assert isinstance(log_likelihood, Tensor)
    assert x_1.shape[0] == log_likelihood.shape[0]
    assert torch.allclose(dummy_log_p(x_1 - 1.0), log_likelihood, atol=1e-2)
    assert torch.allclose(x_1 - 1.0, x_0, atol=1e-2)
    log_likelihood.backward()
    assert torch.allclose(x_1.grad, torch.tensor([1.0, 1.0]), atol=1e-2)


# -- beyond flow_matching: shapes, dtypes, stats, errors -------------------------------------------

def test_image_shaped_exact_divergence_equals_flat():
    flat = MLP(dim=4, seed=2).requires_grad_(False)
    image = lambda x, t: flat(x.reshape(x.shape[0], 4), t).reshape(x.shape)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    for exact in (True, False):
        want = bx_likelihood(flat, x, seed=1, method="rk4", step_size=0.25, exact_divergence=exact)
        got = bx_likelihood(image, x.reshape(3, 1, 2, 2), seed=1, method="rk4", step_size=0.25, exact_divergence=exact)
        assert got[0].shape == (3, 1, 2, 2)
        torch.testing.assert_close(got[0].reshape(3, 4), want[0])
        torch.testing.assert_close(got[1], want[1])


def test_float64_hutchinson_and_intermediates():
    model = MLP().double().requires_grad_(False)
    x = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grid = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    traj, ll = bx_likelihood(model, x, seed=0, method="midpoint", step_size=0.1, time_grid=grid,
                             return_intermediates=True)
    assert traj.shape == (3, 4, 2) and traj.dtype == torch.float64 and ll.dtype == torch.float64
    assert torch.equal(traj[0], x)
    x_0, ll_final = bx_likelihood(model, x, seed=0, method="midpoint", step_size=0.1, time_grid=grid)
    torch.testing.assert_close(traj[-1], x_0, rtol=0, atol=0)
    torch.testing.assert_close(ll, ll_final, rtol=0, atol=0)


def test_stats_and_nfe(mlp, x1):
    calls = []

    def counted(x, t):
        calls.append(float(t))
        return mlp(x, t)

    _, ll, stats = bx.compute_likelihood(counted, x1, log_normal, step_size=None, method="midpoint", nfe=8,
                                         exact_divergence=True, return_stats=True)
    assert stats.nfe == 8 and len(calls) == 8 and stats.steps == 4
    assert calls[0] == 1.0 and calls[-1] == pytest.approx(0.125)  # reverse time: 1 -> 0
    want = bx_likelihood(mlp, x1, step_size=0.25, method="midpoint", exact_divergence=True)[1]
    torch.testing.assert_close(ll, want)
    calls.clear()
    _, _, stats = bx.compute_likelihood(counted, x1, log_normal, step_size=None, method="dopri5",
                                        exact_divergence=True, return_stats=True)
    assert stats.nfe == len(calls) > 6


def test_runs_under_no_grad_and_inference_mode_callers(mlp, x1):
    want = bx_likelihood(mlp, x1, step_size=0.25, method="rk4", exact_divergence=True)
    with torch.no_grad():
        got = bx_likelihood(mlp, x1, step_size=0.25, method="rk4", exact_divergence=True)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(time_grid=(0.0, 1.0), step_size=0.1), "start at 1.0 and end at 0.0"),
    (dict(time_grid=(1.0, 0.2), step_size=0.1), "start at 1.0 and end at 0.0"),
    (dict(method="dopri5", step_size=0.1), "adaptive"),
    (dict(method="nope", step_size=0.1), "unknown method"),
    (dict(method="dpm++2m", step_size=0.1), "unknown method"),
    (dict(method="rk4", step_size=None, nfe=6), "multiple of 4"),
    (dict(method="explicit_adams", step_size=None, nfe=6), "nfe applies"),
])
def test_argument_errors(mlp, x1, kwargs, match):
    with pytest.raises(ValueError, match=match):
        bx.compute_likelihood(mlp, x1, log_normal, **kwargs)


@pytest.mark.parametrize("extra, meant", [("solver", "method="), ("steps", "nfe"), ("method_name", "method=")])
def test_solver_like_extras_are_refused(mlp, x1, extra, meant):
    # they would reach a model taking **kwargs while the likelihood ran its default method
    with pytest.raises(TypeError, match=f"compute_likelihood\\(\\) got {extra}=.*Did you mean {meant}"):
        bx.compute_likelihood(mlp, x1, log_normal, step_size=0.25, **{extra: 4})


def test_a_model_without_autograd_is_a_clear_error(x1):
    def detached(x, t):
        with torch.no_grad():
            return -x * t

    for method in ("euler", "dopri5"):
        with pytest.raises(RuntimeError, match="no autograd graph"):
            bx.compute_likelihood(detached, x1, log_normal, step_size=0.5 if method == "euler" else None,
                                  method=method, exact_divergence=True)


def test_augmented_field_runs_with_a_learned_solver(mlp, x1):
    """The flat augmented state is an ordinary bx model: an identity BespokeSolver on the
    time-reversed field (s = 1 - t) reproduces midpoint's likelihood at the same NFE."""
    from bespoke_ext.sampling.likelihood import AugmentedVelocity

    aug = AugmentedVelocity(mlp, x1.shape[1:])
    reversed_field = lambda y, s: -aug(y, 1.0 - s)
    y1 = torch.cat([x1, x1.new_zeros(x1.shape[0], 1)], dim=1)
    y0 = bx.sample(reversed_field, y1, solver=bx.BespokeSolver(4, order=2))
    want_x, want_ll = bx_likelihood(mlp, x1, method="midpoint", nfe=8, step_size=None, exact_divergence=True)
    torch.testing.assert_close(y0[:, :-1], want_x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(log_normal(y0[:, :-1]) + y0[:, -1], want_ll, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["midpoint", "dopri5"])
def test_matches_flow_matching_on_device(device, method):
    model = MLP().to(device).requires_grad_(False)
    x_1 = torch.randn(8, 2, generator=torch.Generator().manual_seed(2)).to(device)
    kwargs = dict(method=method, step_size=0.1 if method == "midpoint" else None,
                  time_grid=torch.tensor([1.0, 0.0], device=device))
    want = fm_likelihood(model, x_1, seed=9, **kwargs)
    got = bx_likelihood(model, x_1, seed=9, **kwargs)
    assert got[0].device == x_1.device and got[1].device == x_1.device
    torch.testing.assert_close(got, want, rtol=2e-6, atol=5e-6)
