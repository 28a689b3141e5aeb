"""Tests for bespoke_ext.models: schedules, adapters, oracle, nets, data, pretraining."""

import math
import types

import pytest
import torch

from bespoke_ext.models.adapters import (
    ClassifierFreeGuidance,
    DiffusersTimeAdapter,
    ScalarTimeAdapter,
    VelocityAdapter,
)
from bespoke_ext.models.nets import MLPVelocity, UNetVelocity
from bespoke_ext.models.oracle import GaussianMixtureFlow
from bespoke_ext.models.schedules import CosineSchedule, CustomSchedule, OTSchedule, VPSchedule, get_schedule

SCHEDULES = ["ot", "cosine", "vp"]


# ----------------------------------------------------------------------------- schedules

@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_derivatives_match_autograd(name):
    sch = get_schedule(name)
    t = torch.linspace(0.0, 0.99, 101, dtype=torch.float64).requires_grad_(True)
    for fn, dfn in ((sch.alpha, sch.d_alpha), (sch.sigma, sch.d_sigma)):
        (g,) = torch.autograd.grad(fn(t).sum(), t)
        torch.testing.assert_close(dfn(t).detach(), g, rtol=1e-10, atol=1e-12)


def test_schedule_end_values_and_unit_variance():
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    for name in SCHEDULES:
        sch = get_schedule(name)
        torch.testing.assert_close(sch.sigma(t)[1], torch.tensor(0.0, dtype=torch.float64), atol=1e-12, rtol=0)
        assert float(sch.alpha(t)[1]) == pytest.approx(1.0)
    ts = torch.rand(50, dtype=torch.float64)
    for sch in (CosineSchedule(), VPSchedule()):
        torch.testing.assert_close(sch.alpha(ts) ** 2 + sch.sigma(ts) ** 2, torch.ones_like(ts))
    # VP in this time convention: alpha(0) = xi(1) = exp(-(B - b)/4 - b/2)
    assert float(VPSchedule().alpha(torch.tensor(0.0))) == pytest.approx(math.exp(-19.9 / 4 - 0.05), rel=1e-5)


def test_custom_schedule_autograd_derivatives_everywhere():
    sch = CustomSchedule(lambda t: torch.sin(0.5 * math.pi * t), lambda t: torch.cos(0.5 * math.pi * t))
    ref = CosineSchedule()
    t = torch.rand(20, dtype=torch.float64)
    torch.testing.assert_close(sch.d_alpha(t), ref.d_alpha(t))
    with torch.inference_mode():  # sampling: must still work without a graph
        torch.testing.assert_close(sch.d_sigma(t.clone()), ref.d_sigma(t))
    # with a graph to t: the derivative itself is differentiable (second derivative of sin)
    tg = t.clone().requires_grad_(True)
    (g2,) = torch.autograd.grad(sch.d_alpha(tg).sum(), tg)
    torch.testing.assert_close(g2, -(0.5 * math.pi) ** 2 * torch.sin(0.5 * math.pi * t))
    given = CustomSchedule(lambda t: t, lambda t: 1 - t, d_alpha_fn=lambda t: 7 + 0 * t)
    assert float(given.d_alpha(torch.tensor(0.3))) == 7


def test_get_schedule_inputs_and_errors():
    assert isinstance(get_schedule("OT"), OTSchedule)
    vp = get_schedule({"name": "vp", "beta_min": 0.2, "beta_max": 10.0})
    assert (vp.beta_min, vp.beta_max) == (0.2, 10.0)
    assert get_schedule(vp.to_dict()).to_dict() == vp.to_dict()
    assert get_schedule(vp) is vp
    with pytest.raises(ValueError, match="schedule"):
        get_schedule("karras")
    with pytest.raises(ValueError, match="schedule"):
        get_schedule(3)
    with pytest.raises(ValueError, match="alpha_fn"):
        CustomSchedule(1.0, lambda t: t)


# ----------------------------------------------------------------------------- adapters
# Gaussian data x1 ~ N(m, c^2 I), x0 ~ N(0, I), x_t = a x1 + s x0 ~ N(a m, V I), V = a^2 c^2 + s^2:
#   E[x1 | x_t] = m + (a c^2 / V)(x_t - a m),   E[x0 | x_t] = (s / V)(x_t - a m)
#   u = a' E[x1 | x_t] + s' E[x0 | x_t]

M, C = 0.7, 0.4


def _gauss(sch, t, x):
    a, s, da, ds = (f(t)[:, None] for f in (sch.alpha, sch.sigma, sch.d_alpha, sch.d_sigma))
    v = a * a * C * C + s * s
    ex1 = M + a * C * C / v * (x - a * M)
    ex0 = s / v * (x - a * M)
    return ex1, ex0, da * ex1 + ds * ex0


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("prediction", ["noise", "data", "velocity"])
def test_adapter_exact_gaussian_predictors_give_exact_velocity(name, prediction):
    sch = get_schedule(name)
    which = {"data": 0, "noise": 1, "velocity": 2}[prediction]

    def predictor(x, t):
        return _gauss(sch, t.expand(x.shape[0]), x)[which]

    adapter = VelocityAdapter(predictor, prediction=prediction, schedule=name)
    t = torch.linspace(0.02, 0.98, 64, dtype=torch.float64)
    x = torch.randn(64, 3, dtype=torch.float64)
    torch.testing.assert_close(adapter(x, t), _gauss(sch, t, x)[2], rtol=1e-9, atol=1e-9)
    u0 = adapter(x[:1], torch.tensor(0.5, dtype=torch.float64))  # 0-dim t
    torch.testing.assert_close(u0, _gauss(sch, torch.tensor([0.5], dtype=torch.float64), x[:1])[2])


@pytest.mark.parametrize("prediction", ["noise", "data"])
def test_adapter_clamps_ends_and_stays_differentiable(prediction):
    sch = OTSchedule()
    which = {"data": 0, "noise": 1}[prediction]
    adapter = VelocityAdapter(lambda x, t: _gauss(sch, t.expand(x.shape[0]), x)[which], prediction, "ot")
    assert adapter.t_eps == pytest.approx(1e-3)
    x = torch.randn(4, 3, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0, 0.3, 0.6], dtype=torch.float64, requires_grad=True)
    u = adapter(x, t)
    assert torch.isfinite(u).all()
    (g,) = torch.autograd.grad(u.sum(), t)
    assert torch.isfinite(g).all() and bool((g[2:] != 0).all())


class _HalfPrecisionNet(torch.nn.Module):
    """f(x, t) = x cos(3 t) + sin(5 t) in float32, returned in x's dtype: a bf16 network's output. Its time
    also goes through a bf16 layer (zero weights), so t must reach it in x's dtype."""

    def __init__(self):
        super().__init__()
        self.temb = torch.nn.Linear(1, 1).to(torch.bfloat16)
        torch.nn.init.zeros_(self.temb.weight), torch.nn.init.zeros_(self.temb.bias)

    def forward(self, x, t):
        zero = self.temb(t.reshape(-1, 1)).reshape(-1, *([1] * (x.dim() - 1)))  # t in x's dtype, or this fails
        t = t.float().reshape(-1, *([1] * (x.dim() - 1))) if t.dim() else t.float()
        return (x.float() * torch.cos(3 * t) + torch.sin(5 * t) + zero.float()).to(x.dtype)


@pytest.mark.parametrize("prediction, schedule", [("noise", "vp"), ("noise", "cosine"), ("data", "ot")])
def test_adapter_time_and_schedule_math_stays_float32_for_a_bf16_model(prediction, schedule):
    # in bf16, t = 0.9986 and 1 - t_eps round to 1.0: sigma was 0 and a VP noise predictor's velocity NaN
    net = _HalfPrecisionNet()
    # the reference: the adapter's arithmetic in float32 around the same bf16 network call
    low, full = VelocityAdapter(net, prediction=prediction, schedule=schedule), VelocityAdapter(
        lambda x, t: net(x.bfloat16(), t.bfloat16()).float(), prediction=prediction, schedule=schedule)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    for t in (0.3, 0.9986, 0.9995, 0.0007):
        u16 = low(x.bfloat16(), torch.tensor(t)).float()
        u32 = full(x, torch.tensor(t))
        assert torch.isfinite(u16).all(), (t, u16)
        # within bf16's rounding of x and of the network's output, times the coefficients that scale them
        # (near the ends beta x and gamma f nearly cancel)
        beta, gamma, _ = full.coefficients(torch.tensor(t))
        bound = 2e-2 * (beta.abs() + gamma.abs()) * (x.abs().max() + 1)
        assert (u16 - u32).abs().max() <= bound, (prediction, schedule, t)


def test_diffusers_time_adapter_forms_timesteps_in_float32_for_bf16_states():
    seen = []
    adapter = DiffusersTimeAdapter(lambda x, ts: seen.append(ts) or x)
    adapter(torch.zeros(1, 2, dtype=torch.bfloat16), torch.tensor(0.0013))
    assert seen[0].dtype == torch.float32 and abs(float(seen[0]) - 998.7) < 1e-3  # bf16 gave 1000
    DiffusersTimeAdapter(lambda x, ts: seen.append(ts) or x, timestep_dtype=torch.bfloat16)(
        torch.zeros(1, 2, dtype=torch.bfloat16), torch.tensor(0.0013))
    assert seen[1].dtype == torch.bfloat16


def test_guidance_and_scalar_time_adapters_pass_t_in_a_bf16_states_dtype():
    net = _HalfPrecisionNet()
    x = torch.randn(4, 3).bfloat16()
    guided = ClassifierFreeGuidance(lambda x, t, label: net(x, t), guidance_scale=1.0)
    assert guided(x, torch.tensor(0.5), label=torch.zeros(4)).dtype == torch.bfloat16
    assert ScalarTimeAdapter(net)(x, torch.tensor([0.1, 0.1, 0.5, 0.5])).dtype == torch.bfloat16


def test_adapter_bad_arguments_name_them():
    with pytest.raises(ValueError, match="prediction"):
        VelocityAdapter(lambda x, t: x, prediction="score")
    with pytest.raises(ValueError, match="schedule"):
        VelocityAdapter(lambda x, t: x, prediction="noise", schedule="edm")
    with pytest.raises(ValueError, match="t_eps"):
        VelocityAdapter(lambda x, t: x, prediction="noise", t_eps=0.7)
    with pytest.raises(ValueError, match="model"):
        VelocityAdapter(None)
    with pytest.raises(ValueError, match=r"\bt\b"):
        VelocityAdapter(lambda x, t: x)(torch.zeros(3, 2), torch.zeros(2))


def _cond_model(calls):
    def model(x, t, label=None, scale=None):
        calls.append((x.shape[0], tuple(t.shape), label.clone(), None if scale is None else scale.shape[0]))
        tb = t if t.dim() == 0 else t[:, None]
        return label[:, None].to(x.dtype) * x + tb * (1.0 if scale is None else scale[:, None])
    return model


@pytest.mark.parametrize("t_shape", ["scalar", "batch"])
def test_cfg_formula_and_single_batched_call(t_shape):
    calls = []
    w = 1.5
    cfg = ClassifierFreeGuidance(_cond_model(calls), guidance_scale=w, cond_key="label", null_value=0)
    x = torch.randn(5, 2)
    t = torch.tensor(0.3) if t_shape == "scalar" else torch.rand(5)
    label = torch.tensor([1, 2, 3, 4, 5])
    scale = torch.rand(5)
    u = cfg(x, t, label=label, scale=scale)
    assert len(calls) == 1 and calls[0][0] == 10 and calls[0][3] == 10
    assert calls[0][2].tolist() == [1, 2, 3, 4, 5, 0, 0, 0, 0, 0]
    tb = t if t.dim() == 0 else t[:, None]
    u_c = label[:, None] * x + tb * scale[:, None]
    u_u = tb * scale[:, None]
    torch.testing.assert_close(u, (1 + w) * u_c - w * u_u)
    assert (cfg.nfe, cfg.network_forwards) == (1, 2)
    cfg(x, t, label=label)
    assert (cfg.nfe, cfg.network_forwards) == (2, 4)
    cfg.reset_counters()
    assert (cfg.nfe, cfg.network_forwards) == (0, 0)


def test_cfg_errors_name_the_argument():
    cfg = ClassifierFreeGuidance(_cond_model([]), 1.0, cond_key="label", null_value=0)
    with pytest.raises(ValueError, match="label"):
        cfg(torch.zeros(2, 2), torch.tensor(0.5))
    with pytest.raises(ValueError, match="guidance_scale"):
        ClassifierFreeGuidance(_cond_model([]), "strong")
    with pytest.raises(ValueError, match="cond_key"):
        ClassifierFreeGuidance(_cond_model([]), 1.0, cond_key="")


def test_diffusers_time_mapping():
    seen = []

    def unet(x, timestep, **kw):
        seen.append(timestep.detach().clone())
        return types.SimpleNamespace(sample=x * timestep.reshape(-1, 1) / 1000.0)

    ad = DiffusersTimeAdapter(unet, num_train_timesteps=1000)
    x = torch.ones(3, 2)
    out = ad(x, torch.tensor([0.0, 0.25, 1.0]))
    torch.testing.assert_close(seen[-1], torch.tensor([1000.0, 750.0, 0.0]))
    torch.testing.assert_close(out[:, 0], torch.tensor([1.0, 0.75, 0.0]))
    ad_r = DiffusersTimeAdapter(unet, num_train_timesteps=1000, timestep_scale=999, round_timesteps=True)
    t = torch.tensor([0.0, 0.1234, 1.0], requires_grad=True)
    out = ad_r(x, t)
    torch.testing.assert_close(seen[-1], torch.tensor([999.0, 876.0, 0.0]))
    (g,) = torch.autograd.grad(out.sum(), t)  # straight-through: d t_model / dt = -999
    assert torch.isfinite(g).all() and bool((g < 0).all())
    with pytest.raises(ValueError, match="num_train_timesteps"):
        DiffusersTimeAdapter(unet, num_train_timesteps=0)


def test_scalar_time_adapter_groups_and_keeps_time_gradient():
    calls = []

    def scalar_model(x, t):
        assert torch.is_tensor(t) and t.dim() == 0, "the wrapped model must only see 0-dim times"
        calls.append(x.shape[0])
        return x * torch.sin(3 * t) + t

    ad = ScalarTimeAdapter(scalar_model)
    x = torch.randn(6, 2, dtype=torch.float64)
    t = torch.tensor([0.1, 0.5, 0.1, 0.5, 0.9, 0.1], dtype=torch.float64)
    ref = x * torch.sin(3 * t)[:, None] + t[:, None]
    torch.testing.assert_close(ad(x, t), ref)
    assert sorted(calls) == [1, 2, 3]  # one call per unique time
    tg = t.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(ad(x, tg).sum(), tg)
    torch.testing.assert_close(g, (x * 3 * torch.cos(3 * t)[:, None] + 1).sum(1))
    torch.testing.assert_close(ad(x, torch.tensor(0.5, dtype=torch.float64)), x * math.sin(1.5) + 0.5)
    with pytest.raises(ValueError, match="time_as"):
        ScalarTimeAdapter(scalar_model, time_as="int")


# ----------------------------------------------------------------------------- oracle

def test_oracle_single_gaussian_matches_closed_form():
    dim = 5
    gm = GaussianMixtureFlow(torch.full((1, dim), M, dtype=torch.float64), stds=C)
    t = torch.rand(32, dtype=torch.float64)
    x = torch.randn(32, dim, dtype=torch.float64)
    torch.testing.assert_close(gm(x, t), _gauss(OTSchedule(), t, x)[2])
    torch.testing.assert_close(gm(x, t[3]), _gauss(OTSchedule(), t[3].expand(32), x)[2])
    # float32 path and image-shaped data
    gi = GaussianMixtureFlow(torch.full((1, 16), M), stds=C, shape=(1, 4, 4))
    xi = torch.randn(8, 1, 4, 4)
    ui = gi(xi, torch.full((8,), 0.4))
    assert ui.shape == xi.shape and ui.dtype == torch.float32
    torch.testing.assert_close(ui.reshape(8, 16), _gauss(OTSchedule(), torch.full((8,), 0.4), xi.reshape(8, 16))[2].float())


def test_oracle_mixture_matches_gaussian_densities():
    # p(k | x_t) from the component densities N(x_t; t mu_k, v_k I); u = sum_k p_k u_k (closed form per k)
    gm = GaussianMixtureFlow(torch.tensor([[-1.0, 0.5, 0.0], [1.0, -0.5, 0.3]], dtype=torch.float64),
                             stds=torch.tensor([0.3, 0.8], dtype=torch.float64), weights=torch.tensor([0.3, 0.7]))
    x = torch.randn(16, 3, dtype=torch.float64)
    t = torch.rand(16, dtype=torch.float64)
    logp, uk = [], []
    for k in range(2):
        mu, s = gm.means[k], gm.stds[k]
        v = t**2 * s**2 + (1 - t) ** 2
        normal = torch.distributions.Normal(t[:, None] * mu, v.sqrt()[:, None])
        logp.append(torch.log(gm.weights[k]) + normal.log_prob(x).sum(1))
        uk.append(mu + ((t * s**2 - (1 - t)) / v)[:, None] * (x - t[:, None] * mu))
    post = torch.softmax(torch.stack(logp, 1), 1)
    torch.testing.assert_close(gm.posterior(x, t), post)
    torch.testing.assert_close(gm(x, t), post[:, :1] * uk[0] + post[:, 1:] * uk[1])


def test_oracle_posterior_is_stable_and_differentiable():
    gm = GaussianMixtureFlow.random(dim=3, components=4, std=0.02, seed=1).double()
    x = torch.randn(6, 3, dtype=torch.float64) * 3
    t = torch.tensor([0.0, 0.3, 0.7, 0.99, 1.0, 0.5], dtype=torch.float64)
    assert torch.isfinite(gm(x, t)).all()
    xs = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    ts = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: gm(a, b), (xs, ts))


def test_oracle_flow_transports_noise_to_the_mixture():
    import torchdiffeq
    gm = GaussianMixtureFlow(torch.tensor([[-1.0, -1.0], [1.0, -0.5], [0.0, 1.0]], dtype=torch.float64),
                             stds=torch.tensor([0.1, 0.05, 0.15], dtype=torch.float64), weights=torch.tensor([0.2, 0.3, 0.5]))
    gen = torch.Generator().manual_seed(0)
    n = 3000
    x0 = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    x1 = torchdiffeq.odeint(lambda t, x: gm(x, t), x0, torch.tensor([0.0, 1.0], dtype=torch.float64),
                            method="dopri5", rtol=1e-6, atol=1e-6)[-1]
    k = torch.cdist(x1, gm.means).argmin(1)
    freq = torch.bincount(k, minlength=3).double() / n
    torch.testing.assert_close(freq, gm.weights, atol=0.035, rtol=0)  # ~4 binomial std errors
    for j in range(3):
        xk = x1[k == j]
        torch.testing.assert_close(xk.mean(0), gm.means[j], atol=4 * float(gm.stds[j]) / math.sqrt(len(xk)) + 1e-3, rtol=0)
        assert float(xk.std(0).mean()) == pytest.approx(float(gm.stds[j]), rel=0.1)
    # the exact sampler of the data agrees in distribution (same component frequencies)
    xd = gm.sample_data(n, generator=gen, dtype=torch.float64)
    fd = torch.bincount(torch.cdist(xd, gm.means).argmin(1), minlength=3).double() / n
    torch.testing.assert_close(fd, gm.weights, atol=0.035, rtol=0)


def test_oracle_bad_inputs():
    with pytest.raises(ValueError, match="means"):
        GaussianMixtureFlow(torch.zeros(3))
    with pytest.raises(ValueError, match="stds"):
        GaussianMixtureFlow(torch.zeros(2, 2), stds=torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="weights"):
        GaussianMixtureFlow(torch.zeros(2, 2), weights=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="shape"):
        GaussianMixtureFlow(torch.zeros(2, 4), shape=(3,))
    with pytest.raises(ValueError, match="x must"):
        GaussianMixtureFlow(torch.zeros(2, 4))(torch.zeros(3, 5), torch.tensor(0.5))


# ----------------------------------------------------------------------------- nets

NET_CASES = [
    (lambda: MLPVelocity(dim=2, hidden=32, layers=2), (2,)),
    (lambda: UNetVelocity(channels=(8, 16), time_dim=16, groups=4), (1, 8, 8)),
    (lambda: UNetVelocity(channels=(8, 16), time_dim=16, groups=4, attention=False), (1, 28, 28)),
]


@pytest.mark.parametrize("make,shape", NET_CASES)
def test_nets_time_forms_dtypes_and_time_gradient(make, shape):
    torch.manual_seed(0)
    net = make()
    for p in net.parameters():  # zero-initialised output layers would hide the time dependence
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(3, *shape)
    out_s = net(x, torch.tensor(0.4))
    out_b = net(x, torch.full((3,), 0.4))
    assert out_s.shape == x.shape
    torch.testing.assert_close(out_s, out_b)
    net64 = net.double()
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64, requires_grad=True)
    out = net64(x.double(), t)
    assert out.dtype == torch.float64
    (g,) = torch.autograd.grad(out.pow(2).sum(), t)
    assert torch.isfinite(g).all() and bool((g != 0).all())
    # finite-difference check of the time derivative of one output
    h = 1e-6
    e = torch.zeros(3, dtype=torch.float64)
    e[1] = h
    td = t.detach()
    with torch.no_grad():
        fd = (net64(x.double(), td + e).pow(2).sum() - net64(x.double(), td - e).pow(2).sum()) / (2 * h)
    assert float(g[1]) == pytest.approx(float(fd), rel=1e-4, abs=1e-7)


def test_nets_reject_bad_shapes():
    with pytest.raises(ValueError, match="x must"):
        MLPVelocity(dim=2)(torch.zeros(4, 3), torch.tensor(0.1))
    with pytest.raises(ValueError, match="x must"):
        UNetVelocity(channels=(8, 16), groups=4)(torch.zeros(2, 1, 7, 7), torch.tensor(0.1))
    with pytest.raises(ValueError, match="channels"):
        UNetVelocity(channels=(8, 16, 32))


def test_preset_nets_are_small():
    from bespoke_ext.models.nets import build_net
    from bespoke_ext.models.pretrain import PRESETS

    for name, cfg in PRESETS.items():
        n = sum(p.numel() for p in build_net(cfg["net"], cfg["net_kwargs"]).parameters())
        assert n <= 1_500_000, name


# ----------------------------------------------------------------------------- data and pretraining

def test_data_loaders():
    from bespoke_ext.models import data

    m = data.moons(500, seed=3)
    assert m.shape == (500, 2) and m.dtype == torch.float32 and float(m.abs().max()) < 1.5
    torch.testing.assert_close(m, data.moons(500, seed=3))
    cb = data.checkerboard(400, seed=1)
    assert cb.shape == (400, 2) and float(cb.abs().max()) <= 1.0
    cell = ((cb + 1) * 2).floor().long()
    assert bool(((cell.sum(1) % 2) == 0).all())
    d8, y8 = data.digits8("train", return_labels=True)
    d8t = data.digits8("test")
    assert d8.shape[1:] == (1, 8, 8) and d8.shape[0] + d8t.shape[0] == 1797 and len(y8) == len(d8)
    assert float(d8.min()) == -1.0 and float(d8.max()) == 1.0
    with pytest.raises(ValueError, match="split"):
        data.digits8("validation")
    with pytest.raises(ValueError, match="dataset"):
        data.load_dataset("cifar10")


def test_mnist_split_is_deterministic_and_disjoint():
    from bespoke_ext.models import data

    tr, ytr = data.mnist("train", return_labels=True)
    te, yte = data.mnist("test", return_labels=True)
    assert tr.shape == (4500, 1, 28, 28) and te.shape == (500, 1, 28, 28)
    assert float(tr.min()) == -1.0 and float(tr.max()) == 1.0
    assert torch.bincount(yte).tolist() == [50] * 10
    torch.testing.assert_close(te, data.mnist("test"))
    # no held-out image appears in the training set
    d = torch.cdist(te.reshape(500, -1)[:50], tr.reshape(4500, -1))
    assert float(d.min()) > 0


def test_pretrain_is_reproducible_and_writes_a_card(tmp_path):
    from bespoke_ext.models.pretrain import pretrain, sha256_file

    c1 = pretrain("moons2d", tmp_path / "a", iterations=15, batch_size=64, seed=3, progress=False)
    c2 = pretrain("moons2d", tmp_path / "b", iterations=15, batch_size=64, seed=3, progress=False)
    c3 = pretrain("moons2d", tmp_path / "c", iterations=15, batch_size=64, seed=4, progress=False)
    assert c1["weights"]["sha256"] == c2["weights"]["sha256"] != c3["weights"]["sha256"]
    assert c1["weights"]["sha256"] == sha256_file(tmp_path / "a" / "moons2d.safetensors")
    tr = c1["training"]
    for key in ("iterations", "batch_size", "lr", "seed", "final_loss", "wall_clock_seconds", "machine"):
        assert key in tr
    assert tr["iterations"] == 15 and tr["seed"] == 3 and "torch_num_threads" in tr["machine"]
    assert c1["prediction"] == "velocity" and c1["schedule"] == {"name": "ot"}
    assert (tmp_path / "a" / "moons2d.json").is_file()
    with pytest.raises(ValueError, match="name"):
        pretrain("imagenet", tmp_path)


def test_pretrain_cli_arguments():
    import argparse

    from bespoke_ext.cli.pretrain import add_pretrain_arguments

    args = add_pretrain_arguments(argparse.ArgumentParser()).parse_args(["mnist", "--out", "d", "--iterations", "5", "--seed", "2"])
    assert (args.name, args.out, args.iterations, args.seed) == ("mnist", "d", 5, 2)
    with pytest.raises(SystemExit):
        add_pretrain_arguments(argparse.ArgumentParser()).parse_args(["cifar"])


def test_class_conditional_unet_reads_labels_and_the_null_label():
    from bespoke_ext.models.nets import UNetVelocity

    torch.manual_seed(0)
    net = UNetVelocity(1, (8, 16), time_dim=16, groups=4, num_classes=10)
    with torch.no_grad():  # zero-initialised output and projections: make every weight speak
        for p in net.parameters():
            p.normal_(std=0.2)
    x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 0.3)
    a, b = net(x, t, y=torch.tensor([1, 2, 3, 4])), net(x, t, y=torch.tensor([5, 6, 7, 8]))
    assert not torch.allclose(a, b)  # the label changes the field
    torch.testing.assert_close(net(x, t), net(x, t, y=torch.full((4,), 10)))  # no y = the null label
    torch.testing.assert_close(net(x, t, y=3), net(x, t, y=torch.full((4,), 3)))
    with pytest.raises(ValueError, match="integer class labels"):
        net(x, t, y=torch.ones(4))
    with pytest.raises(ValueError, match=r"labels \[B\]"):
        net(x, t, y=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="unconditional"):
        UNetVelocity(1, (8, 16), time_dim=16, groups=4)(x, t, y=torch.tensor([1, 2, 3, 4]))
    with pytest.raises(ValueError, match="num_classes"):
        UNetVelocity(num_classes=-1)


def test_conditional_pretraining_drops_labels_and_writes_the_conditioning(tmp_path):
    from bespoke_ext.models.pretrain import pretrain

    card = pretrain("mnist_cond", tmp_path, iterations=2, batch_size=8, progress=False)
    assert card["conditioning"]["key"] == "y" and card["conditioning"]["null_label"] == 10
    assert card["architecture"]["kwargs"]["num_classes"] == 10 and card["training"]["heldout_loss"] > 0


def test_model_identity_covers_weights_settings_and_inputs():
    import functools

    from bespoke_ext.models import ClassifierFreeGuidance, VelocityAdapter
    from bespoke_ext.models.identity import OpaqueModelError, inputs_tag, model_tag
    from bespoke_ext.models.oracle import GaussianMixtureFlow

    m = GaussianMixtureFlow.random(dim=4, components=3, std=0.2, seed=0)
    other = GaussianMixtureFlow.random(dim=4, components=3, std=0.2, seed=1)
    assert model_tag(m) == model_tag(GaussianMixtureFlow.random(dim=4, components=3, std=0.2, seed=0))
    assert model_tag(m) != model_tag(other)
    # settings of the module and its submodules
    guided = ClassifierFreeGuidance(m, 2.0, cond_key="y", null_value=3)
    assert model_tag(guided) != model_tag(ClassifierFreeGuidance(m, 0.0, cond_key="y", null_value=3))
    assert model_tag(guided) != model_tag(ClassifierFreeGuidance(m, 2.0, cond_key="y", null_value=2))
    net = torch.nn.Linear(4, 4)
    tags = {model_tag(VelocityAdapter(net, prediction=p, schedule=s, t_eps=e))
            for p, s, e in [("noise", "vp", 1e-3), ("data", "vp", 1e-3), ("noise", "cosine", 1e-3), ("noise", "vp", 1e-2)]}
    assert len(tags) == 4
    # counters do not change the identity as the model is used
    before = model_tag(guided)
    guided(torch.randn(2, 4), torch.tensor(0.5), y=torch.tensor([0, 1]))
    assert guided.network_forwards == 2 and model_tag(guided) == before
    # tensors held as plain attributes (not parameters or buffers, so not in the state dict), by value
    emb = ClassifierFreeGuidance(m, 2.0, cond_key="y", null_value=torch.zeros(4))
    assert model_tag(emb) != model_tag(ClassifierFreeGuidance(m, 2.0, cond_key="y", null_value=torch.ones(4)))
    assert model_tag(emb) == model_tag(ClassifierFreeGuidance(m, 2.0, cond_key="y", null_value=torch.zeros(4)))
    scaled = torch.nn.Linear(4, 4)
    scaled.scale = torch.tensor(1.0)
    before_scale = model_tag(scaled)
    scaled.scale = torch.tensor(50.0)
    assert model_tag(scaled) != before_scale
    # ScalarTimeAdapter's call counter either
    from bespoke_ext.models import ScalarTimeAdapter

    scalar = ScalarTimeAdapter(m)
    before_calls = model_tag(scalar)
    scalar(torch.randn(3, 4), torch.tensor([0.1, 0.2, 0.2]))
    assert scalar.calls == 2 and model_tag(scalar) == before_calls
    # bound methods are the object they are bound to
    assert model_tag(m.forward) != model_tag(other.forward)
    # state the package cannot see is refused unless the caller takes responsibility
    for opaque in (lambda x, t: m(x, t), functools.partial(m.forward)):
        with pytest.raises(OpaqueModelError, match="model_tag"):
            model_tag(opaque)
    assert ":" not in model_tag(lambda x, t: x, strict=False)
    # inputs: constant extras' values and the conditions pool
    assert inputs_tag({"y": torch.tensor([1])}) != inputs_tag({"y": torch.tensor([2])})
    assert inputs_tag({"w": 2.0}) != inputs_tag({"w": 4.0})
    assert inputs_tag(None, {"y": torch.arange(3)}) != inputs_tag(None, {"y": torch.arange(4)})
    assert inputs_tag({"y": torch.arange(3)}) != inputs_tag(None, {"y": torch.arange(3)})


def test_model_tag_of_a_buffer_with_stride_zero():
    # a one-component mixture's stds come from expand(1).clone(): size 1, stride 0 (hashing crashed)
    from bespoke_ext.models.identity import model_tag

    one = GaussianMixtureFlow(torch.zeros(1, 2), 0.1)
    m = torch.nn.Module()
    m.register_buffer("b", torch.ones(()).expand(1, 1).clone())
    assert m.b.stride() == (0, 0)
    assert model_tag(one) == model_tag(GaussianMixtureFlow(torch.zeros(1, 2), 0.1)) and ":" in model_tag(m)
    assert model_tag(one) != model_tag(GaussianMixtureFlow(torch.zeros(1, 2), 0.2))


@pytest.mark.parametrize("shape", [(4,), (1, 2, 2)])
def test_oracle_takes_an_empty_batch(shape):
    gm = GaussianMixtureFlow.random(dim=4, components=3, std=0.2, seed=0, shape=shape)
    x = torch.randn(0, *shape)
    assert gm(x, torch.tensor(0.5)).shape == x.shape and gm(x, torch.rand(0)).shape == x.shape
