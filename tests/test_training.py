"""Tests for bespoke_ext.training: the bound loss against a slow reference, gradients against finite
differences, the identity solver against the base methods' local errors, and training itself."""

import warnings

import numpy as np
import pytest
import torch

import bespoke_ext as bx
from bespoke_ext.groundtruth import CacheSpec, TrajectoryCache, build_cache, fine_grid, online_states
from bespoke_ext.models.identity import model_tag
from bespoke_ext.metrics import per_sample_rms, psnr, rmse
from bespoke_ext.models.oracle import GaussianMixtureFlow
from bespoke_ext.solvers import BespokeSolver
from bespoke_ext.training import (
    TrainOptions,
    ValidationSet,
    bound_loss,
    end_to_end_loss,
    lipschitz_weights,
    solver_table,
    train,
)
from bespoke_ext.training.batches import derive_seed
from bespoke_ext.training.distributed import DistContext

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py; so is the ``mixture`` factory


def perturbed(steps, order, scale=0.3, seed=0):
    """A solver away from the identity (every raw parameter moved), so all terms of the loss matter."""
    s = BespokeSolver(steps, order)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in s.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return s


@pytest.fixture(scope="module")
def cache(tmp_path_factory, mixture):
    m = mixture()
    spec = CacheSpec(model_tag=model_tag(m), shape=(4,), dtype="float64", rtol=1e-9, atol=1e-9,
                     grid=tuple(fine_grid(64).tolist()), num_samples=8, shard_size=8, seed=1)
    d = tmp_path_factory.mktemp("gt")
    build_cache(m, d, spec, progress=False)
    return m, TrajectoryCache(d, expect=spec)


# ------------------------------------------------------------------------------ slow reference

def reference_bound_loss(model, solver, states, L_tau):
    """method.md §3 and §5 written out step by step from grid(): plain torch, no fused ops, no batching
    over steps. ``states`` [n+1, B, D] is the ground truth at the solver's times."""
    g = solver.grid()
    n, h = solver.steps, 1.0 / solver.steps
    b = states.shape[1]
    u = lambda x, t: model(x, t.expand(b))
    d, L = [], []
    for i in range(n):
        x = states[i]
        u1 = u(x, g.t[i])
        if solver.order == 1:
            nxt = ((g.s[i] + h * g.ds[i]) / g.s[i + 1]) * x + (h * g.dt[i] * g.s[i] / g.s[i + 1]) * u1
            lbar = g.ds[i].abs() / g.s[i] + g.dt[i] * L_tau
            L.append(g.s[i] / g.s[i + 1] * (1 + h * lbar))
        else:
            xm = ((g.s[i] + h / 2 * g.ds[i]) / g.sm[i]) * x + (h / 2 * g.dt[i] * g.s[i] / g.sm[i]) * u1
            u2 = u(xm, g.tm[i])
            nxt = (g.s[i] / g.s[i + 1]) * x + (h * g.dsm[i] / g.s[i + 1]) * xm + (h * g.dtm[i] * g.sm[i] / g.s[i + 1]) * u2
            lbar_i = g.ds[i].abs() / g.s[i] + g.dt[i] * L_tau
            lbar_m = g.dsm[i].abs() / g.sm[i] + g.dtm[i] * L_tau
            L.append(g.s[i] / g.s[i + 1] * (1 + h * lbar_m * (1 + h / 2 * lbar_i)))
        d.append((nxt - states[i + 1]).pow(2).mean(dim=1).sqrt())          # per-sample RMS
    total = 0
    for i in range(n):
        M = 1.0
        for j in range(i + 1, n):
            M = M * L[j]
        total = total + M * d[i]
    return total.mean()


@pytest.mark.parametrize("order", [1, 2])
def test_bound_loss_equals_slow_reference(cache, order):
    m, c = cache
    solver = perturbed(4, order, seed=order)
    idx = torch.arange(8)
    table = solver_table(solver, L_tau=0.7)
    fast = bound_loss(m, table, c.states(idx, table.times), chunk_size=5)
    slow = reference_bound_loss(m, solver, c.states(idx, solver.grid().t.detach()), L_tau=0.7)
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-12, atol=0)


def test_lipschitz_weights_are_reversed_products():
    L = torch.tensor([2.0, 3.0, 5.0, 7.0], dtype=F64)
    torch.testing.assert_close(lipschitz_weights(L), torch.tensor([105.0, 35.0, 7.0, 1.0], dtype=F64))


# ------------------------------------------------------------------------------ gradients

def loss_of_params(model, solver, flat, c, idx, L_tau, loss="bound"):
    """The loss as a function of a flat parameter vector (ground truth re-read at the new times)."""
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(flat, solver.parameters())
    table = solver_table(solver, L_tau=L_tau)
    if loss == "bound":
        return float(bound_loss(model, table, c.states(idx, table.times)).detach())
    x0, x1 = c.endpoints(idx)
    return float(end_to_end_loss(model, solver, x0, x1).detach())


@pytest.mark.parametrize("order,loss", [(1, "bound"), (2, "bound"), (2, "end_to_end")])
def test_gradients_match_finite_differences(cache, order, loss):
    # Through everything: coefficients, model time inputs, x_m, the weights M_i and the Hermite
    # ground truth at the learnable times. Chunked backward (chunk_size 3) exercises the two-stage path.
    m, c = cache
    solver = perturbed(3, order, scale=0.2, seed=10 + order)
    idx = torch.tensor([0, 2, 3, 6, 7])
    table = solver_table(solver, L_tau=1.0 if loss == "bound" else None)
    solver.zero_grad()
    if loss == "bound":
        bound_loss(m, table, c.states(idx, table.times), chunk_size=3, backward=True)
    else:
        x0, x1 = c.endpoints(idx)
        end_to_end_loss(m, solver, x0, x1, chunk_size=3, backward=True)   # one sample per chunk
    grad = torch.cat([p.grad.reshape(-1) for p in solver.parameters()])
    theta = torch.nn.utils.parameters_to_vector(solver.parameters()).detach().clone()
    eps = 1e-6
    fd = torch.zeros_like(theta)
    for k in range(theta.numel()):
        e = torch.zeros_like(theta)
        e[k] = eps
        fd[k] = (loss_of_params(m, solver, theta + e, c, idx, 1.0, loss)
                 - loss_of_params(m, solver, theta - e, c, idx, 1.0, loss)) / (2 * eps)
    torch.testing.assert_close(grad, fd, rtol=2e-5, atol=2e-8)


def test_online_gradient_matches_finite_differences_of_exact_solves(mixture):
    # x_aux: the time gradient of the online ground truth is the true derivative dx/dt = u; finite
    # differences of tightly solved trajectories (rtol 1e-11) agree.
    m = mixture(dim=2, std=0.3, seed=4)
    solver = perturbed(2, 1, scale=0.2, seed=5)
    x0 = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    tol = dict(rtol=1e-11, atol=1e-11)

    def loss_at(flat):
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(flat, solver.parameters())
        table = solver_table(solver, L_tau=1.0)
        return bound_loss(m, table, online_states(m, x0, table.times, **tol))

    theta = torch.nn.utils.parameters_to_vector(solver.parameters()).detach().clone()
    solver.zero_grad()
    loss_at(theta).backward()
    grad = torch.cat([p.grad.reshape(-1) for p in solver.parameters()])
    eps = 1e-5
    fd = torch.tensor([(float(loss_at(theta + eps * e).detach()) - float(loss_at(theta - eps * e).detach())) / (2 * eps)
                       for e in torch.eye(theta.numel(), dtype=F64)], dtype=F64)
    torch.testing.assert_close(grad, fd, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------ identity solver

@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("L_tau", [0.0, 1.0])
def test_identity_loss_is_base_method_local_errors(order, L_tau, mixture):
    # A fresh solver is plain Euler / midpoint: its loss is their local errors measured from ground truth
    # on the uniform grid, weighted by M_i = L^(n-1-i) with L = 1 + h L_tau (Euler) or
    # 1 + h L_tau (1 + h L_tau / 2) (midpoint).
    m = mixture(dim=3, std=0.2, seed=2)
    n, h = 4, 0.25
    x0 = torch.randn(6, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    grid = torch.linspace(0, 1, n + 1, dtype=F64)
    gt = online_states(m, x0, grid, rtol=1e-10, atol=1e-10)
    solver = BespokeSolver(n, order)
    table = solver_table(solver, L_tau=L_tau)
    torch.testing.assert_close(table.times.detach(), grid, rtol=0, atol=1e-15)
    loss = bound_loss(m, table, gt)
    L = 1 + h * L_tau if order == 1 else 1 + h * L_tau * (1 + h / 2 * L_tau)
    expected = 0
    for i in range(n):
        x, t = gt[i], grid[i].expand(6)
        step = x + h * m(x, t) if order == 1 else x + h * m(x + h / 2 * m(x, t), t + h / 2)
        expected = expected + L ** (n - 1 - i) * (step - gt[i + 1]).pow(2).mean(1).sqrt()
    torch.testing.assert_close(loss.detach(), expected.mean(), rtol=1e-12, atol=0)


def test_identity_samples_like_midpoint_and_e2e_loss_is_its_error(mixture):
    m = mixture(dim=3, std=0.2, seed=2)
    x0 = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    solver = BespokeSolver(3, 2)
    x = x0.clone()
    for i in range(3):
        t = torch.tensor(i / 3, dtype=F64).expand(5)
        x = x + (1 / 3) * m(x + (1 / 6) * m(x, t), t + 1 / 6)
    torch.testing.assert_close(bx.sample(m, x0, solver=solver), x, rtol=1e-13, atol=1e-13)
    x1 = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(end_to_end_loss(m, solver, x0, x1).detach(),
                               (x - x1).pow(2).mean(1).sqrt().mean(), rtol=1e-12, atol=0)


def test_end_to_end_loss_and_validation_run_the_sampler(mixture):
    # What keep-best selects by is what users get: validation's per-sample errors are those of
    # bx.sample (float32 states, 0-dim times) to the last bit, and so is the end-to-end loss.
    m = mixture(dim=4, std=0.15, seed=0)
    solver = perturbed(3, 2, seed=7)
    val = ValidationSet(m, (4,), size=24, seed=5, dtype=torch.float32, device=torch.device("cpu"), rtol=1e-6,
                        atol=1e-6, group_size=24, extras={}, ctx=DistContext())
    assert val.x0.dtype == torch.float32 and val.x1.dtype == torch.float32
    sampled = bx.sample(m, val.x0, solver=solver)
    want = per_sample_rms(sampled - val.x1)
    got = val.per_sample_errors(m, solver, extras={}, chunk_size=64)
    assert torch.equal(got, want), f"validation differs from bx.sample by {float((got - want).abs().max()):.3g}"
    chunked = val.per_sample_errors(m, solver, extras={}, chunk_size=5)
    torch.testing.assert_close(chunked, want, rtol=1e-6, atol=0)
    v_rmse, v_psnr = val.evaluate(m, solver, extras={}, chunk_size=64)
    assert v_rmse == pytest.approx(rmse(sampled, val.x1), rel=1e-12)
    assert v_psnr == pytest.approx(psnr(sampled, val.x1), rel=1e-12)
    loss = end_to_end_loss(m, solver, val.x0, val.x1)
    assert float(loss.detach()) == float(want.mean()), (float(loss.detach()), float(want.mean()))
    assert loss.requires_grad   # differentiable in theta through the program's tables
    with pytest.raises(TypeError, match="SolverTable serves the bound loss only"):
        val.per_sample_errors(m, solver_table(solver), extras={}, chunk_size=64)


def test_end_to_end_chunking_does_not_change_the_gradient(mixture):
    m = mixture(dim=4, std=0.15, seed=0)
    solver = perturbed(3, 2, seed=8)
    x0 = torch.randn(10, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    x1 = torch.randn(10, 4, dtype=F64, generator=torch.Generator().manual_seed(2))
    grads, values = [], []
    for chunk_size in (6, 16384):   # 2 samples per chunk (3 steps each) vs one chunk
        solver.zero_grad()
        values.append(float(end_to_end_loss(m, solver, x0, x1, chunk_size=chunk_size, backward=True)))
        grads.append(torch.cat([p.grad.reshape(-1) for p in solver.parameters()]))
    assert float(grads[1].abs().max()) > 1e-3, "no gradient reached theta"
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-15)
    assert values[0] == pytest.approx(values[1], rel=1e-13)



def test_gradient_checkpointing_keeps_the_gradient_and_drops_the_activations():
    """Recomputed evaluations: the same log-MSE gradient of a non-stationary solver (bitwise on the CPU),
    with only the rollout's inputs saved for backward instead of every evaluation's activations."""
    from bespoke_ext.models.nets import MLPVelocity
    from bespoke_ext.training.loss import Recomputed

    torch.manual_seed(0)
    net = MLPVelocity(dim=4, hidden=64).double().requires_grad_(False)
    x0 = torch.randn(6, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    x1 = torch.randn(6, 4, dtype=F64, generator=torch.Generator().manual_seed(2))
    grads, saved = [], []
    for model in (net, Recomputed(net)):
        solver = bx.NonStationarySolver(5, "euler")
        count = [0]

        def pack(t, count=count):
            count[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = end_to_end_loss(model, solver, x0, x1, objective="log_mse")
        loss.backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in solver.parameters()]))
        saved.append(count[0])
    assert float(grads[0].abs().max()) > 1e-3
    assert torch.equal(grads[0], grads[1])
    assert saved[1] < saved[0] / 3, saved
    with torch.no_grad():
        assert Recomputed(net)(x0, torch.tensor(0.5, dtype=F64)).equal(net(x0, torch.tensor(0.5, dtype=F64)))
    trained = [train(net, bx.NonStationarySolver(4), shape=(4,), iterations=3, batch_size=4, loss="log_mse",
                     gt="online", val_size=4, val_every=3, keep_best=False, progress=False,
                     gradient_checkpointing=flag)
               for flag in (False, True)]
    assert torch.equal(trained[0].b_delta, trained[1].b_delta) and float(trained[0].b_delta.detach().abs().max()) > 0
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        train(net, BespokeSolver(2, 2), shape=(4,), iterations=1, batch_size=2, gradient_checkpointing=True)


# ------------------------------------------------------------------------------ training

MIX8 = dict(dim=8, components=6, std=0.05, seed=3)


def base_method(order):
    return "midpoint" if order == 2 else "euler"


def validation_noise(model, size, seed=0, dtype=F64):
    """The validation set train() draws for ``seed`` (same stream, tolerances and grouping)."""
    o = TrainOptions()
    return ValidationSet(model, (model.dim,), size=size, seed=derive_seed(seed, "validation"), dtype=dtype,
                         device=torch.device("cpu"), rtol=o.gt_rtol, atol=o.gt_atol, group_size=o.gt_group_size,
                         extras={}, ctx=DistContext())


@pytest.mark.parametrize("order,steps,ratio", [(2, 3, 0.6), (1, 6, 0.75)])
def test_training_on_mixture_oracle_beats_base_method_on_fresh_noise(tmp_path, order, steps, ratio):
    # 40 iterations only (a test); benchmarks/bench_training.py measures full runs.
    m = GaussianMixtureFlow.random(**MIX8)
    solver = train(m, BespokeSolver(steps, order), shape=(8,), iterations=40, batch_size=32, seed=0, lr=1e-2,
                   cache_dir=str(tmp_path / "gt"), cache_samples=128, cache_shard_size=64, val_size=64,
                   val_every=10, progress=False, dtype=F64)
    h = solver.history
    assert h.val_iteration == [0, 10, 20, 30, 40] and len(h.loss) == 40
    assert h.best_rmse < ratio * h.base_rmse, (h.base_rmse, h.val_rmse)
    assert solver.metadata["training"]["best_val_rmse"] == h.best_rmse
    # Held-out noise from a stream training never saw, ground truth by a tight dopri5, every solver run by
    # bx.sample: the trained solver beats its base method at the same NFE there too.
    x0 = torch.randn(256, 8, dtype=F64, generator=torch.Generator().manual_seed(2024))
    gt = bx.sample(m, x0, method="dopri5", atol=1e-10, rtol=1e-10)
    base = rmse(bx.sample(m, x0, method=base_method(order), nfe=solver.nfe), gt)
    trained = rmse(bx.sample(m, x0, solver=solver), gt)
    assert trained < ratio * base, f"fresh noise: trained RMSE {trained:.4g} vs {base_method(order)} {base:.4g}"


def test_keep_best_returns_the_solver_of_the_best_validation():
    # lr 0.1 overshoots: the best validation (iteration 10) is not the last, so keep-best has something to
    # select. The returned solvers are re-validated by bx.sample on the validation noise itself.
    m = GaussianMixtureFlow.random(**MIX8)
    kw = dict(shape=(8,), iterations=20, batch_size=16, seed=0, lr=0.1, gt="online", val_size=32, val_every=5,
              progress=False, dtype=F64)
    best = train(m, BespokeSolver(3, 2), **kw)
    last = train(m, BespokeSolver(3, 2), keep_best=False, **kw)
    h = best.history
    assert h.val_rmse == last.history.val_rmse, "the two runs must be the same run"
    assert h.best_iteration < h.val_iteration[-1] and h.best_rmse < h.val_rmse[-1], \
        f"this run no longer overshoots (validation RMSE {h.val_rmse}): the test needs one that does"
    val = validation_noise(m, 32)
    assert rmse(bx.sample(m, val.x0, solver=best), val.x1) == pytest.approx(h.best_rmse, rel=1e-12)
    assert rmse(bx.sample(m, val.x0, solver=last), val.x1) == pytest.approx(h.val_rmse[-1], rel=1e-12)


def test_end_to_end_fine_tuning_improves_on_its_start(tmp_path, mixture):
    m = mixture(dim=4, std=0.1, seed=6)
    solver = train(m, BespokeSolver(2, 2), shape=(4,), iterations=6, batch_size=8, gt="online", val_size=16,
                   val_every=3, progress=False, dtype=F64)
    assert solver.history.val_iteration == [0, 3, 6] and solver.history.gt_seconds > 0
    start = solver.history.best_rmse
    solver = train(m, solver, shape=(4,), iterations=20, batch_size=16, loss="end_to_end", lr=1e-2,
                   cache_dir=str(tmp_path / "gt"), cache_samples=64, val_size=16, val_every=5, progress=False,
                   dtype=F64)
    h = solver.history
    assert h.base_rmse == pytest.approx(start, rel=1e-12)   # the same validation set, the same start
    assert h.best_rmse < 0.9 * h.base_rmse, f"end-to-end fine-tuning did not improve: {h.val_rmse}"
    assert h.lr[0] == pytest.approx(1e-2) and h.lr[-1] == pytest.approx(5e-4)   # cosine to 5%


def test_model_weights_frozen_during_training_and_restored():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x, t):
            t = t.expand(x.shape[0]) if t.dim() == 0 else t   # 0-dim when sampling, [B] in the bound loss
            return self.net(torch.cat([x, t[:, None]], dim=1))

    model = Net().train()
    before = [p.detach().clone() for p in model.parameters()]
    solver = train(model, BespokeSolver(2, 1), shape=(2,), iterations=30, batch_size=16, gt="online", val_size=32,
                   val_every=10, lr=3e-2, progress=False)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert model.training
    h = solver.history
    assert h.best_rmse < 0.9 * h.base_rmse, f"the solver did not learn: validation RMSE {h.val_rmse}"


def test_plain_function_networks_frozen_too(tmp_path):
    # a function around a network (in a closure and as a global it reads) and a raw weight tensor: none
    # collects the gradients of any loss, each keeps its own requires_grad and mode, and the states take
    # the network's dtype (float64 here) as a module's would
    with torch.random.fork_rng():
        torch.manual_seed(0)
        inner = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 2)).double()
        scale = torch.ones(2, dtype=F64, requires_grad=True)
    inner.train()
    inner[1].eval()   # a submodule's own mode survives the run

    def make(net):
        def field(x, t):
            assert x.dtype == F64 and not net.training   # eval: dropout would make the field random
            t = t.expand(x.shape[0]) if t.dim() == 0 else t
            return net(torch.cat([x, t[:, None]], dim=1)) * scale
        return field

    for loss in ("bound", "end_to_end", "log_mse"):
        train(make(inner), BespokeSolver(2, 1), shape=(2,), iterations=3, batch_size=8, loss=loss, val_size=4,
              cache_samples=16, cache_dir=str(tmp_path / loss), progress=False)
        assert all(p.grad is None and p.requires_grad for p in inner.parameters()), loss
        assert scale.grad is None and scale.requires_grad, loss
        assert inner.training and inner[0].training and not inner[1].training, loss


def test_an_object_holding_its_solver_and_a_bigger_float32_net_trains_that_solver(tmp_path):
    # train(flow.velocity, flow.solver): the bound method's object reaches the solver too, which must keep its
    # gradients (it trained nothing), and the states follow the network (the biggest module), not the
    # float64 solver reached first
    class Flow:
        def __init__(self):
            with torch.random.fork_rng():
                torch.manual_seed(0)
                self.solver = BespokeSolver(2, 1)
                self.net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))

        def velocity(self, x, t):
            assert x.dtype == torch.float32
            t = t.expand(x.shape[0]) if t.dim() == 0 else t
            return self.net(torch.cat([x, t[:, None]], 1))

    flow = Flow()
    before = [p.detach().clone() for p in flow.solver.parameters()]
    out = train(flow.velocity, flow.solver, shape=(2,), iterations=5, batch_size=8, val_size=4, cache_samples=16,
                cache_dir=str(tmp_path), progress=False, lr=1e-2)
    assert any(not torch.equal(a, b) for a, b in zip(before, out.parameters()))
    assert all(p.requires_grad for p in flow.solver.parameters()) and all(p.grad is None for p in flow.net.parameters())


def test_modes_are_restored_through_each_modules_train():
    # a module whose train() does work (loralib merges an adapter in eval() and unmerges it in train()) is
    # left consistent: its mode restored by train(mode), not by setting .training
    class Merging(torch.nn.Linear):
        def __init__(self):
            super().__init__(3, 2)
            self.merged = False

        def train(self, mode=True):
            super().train(mode)
            self.merged = not mode
            return self

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = Merging()

        def forward(self, x, t):
            t = t.expand(x.shape[0]) if t.dim() == 0 else t
            return self.lin(torch.cat([x, t[:, None]], 1))

    net = Net().train()
    train(net, BespokeSolver(2, 1), shape=(2,), iterations=2, batch_size=8, val_size=4, cache_samples=16,
          gt="online", progress=False)
    assert net.lin.training and not net.lin.merged


def test_options_are_checked_with_clear_errors(mixture):
    m, s = mixture(), BespokeSolver(2, 1)
    with pytest.raises(TypeError, match="unknown option"):
        train(m, s, shape=(4,), iterations=1, batch_size=2, learning_rate=1)
    with pytest.raises(ValueError, match="gt must be one of"):
        train(m, s, shape=(4,), iterations=1, batch_size=2, gt="exact")
    with pytest.raises(ValueError, match="gt_rtol"):
        train(m, s, shape=(4,), iterations=1, batch_size=2, gt_rtol=1e-3)
    with pytest.raises(ValueError, match="batch_size"):
        train(m, s, shape=(4,), iterations=1, batch_size=0)
    with pytest.raises(ValueError, match="shape"):
        train(m, s, shape=(), iterations=1, batch_size=2)
    with pytest.raises(ValueError, match="shape must be a sequence of positive integers"):
        train(m, s, shape=(2.5,), iterations=1, batch_size=2)
    with pytest.raises(ValueError, match="iterations must be an integer >= 0, got 2.5"):
        train(m, s, shape=(4,), iterations=2.5, batch_size=2)
    # Counts of any integer kind (numpy, a 0-dim tensor; from a config or an array) are counts.
    done = train(m, BespokeSolver(np.int64(2), np.int64(1)), shape=(np.int64(4),), iterations=np.int64(1),
                 batch_size=torch.tensor(2), seed=np.int32(3), gt="online", val_size=2, progress=False)
    assert (done.steps, done.order, done.history.iterations) == (2, 1, 1) and type(done.steps) is int
    bad_device = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ValueError, match="no CUDA device|CUDA device\\(s\\) are visible"):
        train(m, s, shape=(4,), iterations=1, batch_size=2, device=bad_device)
    with pytest.raises(ValueError, match="device must be a torch device or its name.*'gpu'"):
        train(m, s, shape=(4,), iterations=1, batch_size=2, device="gpu")
    for name in ("keep_best", "progress"):
        with pytest.raises(ValueError, match=f"{name} must be True or False, got 'no'"):
            train(m, s, shape=(4,), iterations=1, batch_size=2, **{name: "no"})
    with pytest.raises(TypeError, match="BespokeSolver"):
        train(m, object(), shape=(4,), iterations=1, batch_size=2)
    with pytest.raises(ValueError, match="max_nonfinite_steps"):
        train(m, s, shape=(4,), iterations=1, batch_size=2, max_nonfinite_steps=0)
    assert TrainOptions().schedule == "constant" and TrainOptions(loss="end_to_end").clip == 1.0


# ------------------------------------------------------------------------------ command line

def test_cli_train_with_module_factory_writes_solver_and_curve(tmp_path, monkeypatch):
    import argparse

    from bespoke_ext.cli.train import add_train_arguments, run_train

    (tmp_path / "my_flow_models.py").write_text(
        "from bespoke_ext.models.oracle import GaussianMixtureFlow\n"
        "def make():\n    return GaussianMixtureFlow.random(dim=3, components=4, std=0.2, seed=0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    parser = add_train_arguments(argparse.ArgumentParser())
    out = tmp_path / "solver.safetensors"
    args = parser.parse_args(["my_flow_models:make", "--shape", "3", "--steps", "2", "--order", "1", "--iterations", "4",
                              "--batch-size", "8", "--val-size", "8", "--val-every", "2", "--cache-samples", "16",
                              "--cache-dir", str(tmp_path / "gt"), "-o", str(out), "--no-progress"])
    assert run_train(args) == 0
    solver = BespokeSolver.load(out)
    assert solver.order == 1 and solver.steps == 2 and solver.metadata["model"] == "my_flow_models:make"
    assert solver.metadata["training"]["iterations"] == 4
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "model_weights_sha256" not in solver.metadata   # a factory has no card
    # an embedded model's file records its weights' sha256, which `bespoke-ext sample` checks against
    from bespoke_ext.models.embedded import read_card

    args = parser.parse_args(["moons2d", "--steps", "2", "--iterations", "1", "--batch-size", "8", "--val-size", "8",
                              "--cache-samples", "16", "--cache-dir", str(tmp_path / "gt2"), "-o", str(out),
                              "--no-progress"])
    assert run_train(args) == 0
    assert BespokeSolver.load(out).metadata["model_weights_sha256"] == read_card("moons2d")["weights"]["sha256"]



def test_cli_train_nonstationary_from_a_trained_file(tmp_path, monkeypatch):
    """--solver nonstationary --init FILE converts the file's solver exactly (its validation RMSE is the base's)
    and trains it with the log-MSE loss; a BespokeSolver cannot start from a non-stationary file."""
    import argparse

    from bespoke_ext.cli.train import add_train_arguments, run_train
    from bespoke_ext.solvers import NonStationarySolver

    (tmp_path / "my_flow_models.py").write_text(
        "from bespoke_ext.models.oracle import GaussianMixtureFlow\n"
        "def make():\n    return GaussianMixtureFlow.random(dim=3, components=4, std=0.2, seed=0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    parser = add_train_arguments(argparse.ArgumentParser())
    common = ["my_flow_models:make", "--shape", "3", "--iterations", "4", "--batch-size", "8", "--val-size", "8",
              "--val-every", "2", "--cache-samples", "16", "--cache-dir", str(tmp_path / "gt"), "--no-progress"]
    first, second = tmp_path / "rk2.safetensors", tmp_path / "ns.safetensors"
    assert run_train(parser.parse_args(common + ["--steps", "2", "-o", str(first)])) == 0
    start = BespokeSolver.load(first)
    assert run_train(parser.parse_args(common + ["--solver", "nonstationary", "--init", str(first), "-o", str(second)])) == 0
    ns = NonStationarySolver.load(second)
    assert ns.nfe == start.nfe == 4 and ns.metadata["training"]["options"]["loss"] == "log_mse"
    assert ns.metadata["training"]["base_val_rmse"] == pytest.approx(start.metadata["training"]["best_val_rmse"],
                                                                      rel=1e-5)
    with pytest.raises(ValueError, match="--solver nonstationary"):
        run_train(parser.parse_args(common + ["--init", str(second), "-o", str(tmp_path / "x.safetensors")]))


def _cli_solver(*argv):
    """The solver `bespoke-ext train m <argv>` starts from."""
    import argparse

    from bespoke_ext.cli.train import _initial_solver, add_train_arguments

    return _initial_solver(add_train_arguments(argparse.ArgumentParser()).parse_args(["m", *argv]))


def test_cli_train_nfe_sets_the_bespoke_solvers_steps():
    """--nfe means model evaluations for both families (it was ignored for --solver bespoke: NFE 10 came out)."""
    made = _cli_solver
    assert (made("--nfe", "4").steps, made("--nfe", "4").nfe) == (2, 4)
    assert made("--nfe", "3", "--order", "1").steps == 3 and made().nfe == 10 and made("--steps", "3").nfe == 6
    assert made("--steps", "2", "--nfe", "4").nfe == 4
    assert made("--solver", "nonstationary", "--nfe", "7").nfe == 7
    with pytest.raises(ValueError, match="--nfe must be a positive multiple of 2"):
        made("--nfe", "5")
    with pytest.raises(ValueError, match="makes NFE 6, not --nfe 4"):
        made("--steps", "3", "--nfe", "4")
    with pytest.raises(ValueError, match="--steps is for --solver bespoke"):
        made("--solver", "nonstationary", "--steps", "4")

def test_cli_train_init_refuses_sizes_the_file_contradicts(tmp_path):
    """--init's solver decides NFE, steps and order: --nfe 12 with a 10-evaluation file was ignored and
    wrote an NFE-10 solver under the name the user chose; now refused, equal values accepted."""
    from bespoke_ext.solvers import NonStationarySolver

    init = tmp_path / "init.safetensors"
    BespokeSolver(5, order=2).save(str(init))
    made = lambda *extra: _cli_solver("--init", str(init), *extra)
    assert made("--nfe", "10", "--steps", "5", "--order", "2").nfe == 10
    ns = made("--solver", "nonstationary", "--nfe", "10")
    assert isinstance(ns, NonStationarySolver) and ns.nfe == 10
    with pytest.raises(ValueError, match="--nfe 12, but --init .* nfe 10"):
        made("--solver", "nonstationary", "--nfe", "12")
    with pytest.raises(ValueError, match="--steps 8, but --init .* steps 5"):
        made("--steps", "8")
    with pytest.raises(ValueError, match="--order 1, but --init .* order 2"):
        made("--order", "1")
    with pytest.raises(ValueError, match="--base sets a fresh solver"):
        made("--solver", "nonstationary", "--base", "midpoint")
    with pytest.raises(ValueError, match="--steps is for --solver bespoke"):
        made("--solver", "nonstationary", "--steps", "5")


def test_cli_model_specs_resolve():
    from pathlib import Path

    import bespoke_ext.models.embedded as embedded
    from bespoke_ext.cli.model_spec import resolve_model

    weights = Path(embedded.WEIGHTS_DIR) / "moons2d.safetensors"
    assert weights.exists(), f"{weights} ships with the package"
    model, shape, name, card = resolve_model(str(weights))
    assert card["weights"]["sha256"]   # the checkpoint's card comes with it
    assert shape == (2,) and name == "moons2d" and model(torch.zeros(3, 2), torch.zeros(3)).shape == (3, 2)
    with pytest.raises(ValueError, match="neither module:attribute"):
        resolve_model("no-such-model")
    with pytest.raises(ValueError, match="cannot import"):
        resolve_model("no_such_module_xyz:f")


def test_a_run_that_never_beats_its_start_says_so(mixture):
    # keep_best then returns the start unchanged, which must not pass for a trained solver silently
    from bespoke_ext.solvers import NonStationarySolver

    kw = dict(shape=(4,), iterations=10, batch_size=16, gt="online", val_size=32, val_every=5, progress=False,
              fit_start=False)
    m = mixture()
    with pytest.warns(RuntimeWarning, match=r"no iteration improved on the starting solver.*lr \(this run: 0.05\)"):
        done = train(m, NonStationarySolver(20, "midpoint"), lr=5e-2, **kw)
    assert done.history.best_iteration == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        improved = train(m, BespokeSolver(4, 2), lr=5e-3, **kw)
    assert improved.history.best_iteration > 0
    # a least-squares start that training cannot improve on (here at the ground truth's accuracy) is named
    with pytest.warns(RuntimeWarning, match=r"improved on the least-squares start's .*iterations=0 only fits"):
        fitted = train(m, NonStationarySolver(20, "midpoint"), lr=5e-2, **{**kw, "fit_start": True})
    assert fitted.history.best_rmse == fitted.history.fitted_rmse
