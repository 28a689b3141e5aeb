"""sample(): agreement with flow_matching, NFE accounting, intermediates, gradients, input errors."""

from __future__ import annotations

import os

import pytest
import torch
from flow_matching.solver import ODESolver

from bespoke_ext.sampling import METHODS, SampleStats, sample
from bespoke_ext.solvers import BespokeSolver

F64 = torch.float64


class Field(torch.nn.Module):
    """A small nonlinear velocity model with a parameter, an optional extra and a call counter."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.7, -0.4, 1.1]))
        self.calls = 0

    def forward(self, x, t, scale=1.0, shift=None):
        self.calls += 1
        out = scale * (torch.sin(2 * x) * self.w * (1 + t) - x * t * t)
        return out if shift is None else out + shift


class GuidedField(Field):
    """Counts two network forwards per evaluation, as classifier-free guidance does."""

    def __init__(self):
        super().__init__()
        self.network_forwards = 0

    def forward(self, x, t, **extras):
        self.network_forwards += 2
        return super().forward(x, t, **extras)


@pytest.fixture
def x0():
    return torch.randn(64, 3, generator=torch.Generator().manual_seed(0))


def reference(model, x0, method, **kwargs):
    return ODESolver(model).sample(x_init=x0, method={"heun": "heun2"}.get(method, method), **kwargs)


# -- drop-in agreement with flow_matching ----------------------------------------------------------


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun", "rk4"])
@pytest.mark.parametrize("grid, step_size", [
    ([0.0, 1.0], 0.05),
    ([0.0, 1.0], 0.3),  # last step shortened
    ([0.0, 0.2, 0.55, 0.9, 1.0], None),
    ([0.0, 0.33, 0.5, 1.0], 0.1),  # intermediates interpolated inside steps
    ([1.0, 0.6, 0.0], 0.15),  # decreasing: solved backwards
])
def test_matches_flow_matching(x0, method, grid, step_size):
    model = Field()
    tg = torch.tensor(grid)
    kwargs = dict(step_size=step_size, time_grid=tg, scale=1.3, shift=0.1)
    got = sample(model, x0, method=method, return_intermediates=True, **kwargs)
    with torch.no_grad():
        expected = reference(model, x0, method, return_intermediates=True, **kwargs)
    assert got.shape == expected.shape == (len(grid), *x0.shape)
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=2e-6)
    final = sample(model, x0, method=method, **kwargs)
    torch.testing.assert_close(final, expected[-1], rtol=2e-6, atol=2e-6)


def test_default_is_one_euler_step_like_flow_matching(x0):
    model = Field()
    got, stats = sample(model, x0, return_stats=True)
    with torch.no_grad():
        expected = ODESolver(model).sample(x_init=x0, step_size=None)
    torch.testing.assert_close(got, expected)
    assert stats == SampleStats(nfe=1, network_forwards=1, steps=1, method="euler")


def test_dopri5_matches_flow_matching_and_counts_evaluations(x0):
    model = Field()
    tg = torch.tensor([0.0, 0.5, 1.0])
    got, stats = sample(model, x0, method="dopri5", time_grid=tg, return_intermediates=True,
                        atol=1e-6, rtol=1e-6, return_stats=True)
    calls = model.calls
    with torch.no_grad():
        expected = ODESolver(model).sample(x_init=x0, step_size=None, method="dopri5", time_grid=tg,
                                           return_intermediates=True, atol=1e-6, rtol=1e-6)
    # a drop-in: the same adaptive steps as flow_matching's, so the same numbers
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert stats.nfe == calls > 6 and stats.steps is None
    # and an accurate solve: against a float64 solve at 1e-12 with every step counted separately
    tight = sample(Field().double(), x0.double(), method="dopri5", time_grid=tg.double(), return_intermediates=True,
                   atol=1e-12, rtol=1e-12)
    assert (got.double() - tight).abs().max() < 2e-5


def test_float64_agrees_tightly(x0):
    """With float64 states and a float64 time grid both do all arithmetic in float64 (with the
    default float32 grid torchdiffeq rounds step lengths to float32, where this package does not)."""
    model = Field().double()
    tg = torch.tensor([0.0, 1.0], dtype=F64)
    got = sample(model, x0.double(), method="midpoint", step_size=0.1, time_grid=tg)
    with torch.no_grad():
        expected = reference(model, x0.double(), "midpoint", step_size=0.1, time_grid=tg)
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)


# -- NFE ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, nfe", [("euler", 7), ("midpoint", 20), ("heun", 8), ("rk4", 12), ("dpm++2m", 5)])
def test_nfe_is_exact(x0, method, nfe):
    model = Field()
    _, stats = sample(model, x0, method=method, nfe=nfe, return_stats=True)
    assert model.calls == nfe == stats.nfe == stats.network_forwards
    per_step = {"midpoint": 2, "heun": 2, "rk4": 4}.get(method, 1)
    assert stats.steps == nfe // per_step and stats.method == method


@pytest.mark.parametrize("method, nfe, hint", [("midpoint", 7, "6 or 8"), ("rk4", 10, "8 or 12"), ("rk4", 2, "4")])
def test_impossible_nfe_is_an_error(x0, method, nfe, hint):
    with pytest.raises(ValueError, match=f"multiple of .*nearest: {hint}.*nfe={nfe}"):
        sample(Field(), x0, method=method, nfe=nfe)


def test_network_forwards_follow_the_models_counter(x0):
    model = GuidedField()
    _, stats = sample(model, x0, method="midpoint", nfe=10, return_stats=True)
    assert stats.nfe == 10 and stats.network_forwards == 20 == model.network_forwards
    _, stats = sample(model, x0, solver=BespokeSolver(3, 2), return_stats=True)
    assert stats == SampleStats(nfe=6, network_forwards=12, steps=3, method="bespoke-rk2")


class PropertyCounted(Field):
    """A counter kept as a property (a class attribute), not an instance attribute."""

    def __init__(self):
        super().__init__()
        self.forwards = 0

    @property
    def network_forwards(self):
        return self.forwards

    def forward(self, x, t, **extras):
        self.forwards += 3
        return super().forward(x, t, **extras)


class Forwarding(torch.nn.Module):
    """A wrapper whose __getattr__ hands unknown names to the model it wraps."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def forward(self, x, t, **extras):
        return self.inner(x, t, **extras)


def test_network_forwards_read_from_properties_and_forwarding_wrappers(x0):
    _, stats = sample(PropertyCounted(), x0, method="euler", nfe=4, return_stats=True)
    assert stats.network_forwards == 12
    _, stats = sample(Forwarding(GuidedField()), x0, method="euler", nfe=4, return_stats=True)
    assert stats.network_forwards == 8
    _, stats = sample(Field(), x0, method="euler", nfe=4, return_stats=True)  # no counter: one per evaluation
    assert stats.network_forwards == 4


def test_module_device_is_the_first_parameter_or_buffer():
    from bespoke_ext.sampling.sample import _module_device

    deep = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(2, 2)))
    assert _module_device(deep) == next(deep.parameters()).device
    buffers_only = torch.nn.BatchNorm1d(2, affine=False)
    assert _module_device(torch.nn.Sequential(torch.nn.ReLU(), buffers_only)) == torch.device("cpu")
    assert _module_device(torch.nn.ReLU()) is None
    assert _module_device(torch.nn.Linear(2, 2, device="meta")) is None
    assert _module_device(lambda x, t: x) is None


def test_nfe_with_time_grid_interpolates_its_points(x0):
    model = Field()
    tg = torch.tensor([0.0, 0.3, 1.0])
    got = sample(model, x0, method="euler", nfe=4, time_grid=tg, return_intermediates=True)
    with torch.no_grad():
        expected = reference(model, x0, "euler", step_size=0.25, time_grid=tg, return_intermediates=True)
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=2e-6)


# -- Bespoke solvers through sample ----------------------------------------------------------------


@pytest.mark.parametrize("order, method", [(1, "euler"), (2, "midpoint")])
def test_identity_bespoke_samples_like_its_base(x0, order, method):
    model = Field()
    solver = BespokeSolver(10 if order == 2 else 20, order)
    got, stats = sample(model, x0, solver=solver, return_stats=True)
    expected = sample(model, x0, method=method, nfe=20)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        flow_matching = reference(model, x0, method, step_size=0.05 if order == 1 else 0.1)
    torch.testing.assert_close(got, flow_matching, rtol=2e-6, atol=2e-6)
    assert stats.nfe == 20


def test_solver_intermediates_are_at_its_times(x0):
    model = Field()
    solver = BespokeSolver(4, 2)
    with torch.no_grad():
        solver.time_logits.normal_(generator=torch.Generator().manual_seed(0))
    traj = sample(model, x0, solver=solver, return_intermediates=True)
    assert traj.shape == (5, *x0.shape)
    torch.testing.assert_close(traj[0], x0, rtol=0, atol=0)
    torch.testing.assert_close(traj[-1], sample(model, x0, solver=solver), rtol=0, atol=0)


def test_solver_changes_are_seen_by_the_next_call(x0):
    """Inference programs are memoised; any change of the raw parameters must invalidate them."""
    model = Field()
    solver = BespokeSolver(3, 2)
    first = sample(model, x0, solver=solver)
    solver.ds.data.add_(0.2)  # .data: not even autograd's version counter sees this
    second = sample(model, x0, solver=solver)
    fresh = BespokeSolver(3, 2)
    fresh.load_state_dict(solver.state_dict())
    assert not torch.equal(first, second)
    torch.testing.assert_close(second, sample(model, x0, solver=fresh), rtol=0, atol=0)


def test_gradients_reach_x0_model_and_solver(x0):
    model = Field()
    solver = BespokeSolver(3, 2)
    x = x0.clone().requires_grad_(True)
    out = sample(model, x, solver=solver, enable_grad=True)
    out.square().sum().backward()
    assert x.grad is not None and model.w.grad is not None
    assert all(p.grad is not None for p in solver.parameters())
    # x0's gradient agrees with flow_matching's autograd through the same midpoint steps.
    x_ref = x0.clone().requires_grad_(True)
    reference(Field(), x_ref, "midpoint", step_size=1 / 3, enable_grad=True).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


def test_inference_results_are_plain_tensors(x0):
    model = Field()
    out = sample(model, x0.requires_grad_(True), method="midpoint", nfe=4, return_intermediates=True)
    assert not out.requires_grad and not out.is_inference()
    (out * model.w).sum().backward()  # usable in later autograd code, like flow_matching's results
    assert model.w.grad is not None
    assert x0.grad is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_states(x0, dtype):
    model = lambda x, t: torch.sin(2 * x) * (1 + t) - x * t  # noqa: E731
    got = sample(model, x0.to(dtype), method="midpoint", nfe=10)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), sample(model, x0, method="midpoint", nfe=10), rtol=3e-2, atol=3e-2)


# -- input errors ---------------------------------------------------------------------------------


def test_model_output_is_checked_once(x0):
    with pytest.raises(ValueError, match=r"returned shape \(64, 2\); expected x's shape \(64, 3\)"):
        sample(lambda x, t: x[:, :2], x0, method="euler", nfe=2)
    # floating outputs of another dtype are cast (autocast, test_sampling_dropin.py); others are not
    with pytest.raises(ValueError, match="returned dtype torch.int64; expected x's dtype torch.float32"):
        sample(lambda x, t: x.long(), x0, method="midpoint", nfe=2)
    with pytest.raises(ValueError, match="returned dtype torch.int64; expected x's dtype torch.float32"):
        sample(lambda x, t: x.long(), x0, method="bosh3")
    with pytest.raises(ValueError, match=r"returned a tensor on meta; expected x's device cpu"):
        sample(lambda x, t: torch.empty_like(x, device="meta"), x0, method="heun3", nfe=3)
    with pytest.raises(TypeError, match="returned tuple"):
        sample(lambda x, t: (x,), x0, solver=BespokeSolver(2))
    with pytest.raises(ValueError, match="returned shape"):
        sample(lambda x, t: x[:1], x0, method="dopri5")


def test_a_bf16_module_samples_a_float32_state_in_its_own_dtype():
    # as bx.train calls it: the module in bf16, the state in float32 (a bf16 state rounds every step)
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)
            self.seen = []

        def forward(self, x, t):
            self.seen.append(x.dtype)
            return self.lin(torch.cat([x, torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0], 1)], 1))

    net = Net().bfloat16()
    x0 = torch.randn(64, 2)
    out, stats = sample(net, x0, method="midpoint", nfe=8, return_stats=True)
    assert out.dtype == torch.float32 and set(net.seen) == {torch.bfloat16} and stats.nfe == 8
    # the same arithmetic as casting by hand around each call
    want = sample(lambda x, t: net(x.bfloat16(), t).float(), x0, method="midpoint", nfe=8)
    assert torch.equal(out, want)
    assert sample(net, x0.bfloat16(), method="midpoint", nfe=8).dtype == torch.bfloat16
    assert sample(net, x0, solver=BespokeSolver(2, 2)).dtype == torch.float32
    assert sample(net, x0, method="dopri5").dtype == torch.float32


def test_a_later_output_of_another_dtype_is_named(x0):
    calls = []

    def changes(x, t):
        calls.append(1)
        return -x if len(calls) < 3 else (-x).double()

    with pytest.raises(ValueError, match="a model output changed during sampling: .* torch.float64 .* torch.float32"):
        sample(changes, x0, method="midpoint", nfe=6)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(method="rk45"), ValueError, "unknown method 'rk45'"),
    (dict(method="midpoint", nfe=4, step_size=0.1), ValueError, "nfe or step_size, not both"),
    (dict(method="euler", nfe=0), ValueError, "nfe must be a positive integer"),
    (dict(method="euler", nfe=2.0), ValueError, "nfe must be a positive integer"),
    (dict(method="euler", step_size=-0.1), ValueError, "step_size must be a positive"),
    (dict(method="euler", time_grid=[0.0, 0.5, 0.4, 1.0]), ValueError, "strictly increasing or strictly decreasing"),
    (dict(method="euler", time_grid=[0.0, 0.0, 1.0]), ValueError, "strictly increasing"),
    (dict(method="euler", time_grid=[0.0]), ValueError, "at least 2 points"),
    (dict(method="euler", time_grid=[0.0, float("nan")]), ValueError, "finite"),
    (dict(method="dopri5", nfe=10), ValueError, "adaptive"),
    (dict(method="dopri5", step_size=0.1), ValueError, "adaptive"),
    (dict(method="dopri5", atol=0.0), ValueError, "atol must be a positive"),
    (dict(method="dopri5", cuda_graph=True), ValueError, "adaptive"),
    (dict(method="euler", cuda_graph=True, enable_grad=True), ValueError, "inference-only"),
    (dict(method="dpm++2m", time_grid=[1.0, 0.0]), ValueError, "increase inside"),
    (dict(method="dpm++2m", time_grid=[0.0, 1.5]), ValueError, "increase inside"),
    (dict(solver=BespokeSolver(2), method="euler"), ValueError, "solver= or method=, not both"),
    (dict(solver=BespokeSolver(2), nfe=5), ValueError, "makes 4 model evaluations"),
    (dict(solver=BespokeSolver(2), time_grid=[0.0, 1.0]), ValueError, "fixes its own time grid"),
    (dict(solver=object()), TypeError, "learned solver"),
    (dict(solver=BespokeSolver(2).to("meta")), ValueError, "meta device"),
])
def test_bad_arguments(x0, kwargs, error, match):
    with pytest.raises(error, match=match):
        sample(Field(), x0, **kwargs)


def test_nfe_of_any_integer_type(x0):
    import numpy as np

    want = sample(Field(), x0, method="midpoint", nfe=4)
    for nfe in (np.int64(4), torch.tensor(4)):
        assert torch.equal(sample(Field(), x0, method="midpoint", nfe=nfe), want)
    with pytest.raises(ValueError, match="nfe must be a positive integer"):
        sample(Field(), x0, method="midpoint", nfe=True)


def test_bad_model_or_x0(x0):
    with pytest.raises(TypeError, match="model must be callable"):
        sample("model", x0)
    with pytest.raises(TypeError, match="x0 must be a tensor"):
        sample(Field(), [[0.0, 1.0, 2.0]])
    with pytest.raises(ValueError, match="floating-point"):
        sample(Field(), torch.ones(4, 3, dtype=torch.int64))


def test_devices_must_match():
    x_meta = torch.empty(4, 3, device="meta")
    with pytest.raises(ValueError, match="x0 is on meta but the model's parameters are on cpu"):
        sample(Field(), x_meta, method="euler")
    with pytest.raises(ValueError, match="solver is on cpu but x0 is on meta"):
        sample(lambda x, t: x, x_meta, solver=BespokeSolver(2))


def test_diverged_solver_is_refused(x0):
    solver = BespokeSolver(2)
    with torch.no_grad():
        solver.ds.fill_(float("nan"))
    with pytest.raises(ValueError, match="not finite"):
        sample(Field(), x0, solver=solver)


def test_methods_listed():
    assert set(METHODS) == {"euler", "midpoint", "heun", "heun3", "rk4", "dpm++2m", "dopri5", "dopri8", "bosh3",
                            "fehlberg2", "adaptive_heun", "scipy_solver", "explicit_adams", "implicit_adams",
                            "fixed_adams"}


# -- CUDA graphs ------------------------------------------------------------------------------------


class _RecordingGraph:
    """CPU stand-in for a captured CUDA graph: replay re-runs the captured function, which reads
    and writes the same static tensors a real graph would."""

    def __init__(self, fn):
        self.fn = fn
        self.replays = 0

    def replay(self):
        self.replays += 1
        self.fn()


def test_graph_replay_plumbing_on_cpu(monkeypatch):
    """Static inputs, tables, extras and outputs of the CUDA-graph path, with the capture replaced
    by a stand-in (the real capture runs in test_cuda_graph_replay_equals_eager on a GPU)."""
    from bespoke_ext.sampling import cuda_graph
    from bespoke_ext.sampling.executor import execute
    from bespoke_ext.sampling.sample import _fixed_program
    from bespoke_ext.solvers.tableaus import TABLEAUS, fixed_step_program
    from bespoke_ext.solvers.time_grid import record_plan, uniform_grid

    graphs = []
    monkeypatch.setattr(cuda_graph, "_on_side_stream", lambda fn, device: fn())
    monkeypatch.setattr(cuda_graph, "_capture", lambda fn: graphs.append(_RecordingGraph(fn)) or graphs[-1])
    cuda_graph.clear_cuda_graphs()
    model = Field().double()
    gen = torch.Generator().manual_seed(0)
    solver = BespokeSolver(3, 2)
    # Two rk4 programs of one structure (one graph) and a Bespoke one. Expected results come from
    # programs built afresh, so a graph writing into a cached program's tables would show.
    def rk4(end, cached=True):
        if cached:
            return _fixed_program("rk4", torch.tensor([0.0, end]), nfe=8, step_size=None, intermediates=True)
        grid = uniform_grid(0.0, end, 2)
        return fixed_step_program(TABLEAUS["rk4"], grid, record_plan(grid, torch.tensor([0.0, end])))

    def bespoke(cached=True):
        with torch.set_grad_enabled(not cached):  # with autograd on, nothing is memoised
            return solver.program()

    makers = [lambda cached=True: rk4(1.0, cached), lambda cached=True: rk4(0.5, cached), bespoke]
    for trial in range(3):
        x0 = torch.randn(16, 3, dtype=F64, generator=gen)
        extras = dict(shift=torch.full((3,), 0.1 * trial, dtype=F64), scale=1.5)
        with torch.no_grad():
            solver.ds.add_(0.2)  # new tables for the same structure
        for make in makers:
            final, traj, stats = cuda_graph.execute_graphed(make(), model, x0, extras)
            cached_final = execute(make(), model, x0, extras)[0]  # cached programs still intact?
            e_final, e_traj, e_stats = execute(make(cached=False), model, x0, extras)
            torch.testing.assert_close(final, e_final, rtol=0, atol=0)
            torch.testing.assert_close(cached_final, e_final, rtol=0, atol=0)
            if e_traj is not None:
                torch.testing.assert_close(traj, e_traj, rtol=0, atol=0)
            assert stats == e_stats
    assert len(graphs) == 2 and sum(g.replays for g in graphs) == 9  # rk4 (shared) and bespoke
    cuda_graph.clear_cuda_graphs()


class NestedField(Field):
    """Takes its extras nested, as pipelines pass them (a dict of tensors and values)."""

    def forward(self, x, t, cond):
        return super().forward(x, t, scale=cond["scale"], shift=cond["shift"][0])


def test_graph_extras_nested_changing_and_refused(monkeypatch):
    """Nested tensor extras are copied in on every replay (a changed value is seen), a changed
    non-tensor value captures anew, and extras a graph cannot hold are refused by name."""
    from bespoke_ext.sampling import cuda_graph
    from bespoke_ext.sampling.executor import execute

    graphs = []
    monkeypatch.setattr(cuda_graph, "_on_side_stream", lambda fn, device: fn())
    monkeypatch.setattr(cuda_graph, "_capture", lambda fn: graphs.append(_RecordingGraph(fn)) or graphs[-1])
    cuda_graph.clear_cuda_graphs()
    model, program = NestedField(), BespokeSolver(3, 2).program()
    x0 = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    for trial, scale in enumerate((1.0, 1.0, 2.0)):
        cond = {"scale": scale, "shift": [torch.full((3,), 0.3 * trial)]}
        final, _, _ = cuda_graph.execute_graphed(program, model, x0, {"cond": cond})
        torch.testing.assert_close(final, execute(program, model, x0, {"cond": cond})[0], rtol=0, atol=0)
    assert len(graphs) == 2 and [g.replays for g in graphs] == [2, 1]  # scale 2.0 is a new graph
    with pytest.raises(ValueError, match="unhashable"):
        cuda_graph.execute_graphed(program, model, x0, {"cond": {"scale": {1.0}, "shift": [torch.zeros(3)]}})
    cuda_graph.clear_cuda_graphs()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replay_equals_eager():
    model = Field().cuda()
    gen = torch.Generator(device="cuda").manual_seed(0)
    for kwargs in (dict(method="midpoint", nfe=8), dict(method="rk4", nfe=8, return_intermediates=True),
                   dict(solver=BespokeSolver(4, 2).cuda())):
        for trial in range(3):
            x0 = torch.randn(128, 3, device="cuda", generator=gen)
            shift = torch.full((3,), 0.1 * trial, device="cuda")
            if trial == 2 and "solver" in kwargs:
                with torch.no_grad():
                    kwargs["solver"].ds.add_(0.3)  # new coefficients: the same graph, new tables
            eager, s_eager = sample(model, x0, shift=shift, return_stats=True, **kwargs)
            graphed, s_graph = sample(model, x0, shift=shift, cuda_graph=True, return_stats=True, **kwargs)
            torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)
            assert s_graph == s_eager


@pytest.mark.cuda
def test_cuda_graph_memory_stays_its_own():
    """Sentinels allocated after capture (the sizes of the graph's buffers, as a caller's next x0
    would be) are not written by later replays; CPU tensor extras are refused, not baked in."""
    from bespoke_ext.sampling import cuda_graph

    cuda_graph.clear_cuda_graphs()
    model = Field().cuda()
    x0 = torch.randn(256, 3, device="cuda")
    first = sample(model, x0, method="rk4", nfe=8, cuda_graph=True)
    sentinels = [torch.full_like(x0, 7.0) for _ in range(16)]
    for _ in range(3):
        again = sample(model, x0, method="rk4", nfe=8, cuda_graph=True)
    torch.cuda.synchronize()
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert all(bool((s == 7.0).all()) for s in sentinels)
    with pytest.raises(ValueError, match="x0's device"):
        sample(model, x0, method="rk4", nfe=8, cuda_graph=True, shift=torch.zeros(3))
    cuda_graph.clear_cuda_graphs()


@pytest.mark.cuda
def test_cuda_graph_under_autocast_and_on_a_side_stream():
    model = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.GELU(), torch.nn.Linear(64, 3)).cuda()
    velocity = lambda x, t: model(x).float()  # noqa: E731  (autocast outputs cast back to the state's dtype)
    x0 = torch.randn(128, 3, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.autocast("cuda", dtype=torch.bfloat16):
        eager = sample(velocity, x0, method="midpoint", nfe=8)
        graphed = [sample(velocity, x0, method="midpoint", nfe=8, cuda_graph=True) for _ in range(3)]
    stream.synchronize()
    for g in graphed:
        torch.testing.assert_close(g, eager, rtol=2e-2, atol=2e-2)


# -- command line ----------------------------------------------------------------------------------


def test_sample_command_writes_samples(tmp_path):
    from safetensors import safe_open

    from bespoke_ext.cli import main

    from bespoke_ext.models import embedded

    assert "moons2d" in embedded.list_embedded()  # shipped with the package
    solver_file = tmp_path / "solver.safetensors"
    BespokeSolver(2, 2).save(solver_file, metadata={"model": "moons2d"})
    for extra, method, nfe in ((["--method", "euler", "--nfe", "3"], "euler", 3), (["--solver", str(solver_file)], "bespoke-rk2", 4)):
        out = tmp_path / f"{method}.safetensors"
        assert main(["sample", "moons2d", "-n", "5", "-o", str(out), *extra]) == 0
        with safe_open(str(out), "pt") as f:
            assert f.get_tensor("samples").shape == (5, 2)
            assert f.metadata()["method"] == method and f.metadata()["nfe"] == str(nfe)
        umask = os.umask(0)
        os.umask(umask)
        assert out.stat().st_mode & 0o777 == 0o666 & ~umask   # a file as any other the user makes, not owner-only


def test_sample_command_errors_are_one_line_and_a_foreign_solver_is_warned(tmp_path, capsys, monkeypatch):
    from bespoke_ext.cli import main
    from bespoke_ext.models.embedded import load_embedded
    from bespoke_ext.models.identity import model_tag

    not_a_solver = tmp_path / "notes.txt"
    not_a_solver.write_text("not a solver\n" * 20)
    assert main(["sample", "moons2d", "--solver", str(not_a_solver)]) == 1
    err = capsys.readouterr().err
    assert "bespoke-ext sample: error:" in err and "not a solver file" in err and "Traceback" not in err
    monkeypatch.setenv("BESPOKE_EXT_TRACEBACK", "1")
    with pytest.raises(ValueError, match="not a solver file"):
        main(["sample", "moons2d", "--solver", str(not_a_solver)])
    # a solver trained for another model samples, with a warning naming both identities
    foreign = BespokeSolver(2, 2)
    foreign.metadata["training"] = {"model_tag": "my_models.Other:0123456789abcdef"}
    path = tmp_path / "foreign.safetensors"
    foreign.save(path)
    assert main(["sample", "moons2d", "-n", "3", "--solver", str(path), "-o", str(tmp_path / "s.safetensors")]) == 0
    err = capsys.readouterr().err
    assert "trained for the model my_models.Other:0123456789abcdef" in err
    assert model_tag(load_embedded("moons2d").velocity) in err
    own = BespokeSolver(2, 2)
    own.metadata["training"] = {"model_tag": model_tag(load_embedded("moons2d").velocity)}
    own.save(path)
    assert main(["sample", "moons2d", "-n", "3", "--solver", str(path), "-o", str(tmp_path / "s.safetensors")]) == 0
    assert "warning" not in capsys.readouterr().err
    # where the file records the weights' sha256 (demo, bench, bespoke-ext train), the weights decide: a tag
    # from an older package version is no reason to warn, other weights are
    from bespoke_ext.models.embedded import read_card

    weights = read_card("moons2d")["weights"]["sha256"]
    for recorded, warned in ((weights, False), ("0" * 64, True)):
        own.metadata.update(model_weights_sha256=recorded, training={"model_tag": "bespoke_ext.old:0123456789abcdef"})
        own.save(path)
        assert main(["sample", "moons2d", "-n", "3", "--solver", str(path), "-o", str(tmp_path / "s.safetensors")]) == 0
        err = capsys.readouterr().err
        assert ("trained for the weights 0000000000000000..." in err) is warned and ("warning" in err) is warned


def test_program_builder_refuses_evaluations_into_buffers_and_combinations_into_velocities():
    # model outputs are rebound to their slots, combinations write preallocated buffers in place (and a
    # captured CUDA graph keeps writing them): a program mixing the two would lose a buffer mid-run
    from bespoke_ext.program import ProgramBuilder

    b = ProgramBuilder("check")
    y, u = b.buffer(), b.velocity()
    with pytest.raises(ValueError, match="not a velocity slot"):
        b.eval(y, b.input, 0.0)
    with pytest.raises(ValueError, match="not a velocity slot"):
        b.eval(b.input, b.input, 0.0)
    with pytest.raises(ValueError, match="not a buffer slot"):
        b.combine(u, (b.input,), [1.0])
    b.eval(u, b.input, 0.0)
    b.combine(y, (b.input, u), [1.0, 0.5])
    program = b.build(output=y)
    assert program.nfe == 1 and program.buffers == (y,)


def test_sample_command_step_options_follow_the_method_kind(tmp_path, capsys):
    # --nfe for fixed-step methods, --tol for adaptive ones, --step-size for multistep ones: every listed
    # method runs (bosh3 failed with "drop nfe=10" although no --nfe was given)
    from safetensors import safe_open

    from bespoke_ext.cli import main

    for extra, method in ((["--method", "bosh3", "--tol", "1e-4"], "bosh3"), (["--method", "dopri5"], "dopri5"),
                          (["--method", "explicit_adams", "--step-size", "0.25"], "explicit_adams"),
                          (["--method", "fixed_adams"], "fixed_adams")):
        out = tmp_path / "new" / f"{method}.safetensors"  # a folder that does not exist yet is made first
        assert main(["sample", "moons2d", "-n", "3", "-o", str(out), *extra]) == 0, capsys.readouterr().err
        with safe_open(str(out), "pt") as f:
            assert f.get_tensor("samples").shape == (3, 2) and f.metadata()["method"] == method
    for extra, message in ((["--method", "dopri5", "--nfe", "4"], "--nfe does not apply to --method dopri5"),
                           (["--method", "euler", "--tol", "1e-3"], "--tol does not apply to --method euler"),
                           (["--method", "bosh3", "--step-size", "0.1"], "it takes --tol"),
                           (["--shape", "2,x"], "--shape must be sizes"),
                           (["--shape", "2,,"], "--shape must be sizes")):
        assert main(["sample", "moons2d", "-n", "3", "-o", str(tmp_path / "x.safetensors"), *extra]) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    if not torch.cuda.is_available():
        assert main(["sample", "moons2d", "-n", "3", "--device", "cuda"]) == 1
        assert "sees no CUDA device" in capsys.readouterr().err


def test_a_module_is_called_in_the_dtype_of_most_of_its_weights():
    # diffusers keeps a few modules in float32 around a bf16 body: the first parameter said float32, the
    # body then got float32 x and failed; a float32 network with a small bf16 table was called in bf16
    from bespoke_ext.groundtruth.inputs import model_call_dtype

    class Mixed(torch.nn.Module):
        def __init__(self, small, body):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(1, dtype=small))      # registered first
            self.body = torch.nn.Linear(2, 2).to(body)
            self.more = torch.nn.Linear(2, 64).to(body)

        def forward(self, x, t):
            return self.body(x) * self.scale.to(x.dtype)

    bf16_body = Mixed(torch.float32, torch.bfloat16)
    assert model_call_dtype(bf16_body) == torch.bfloat16
    assert model_call_dtype(Mixed(torch.bfloat16, torch.float32)) is None
    x1 = sample(bf16_body, torch.randn(4, 2), method="euler", nfe=2)
    assert x1.dtype == torch.float32 and torch.isfinite(x1).all()
    bf16_body.float()  # the remembered answer follows the module's conversion
    assert model_call_dtype(bf16_body) is None
    assert model_call_dtype(bf16_body.to(torch.float16)) == torch.float16


def test_a_lazy_module_samples():
    # uninitialised (lazy) parameters have no elements to count yet: the call dtype ignores them
    class Lazy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.LazyLinear(2)

        def forward(self, x, t):
            return self.lin(x)

    assert sample(Lazy(), torch.randn(3, 2), method="euler", nfe=2).shape == (3, 2)
