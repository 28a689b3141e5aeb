"""Models as users write them, met by bx.train: callable objects around a module-level network, objects
holding their solver, buffer-only float64 fields, a no_grad forward, a batch-dependent output shape, and
a notebook rerun after Ctrl-C with the same solver object."""

from __future__ import annotations

import pytest
import torch

import bespoke_ext as bx
from bespoke_ext.models.identity import model_tag

F64 = torch.float64
SMALL = dict(iterations=2, batch_size=8, val_size=4, cache_samples=16, progress=False)


def _mlp(seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 2))


def _with_time(x, t):
    t = t.expand(x.shape[0]) if t.dim() == 0 else t
    return torch.cat([x, t[:, None].to(x.dtype)], 1)


NET = _mlp()


class GlobalNetField:
    """A callable object whose __call__ reads a module-level network."""

    def __call__(self, x, t):
        assert not NET.training
        return NET(_with_time(x, t))


def test_a_callable_object_over_a_global_network_is_seen(tmp_path):
    field = GlobalNetField()
    before = model_tag(field)
    NET.train()
    bx.train(field, bx.BespokeSolver(2, 1), shape=(2,), cache_dir=str(tmp_path), **SMALL)
    assert NET.training and all(p.grad is None and p.requires_grad for p in NET.parameters())
    with torch.no_grad():
        NET[0].weight.add_(0.1)
    assert model_tag(field) != before     # another network, another cache


def test_an_object_holding_its_solver_keeps_its_tag_while_that_solver_trains(tmp_path):
    class Holder:
        def __init__(self):
            self.net, self.solver = _mlp(1).eval(), bx.BespokeSolver(2, 2)

        def velocity(self, x, t):
            return self.net(_with_time(x, t))

    h = Holder()
    before = model_tag(h.velocity)
    out = bx.train(h.velocity, h.solver, shape=(2,), cache_dir=str(tmp_path), lr=1e-2, **SMALL)
    assert model_tag(h.velocity) == before == out.metadata["training"]["model_tag"]


def test_a_float64_field_of_buffers_trains_in_float64(tmp_path):
    from bespoke_ext.models.oracle import GaussianMixtureFlow

    flow = GaussianMixtureFlow.random(dim=2, components=3, std=0.3, seed=0)
    assert not list(flow.parameters()) and next(flow.buffers()).dtype == F64
    from bespoke_ext.training.probe import model_device_dtype

    assert model_device_dtype(flow) == (torch.device("cpu"), F64)   # the states take the model's own dtype
    seen = []
    flow.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    bx.train(flow, bx.BespokeSolver(2, 1), shape=(2,), cache_dir=str(tmp_path), **SMALL)
    assert set(seen) == {F64}


def test_a_no_grad_forward_is_warned_about(tmp_path):
    class NoGrad(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _mlp(2)

        @torch.no_grad()
        def forward(self, x, t):
            return self.net(_with_time(x, t))

    with pytest.warns(RuntimeWarning, match="does not depend on x through autograd"):
        bx.train(NoGrad(), bx.BespokeSolver(2, 1), shape=(2,), cache_dir=str(tmp_path), **SMALL)


def test_ground_truth_checks_every_batchs_output_shape(tmp_path):
    class Shrinks(torch.nn.Module):   # right for the probe's batch of 2, [B, 1] beyond
        def __init__(self):
            super().__init__()
            self.net = _mlp(3).eval()

        def forward(self, x, t):
            v = self.net(_with_time(x, t))
            return v if x.shape[0] <= 2 else v[:, :1]

    with pytest.raises(ValueError, match=r"ground truth.*returned shape \(16, 1\); expected x's shape \(16, 2\)"):
        bx.train(Shrinks(), bx.BespokeSolver(2, 1), shape=(2,), cache_dir=str(tmp_path), **SMALL)


def test_rerun_after_ctrl_c_with_the_same_solver_object_resumes(tmp_path):
    class Interrupting(torch.nn.Module):
        identity_ignore = ("left",)

        def __init__(self, calls):
            super().__init__()
            self.net, self.left = _mlp(4).eval(), calls

        def forward(self, x, t):
            if torch.is_grad_enabled() and self.left is not None:
                self.left -= 1
                if self.left == 0:
                    raise KeyboardInterrupt
            return self.net(_with_time(x, t))

    kw = dict(shape=(2,), iterations=6, batch_size=8, val_size=4, val_every=2, cache_samples=16, progress=False,
              cache_dir=str(tmp_path / "gt"), checkpoint=str(tmp_path / "c.ckpt"))
    model, solver = Interrupting(4), bx.BespokeSolver(2, 1)
    with pytest.raises(KeyboardInterrupt):
        bx.train(model, solver, **kw)
    model.left = None
    resumed = bx.train(model, solver, **kw)            # the same objects, as a notebook rerun passes them
    ref = bx.train(Interrupting(None), bx.BespokeSolver(2, 1), **{**kw, "checkpoint": str(tmp_path / "r.ckpt")})
    assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), ref.parameters()))


def test_a_low_precision_network_behind_a_function_gets_a_hint(tmp_path):
    net = _mlp(5).eval().bfloat16()
    with pytest.raises(RuntimeError, match=r"reaches a network with torch.bfloat16 weights.*pass the module itself"):
        bx.train(lambda x, t: net(_with_time(x, t)), bx.BespokeSolver(2, 1), shape=(2,), cache_dir=str(tmp_path),
                 **SMALL)


def test_paths_may_be_pathlib_and_the_trained_solver_saves(tmp_path):
    """cache_dir and checkpoint as pathlib.Path (as users write them): kept as str, so the solver's metadata
    (which records the options) is JSON and the file saves and loads."""
    net = _mlp(6).eval()
    solver = bx.train(lambda x, t: net(_with_time(x, t)), bx.BespokeSolver(2, 1), shape=(2,),
                      cache_dir=tmp_path / "gt", checkpoint=tmp_path / "c.ckpt", **SMALL)
    solver.save(tmp_path / "s.safetensors")
    options = bx.BespokeSolver.load(tmp_path / "s.safetensors").metadata["training"]["options"]
    assert options["cache_dir"] == str(tmp_path / "gt") and options["checkpoint"] == str(tmp_path / "c.ckpt")
    with pytest.raises(ValueError, match="cache_dir must be a path"):
        bx.train(net, bx.BespokeSolver(2, 1), shape=(2,), cache_dir=3, **SMALL)
