"""Training for conditional and guided models (issue 11, training side): per-sample conditions follow their
samples through ground truth, both losses, validation and resume; models that differ in guidance scale,
schedule, constant extras or conditions never share ground truth; the model probe refuses a bad contract
before any ground truth; a bf16 model's ground truth stays float32; non-finite steps are counted and stop
training."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import bespoke_ext as bx
from bespoke_ext.groundtruth import (CacheSpec, TrajectoryCache, build_cache, fine_grid, online_states, shard_noise,
                                     shard_rows, solve_trajectories)
from bespoke_ext.models.adapters import ClassifierFreeGuidance, VelocityAdapter
from bespoke_ext.models.identity import OpaqueModelError, inputs_tag, model_tag
from bespoke_ext.models.oracle import GaussianMixtureFlow
from bespoke_ext.metrics import rmse
from bespoke_ext.solvers import BespokeSolver
from bespoke_ext.training import NonFiniteTrainingError, bound_loss, end_to_end_loss, solver_table, train
from bespoke_ext.training.checkpoint import load_checkpoint

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


class LabelFlow(torch.nn.Module):
    """A class-conditional analytic flow: label k (0..K-1) is its own Gaussian mixture, label K (the null
    label) a broad one. The velocity depends strongly on y (the label means are far apart)."""

    def __init__(self, dim=4, labels=3, std=0.1):
        super().__init__()
        flows = []
        for k in range(labels):
            g = torch.Generator().manual_seed(100 + k)
            centre = 2.0 * torch.randn(dim, generator=g)
            means = centre + 0.5 * torch.randn(2, dim, generator=g)
            flows.append(GaussianMixtureFlow(means, stds=std))
        flows.append(GaussianMixtureFlow.random(dim=dim, components=4, std=0.5, seed=7))   # null label
        self.flows = torch.nn.ModuleList(flows)
        self.labels = labels

    def forward(self, x, t, y):
        y = torch.as_tensor(y, device=x.device).long()
        y = y.expand(x.shape[0]) if y.dim() == 0 else y
        assert y.shape == (x.shape[0],), f"y must have one label per sample, got {tuple(y.shape)} for x {tuple(x.shape)}"
        out = torch.stack([f(x, t) for f in self.flows])             # [K+1, B, D]
        return out[y, torch.arange(x.shape[0])]


@pytest.fixture(scope="module")
def label_flow():
    return LabelFlow()


def per_label(model, x, t, y):
    """The conditional model evaluated sample by sample with a constant label: the reference."""
    return torch.cat([model(x[i:i + 1], t[i:i + 1] if t.dim() else t, y=int(y[i])) for i in range(x.shape[0])])


# ------------------------------------------------------------------------------ rows follow samples

def test_online_ground_truth_and_losses_follow_rows_through_groups_chunks_and_tiling(label_flow):
    m = label_flow
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(7, 4, dtype=F64, generator=g)
    y = torch.tensor([0, 2, 1, 1, 3, 0, 2])
    solver = BespokeSolver(3, 2)
    with torch.no_grad():
        for p in solver.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    table = solver_table(solver, L_tau=1.0)
    tol = dict(rtol=1e-9, atol=1e-9)
    # Ground truth in groups of 3 (rows sliced per group) = each sample solved alone with its own label.
    states = online_states(m, x0, table.times, group_size=3, chunk_size=5, conditions={"y": y}, **tol)
    alone = torch.cat([online_states(m, x0[i:i + 1], table.times, model_extras={"y": int(y[i])}, **tol)
                       for i in range(7)], dim=1)
    torch.testing.assert_close(states, alone, rtol=1e-7, atol=1e-8)
    # The bound loss tiles the rows over the n*B teacher-forced pairs, chunked at 4 (not a multiple of B).
    fast = bound_loss(m, table, states, chunk_size=4, conditions={"y": y})
    slow = sum(bound_loss(m, table, states[:, i:i + 1], extras={"y": int(y[i])}) for i in range(7)) / 7
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=0)
    shuffled = bound_loss(m, table, states, chunk_size=4, conditions={"y": y.roll(1)})
    assert float((shuffled - fast).detach().abs()) > 1e-2 * float(fast.detach())    # the rows matter: the check can fail
    # The end-to-end loss slices them with its chunks of samples (chunk_size 6 // 3 steps = 2 samples).
    x1 = states[-1]
    e2e = end_to_end_loss(m, solver, x0, x1, chunk_size=6, conditions={"y": y})
    ref = sum(end_to_end_loss(m, solver, x0[i:i + 1], x1[i:i + 1], extras={"y": int(y[i])}) for i in range(7)) / 7
    torch.testing.assert_close(e2e, ref, rtol=1e-12, atol=0)


def test_cached_trajectories_equal_direct_solves_with_their_stored_rows(tmp_path, label_flow):
    m = label_flow
    pool = {"y": torch.tensor([2, 0, 1, 3, 1])}       # rows 0..4 -> labels
    spec = CacheSpec(model_tag=model_tag(m), shape=(4,), dtype="float64", rtol=1e-8, atol=1e-8,
                     grid=tuple(fine_grid(16).tolist()), num_samples=10, shard_size=4, seed=5,
                     inputs_tag=inputs_tag({}, pool), condition_rows=5)
    build_cache(m, tmp_path, spec, progress=False, group_size=3, conditions=pool)
    cache = TrajectoryCache(tmp_path, expect=spec)
    idx = torch.arange(10)
    rows = cache.rows(idx)
    assert torch.equal(rows, torch.cat([shard_rows(spec, s) for s in range(3)]))
    assert len(set(rows.tolist())) > 2                 # the trajectories really have different conditions
    assert (tmp_path / "shard_00000.rows.npy").is_file()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert "rows" in manifest["shards"][0]["sha256"]
    x0 = torch.cat([shard_noise(spec, s) for s in range(3)])
    assert torch.equal(cache.noise(idx), x0)
    grid = torch.tensor(spec.grid, dtype=F64)
    direct = torch.cat([solve_trajectories(m, x0[i:i + 1], grid, rtol=1e-8, atol=1e-8,
                                           model_extras={"y": int(pool["y"][rows[i]])}) for i in range(10)], dim=1)
    x, u = cache.gather(idx, torch.arange(len(grid)))
    # Groups of 3 share a step sequence, single solves do not: equal to the tolerance (labels differ by O(1)).
    torch.testing.assert_close(x, direct, rtol=1e-5, atol=1e-6)
    vel = torch.stack([per_label(m, x[k], grid[k].expand(10).to(F64), pool["y"][rows]) for k in range(len(grid))])
    torch.testing.assert_close(u, vel, rtol=1e-12, atol=1e-12)
    wrong = solve_trajectories(m, x0, grid, rtol=1e-8, atol=1e-8, conditions={"y": pool["y"][(rows + 1) % 5]})
    assert float((wrong - x).abs().max()) > 0.1
    # The rows file is checksummed like the others.
    import shutil
    copy = tmp_path.parent / (tmp_path.name + "_damaged")
    shutil.copytree(tmp_path, copy)
    raw = bytearray((copy / "shard_00001.rows.npy").read_bytes())
    raw[-1] ^= 0x01
    (copy / "shard_00001.rows.npy").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        TrajectoryCache(copy, expect=spec)
    # A different pool is a different cache: refused with the inputs part named.
    other = CacheSpec(**{**spec.to_json(), "inputs_tag": inputs_tag({}, {"y": torch.tensor([2, 0, 1, 3, 0])})})
    with pytest.raises(ValueError, match="inputs_tag .the values of the constant model_extras and the conditions pool"):
        TrajectoryCache(tmp_path, expect=other)
    with pytest.raises(ValueError, match="condition_rows"):
        build_cache(m, tmp_path / "x", spec, progress=False, conditions={"y": torch.arange(4)})


def test_version_1_cache_is_refused_clearly(tmp_path, label_flow):
    spec = CacheSpec(model_tag="m", shape=(4,), dtype="float64", rtol=1e-5, atol=1e-5,
                     grid=tuple(fine_grid(4).tolist()), num_samples=2, shard_size=2, seed=0)
    d = tmp_path / "old"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"format": "bespoke_ext.trajectory_cache", "version": 1,
                                                 "spec": spec.to_json(), "complete": True, "shards": []}))
    with pytest.raises(ValueError, match="format version 1.*delete the folder or use another cache_dir"):
        TrajectoryCache(d, expect=spec)


# ------------------------------------------------------------------------------ identity: no shared ground truth

def cache_folders(root: Path):
    return {p.name for p in root.iterdir() if (p / "manifest.json").is_file()}


class Scaled(torch.nn.Module):
    """A model with a constant extra (scale) that changes the field."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, t, scale):
        return scale * self.inner(x, t)


class Denoiser(torch.nn.Module):
    """A tiny data predictor for VelocityAdapter (the schedule changes the velocity it implies)."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.net = torch.nn.Linear(4, 4).double()

    def forward(self, x, t):
        return torch.tanh(self.net(x))


def test_models_differing_in_guidance_schedule_extras_or_conditions_never_share_ground_truth(
        tmp_path, monkeypatch, label_flow, mixture):
    monkeypatch.setenv("BESPOKE_EXT_CACHE_DIR", str(tmp_path))
    kw = dict(shape=(4,), iterations=1, batch_size=4, cache_samples=4, cache_shard_size=4, val_size=2, progress=False,
              dtype=F64)
    mix = mixture(4, std=0.2).double()
    runs = [
        # guidance scale (a setting of the wrapper module)
        (ClassifierFreeGuidance(label_flow, 2.0, cond_key="y", null_value=3), {"conditions": {"y": torch.arange(3)}}),
        (ClassifierFreeGuidance(label_flow, 0.0, cond_key="y", null_value=3), {"conditions": {"y": torch.arange(3)}}),
        # conditions pool: same size, other values; and another size
        (ClassifierFreeGuidance(label_flow, 0.0, cond_key="y", null_value=3), {"conditions": {"y": torch.tensor([0, 0, 1])}}),
        (ClassifierFreeGuidance(label_flow, 0.0, cond_key="y", null_value=3), {"conditions": {"y": torch.arange(2)}}),
        # the schedule of a VelocityAdapter
        (VelocityAdapter(Denoiser(), prediction="data", schedule="ot"), {}),
        (VelocityAdapter(Denoiser(), prediction="data", schedule="cosine"), {}),
        # the value of a constant extra
        (Scaled(mix), {"model_extras": {"scale": 1.0}}),
        (Scaled(mix), {"model_extras": {"scale": 0.5}}),
    ]
    seen = set()
    for i, (model, extra) in enumerate(runs):
        train(model, BespokeSolver(2, 1), **kw, **extra)
        folders = cache_folders(tmp_path)
        new = folders - seen
        assert len(new) == 1, f"run {i} ({type(model).__name__}, {extra}) reused another model's ground truth"
        seen = folders
    # The same model and inputs again: the cache is reused, not rebuilt.
    train(runs[-1][0], BespokeSolver(2, 1), **kw, **runs[-1][1])
    assert cache_folders(tmp_path) == seen


def test_issue_repro_guidance_2_then_0_trains_against_its_own_trajectories(tmp_path, monkeypatch, label_flow):
    # Issue 11: with the default cache, a w = 0 run after a w = 2 run reused w = 2's trajectories and came out
    # equal to midpoint. Now w = 0 builds its own cache, and the solver trained for the label pool beats midpoint
    # on held-out conditioned samples, each sampled with its own label (bx.sample(..., y=labels)).
    monkeypatch.setenv("BESPOKE_EXT_CACHE_DIR", str(tmp_path))
    pool = {"y": torch.arange(3)}
    kw = dict(shape=(4,), batch_size=32, seed=0, lr=1e-2, cache_samples=128, cache_shard_size=64, val_size=32,
              val_every=10, progress=False, dtype=F64, conditions=pool)
    w2 = ClassifierFreeGuidance(label_flow, 2.0, cond_key="y", null_value=3)
    train(w2, BespokeSolver(3, 2), iterations=1, **kw)
    w0 = ClassifierFreeGuidance(label_flow, 0.0, cond_key="y", null_value=3)
    solver = train(w0, BespokeSolver(3, 2), iterations=40, **kw)
    folders = [p for p in tmp_path.iterdir() if (p / "manifest.json").is_file()]
    assert len(folders) == 2
    tags = {json.loads((p / "manifest.json").read_text())["spec"]["model_tag"] for p in folders}
    assert tags == {model_tag(w2), model_tag(w0)}
    h = solver.history
    assert h.best_rmse < 0.7 * h.base_rmse, h.val_rmse
    g = torch.Generator().manual_seed(2024)
    x0 = torch.randn(96, 4, dtype=F64, generator=g)
    labels = torch.randint(3, (96,), generator=g)
    gt = bx.sample(w0, x0, method="dopri5", atol=1e-10, rtol=1e-10, y=labels)
    mid = rmse(bx.sample(w0, x0, method="midpoint", nfe=solver.nfe, y=labels), gt)
    trained = rmse(bx.sample(w0, x0, solver=solver, y=labels), gt)
    assert trained < 0.7 * mid, f"held-out conditioned samples: trained {trained:.4g} vs midpoint {mid:.4g}"
    # The wrong label at sampling time is far off: the solver was trained and checked per label.
    assert rmse(bx.sample(w0, x0, solver=solver, y=(labels + 1) % 3), gt) > 5 * trained


def test_opaque_model_needs_a_model_tag_or_a_cache_dir(tmp_path, mixture):
    m = mixture(4)
    kw = dict(shape=(4,), iterations=0, batch_size=2, progress=False)
    with pytest.raises(OpaqueModelError, match="model_tag=.*cache_dir="):
        train(lambda x, t: m(x, t), BespokeSolver(2, 1), **kw)
    tagged = train(lambda x, t: m(x, t), BespokeSolver(2, 1), model_tag="mixture-4", **kw)
    assert tagged.metadata["training"]["model_tag"] == "mixture-4"
    train(lambda x, t: m(x, t), BespokeSolver(2, 1), cache_dir=str(tmp_path / "gt"), **kw)


def test_an_opaque_model_checkpoint_is_not_resumed_for_another_cache_dir(tmp_path, mixture):
    # the cache folder is what identifies a plain function: a checkpoint made with another one (another
    # model, here a closure over another mixture) is refused, not returned as this model's solver
    def make(seed):
        g = mixture(4, seed=seed)
        return lambda x, t: g(x, t)

    assert model_tag(make(0), strict=False) != model_tag(make(1), strict=False)  # closure values are seen
    kw = dict(shape=(4,), iterations=2, batch_size=4, cache_samples=8, cache_grid=8, val_size=4, progress=False,
              checkpoint=str(tmp_path / "ck.pt"))
    train(make(0), BespokeSolver(2, 1), cache_dir=str(tmp_path / "a"), **kw)
    with pytest.raises(ValueError, match="model_tag"):
        train(make(1), BespokeSolver(2, 1), cache_dir=str(tmp_path / "b"), **kw)


_GLOBAL_FIELD = None  # what _reads_a_global computes with: set by the test below


def _reads_a_global(x, t):
    return _GLOBAL_FIELD(x, t)


_CALLS = 0


def _counts_its_calls(x, t):
    global _CALLS
    _CALLS += 1
    return _GLOBAL_FIELD(x, t)


def test_a_global_the_function_writes_is_not_part_of_its_tag(mixture):
    # a call counter is state the function keeps, not an input of the field: the tag stays as it is used
    global _GLOBAL_FIELD
    try:
        _GLOBAL_FIELD = mixture(4, seed=0)
        before = model_tag(_counts_its_calls, strict=False)
        _counts_its_calls(torch.zeros(2, 4), torch.tensor(0.5))
        assert model_tag(_counts_its_calls, strict=False) == before
        _GLOBAL_FIELD = mixture(4, seed=1)  # what it reads still counts
        assert model_tag(_counts_its_calls, strict=False) != before
    finally:
        _GLOBAL_FIELD = None


def test_a_function_reading_another_global_model_does_not_reuse_its_cache(tmp_path, mixture):
    # `def f(x, t): return net(x, t)` with a module-level net: the globals the code names are part of its
    # tag, so a cache folder solved for one net is refused for another, naming the model tag
    global _GLOBAL_FIELD
    kw = dict(shape=(4,), iterations=1, batch_size=4, cache_samples=8, cache_grid=8, val_size=4, progress=False,
              cache_dir=str(tmp_path / "gt"))
    try:
        _GLOBAL_FIELD = mixture(4, seed=0)
        first = model_tag(_reads_a_global, strict=False)
        train(_reads_a_global, BespokeSolver(2, 1), **kw)
        _GLOBAL_FIELD = mixture(4, seed=1)
        assert model_tag(_reads_a_global, strict=False) != first
        with pytest.raises(ValueError, match="model_tag"):
            train(_reads_a_global, BespokeSolver(2, 1), **kw)
        _GLOBAL_FIELD = mixture(4, seed=0)  # the same weights again: the same tag, the cache is reused
        assert model_tag(_reads_a_global, strict=False) == first
        train(_reads_a_global, BespokeSolver(2, 1), **kw)
    finally:
        _GLOBAL_FIELD = None


class _ForwardReadsAGlobal(torch.nn.Module):
    """A wrapper module whose forward computes with a module-level network and scale."""

    def forward(self, x, t):
        return _GLOBAL_SCALE * _GLOBAL_FIELD(x, t)


_GLOBAL_SCALE = 1.0


def test_a_module_whose_forward_reads_a_global_network_is_tagged_by_it(mixture):
    # the wrapper has no weights of its own: the network and the number its forward reads are its field
    global _GLOBAL_FIELD, _GLOBAL_SCALE
    wrapper = _ForwardReadsAGlobal()
    try:
        _GLOBAL_FIELD = mixture(4, seed=0)
        first = model_tag(wrapper)
        assert model_tag(wrapper) == first  # stable while nothing changes
        _GLOBAL_FIELD = mixture(4, seed=1)
        assert model_tag(wrapper) != first
        _GLOBAL_FIELD, _GLOBAL_SCALE = mixture(4, seed=0), 2.0
        assert model_tag(wrapper) != first
        _GLOBAL_SCALE = 1.0
        assert model_tag(wrapper) == first
    finally:
        _GLOBAL_FIELD, _GLOBAL_SCALE = None, 1.0


def test_training_freezes_and_places_a_global_network_a_module_forward_reads():
    # the wrapper has no weights: the network its forward reads is what training must freeze (its weights
    # would collect the losses' gradients) and whose dtype the states take
    from bespoke_ext.training.probe import frozen, model_device_dtype

    global _GLOBAL_FIELD
    wrapper = _ForwardReadsAGlobal()
    try:
        _GLOBAL_FIELD = _TimeLinear(4).double().train()
        assert model_device_dtype(wrapper) == (torch.device("cpu"), torch.float64)
        with frozen(wrapper):
            assert not any(p.requires_grad for p in _GLOBAL_FIELD.parameters()) and not _GLOBAL_FIELD.training
        assert all(p.requires_grad for p in _GLOBAL_FIELD.parameters()) and _GLOBAL_FIELD.training  # restored
    finally:
        _GLOBAL_FIELD = None


class _TimeLinear(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.lin = torch.nn.Linear(dim + 1, dim)

    def forward(self, x, t):
        return self.lin(torch.cat([x, t.expand(x.shape[0], 1)], dim=1))


# ------------------------------------------------------------------------------ the model probe

class Probe(torch.nn.Module):
    """Counts calls; ``kind`` selects how it breaks the model contract."""

    identity_ignore = ("calls",)

    def __init__(self, kind):
        super().__init__()
        self.kind, self.calls = kind, 0

    def forward(self, x, t):
        self.calls += 1
        if self.kind == "shape":
            return x[:, :2]
        if self.kind == "dtype":
            return x.float()
        if self.kind == "device":
            return torch.empty(x.shape, dtype=x.dtype, device="meta")
        if self.kind == "nan":
            return x * float("nan")
        if self.kind == "tuple":
            return (x,)
        return -x


@pytest.mark.parametrize("kind,error,message", [
    ("shape", ValueError, r"returned shape \(2, 2\); expected x's shape \(2, 4\)"),
    ("dtype", ValueError, "returned dtype torch.float32; expected x's dtype torch.float64"),
    ("device", ValueError, "returned a tensor on meta; expected the training device cpu"),
    ("nan", ValueError, "non-finite values"),
    ("tuple", TypeError, "returned tuple"),
])
def test_probe_refuses_a_bad_model_before_any_ground_truth(tmp_path, kind, error, message):
    model = Probe(kind)
    with pytest.raises(error, match=message):
        train(model, BespokeSolver(2, 1), shape=(4,), iterations=2, batch_size=2, cache_dir=str(tmp_path / "gt"),
              progress=False, dtype=F64)
    assert model.calls == 1 and not (tmp_path / "gt").exists()


@pytest.mark.parametrize("takes", ["per_sample", "scalar"])
def test_probe_calls_with_both_time_forms_and_names_the_one_that_fails(tmp_path, takes):
    # a model indexing t[:, None] failed only at validation (0-dim t), after every ground truth was solved,
    # with a bare IndexError; one that takes only a scalar time failed the probe without a pointer
    def per_sample(x, t):
        return -x * t[:, None]

    def scalar(x, t):
        return -x * float(t)

    model = per_sample if takes == "per_sample" else scalar
    form = "a 0-dim t" if takes == "per_sample" else r"t \[2\]"
    remedy = "t.expand" if takes == "per_sample" else "ScalarTimeAdapter"
    with pytest.raises(RuntimeError, match=f"{form}.*{remedy}"):
        train(model, BespokeSolver(2, 1), shape=(4,), iterations=2, batch_size=2, cache_dir=str(tmp_path / "gt"),
              progress=False, dtype=F64)
    assert not (tmp_path / "gt").exists()


def test_probe_and_checks_name_bad_conditions_and_extras(tmp_path, label_flow):
    kw = dict(shape=(4,), iterations=2, batch_size=2, cache_dir=str(tmp_path / "gt"), progress=False, dtype=F64)
    with pytest.raises(TypeError, match=r"model_extras \['colour'\] and conditions \['y'\]"):
        train(label_flow, BespokeSolver(2, 1), conditions={"y": torch.arange(3)}, model_extras={"colour": 1}, **kw)
    with pytest.raises(TypeError, match=r"conditions \['label'\]"):
        train(label_flow, BespokeSolver(2, 1), conditions={"label": torch.arange(3)}, **kw)
    with pytest.raises(ValueError, match="share one leading dimension"):
        train(label_flow, BespokeSolver(2, 1), conditions={"y": torch.arange(3), "z": torch.zeros(4, 2)}, **kw)
    with pytest.raises(TypeError, match=r"conditions\['y'\] must be a tensor"):
        train(label_flow, BespokeSolver(2, 1), conditions={"y": [0, 1, 2]}, **kw)
    with pytest.raises(ValueError, match="0-dimensional"):
        train(label_flow, BespokeSolver(2, 1), conditions={"y": torch.tensor(1)}, **kw)
    with pytest.raises(ValueError, match="both in conditions and in model_extras"):
        train(label_flow, BespokeSolver(2, 1), conditions={"y": torch.arange(3)}, model_extras={"y": 1}, **kw)
    assert not (tmp_path / "gt").exists()


class ThreeClasses(torch.nn.Module):
    """Takes labels 0, 1 and 2 only (an Embedding of 3)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(3, 4)

    def forward(self, x, t, y):
        return -x + 0.1 * self.emb(y)


def test_probe_tries_the_pools_extreme_labels_before_any_ground_truth(tmp_path):
    # labels 3..9 reach past the model's three classes: the probe, not the ground-truth solve, finds them
    kw = dict(shape=(4,), iterations=2, batch_size=2, cache_dir=str(tmp_path / "gt"), progress=False)
    labels = torch.tensor([1, 0, 2, 9, 4, 2])
    with pytest.raises(RuntimeError, match=r"conditions rows \[1, 3\] \(those of the smallest and largest y\).*IndexError"):
        train(ThreeClasses(), BespokeSolver(2, 1), conditions={"y": labels}, **kw)
    assert not (tmp_path / "gt").exists()
    done = train(ThreeClasses(), BespokeSolver(2, 1), conditions={"y": labels % 3}, cache_samples=4, val_size=2, **kw)
    assert done.history.iterations == 2


class EmbeddingFlow(torch.nn.Module):
    """A field conditioned on a per-sample embedding c and a constant offset e (a text encoder's outputs)."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.net = torch.nn.Linear(4 + 1 + 3, 4)

    def forward(self, x, t, c, e):
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        return -x + 0.3 * torch.tanh(self.net(torch.cat([x, t.to(x.dtype)[:, None], c + e], 1)))


@pytest.mark.parametrize("loss", ["bound", "log_mse"])
def test_condition_and_extra_tensors_from_an_encoder_are_inputs_not_parameters(tmp_path, loss):
    # embeddings computed without torch.no_grad() still carry the encoder's graph: training must not send its
    # gradients there (nor backpropagate through that graph twice, which fails at the second step)
    encoder = torch.nn.Linear(3, 3)
    pool, offset = encoder(torch.randn(5, 3)), encoder(torch.randn(1, 3))
    solver = train(EmbeddingFlow(), BespokeSolver(2, 1), shape=(4,), iterations=3, batch_size=4, cache_samples=8,
                   cache_shard_size=8, val_size=4, loss=loss, conditions={"c": pool}, model_extras={"e": offset},
                   cache_dir=str(tmp_path / "gt"), progress=False)
    assert len(solver.history.loss) == 3 and all(np.isfinite(v) for v in solver.history.loss)
    assert all(p.grad is None for p in encoder.parameters())
    assert pool.requires_grad and offset.requires_grad   # the caller's tensors themselves are left as they were


# ------------------------------------------------------------------------------ dtype policy

class HalfNet(torch.nn.Module):
    """A bfloat16 model: computes in bf16 and returns bf16."""

    def __init__(self, returns=None):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.net = torch.nn.Linear(5, 3)
        self.net.to(torch.bfloat16)
        self.register_buffer("scale", torch.tensor(0.3))   # a float32 buffer: the parameters decide the dtype
        self.seen, self.returns = set(), returns

    identity_ignore = ("seen",)

    def forward(self, x, t):
        self.seen.add(x.dtype)
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        out = -x + self.scale.to(x.dtype) * torch.tanh(self.net(torch.cat([x, t.to(x.dtype)[:, None], x[:, :1] * 0], dim=1)))
        return out if self.returns is None else out.to(self.returns)


@pytest.mark.parametrize("returns", [None, torch.float32])
def test_bf16_model_is_called_in_bf16_and_ground_truth_stays_float32(tmp_path, returns):
    model = HalfNet(returns)
    solver = train(model, BespokeSolver(2, 1), shape=(3,), iterations=2, batch_size=4, cache_samples=4,
                   cache_shard_size=4, cache_dir=str(tmp_path / "gt"), val_size=4, progress=False)
    assert model.seen == {torch.bfloat16}
    spec = json.loads((tmp_path / "gt" / "manifest.json").read_text())["spec"]
    assert spec["dtype"] == "float32"
    assert np.load(tmp_path / "gt" / "shard_00000.x.npy").dtype == np.float32
    assert all(np.isfinite(v) for v in solver.history.val_rmse)
    with pytest.raises(ValueError, match="dtype must be torch.float32 or torch.float64"):
        train(model, BespokeSolver(2, 1), shape=(3,), iterations=1, batch_size=2, dtype=torch.bfloat16,
              cache_dir=str(tmp_path / "gt2"), progress=False)


# ------------------------------------------------------------------------------ non-finite steps

class NanWhileTraining(torch.nn.Module):
    """Finite under no_grad (probe, ground truth, validation); NaN in the loss's calls (grad enabled) for the
    first ``bad_calls`` of them (all of them when None)."""

    identity_ignore = ("grad_calls",)

    def __init__(self, inner, bad_calls=None):
        super().__init__()
        self.inner, self.bad_calls, self.grad_calls = inner, bad_calls, 0

    def forward(self, x, t):
        out = self.inner(x, t)
        if torch.is_grad_enabled():
            self.grad_calls += 1
            if self.bad_calls is None or self.grad_calls <= self.bad_calls:
                return out * float("nan")
        return out


def test_nan_model_stops_training_after_n_skipped_steps_and_keeps_the_last_good_checkpoint(tmp_path, mixture):
    model = NanWhileTraining(mixture(4, std=0.2))
    ckpt = tmp_path / "c.ckpt"
    kw = dict(shape=(4,), iterations=20, batch_size=4, cache_samples=8, cache_shard_size=8, val_size=4,
              cache_dir=str(tmp_path / "gt"), progress=False, dtype=F64, max_nonfinite_steps=3)
    with pytest.warns(RuntimeWarning, match="iteration 1: the loss .* not finite") as caught:
        with pytest.raises(NonFiniteTrainingError, match="3 steps in a row .iterations 1..3.*last good state .iteration 0"):
            train(model, BespokeSolver(2, 2), checkpoint=str(ckpt), **kw)
    assert sum("not finite" in str(w.message) for w in caught) == 1        # warned once
    state = load_checkpoint(ckpt)
    assert state["iteration"] == 0
    fresh = BespokeSolver(2, 2)
    assert all(torch.equal(state["solver"][k], v) for k, v in fresh.state_dict().items())


def test_isolated_nonfinite_steps_are_skipped_and_counted(tmp_path, mixture):
    # Order 2, one chunk: 2 model calls per iteration, so the first 4 grad calls poison iterations 1 and 2.
    model = NanWhileTraining(mixture(4, std=0.2), bad_calls=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        solver = train(model, BespokeSolver(2, 2), shape=(4,), iterations=5, batch_size=4, cache_samples=8,
                       cache_shard_size=8, val_size=4, cache_dir=str(tmp_path / "gt"), progress=False, dtype=F64,
                       max_nonfinite_steps=3)
    h = solver.history
    assert h.skipped == 2 and h.skipped_iterations == [1, 2]
    assert all(np.isfinite(h.loss[2:])) and not np.isfinite(h.loss[0])
    assert sum("not finite" in str(w.message) for w in caught) == 1
    assert solver.metadata["training"]["skipped_steps"] == 2
    assert max(float(p.detach().abs().max()) for p in solver.parameters()) > 0   # the finite steps were applied


# ------------------------------------------------------------------------------ resume with conditions

class InterruptAfter(torch.nn.Module):
    """Raises KeyboardInterrupt at the n-th grad-enabled call (the probe's differentiability check is the first, then
    one loss call per iteration: order 1, one chunk): a Ctrl-C in the middle of iteration n - 1."""

    identity_ignore = ("left",)

    def __init__(self, inner, calls):
        super().__init__()
        self.inner, self.left = inner, calls

    def forward(self, x, t, y):
        if torch.is_grad_enabled():
            self.left -= 1
            if self.left == 0:
                raise KeyboardInterrupt
        return self.inner(x, t, y=y)


@pytest.mark.parametrize("gt", ["online", "cached"])
def test_interrupted_run_with_conditions_resumes_to_the_uninterrupted_result(tmp_path, label_flow, gt):
    pool = {"y": torch.tensor([0, 1, 2, 1])}
    kw = dict(shape=(4,), iterations=8, batch_size=6, seed=4, gt=gt, val_size=6, val_every=4, progress=False,
              dtype=F64, model_tag="label-flow", checkpoint_every=100, cache_samples=12, cache_shard_size=6,
              cache_dir=str(tmp_path / "gt"), conditions=pool)
    ref = train(label_flow, BespokeSolver(2, 1), **kw)
    ckpt = tmp_path / "c.ckpt"
    with pytest.raises(KeyboardInterrupt):
        train(InterruptAfter(label_flow, 5), BespokeSolver(2, 1), checkpoint=str(ckpt), **kw)
    state = load_checkpoint(ckpt)
    assert state["iteration"] == 3
    assert json.loads(state["fingerprint"])["inputs_tag"] == inputs_tag({}, pool)
    resumed = train(label_flow, BespokeSolver(2, 1), checkpoint=str(ckpt), **kw)
    for pa, pb in zip(ref.parameters(), resumed.parameters()):
        assert torch.equal(pa, pb)
    assert ref.history.loss == resumed.history.loss and ref.history.val_rmse == resumed.history.val_rmse
    # Another pool is another run: its checkpoint is refused, naming the inputs.
    with pytest.raises(ValueError, match="inputs_tag"):
        train(label_flow, BespokeSolver(2, 1), checkpoint=str(ckpt), **{**kw, "conditions": {"y": torch.arange(4)}})


@pytest.mark.parametrize("gt", ["cached", "online"])
def test_least_squares_start_uses_each_trajectorys_own_condition(tmp_path, gt):
    """The fit's samples carry their own rows of the pool (the velocities depend strongly on y: with
    other rows the fitted coefficients would not fit the validation's trajectories)."""
    pool = {"y": torch.tensor([0, 1, 2, 3, 1, 0])}
    solver = bx.train(LabelFlow().double(), bx.NonStationarySolver(5), shape=(4,), iterations=0, batch_size=4,
                      conditions=pool, loss="log_mse", cache_samples=48, val_size=48, gt=gt, dtype=F64,
                      cache_dir=str(tmp_path / "cache"), progress=False)
    h = solver.history
    assert h.val_iteration == [0, 0] and h.fitted_rmse < 0.5 * h.base_rmse
    assert solver.metadata["training"]["conditions"]["y"]["shape"] == [6]
