"""Tests for bespoke_ext.groundtruth: dopri5 solves, x_aux, Hermite interpolation, the trajectory cache."""

import json
import math

import numpy as np
import pytest
import torch

from bespoke_ext.groundtruth import (
    CacheSpec,
    TrajectoryCache,
    build_cache,
    fine_grid,
    finalize_cache,
    hermite_coefficients,
    hermite_interpolate,
    online_states,
    solve_trajectories,
)
from bespoke_ext.models.identity import model_tag

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def spec_for(model, dim, samples=24, shard=10, grid=None, rtol=1e-8, seed=3):
    g = fine_grid(64, "mixed") if grid is None else grid
    return CacheSpec(model_tag=model_tag(model), shape=(dim,), dtype="float64", rtol=rtol, atol=rtol,
                     grid=tuple(g.tolist()), num_samples=samples, shard_size=shard, seed=seed)


class Counting(torch.nn.Module):
    """Counts model calls (the cache's resume test checks that finished shards are not solved again)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x, t, **kw):
        self.calls += 1
        return self.inner(x, t)


# ------------------------------------------------------------------------------ solves and x_aux

def test_solve_matches_closed_form_and_starts_at_x0():
    # dx/dt = -t x  =>  x(t) = x0 exp(-t^2 / 2)
    x0 = torch.randn(7, 3, dtype=F64)
    times = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=F64)
    out = solve_trajectories(lambda x, t: -t[:, None] * x, x0, times, rtol=1e-9, atol=1e-9, group_size=3)
    exact = x0[None] * torch.exp(-times**2 / 2)[:, None, None]
    assert torch.equal(out[0], x0)
    torch.testing.assert_close(out, exact, rtol=1e-7, atol=1e-8)


def test_solve_names_a_non_finite_velocity_and_its_time():
    # NaN after t = 0.9: every later step is rejected and torchdiffeq stops with "underflow in dt"
    def nan_late(x, t):
        return torch.where(t[:, None] > 0.9, torch.nan, -x)

    with pytest.raises(ValueError, match=r"NaN or inf during the ground-truth solve .* samples 0\.\.3, first at t = 0\.9"):
        solve_trajectories(nan_late, torch.randn(4, 2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), group_size=4)


def test_solve_rejects_bad_times():
    with pytest.raises(ValueError, match="strictly increasing"):
        solve_trajectories(lambda x, t: x, torch.zeros(2, 2), torch.tensor([0.0, 0.5, 0.5]))


def test_online_states_value_and_time_derivative_is_velocity(mixture):
    m = mixture(6, components=6, std=0.2)
    x0 = torch.randn(5, 6, dtype=F64)
    times = torch.tensor([0.0, 0.25, 0.6, 1.0], dtype=F64, requires_grad=True)
    states = online_states(m, x0, times, rtol=1e-9, atol=1e-9)
    direct = solve_trajectories(m, x0, times.detach(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(states.detach(), direct, rtol=0, atol=1e-14)
    w = torch.randn_like(states)
    (g,) = torch.autograd.grad((w * states).sum(), times)
    # x_aux: d x(t_k) / d t_k = u(x(t_k), t_k)
    u = torch.stack([m(direct[k], times[k].detach().expand(5)) for k in range(4)])
    torch.testing.assert_close(g, (w * u).sum(dim=(1, 2)), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------ Hermite

def test_hermite_is_exact_for_cubics_and_differentiable():
    grid = torch.tensor([0.0, 0.1, 0.35, 0.8, 1.0], dtype=F64)
    c = torch.randn(4, 3, dtype=F64)                       # x(t) = c0 + c1 t + c2 t^2 + c3 t^3 per channel
    x = lambda t: c[0] + c[1] * t[..., None] + c[2] * t[..., None] ** 2 + c[3] * t[..., None] ** 3
    dx = lambda t: c[1] + 2 * c[2] * t[..., None] + 3 * c[3] * t[..., None] ** 2
    xs, us = x(grid), dx(grid)                             # [G+1, 3]
    t = torch.tensor([0.0, 0.05, 0.1, 0.3, 0.61, 0.99, 1.0], dtype=F64, requires_grad=True)
    k, coeffs = hermite_coefficients(grid, t)
    out = hermite_interpolate(xs[k], us[k], xs[k + 1], us[k + 1], coeffs)
    torch.testing.assert_close(out, x(t.detach()), rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(out.sum(), t)
    torch.testing.assert_close(g, dx(t.detach()).sum(-1), rtol=1e-10, atol=1e-10)


def test_hermite_rejects_times_outside_grid():
    with pytest.raises(ValueError, match="range"):
        hermite_coefficients(fine_grid(8), torch.tensor([1.2], dtype=F64))


def test_fine_grid_kinds():
    for kind in ("mixed", "cosine", "uniform"):
        g = fine_grid(16, kind)
        assert g[0] == 0 and g[-1] == 1 and bool((g[1:] > g[:-1]).all())
    with pytest.raises(ValueError, match="kind"):
        fine_grid(16, "log")


# ------------------------------------------------------------------------------ the cache

@pytest.fixture(scope="module")
def built(tmp_path_factory, mixture):
    m = mixture(6, components=6, std=0.1)
    spec = spec_for(m, 6)
    d = tmp_path_factory.mktemp("cache")
    build_cache(m, d, spec, progress=False, group_size=8)
    return m, spec, d


def test_cache_interpolation_matches_direct_dopri5(built):
    # The default grid (64 intervals, "mixed") read back at arbitrary times vs direct tight solves.
    m, spec, d = built
    cache = TrajectoryCache(d, expect=spec)
    idx = torch.tensor([0, 5, 11, 23])
    times = torch.cat([torch.tensor([0.0]), torch.rand(12, generator=torch.Generator().manual_seed(0)).sort()[0],
                       torch.tensor([0.997, 1.0])]).to(F64)
    interp = cache.states(idx, times)
    direct = solve_trajectories(m, cache.noise(idx), times, rtol=1e-10, atol=1e-10)
    err = (interp - direct).pow(2).mean(-1).sqrt()
    assert float(err.max()) < 1e-6, float(err.max())   # measured 1.5e-7 (cache solved at 1e-8)


def test_cache_layout_manifest_and_reopen(built):
    m, spec, d = built
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["shards"]) == 3 and manifest["spec"]["model_tag"] == model_tag(m)
    cache = TrajectoryCache(d, expect=spec)
    assert cache.in_memory and len(cache) == 24
    x0, x1 = cache.endpoints(torch.arange(24))
    assert x0.shape == (24, 6) and x1.shape == (24, 6)
    # x stored at grid points agrees with u stored there: u = model(x, g)
    x, u = cache.gather(torch.tensor([3, 17]), torch.tensor([10, 40]))
    g = cache.grid[torch.tensor([10, 40])]
    for j in range(2):
        torch.testing.assert_close(u[j], m(x[j], g[j].expand(2)), rtol=1e-12, atol=1e-12)


def test_cache_memory_mapped_reads_equal_in_memory(built):
    _, spec, d = built
    a = TrajectoryCache(d, expect=spec, in_memory=True)
    b = TrajectoryCache(d, expect=spec, in_memory=False, verify=False)
    assert not b.in_memory
    idx = torch.tensor([23, 0, 12, 9, 10])
    times = torch.tensor([0.0, 0.31, 0.5, 1.0], dtype=F64)
    assert torch.equal(a.states(idx, times), b.states(idx, times))


def test_cache_refuses_other_spec_and_damage(built, tmp_path):
    m, spec, d = built
    other = spec_for(m, 6, rtol=1e-6)
    with pytest.raises(ValueError, match="rtol"):
        TrajectoryCache(d, expect=other)
    with pytest.raises(ValueError, match="rtol"):
        build_cache(m, d, other, progress=False)
    # Grids of another size or, same size, another spacing: the message says which.
    with pytest.raises(ValueError, match=r"grid: cache has 65 points, expected 33 \(cache_grid\)"):
        TrajectoryCache(d, expect=spec_for(m, 6, grid=fine_grid(32, "mixed")))
    with pytest.raises(ValueError, match=r"grid: both have 65 points but another spacing: point 1 is .*cache_grid_kind"):
        TrajectoryCache(d, expect=spec_for(m, 6, grid=fine_grid(64, "uniform")))
    # A damaged shard fails its checksum.
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(d, copy)
    path = copy / "shard_00001.x.npy"
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        TrajectoryCache(copy, expect=spec)
    with pytest.raises(FileNotFoundError, match="no trajectory cache"):
        TrajectoryCache(tmp_path / "nothing")


def test_cache_build_resumes_and_is_independent_of_process_count(built, tmp_path):
    m, spec, d = built
    counted = Counting(m)
    # "Two ranks": rank 1 builds its shard, then the run dies before rank 0 does anything.
    build_cache(counted, tmp_path, spec, progress=False, rank=1, world_size=2, finalize=False, group_size=8)
    assert (tmp_path / "shard_00001.json").exists() and not (tmp_path / "shard_00000.json").exists()
    assert counted.calls > 0
    calls_rank1 = counted.calls
    with pytest.raises(ValueError, match="incomplete"):
        TrajectoryCache(tmp_path, expect=spec)
    with pytest.raises(RuntimeError, match="missing"):
        finalize_cache(tmp_path)
    # Rerunning single-process builds only the missing shards 0 and 2.
    stamp = (tmp_path / "shard_00001.x.npy").stat().st_mtime_ns
    build_cache(counted, tmp_path, spec, progress=False, group_size=8)
    assert (tmp_path / "shard_00001.x.npy").stat().st_mtime_ns == stamp
    assert counted.calls > calls_rank1
    # A complete cache is never solved again.
    done = counted.calls
    build_cache(counted, tmp_path, spec, progress=False, group_size=8)
    assert counted.calls == done
    a, b = TrajectoryCache(d, expect=spec), TrajectoryCache(tmp_path, expect=spec)
    # Same bytes as the single-process build: shards depend on (seed, shard) only.
    for s in range(3):
        for key in ("x", "u"):
            assert np.array_equal(np.load(d / f"shard_{s:05d}.{key}.npy"), np.load(tmp_path / f"shard_{s:05d}.{key}.npy"))
    assert torch.equal(a.noise(torch.arange(24)), b.noise(torch.arange(24)))


def test_model_tag_follows_weights(mixture):
    assert model_tag(mixture(seed=0)) == model_tag(mixture(seed=0))
    assert model_tag(mixture(seed=0)) != model_tag(mixture(seed=1))


def test_validation_ground_truth_is_kept_with_the_cache_and_read_only_when_it_is_this_set(tmp_path, mixture):
    import bespoke_ext as bx

    m = mixture(dim=3)
    calls = []

    class Counted(torch.nn.Module):   # the mixture, counting the validation-sized calls
        def __init__(self):
            super().__init__()
            self.m = m

        def forward(self, x, t):
            calls.append(x.shape[0])
            return self.m(x, t)

    model = Counted()
    kw = dict(shape=(3,), iterations=1, batch_size=4, gt="cached", cache_dir=tmp_path / "c", cache_samples=8,
              val_size=24, gt_group_size=24, progress=False, dtype=torch.float64)
    first = bx.train(model, bx.BespokeSolver(2, 1), **kw)
    solved = calls.count(24)
    assert solved > 6 and first.history.gt_seconds > 0   # a dopri5 solve of the 24 samples
    files = sorted(p.name for p in (tmp_path / "c").glob("validation_*"))
    assert len(files) == 2
    calls.clear()
    second = bx.train(model, bx.BespokeSolver(2, 1), **kw)
    assert calls.count(24) == 2 * second.nfe   # validations of iteration 0 and 1 only: no solve
    assert second.history.val_rmse == first.history.val_rmse
    # another set (size) is solved, next to the first
    calls.clear()
    third = bx.train(model, bx.BespokeSolver(2, 1), **{**kw, "val_size": 12, "gt_group_size": 12})
    assert calls.count(12) > 6 and len(list((tmp_path / "c").glob("validation_*"))) == 4
    # a damaged file is solved again (and rewritten), never used
    npy = next((tmp_path / "c").glob(f"validation_{files[0].split('_')[1].split('.')[0]}.npy"))
    arr = np.load(npy)
    np.save(npy, arr + 1.0)
    calls.clear()
    again = bx.train(model, bx.BespokeSolver(2, 1), **kw)
    assert calls.count(24) == solved and again.history.val_rmse == first.history.val_rmse
    assert np.array_equal(np.load(npy), arr)
    # a record is used only for its own key and noise (another torch's random stream: another checksum)
    from bespoke_ext.groundtruth.validation_store import load_solved, store_solved
    x0 = torch.randn(5, 3, dtype=torch.float64)
    store_solved(tmp_path, {"size": 5}, x0, 2 * x0)
    assert load_solved(tmp_path, {"size": 5}, x0).equal(2 * x0)
    assert load_solved(tmp_path, {"size": 5}, x0 + 1) is None and load_solved(tmp_path, {"size": 6}, x0) is None


def test_ground_truth_never_evaluates_the_model_past_the_end_time():
    # dopri5 steps past the last time and interpolates back unless told to land on it; a field that is
    # defined on [0, 1] only (here -x, NaN past 1, like a sqrt(1 - t) term) must still have ground truth
    from bespoke_ext.groundtruth.odesolve import solve_trajectories

    seen = []

    def field(x, t):
        t = torch.as_tensor(t).reshape(-1, 1)   # per sample or one time
        seen.append(float(t.max()))
        return -x * torch.where(t <= 1, 1.0, float("nan"))

    x0 = torch.randn(8, 3, dtype=torch.float64)
    states = solve_trajectories(field, x0, torch.linspace(0, 1, 5, dtype=torch.float64))
    assert max(seen) <= 1.0 and torch.isfinite(states).all()
    assert torch.allclose(states[-1], x0 * math.exp(-1.0), atol=1e-5)   # x0 e^(-t)
