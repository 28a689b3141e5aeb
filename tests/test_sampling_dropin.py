"""sample() as a flow_matching drop-in: every torchdiffeq method, flow_matching's own ODESolver test
cases through a thin shim, extras that look like solver arguments, no_grad semantics (models using
autograd inside) and autocast outputs."""

from __future__ import annotations

import functools
import sys
import warnings
from unittest.mock import MagicMock

import pytest
import torch
from flow_matching.solver import ODESolver
from flow_matching.utils import ModelWrapper
from torchdiffeq._impl.odeint import SOLVERS as TORCHDIFFEQ_SOLVERS

import bespoke_ext as bx
from bespoke_ext.sampling import METHODS, sample
from bespoke_ext.sampling.adaptive import ADAPTIVE_METHODS, MULTISTEP_METHODS
from bespoke_ext.solvers import TABLEAUS, BespokeSolver

from test_sampling import Field  # noqa: E402  (the same small nonlinear model as the sampling tests)

pytestmark = pytest.mark.usefixtures("one_thread")

EXECUTOR = ("euler", "midpoint", "heun2", "heun3", "rk4")  # torchdiffeq's names


@pytest.fixture
def x0():
    return torch.randn(32, 3, generator=torch.Generator().manual_seed(0))


def flow_matching(model, x0, **kwargs):
    kwargs.setdefault("step_size", None)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy_solver's unused-option warning
        return ODESolver(model).sample(x_init=x0, **kwargs)


# -- every method flow_matching accepts -------------------------------------------------------------


def test_every_torchdiffeq_method_is_accepted():
    accepted = set(METHODS) | {"heun2"}
    assert set(TORCHDIFFEQ_SOLVERS) <= accepted, set(TORCHDIFFEQ_SOLVERS) - accepted
    # the explicit fixed-grid ones run as executor programs, the rest through torchdiffeq
    assert {"euler", "midpoint", "heun", "heun3", "rk4"} <= set(TABLEAUS)
    assert set(TORCHDIFFEQ_SOLVERS) - set(EXECUTOR) == set(ADAPTIVE_METHODS) | set(MULTISTEP_METHODS)


@pytest.mark.parametrize("method", sorted(TORCHDIFFEQ_SOLVERS))
@pytest.mark.parametrize("grid", [[0.0, 0.3, 0.75, 1.0], [1.0, 0.45, 0.0]])
def test_every_method_equals_flow_matching(x0, method, grid):
    model = Field()
    tg = torch.tensor(grid)
    kwargs = dict(time_grid=tg, return_intermediates=True, scale=1.3, shift=0.1)
    if method not in ADAPTIVE_METHODS:
        kwargs["step_size"] = 0.08  # the last step shortened, intermediates inside steps
    else:
        kwargs.update(atol=1e-6, rtol=1e-6)
    expected = flow_matching(model, x0, method=method, **kwargs)
    model.calls = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got, stats = sample(model, x0, method=method, return_stats=True, **kwargs)
    assert got.shape == expected.shape == (len(grid), *x0.shape) and got.dtype == x0.dtype
    if method in EXECUTOR:  # the same arithmetic, fused: equal to float32 rounding
        torch.testing.assert_close(got, expected, rtol=2e-6, atol=2e-6)
    else:  # torchdiffeq itself, called as flow_matching calls it: the same numbers
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert stats.nfe == model.calls == stats.network_forwards > 0
    assert stats.method == {"heun2": "heun"}.get(method, method)
    if method in EXECUTOR or method in MULTISTEP_METHODS:
        assert stats.steps == 13  # 1 / 0.08 rounded up: torchdiffeq's step grid
    else:
        assert stats.steps is None


def test_heun3_is_torchdiffeqs_third_order_method(x0):
    model = Field().double()
    x = x0.double()
    got, stats = sample(model, x, method="heun3", nfe=12, return_stats=True)
    assert stats.steps == 4 and stats.nfe == 12 == model.calls
    expected = flow_matching(model, x, method="heun3", step_size=0.25, time_grid=torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=1e-14)
    with pytest.raises(ValueError, match="multiple of 3"):
        sample(model, x, method="heun3", nfe=10)


@pytest.mark.parametrize("method", ["dopri8", "bosh3", "fehlberg2", "adaptive_heun", "implicit_adams", "explicit_adams"])
def test_nfe_is_refused_where_the_method_decides_it(x0, method):
    with pytest.raises(ValueError, match=f"method '{method}' is .*drop nfe=8"):
        sample(Field(), x0, method=method, nfe=8)


def test_torchdiffeq_method_arguments(x0):
    with pytest.raises(ValueError, match="adaptive: step_size applies"):
        sample(Field(), x0, method="bosh3", step_size=0.1)
    with pytest.raises(ValueError, match="cuda_graph=True .* runs through torchdiffeq"):
        sample(Field(), x0, method="explicit_adams", step_size=0.1, cuda_graph=True)
    with pytest.raises(ValueError, match="rtol must be a positive"):
        sample(Field(), x0, method="implicit_adams", step_size=0.1, rtol=-1.0)


# -- flow_matching's own ODESolver tests (tests/solver/test_ode_solver.py), through a shim ---------


class Shim:
    """flow_matching's ODESolver interface on top of bespoke_ext."""

    def __init__(self, velocity_model):
        self.velocity_model = velocity_model

    def sample(self, x_init, step_size, method="euler", atol=1e-5, rtol=1e-5, time_grid=torch.tensor([0.0, 1.0]),
               return_intermediates=False, enable_grad=False, **model_extras):
        return bx.sample(self.velocity_model, x_init, method=method, step_size=step_size, atol=atol, rtol=rtol,
                         time_grid=time_grid, return_intermediates=return_intermediates, enable_grad=enable_grad,
                         **model_extras)

    def compute_likelihood(self, x_1, log_p0, step_size, method="euler", atol=1e-5, rtol=1e-5,
                           time_grid=torch.tensor([1.0, 0.0]), return_intermediates=False,
                           exact_divergence=False, enable_grad=False, **model_extras):
        return bx.compute_likelihood(self.velocity_model, x_1, log_p0, step_size=step_size, method=method,
                                     atol=atol, rtol=rtol, time_grid=time_grid,
                                     return_intermediates=return_intermediates,
                                     exact_divergence=exact_divergence, enable_grad=enable_grad, **model_extras)


class DummyModel(ModelWrapper):
    def __init__(self):
        super().__init__(None)

    def forward(self, x, t, **extras):
        return (x * 0.0 + 1.0) * 3.0 * t**2


class ConstantVelocityModel(ModelWrapper):
    def __init__(self):
        super().__init__(None)
        self.a = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, x, t, **extras):
        return x * 0.0 + self.a


def test_fm_sample_with_a_mock_model():
    mock = MagicMock(spec=ModelWrapper)
    mock.return_value = torch.tensor([1.0, 1.0])
    x_init = torch.tensor([0.0, 0.0])
    result = Shim(mock).sample(x_init=x_init, step_size=0.1, time_grid=torch.tensor([0.0, 1.0]))
    assert isinstance(result, torch.Tensor) and result.shape == x_init.shape
    mock.assert_called()
    torch.testing.assert_close(result, torch.tensor([1.0, 1.0]))


@pytest.mark.parametrize("method", ["euler", "dopri5", "midpoint", "heun3"])
def test_fm_sample_with_different_methods(method):
    result = Shim(DummyModel()).sample(x_init=torch.tensor([1.0, 0.0]), step_size=0.001 if method != "dopri5" else None,
                                       time_grid=torch.tensor([0.0, 1.0]), method=method)
    assert torch.allclose(torch.tensor([2.0, 1.0]), result, atol=1e-2)


@pytest.mark.parametrize("method", ["euler", "dopri5", "midpoint", "heun3"])
def test_fm_gradients(method):
    model = ConstantVelocityModel()
    result = Shim(model).sample(x_init=torch.tensor([1.0, 0.0]), step_size=0.001 if method != "dopri5" else None,
                                time_grid=torch.tensor([0.0, 1.0]), method=method, enable_grad=True)
    result.sum().backward()
    assert abs(model.a.grad.item() - 2.0) < 1e-4


def test_fm_no_gradients():
    model = ConstantVelocityModel()
    result = Shim(model).sample(x_init=torch.tensor([1.0, 0.0], requires_grad=True), step_size=0.001,
                                time_grid=torch.tensor([0.0, 1.0]), method="euler")
    with pytest.raises(RuntimeError):
        result.sum().backward()


needs_likelihood = pytest.mark.skipif(not hasattr(bx, "compute_likelihood"), reason="bx.compute_likelihood not there yet")


@needs_likelihood
def test_fm_compute_likelihood():
    _, log_likelihood = Shim(DummyModel()).compute_likelihood(
        x_1=torch.tensor([[0.0, 0.0]]), log_p0=lambda x: -0.5 * torch.sum(x**2, dim=1), step_size=0.1)
    assert isinstance(log_likelihood, torch.Tensor) and log_likelihood.shape[0] == 1
    with pytest.raises(RuntimeError):
        log_likelihood.backward()


@needs_likelihood
def test_fm_compute_likelihood_gradients_non_zero():
    x_1 = torch.tensor([[0.0, 0.0]], requires_grad=True)
    _, log_likelihood = Shim(DummyModel()).compute_likelihood(
        x_1=x_1, log_p0=lambda x: -0.5 * torch.sum(x**2, dim=1), step_size=0.1, enable_grad=True)
    log_likelihood.backward()
    assert not torch.allclose(x_1.grad, torch.tensor([1.0, 1.0]), atol=1e-2)


@needs_likelihood
def test_fm_compute_likelihood_exact_divergence():
    x_1 = torch.tensor([[0.0, 0.0]], requires_grad=True)

    def log_p(x):
        return -0.5 * torch.sum(x**2)

    x_0, log_likelihood = Shim(ConstantVelocityModel()).compute_likelihood(
        x_1=x_1, log_p0=log_p, step_size=0.1, exact_divergence=True, enable_grad=True)
    assert log_likelihood.shape[0] == x_1.shape[0]
    assert torch.allclose(log_p(x_1 - 1.0), log_likelihood, atol=1e-2)
    assert torch.allclose(x_1 - 1.0, x_0, atol=1e-2)
    log_likelihood.backward()
    assert torch.allclose(x_1.grad, torch.tensor([1.0, 1.0]), atol=1e-2)


# -- extras that look like solver arguments -----------------------------------------------------------


class Swallows(torch.nn.Module):
    """A model taking **kwargs: without the check, steps=10 would vanish into it."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x, t, **kwargs):
        self.calls += 1
        return -x


@pytest.mark.parametrize("name, meant", [
    ("steps", "nfe="), ("num_steps", "nfe="), ("n_steps", "nfe="), ("num_inference_steps", "nfe="),
    ("NFEs", "nfe="), ("num_function_evals", "nfe="), ("stepsize", "step_size="), ("step_Size", "step_size="),
    ("time_step_size", "step_size="), ("time_steps", "time_grid="), ("timesteps", "time_grid="), ("t_span", "time_grid="),
    ("solver_method", "method="), ("ode_method", "method="), ("tol", "atol="), ("return_intermediate", "return_intermediates="),
    ("enable_grads", "enable_grad="), ("options", "nfe=, step_size="), ("cuda_graphs", "cuda_graph="),
])
@pytest.mark.parametrize("how", [dict(method="midpoint"), dict(method="dopri5"), dict(solver=BespokeSolver(2))])
def test_solver_like_extras_are_an_error_naming_them(x0, name, meant, how):
    model = Swallows()
    with pytest.raises(TypeError, match=rf"got {name}=10 as a model extra, .*'{name}' looks like a solver argument.*"
                                        rf"Did you mean {meant}"):
        sample(model, x0, **how, **{name: 10})
    assert model.calls == 0  # refused before any evaluation


def test_ordinary_extras_still_reach_the_model(x0):
    seen = {}

    def model(x, t, **kwargs):
        seen.update(kwargs)
        return -x

    labels = torch.arange(32)
    sample(model, x0, method="euler", y=labels, cond="a", guidance_scale=2.0, grid=3, step_index=1, dt=0.5)
    assert set(seen) == {"y", "cond", "guidance_scale", "grid", "step_index", "dt"} and seen["y"] is labels
    # and a model input that really has a solver-like name goes in through functools.partial
    sample(functools.partial(model, steps=7), x0, method="euler")
    assert seen["steps"] == 7


# -- no_grad, not inference mode: models that use autograd inside ----------------------------------------


class EnergyGuided(torch.nn.Module):
    """Velocity plus the gradient of an energy, computed with autograd inside the model, as
    classifier / energy guidance does (the flow_matching way: enable_grad + autograd.grad)."""

    def __init__(self):
        super().__init__()
        self.base = Field()
        self.scale = torch.nn.Parameter(torch.tensor(0.3))
        self.modes = []

    def forward(self, x, t, **extras):
        self.modes.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled()))
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            energy = (torch.cos(3 * xg) * (1 + t)).sum() + 0.5 * (xg**2).sum()
            (grad,) = torch.autograd.grad(energy, xg)
        return self.base(x, t, **extras) - self.scale * grad


@pytest.mark.parametrize("how, reference", [
    (dict(method="midpoint", nfe=8), dict(method="midpoint", step_size=0.25)),
    (dict(method="rk4", step_size=0.2), dict(method="rk4", step_size=0.2)),
    (dict(method="heun3", time_grid=[0.0, 0.5, 1.0]), dict(method="heun3", time_grid=torch.tensor([0.0, 0.5, 1.0]))),
    (dict(solver=BespokeSolver(4, 2)), dict(method="midpoint", step_size=0.25)),
    (dict(method="dopri5"), dict(method="dopri5")),
    (dict(method="explicit_adams", step_size=0.1), dict(method="explicit_adams", step_size=0.1)),
])
def test_models_using_autograd_inside_work_as_with_flow_matching(x0, how, reference):
    model = EnergyGuided()
    x = x0.clone().requires_grad_(True)  # even then nothing is recorded
    got = sample(model, x, **how)
    assert model.modes and all(mode == (False, False) for mode in model.modes)  # no_grad, not inference mode
    assert not got.requires_grad and got.grad_fn is None and not got.is_inference()
    expected = flow_matching(model, x0, **reference)
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=2e-6)
    assert model.scale.grad is None and x.grad is None


# -- autocast outputs --------------------------------------------------------------------------------------


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.l1, self.l2 = torch.nn.Linear(4, 32), torch.nn.Linear(32, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x, t):
        return self.l2(torch.tanh(self.l1(torch.cat([x, t.expand(x.shape[0], 1)], 1))))


@pytest.mark.parametrize("how", [dict(method="midpoint", nfe=6), dict(method="heun3", step_size=0.25),
                                 dict(solver=BespokeSolver(3, 2)), dict(method="dopri5", atol=1e-4, rtol=1e-4),
                                 dict(method="explicit_adams", step_size=0.25)])
def test_autocast_outputs_are_cast_to_the_state_dtype(x0, how):
    net = Net()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net(x0, torch.tensor(0.5)).dtype == torch.bfloat16  # the model really returns bfloat16
        got, stats = sample(net, x0, return_stats=True, **how)
        cast_by_hand = sample(lambda x, t: net(x, t).float(), x0, **how)
    assert got.dtype == torch.float32 and stats.nfe > 0
    torch.testing.assert_close(got, cast_by_hand, rtol=0, atol=0)  # exactly a cast, nothing else
    full = sample(net, x0, **how)  # and close to the float32 model: bfloat16 rounding, not garbage
    torch.testing.assert_close(got, full, rtol=0, atol=0.05)
    assert not torch.equal(got, full)


def test_half_outputs_for_float64_states_and_gradients_through_the_cast(x0):
    model = Field()
    x = x0.double().requires_grad_(True)
    out = sample(lambda y, t: model(y.float(), t.float()).half(), x, method="midpoint", nfe=4, enable_grad=True)
    assert out.dtype == torch.float64
    out.sum().backward()
    assert x.grad is not None and model.w.grad is not None


def test_one_output_cast_wrapper_per_model_held_weakly(x0):
    """CUDA graphs are cached per model object, so the model they see must be the same object on
    every call; and the cache must not keep models alive."""
    import gc
    import weakref

    module = sys.modules["bespoke_ext.sampling.sample"]
    model = Field()
    first, second = module._cast_outputs(model), module._cast_outputs(model)
    assert first is second and first.model is model
    sample(model, x0, method="euler")
    assert module._cast_outputs(model) is first
    alive = weakref.ref(model)
    del model, first, second
    gc.collect()
    assert alive() is None
    unhashable = type("Unhashable", (), {"__eq__": lambda s, o: False, "__call__": lambda s, x, t: -x})()
    assert module._cast_outputs(unhashable).model is unhashable


@pytest.mark.parametrize("method", ["heun2", "heun3", "rk4"])
def test_float32_rounding_is_no_worse_than_flow_matchings(method):
    # a state far from 0 and small steps: an increment summed onto x term by term is rounded at |x| once
    # per velocity (rk4 gave 3.6x torchdiffeq's float32 error); formed first and added once, it is not
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))
        x0 = torch.randn(512, 2) * 3 + 5

    def model(x, t):
        return 3 * net(torch.cat([x, t.expand(x.shape[0], 1).to(x.dtype)], 1))

    with torch.no_grad():
        ours = sample(model, x0, step_size=0.002, method=method)
        theirs = ODESolver(model).sample(x_init=x0, step_size=0.002, method=method)
        net.double()
        exact = ODESolver(model).sample(x_init=x0.double(), step_size=0.002, method=method,
                                        time_grid=torch.tensor([0.0, 1.0], dtype=torch.float64))
        net.float()
    rms = lambda y: float((y.double() - exact).pow(2).mean().sqrt())  # noqa: E731
    assert rms(ours) <= 1.2 * rms(theirs), (rms(ours), rms(theirs))
