"""What sample() and compute_likelihood() refuse or handle at the edges: gradients to the time grid,
step sizes that are not numbers or make too many steps, long programs kept out of the memo, empty
batches and non-finite fields in the adaptive methods, log_p0's shape."""

from __future__ import annotations

import pytest
import torch

import bespoke_ext as bx
import bespoke_ext.sampling.sample  # noqa: F401  (the module, not the function the package exports)
import sys

from bespoke_ext.solvers.time_grid import MAX_FIXED_STEPS


def field(x, t):
    return -x + torch.sin(t)


def log_p0(z):
    return -0.5 * z.pow(2).flatten(1).sum(1)


def test_time_grid_gradients_are_refused_not_dropped():
    grid = torch.tensor([0.0, 0.4, 1.0], requires_grad=True)
    x0 = torch.randn(3, 2)
    for method in ("euler", "dopri5"):
        with pytest.raises(ValueError, match="time_grid requires grad"):
            bx.sample(field, x0, method=method, time_grid=grid, step_size=0.1 if method == "euler" else None,
                      enable_grad=True)
    with pytest.raises(ValueError, match="time_grid requires grad"):
        bx.compute_likelihood(field, x0, log_p0, time_grid=grid.flip(0).detach().requires_grad_(), step_size=0.25,
                              enable_grad=True)
    out = bx.sample(field, x0, method="euler", time_grid=grid, step_size=0.1)   # no gradients asked: fine
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("bad", ["0.1", True, torch.tensor([0.1, 0.2])])
def test_step_size_must_be_a_number(bad):
    with pytest.raises(ValueError, match="step_size must be a positive number"):
        bx.sample(field, torch.randn(2, 2), method="euler", step_size=bad)


def test_too_many_steps_are_refused_before_building():
    with pytest.raises(ValueError, match=f"at most {MAX_FIXED_STEPS}"):
        bx.sample(field, torch.randn(2, 2), method="euler", step_size=1e-9)
    with pytest.raises(ValueError, match=f"more than {MAX_FIXED_STEPS} steps"):
        bx.sample(field, torch.randn(2, 2), method="euler", nfe=10 ** 9)


def test_long_programs_are_not_memoised():
    module = sys.modules["bespoke_ext.sampling.sample"]
    memo, programs = module._memo_fixed_program, module._cached_program
    memo.cache_clear()
    programs.cache_clear()
    x0 = torch.randn(2, 2)
    bx.sample(field, x0, method="rk4", step_size=1e-4)            # 10^4 steps
    assert memo.cache_info().currsize == 0 and programs.cache_info().currsize == 0
    short = bx.sample(field, x0, method="rk4", step_size=0.1)
    assert memo.cache_info().currsize == 1
    assert torch.equal(bx.sample(field, x0, method="rk4", step_size=0.1), short)
    assert memo.cache_info().hits == 1


@pytest.mark.parametrize("method", ["dopri5", "euler"])
def test_empty_batches(method):
    x0 = torch.randn(0, 3)
    step = None if method == "dopri5" else 0.25
    assert bx.sample(field, x0, method=method, step_size=step).shape == (0, 3)
    xs, ll = bx.compute_likelihood(field, x0, log_p0, method=method, step_size=step, exact_divergence=True)
    assert xs.shape == (0, 3) and ll.shape == (0,)


def test_adaptive_underflow_names_its_cause():
    def nan_field(x, t):
        return x * float("nan")

    with pytest.raises(ValueError, match="underflowed.*velocity is probably not finite"):
        bx.sample(nan_field, torch.randn(2, 3), method="dopri5")
    x0 = torch.randn(2, 3)
    x0[0, 0] = float("inf")
    with pytest.raises(ValueError, match="underflowed.*x0 holds NaN or inf"):
        bx.sample(field, x0, method="dopri5")
    with pytest.raises(ValueError, match="underflowed.*not finite"):
        bx.compute_likelihood(nan_field, torch.randn(2, 3), log_p0, method="dopri5", step_size=None)


@pytest.mark.parametrize("bad", [lambda z: -0.5 * z.pow(2).sum(), lambda z: -0.5 * z.pow(2)[:2].sum(1)],
                         ids=["batch-sum", "too-few"])
def test_log_p0_must_give_one_value_per_sample(bad):
    with pytest.raises(ValueError, match=r"log_p0\(x_0\) must return one log-density per sample, shape \[B\] = \[4\]"):
        bx.compute_likelihood(field, torch.randn(4, 3), bad, step_size=0.25)


def test_log_p0_with_keepdim_gives_per_sample_values():
    x1 = torch.randn(4, 3)
    _, want = bx.compute_likelihood(field, x1, log_p0, step_size=0.25)
    _, got = bx.compute_likelihood(field, x1, lambda z: log_p0(z)[:, None], step_size=0.25)   # [B, 1], not [B, B]
    assert got.shape == (4,) and torch.equal(got, want)


def test_tensor_tolerances_and_low_precision_modules_in_the_likelihood():
    x = torch.randn(4, 3)
    want = bx.sample(field, x, method="dopri5", atol=1e-5, rtol=1e-5)
    assert torch.equal(bx.sample(field, x, method="dopri5", atol=torch.tensor(1e-5), rtol=torch.tensor(1e-5)), want)
    with pytest.raises(ValueError, match="atol must be a positive number"):
        bx.sample(field, x, method="dopri5", atol=torch.tensor([1e-5, 1e-5]))

    class Lin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l = torch.nn.Linear(3, 3)

        def forward(self, x, t):
            return self.l(x)

    m = Lin().bfloat16()   # called in bf16, the state kept in float32, as sample() does
    xs, ll = bx.compute_likelihood(m, x, log_p0, step_size=0.25)
    assert xs.dtype == ll.dtype == torch.float32 and torch.isfinite(ll).all()


def test_models_in_torchdiffeqs_order_under_other_names_are_refused():
    def time_first(t, y):      # flow_matching's keyword call fails on it; ours would pass the state as t
        return -y

    class TimeFirst(torch.nn.Module):
        def forward(self, time, x_t):
            return -x_t

    for model in (time_first, TimeFirst()):
        with pytest.raises(TypeError, match=r"first arguments are \((t, y|time, x_t)\), torchdiffeq's order"):
            bx.sample(model, torch.randn(2, 3))
        with pytest.raises(TypeError, match="torchdiffeq's order"):
            bx.train(model, bx.BespokeSolver(2, 1), shape=(3,), iterations=1, batch_size=2, gt="online",
                     progress=False, model_tag="t-first")


def test_models_flow_matching_calls_by_keyword_are_called_by_keyword():
    """flow_matching calls model(x=x, t=t, **extras): forward(t, x) and forward(*, x, t) work there, so here."""
    w = torch.tensor([[0.5, -1.0, 2.0]])

    def reference(x, t):
        return w * x + t.reshape(-1, 1)

    class TimeFirst(torch.nn.Module):
        def forward(self, t, x, scale=1.0):
            return scale * (w * x + t.reshape(-1, 1))

    def keyword_only(*, x, t, scale=1.0):
        return scale * (w * x + t.reshape(-1, 1))

    x0 = torch.randn(4, 3)
    expected = bx.sample(reference, x0, method="midpoint", nfe=8)
    for model in (TimeFirst(), keyword_only):
        assert bx.sample(model, x0, method="midpoint", nfe=8).equal(expected)
        assert bx.sample(model, x0, method="midpoint", nfe=8, scale=2.0).equal(
            bx.sample(lambda x, t: 2.0 * reference(x, t), x0, method="midpoint", nfe=8))
        assert torch.allclose(bx.sample(model, x0, method="dopri5"), bx.sample(reference, x0, method="dopri5"))
        log_p0 = lambda z: -0.5 * z.pow(2).sum(-1)   # noqa: E731
        assert bx.compute_likelihood(model, x0, log_p0, step_size=0.25)[1].equal(
            bx.compute_likelihood(reference, x0, log_p0, step_size=0.25)[1])
        solver = bx.train(model, bx.BespokeSolver(2, 1), shape=(3,), iterations=2, batch_size=4, gt="online",
                          progress=False, model_tag="keywords")
        assert torch.isfinite(bx.sample(model, x0, solver=solver)).all()
    # the original module is what identity sees; the wrapper is one per model, alive as long as it
    module = TimeFirst()
    from bespoke_ext.groundtruth.inputs import as_positional
    assert as_positional(module) is as_positional(module) and as_positional(reference) is reference

    assert bx.sample(lambda x, t: -x, torch.ones(2, 3), method="euler", nfe=1).equal(torch.zeros(2, 3))


def test_a_function_around_a_bf16_network_gets_the_reason_with_its_dtype_error():
    net = torch.nn.Linear(3, 3).bfloat16()
    for method in ("midpoint", "dopri5"):
        with pytest.raises(RuntimeError, match=r"reaches a network with torch.bfloat16 weights but is called with x in "
                                               r"torch.float32: pass the module itself"):
            bx.sample(lambda x, t: net(x), torch.randn(2, 3), method=method, **({"nfe": 4} if method == "midpoint" else {}))
    # cast inside the function, as the hint says: the state stays float32
    assert bx.sample(lambda x, t: net(x.bfloat16()).float(), torch.randn(2, 3), method="midpoint", nfe=4).dtype == torch.float32


def test_a_tensor_step_size_or_nfe_changed_in_place_is_read_anew():
    # a tensor hashes by identity: the memoised program must follow the value, not the object
    x0 = torch.randn(3, 2)
    step, nfe = torch.tensor(0.25), torch.tensor(4)
    bx.sample(field, x0, method="euler", step_size=step)
    bx.sample(field, x0, method="euler", nfe=nfe)
    step.fill_(0.5)
    nfe.fill_(8)
    _, stats = bx.sample(field, x0, method="euler", step_size=step, return_stats=True)
    assert stats.nfe == 2
    _, stats = bx.sample(field, x0, method="euler", nfe=nfe, return_stats=True)
    assert stats.nfe == 8


def test_model_inputs_named_x0_or_model_reach_the_model_when_the_leading_arguments_are_positional():
    """sample()'s model and x0 are positional-only: a model input named x0 (an image to edit, a
    reference) or model is an extra like any other; given by keyword, they are still the leading
    arguments, as before."""
    seen = []

    def net(x, t, x0=None, model=None):
        seen.append((x0, model))
        return -x if x0 is None else x0 - x

    noise, image = torch.randn(3, 2), torch.randn(3, 2)
    out = bx.sample(net, noise, x0=image, model="tag", method="euler", nfe=4)
    assert all(a is image and b == "tag" for a, b in seen)
    # dx/dt = image - x from noise: x(1) = image + (noise - image) (3/4)^4 with four Euler steps
    torch.testing.assert_close(out, image + (noise - image) * 0.75 ** 4)
    seen.clear()
    by_keyword = bx.sample(model=net, x0=noise, method="euler", nfe=4)
    assert seen and all(a is None and b is None for a, b in seen)
    torch.testing.assert_close(by_keyword, noise * 0.75 ** 4)
    torch.testing.assert_close(bx.sample(net, x0=noise, method="euler", nfe=4), by_keyword)
    with pytest.raises(TypeError, match="'x0'"):
        bx.sample(net, method="euler")
    with pytest.raises(TypeError, match="'model'"):
        bx.sample(x0=noise)


class _OutputBuffer:
    """A model writing every velocity into one preallocated tensor (from call ``fresh_calls`` on)."""

    def __init__(self, fresh_calls=0):
        self.calls, self.fresh_calls, self.buf = 0, fresh_calls, None

    def __call__(self, x, t):
        self.calls += 1
        v = torch.sin(x) * (1 + t)
        if self.calls <= self.fresh_calls:
            return v
        if self.buf is None:
            self.buf = torch.empty_like(v)
        return self.buf.copy_(v)


@pytest.mark.parametrize("fresh_calls", [0, 1])
def test_a_model_rewriting_one_output_tensor_is_refused_where_a_solver_still_needs_the_old_velocity(fresh_calls):
    """Heun / RK4 / learned solvers combine earlier velocities after later evaluations: an output buffer
    written over in place would silently corrupt them (flow_matching returns wrong numbers there). Euler and
    midpoint read each velocity before the next evaluation, so the same model runs there, exactly."""
    x = torch.randn(4, 3)
    fresh = lambda x, t: torch.sin(x) * (1 + t)
    for method in ("euler", "midpoint"):
        torch.testing.assert_close(bx.sample(_OutputBuffer(fresh_calls), x, method=method, nfe=4),
                                   bx.sample(fresh, x, method=method, nfe=4), rtol=0, atol=0)
    for method, nfe in (("heun", 4), ("rk4", 8)):
        with pytest.raises(ValueError, match="previous call, written over in place"):
            bx.sample(_OutputBuffer(fresh_calls), x, method=method, nfe=nfe)
    with pytest.raises(ValueError, match="written over in place"):  # a multistep member of the family
        bx.sample(_OutputBuffer(fresh_calls), x, solver=bx.NonStationarySolver(6))
    # a constant tensor returned again, never written, is harmless
    const = torch.randn(4, 3)
    torch.testing.assert_close(bx.sample(lambda x, t: const, x, method="rk4", nfe=8), x + const)


def test_adaptive_tolerances_finer_than_a_half_precision_state_are_named_as_the_cause():
    """dopri5 on a float16 state at the default 1e-5: the step control cannot get the error estimate below the
    state's rounding, so the step vanishes; the error says so instead of blaming a finite velocity."""
    x0 = torch.randn(4, 3).half()
    with pytest.raises(ValueError, match="float16 state resolves about 9.8e-04") as info:
        bx.sample(lambda x, t: torch.sin(x) * (1 + t), x0, method="dopri5")
    assert "not finite" not in str(info.value) and "x0.float()" in str(info.value)


@pytest.mark.parametrize("kind", ["rk4", "bespoke", "nonstationary"])
def test_sampling_under_inference_mode(kind):
    # inference tensors keep no version counter, which the rewritten-output check reads
    kw = {"rk4": dict(method="rk4", nfe=8), "bespoke": dict(solver=bx.BespokeSolver(4, 2)),
          "nonstationary": dict(solver=bx.NonStationarySolver(8, "midpoint"))}[kind]
    x0 = torch.randn(3, 3)
    want = bx.sample(field, x0, **kw)
    with torch.inference_mode():
        got = bx.sample(field, x0, **kw)
    assert torch.equal(got, want)


def test_a_compiled_function_calling_sample_or_the_likelihood_runs_them_eagerly():
    # Dynamo cannot trace sample()'s preparation (weakly keyed per-model caches): it raised inside the trace
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def forward(self, x, t):
            return torch.tanh(self.lin(x)) * (1 + t)

    net = Net()
    solver = bx.NonStationarySolver(6, "midpoint")
    x0 = torch.randn(5, 3)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: (bx.sample(net, x, method="midpoint", nfe=6), bx.sample(net, x, solver=solver)))
    with torch.no_grad():
        got = compiled(x0)
    assert torch.equal(got[0], bx.sample(net, x0, method="midpoint", nfe=6))
    assert torch.equal(got[1], bx.sample(net, x0, solver=solver))
    log_p0 = lambda x: -0.5 * x.pow(2).sum(1)
    compiled = torch.compile(lambda x: bx.compute_likelihood(net, x, log_p0, step_size=None, nfe=4, method="midpoint",
                                                             exact_divergence=True)[1])
    assert torch.equal(compiled(x0), bx.compute_likelihood(net, x0, log_p0, step_size=None, nfe=4, method="midpoint",
                                                           exact_divergence=True)[1])


def test_an_embedded_model_is_sampled_through_its_velocity_as_train_takes_it():
    from bespoke_ext.models.embedded import load_embedded

    m = load_embedded("moons2d")
    x0 = torch.randn(7, 2)
    assert torch.equal(bx.sample(m, x0, method="heun", nfe=4), bx.sample(m.velocity, x0, method="heun", nfe=4))
    x1 = bx.sample(m, x0, method="midpoint", nfe=4)
    got = bx.compute_likelihood(m, x1, lambda x: -0.5 * x.pow(2).sum(1), step_size=None, nfe=4, exact_divergence=True)
    want = bx.compute_likelihood(m.velocity, x1, lambda x: -0.5 * x.pow(2).sum(1), step_size=None, nfe=4,
                                 exact_divergence=True)
    assert torch.equal(got[1], want[1])
    with pytest.raises(TypeError, match="model must be callable"):
        bx.sample(object(), x0)
