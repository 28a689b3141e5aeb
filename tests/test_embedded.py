"""Tests for the embedded pre-trained models (bespoke_ext.models.embedded and the shipped weights)."""

import json
import shutil

import pytest
import torch

from bespoke_ext.models.embedded import WEIGHTS_DIR, list_embedded, load_embedded
from bespoke_ext.models.pretrain import PRESETS, sha256_file

NAMES = ["moons2d", "mnist", "digits_vp", "mnist_cond"]


def _midpoint(u, x, steps):
    """Plain midpoint sampler (kept local: these tests check the models, not the samplers)."""
    h = 1.0 / steps
    with torch.inference_mode():
        for i in range(steps):
            t = torch.tensor(i * h, dtype=x.dtype)
            xm = x + 0.5 * h * u(x, t)
            x = x + h * u(xm, t + 0.5 * h)
    return x


def test_all_models_are_shipped_within_the_size_budget():
    assert set(NAMES) <= set(list_embedded())
    total = sum((WEIGHTS_DIR / f"{n}.safetensors").stat().st_size for n in NAMES)
    assert total <= 10 * 1024 * 1024


@pytest.mark.parametrize("name", NAMES)
def test_card_matches_weights_and_preset(name):
    card = json.loads((WEIGHTS_DIR / f"{name}.json").read_text())
    assert card["weights"]["sha256"] == sha256_file(WEIGHTS_DIR / card["weights"]["file"])
    preset = PRESETS[name]
    assert card["prediction"] == preset["prediction"]
    assert card["architecture"]["class"] == preset["net"]
    assert tuple(card["shape"]) == tuple(preset["shape"])
    tr = card["training"]
    for key in ("iterations", "batch_size", "lr", "seed", "final_loss", "wall_clock_seconds", "machine"):
        assert key in tr, key
    assert tr["final_loss"] == tr["final_loss"] and tr["final_loss"] < 1.0  # finite, below the loss at init


@pytest.mark.parametrize("name", NAMES)
def test_load_gives_frozen_velocity_with_finite_samples(name):
    m = load_embedded(name)
    assert m.name == name and m.shape == tuple(m.card["shape"])
    assert not m.velocity.training
    assert all(not p.requires_grad for p in m.velocity.parameters())
    x0 = m.sample_noise(8, generator=torch.Generator().manual_seed(0))
    x1 = _midpoint(m.velocity, x0, steps=5)
    assert x1.shape == (8, *m.shape) and torch.isfinite(x1).all()
    assert float(x1.abs().max()) < 3.0  # data live in [-1, 1]
    # differentiable in x and t (weights frozen), both time forms accepted
    x = x0[:3].clone().requires_grad_(True)
    t = torch.tensor([0.2, 0.5, 0.8], requires_grad=True)
    gx, gt = torch.autograd.grad(m.velocity(x, t).sum(), (x, t))
    assert torch.isfinite(gx).all() and torch.isfinite(gt).all() and bool((gt != 0).all())
    torch.testing.assert_close(m.velocity(x0[:3], torch.tensor(0.5)), m.velocity(x0[:3], torch.full((3,), 0.5)))


def test_float64_load_matches_float32():
    m32 = load_embedded("digits_vp")
    m64 = load_embedded("digits_vp", dtype=torch.float64)
    x = m32.sample_noise(4, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])
    u64 = m64.velocity(x.double(), t.double())
    assert u64.dtype == torch.float64
    torch.testing.assert_close(m32.velocity(x, t), u64.float(), rtol=1e-4, atol=1e-4)


def test_digits_vp_uses_noise_prediction_through_the_adapter():
    m = load_embedded("digits_vp")
    assert m.card["prediction"] == "noise" and m.card["schedule"]["name"] == "vp"
    assert m.velocity.prediction == "noise" and m.velocity.t_eps > 0


def test_moons_samples_land_on_the_moons():
    from bespoke_ext.models import data

    m = load_embedded("moons2d")
    x = _midpoint(m.velocity, m.sample_noise(400, generator=torch.Generator().manual_seed(0)), steps=50)
    ref = data.moons(4000, seed=123)
    # typical distance to the data cloud is about the data noise level (0.05 / 0.75 in these units)
    assert float(torch.cdist(x, ref).min(1).values.median()) < 0.05


def test_sha_mismatch_and_missing_files_name_the_file(tmp_path):
    for ext in ("json", "safetensors"):
        shutil.copy(WEIGHTS_DIR / f"moons2d.{ext}", tmp_path / f"moons2d.{ext}")
    load_embedded("moons2d", weights_dir=tmp_path)  # an intact copy loads
    w = tmp_path / "moons2d.safetensors"
    raw = bytearray(w.read_bytes())
    raw[-1] ^= 0xFF
    w.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="moons2d.safetensors"):
        load_embedded("moons2d", weights_dir=tmp_path)
    w.unlink()
    with pytest.raises(FileNotFoundError, match="moons2d.safetensors"):
        load_embedded("moons2d", weights_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="nosuchmodel.json"):
        load_embedded("nosuchmodel")
    with pytest.raises(ValueError, match="dtype"):
        load_embedded("moons2d", dtype=torch.float16)


def test_velocity_is_a_drop_in_for_flow_matching_ode_solver():
    import flow_matching.solver as solver_mod
    m = load_embedded("moons2d")
    x0 = m.sample_noise(16, generator=torch.Generator().manual_seed(2))
    ref = solver_mod.ODESolver(velocity_model=m.velocity).sample(x_init=x0, step_size=0.2, method="midpoint")
    torch.testing.assert_close(ref, _midpoint(m.velocity, x0, steps=5), rtol=1e-5, atol=1e-5)


def test_class_conditional_model_draws_the_asked_labels():
    """mnist_cond under guidance g = 2: the digit classifier of the FCD reads the requested label far more
    often than chance, and the null label (no y) gives the unconditional field, not one of the digits."""
    from bespoke_ext.metrics import load_classifier
    from bespoke_ext.models import ClassifierFreeGuidance
    from bespoke_ext.sampling import sample

    m = load_embedded("mnist_cond")
    cond = m.card["conditioning"]
    guided = ClassifierFreeGuidance(m.velocity, 1.0, cond_key=cond["key"], null_value=cond["null_label"])
    labels = torch.arange(20) % 10
    x0 = m.sample_noise(20, generator=torch.Generator().manual_seed(0))
    x1 = sample(guided, x0, method="midpoint", nfe=20, y=labels)
    with torch.no_grad():
        read = load_classifier("mnist")(x1.clamp(-1, 1)).argmax(1)
    # measured on 100 samples: 43% at g = 1, 62% at g = 2, 76% at g = 4 (chance: 10%)
    assert float((read == labels).float().mean()) >= 0.4
    unconditional = sample(m.velocity, x0, method="midpoint", nfe=20)
    assert float((unconditional - x1).abs().mean()) > 0.05

