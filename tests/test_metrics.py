"""Metrics against hand-computed values, the shipped digit classifiers, the report helpers, the figures."""

import math
import shutil

import pytest
import torch

from bespoke_ext import metrics
from bespoke_ext.compare import Row, markdown_table, nfe_to_match

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    """A valid PNG: the signature, and matplotlib decodes it to a non-empty image."""
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC, path
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50, (path, img.shape)


# -- RMSE and PSNR (method.md §1) ----------------------------------------------------------------------

def test_rmse_and_psnr_of_known_tensors():
    y = torch.zeros(2, 1, 2, 2)
    x = torch.stack([torch.full((1, 2, 2), 0.1), torch.full((1, 2, 2), -0.2)])
    # per-sample RMS 0.1 and 0.2 -> RMSE 0.15; PSNR mean of 10 log10(4 / 0.01) and 10 log10(4 / 0.04)
    assert metrics.rmse(x, y) == pytest.approx(0.15, rel=1e-6)
    assert metrics.per_sample_psnr(x, y).tolist() == pytest.approx([10 * math.log10(400), 20.0], rel=1e-6)
    assert metrics.psnr(x, y) == pytest.approx((10 * math.log10(400) + 10 * math.log10(100)) / 2, rel=1e-6)
    assert metrics.psnr(x, y, data_range=1.0) == pytest.approx((20.0 + 10 * math.log10(25)) / 2, rel=1e-6)


def test_per_sample_rms_ignores_only_the_batch_dimension():
    v = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert metrics.per_sample_rms(v).tolist() == pytest.approx([math.sqrt(12.5), 0.0])


def test_per_sample_rms_has_a_zero_gradient_at_an_exact_sample():
    # sqrt's derivative is infinite at 0: the plain formula's gradient there is 0 * inf = NaN, which made
    # training skip every step once one sample of a batch was solved exactly
    v = torch.tensor([[0.0, 0.0], [3.0, 4.0]], dtype=torch.float64, requires_grad=True)
    rms = metrics.per_sample_rms(v)
    rms.sum().backward()
    assert rms.tolist() == [0.0, math.sqrt(12.5)]
    assert v.grad[0].tolist() == [0.0, 0.0]
    assert v.grad[1].tolist() == pytest.approx([3.0 / (2 * math.sqrt(12.5)), 4.0 / (2 * math.sqrt(12.5))])
    log_mse = torch.log(metrics.per_sample_rms(v).pow(2).clamp_min(1e-30)).sum()
    v.grad = None
    log_mse.backward()
    assert torch.isfinite(v.grad).all()


def test_psnr_of_identical_tensors_is_infinite_and_rmse_zero():
    x = torch.randn(3, 5)
    assert metrics.psnr(x, x.clone()) == math.inf
    assert metrics.rmse(x, x.clone()) == 0.0


def test_metric_errors_name_the_argument():
    with pytest.raises(ValueError, match="same shape"):
        metrics.rmse(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="data_range"):
        metrics.psnr(torch.zeros(2, 3), torch.ones(2, 3), data_range=0)
    with pytest.raises(ValueError, match="features_a and features_b"):
        metrics.frechet_distance(torch.zeros(5, 3), torch.zeros(5, 4))
    with pytest.raises(ValueError, match="p must be"):
        metrics.sliced_wasserstein(torch.zeros(5, 2), torch.zeros(5, 2), p=0.5)


# -- Frechet distance ----------------------------------------------------------------------------------

def test_frechet_distance_of_identical_sets_is_zero():
    f = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    assert metrics.frechet_distance(f, f.clone()) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_of_a_shifted_set_is_the_squared_shift():
    # same sample covariance, means apart by the shift: FD = |shift|^2 exactly
    f = torch.randn(200, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    shift = torch.linspace(-1, 1, 8, dtype=torch.float64)
    assert metrics.frechet_distance(f, f + shift) == pytest.approx(float(shift.pow(2).sum()), rel=1e-9)


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    # commuting covariances: FD = |mu_a - mu_b|^2 + sum (sqrt(a_k) - sqrt(b_k))^2 = 5 + 1 + 1
    mu_a, mu_b = torch.zeros(2), torch.tensor([1.0, 2.0])
    fd = metrics.frechet_distance_from_moments(mu_a, torch.diag(torch.tensor([1.0, 4.0])),
                                               mu_b, torch.diag(torch.tensor([4.0, 9.0])))
    assert fd == pytest.approx(7.0, rel=1e-12)


def test_frechet_distance_general_covariances_match_scipy_sqrtm():
    import scipy.linalg as scipy_linalg  # installed with scikit-learn (the test extra)
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(6, 6, generator=g, dtype=torch.float64), torch.randn(6, 6, generator=g, dtype=torch.float64)
    ca, cb = a @ a.T + 0.1 * torch.eye(6, dtype=torch.float64), b @ b.T
    mu_a, mu_b = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    cross = scipy_linalg.sqrtm(ca.numpy() @ cb.numpy()).real.trace()
    expected = float((mu_a - mu_b).pow(2).sum() + ca.trace() + cb.trace()) - 2 * cross
    assert metrics.frechet_distance_from_moments(mu_a, ca, mu_b, cb) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_of_sampled_shifted_gaussians_approaches_the_closed_form():
    g = torch.Generator().manual_seed(3)
    shift = torch.tensor([0.5, -1.0, 0.25], dtype=torch.float64)
    a = torch.randn(40000, 3, generator=g, dtype=torch.float64)
    b = torch.randn(40000, 3, generator=g, dtype=torch.float64) + shift
    # sampling error of |mean difference|^2 at N = 40000: sd about 2 |shift| sqrt(2 / N) = 0.016
    assert metrics.frechet_distance(a, b) == pytest.approx(float(shift.pow(2).sum()), abs=0.05)


# -- sliced Wasserstein --------------------------------------------------------------------------------

def test_sliced_wasserstein_of_identical_sets_is_zero():
    x = torch.randn(500, 2, generator=torch.Generator().manual_seed(4))
    assert metrics.sliced_wasserstein(x, x[torch.randperm(500)]) == pytest.approx(0.0, abs=1e-12)


def test_sliced_wasserstein_of_a_shifted_set_is_the_mean_projected_shift():
    x = torch.randn(400, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    shift = torch.tensor([0.3, -0.4], dtype=torch.float64)  # |shift| = 0.5
    theta = metrics.projection_directions(2, 256)
    expected = float((theta @ shift).abs().mean())  # W1 of a 1-D shift is |shift . theta|
    assert metrics.sliced_wasserstein(x, x + shift, projections=256) == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(2 * 0.5 / math.pi, rel=1e-4)  # E|cos| over directions = 2 / pi
    # p = 2: (mean |shift . theta|^2)^(1/2) = |shift| / sqrt(2) in 2-D
    assert metrics.sliced_wasserstein(x, x + shift, p=2) == pytest.approx(0.5 / math.sqrt(2), rel=1e-4)


def test_sliced_wasserstein_with_unequal_sizes_is_exact():
    # 1-D: W1({0, 1}, {0, 1, 2, 3}) = (|0-0| + |0-1| + |1-2| + |1-3|) / 4 = 1
    a, b = torch.tensor([[0.0], [1.0]]), torch.tensor([[3.0], [0.0], [2.0], [1.0]])
    assert metrics.sliced_wasserstein(a, b, projections=3) == pytest.approx(1.0, rel=1e-12)
    # a set and the same set repeated are the same empirical measure
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(6))
    assert metrics.sliced_wasserstein(x, torch.cat([x, x])) == pytest.approx(0.0, abs=1e-12)


# -- report helpers ------------------------------------------------------------------------------------

def test_nfe_to_match_interpolates_in_log_log():
    curve = [(4, 1.0), (8, 0.25), (16, 0.0625)]  # error ~ NFE^-2
    nfe, how = nfe_to_match(curve, 0.5)
    assert how == "interpolated" and nfe == pytest.approx(4 * math.sqrt(2))
    nfe, how = nfe_to_match(curve, 0.01)
    assert how.startswith("extrapolated") and nfe == pytest.approx(16 * math.sqrt(6.25))
    assert nfe_to_match(curve, 2.0) == (4.0, "already at the smallest NFE measured")
    assert nfe_to_match(curve, 0.25) == (8.0, "measured")
    assert nfe_to_match([(4, 1.0), (8, 1.5)], 0.5)[0] is None


def test_markdown_table_has_one_line_per_row_and_the_metric_column():
    rows = [Row("ground truth", "ground truth", 120, 0.0, math.inf, 1.0, {"FCD": 2.0}),
            Row("midpoint", "midpoint", 10, 0.05, 30.0, 0.2, {"FCD": 3.5})]
    text = markdown_table(rows, "FCD").splitlines()
    assert len(text) == 4 and "FCD" in text[0] and "| midpoint | 10 | 0.0500 | 30.00 | 3.500 | 0.20 |" == text[3]
    assert "inf" in text[2]


# -- the shipped classifiers ---------------------------------------------------------------------------

@pytest.mark.parametrize("name, threshold", [("mnist", 0.98), ("digits8", 0.95)])
def test_shipped_classifier_accuracy_on_held_out_digits(name, threshold):
    # measured when shipped: mnist 0.992 (500 held-out digits), digits8 0.978 (180)
    from bespoke_ext.metrics.classifier import accuracy, load_classifier
    from bespoke_ext.models import data

    clf = load_classifier(name)
    x, y = data.load_dataset(name, split="test", return_labels=True)
    acc = accuracy(clf, x, y)
    assert acc > threshold
    assert acc == pytest.approx(clf.card["heldout_accuracy"], abs=1e-9)
    assert clf.features(x[:4]).shape == (4, 64)


def test_classifier_files_are_small_and_damage_is_refused(tmp_path):
    from bespoke_ext.metrics.classifier import WEIGHTS_DIR, load_classifier

    assert sum(p.stat().st_size for p in WEIGHTS_DIR.iterdir()) < 500_000
    for suffix in (".json", ".safetensors"):
        shutil.copy(WEIGHTS_DIR / f"mnist{suffix}", tmp_path / f"mnist{suffix}")
    raw = bytearray((tmp_path / "mnist.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (tmp_path / "mnist.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="sha256"):
        load_classifier("mnist", weights_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="digits8.json"):
        load_classifier("digits8", weights_dir=tmp_path)
    with pytest.raises(ValueError, match="name must be one of"):
        load_classifier("cifar")


def test_frechet_classifier_distance_separates_digits_from_noise():
    from bespoke_ext.metrics.classifier import load_classifier
    from bespoke_ext.models import data

    clf = load_classifier("mnist")
    g = torch.Generator().manual_seed(7)
    # the split is ordered by class: a random subset, not the first 500 (all zeros)
    train = data.mnist("train")[torch.randperm(4500, generator=g)[:500]]
    test = data.mnist("test")
    with torch.no_grad():
        real = metrics.frechet_distance(clf.features(train), clf.features(test))
        zeros = metrics.frechet_distance(clf.features(data.mnist("train")[:500]), clf.features(test))
        noise = metrics.frechet_distance(clf.features(torch.randn(500, 1, 28, 28, generator=g).clamp(-1, 1)),
                                         clf.features(test))
    assert real * 10 < zeros < noise


# -- figures -------------------------------------------------------------------------------------------

def test_figures_are_valid_pngs(tmp_path):
    from bespoke_ext.figures import save_error_curves, save_sample_grid, save_schedules
    from bespoke_ext.solvers import BespokeSolver

    images = [("a", torch.rand(6, 1, 8, 8) * 2 - 1), ("b", torch.rand(6, 1, 8, 8) * 2 - 1)]
    save_sample_grid(images, tmp_path / "grid.png", columns=4, title="t")
    save_sample_grid([("p", torch.randn(100, 2)), ("q", torch.randn(100, 2))], tmp_path / "scatter.png")
    save_error_curves({"midpoint": [(4, 0.1), (8, 0.03)], "Euler": [(4, 0.3), (8, 0.1)]},
                      {"Bespoke order 2, NFE 8": (8, 0.01)}, tmp_path / "curves.png",
                      match=("midpoint matches", 12.0, 0.01))
    save_schedules({"order 2": BespokeSolver(4, 2), "order 1": BespokeSolver(8, 1)}, tmp_path / "sched.png")
    for name in ("grid", "scatter", "curves", "sched"):
        assert_png(tmp_path / f"{name}.png")
    with pytest.raises(ValueError, match="per-sample shape"):
        save_sample_grid([("a", torch.zeros(2, 3, 4, 4))], tmp_path / "bad.png")
