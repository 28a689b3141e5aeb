"""The demo's settings per embedded model, chosen by measurement (README, Demo)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from ..training.least_squares_start import WARPS

__all__ = ["Preset", "DEMO_PRESETS", "LOSSES", "settings", "check_nfes"]


@dataclass(frozen=True)
class Preset:
    """Defaults of one model's demo, chosen by timing each stage on 2 busy CPU cores (README, Demo).

    batch: evaluation samples (noise, ground truth, every solver, the distribution metric).
    loss, iterations, train_batch, lr: Bespoke training. The end-to-end loss (method.md §5, the
        follow-up paper's) from the identity, with the trainer's cosine decay and clipping: on the
        MNIST model at NFE 10 (order 2, 32 held-out samples) 60 iterations of it gained 3.0 dB over
        midpoint where the paper's bound loss gained 0.6 dB. 100 iterations of 4 pairs gained as
        much as 120 of 8 (3.8 and 3.6 dB at lr 2e-2) for a third of the cost.
        mnist_cond, guided (demo batch, 64 samples; mean PSNR gain of order 2 at NFE 10 over midpoint / over
        DPM-Solver++(2M) at NFE 10, g = 2 and g = 4; the targets need +3 dB over both): end-to-end 100 of 4 at
        2e-2 +2.39 / +3.55 and +2.08 / +2.25 dB; 300 of 4 at 5e-2 +2.86 / +4.02 and +2.15 / +2.32; 100 of 4 at
        0.1 +1.94 / +3.10 and +3.28 / +3.45. The log-MSE loss (the mean PSNR is its negative, up to a constant)
        300 of 4 at 3e-2 +3.26 +- 0.35 / +4.42 and +4.68 +- 0.49 / +4.84 (seed 1 +3.61 / +4.76, +3.86 / +4.03);
        250 of 4 at 3e-2 +3.47 +- 0.44 / +4.63 and +4.69 +- 0.52 / +4.85 (seed 1 +3.78 / +4.94, +3.79 / +3.95),
        the preset (g = 2 demo, NFE 10: 158 s with its ground truth, 2.97% of pretraining; 300 steps 161 s,
        3.03%); 200 of 4 at 4e-2 +2.99 and +2.49; 300 of 4 at 5e-2 +2.46 / +3.62 and +5.25 / +5.42; 100 of 4 at 0.1 +1.58 and +1.82;
        300 of 4 from 48 trajectories (not 64) +3.63 and +2.41. At g = 4 the runs land near +4.7 or near
        +2.4 dB (RMSE 0.039-0.044 or 0.053). RMSE barely moves at g = 2 (0.0392 end-to-end, 0.0369-0.0382
        log-MSE): the log-MSE steps lift the worst samples' PSNR. Unguided (bench batch, RMSE at NFE 10; midpoint 0.0457,
        UniPC 0.0293): end-to-end 100 of 4 at 2e-2 0.0380, 300 of 4 at 3e-2 0.0311 (seed 1 0.0270), 600 of 4
        0.0293, 300 of 8 0.0312; log-MSE 300 of 4 at 3e-2 0.0246. 250 of 4 cost 55-75 s at 1 thread guided
        (two evaluations per model call), plus 65-99 s for the 64 trajectories.
        moons2d (bench evaluation batch, 1024 samples, 128 pairs a step; RMSE order 2 / order 1 at NFE 10):
        100 at lr 1e-2 0.0166 / 0.0143 (order 2 behind order 1); bound loss 0.0172; 400 at 5e-3 0.0150,
        1e-2 0.0148, 2e-2 0.0108 / 0.0128, 3e-2 0.0108 / 0.0127 (seed 1: 0.0094), 5e-2 0.0107; 1000 at 2e-2
        0.0092 / 0.0126, 3e-2 0.0090; 512 pairs a step 0.0151. NFE 20: 100 at 1e-2 0.0038 / 0.0072, 400 at
        3e-2 0.0030 / 0.0061. 400 at 3e-2: about 15 s a solver at 1 thread.
    cache_samples, cache_grid: ground-truth trajectories (the training pairs) and their grid intervals
        (for MNIST, 128 pairs gained no more than 64 at 60 iterations).
    val_size: noise samples of training's own validation, which is solved anew by every training
        run and only logged: the demo judges every solver on its own evaluation batch instead.
    sweep: baseline NFEs of midpoint and DPM-Solver++(2M), the solvers the targets compare with;
        sparse_sweep: those of Euler, Heun and RK4. Both also get the requested NFEs.
    ns_iterations, ns_train_batch, ns_lr, ns_base, ns_loss, ns_fit, ns_fit_warps: the non-stationary solver (method.md §9),
        trained on the same ground-truth pairs, by default with its paper's loss (mean log-MSE of the final
        sample), cosine decay and clipping, from a fresh Euler solver (fitted by least squares first, since the
        fit exists; the figures before "With the least-squares start" are without it). Measured at NFE 10, 1 thread, against midpoint's RMSE
        at NFE 10 (order-2 Bespoke trained as this preset trains it in brackets):
          MNIST, 64 pairs: 100 iterations of 4 at lr 1e-2 0.40x (0.58x; midpoint at NFE 20 0.54x),
            at lr 2e-2 0.56x; from the trained order-2 solver 0.46x (a fresh Euler base does better).
            The number of steps decides, not the pairs per step (demo evaluation batch, RMSE 0.0272 at 100 of 4):
            100 of 8 0.0290, 200 of 4 0.0258, 400 of 4 0.0215, 400 of 2 0.0224, 600 of 1 0.0221; 400 of 1 over
            three seeds 0.0251 / 0.0245 / 0.0239 (time_scale 2: 0.0214 / 0.0280 / 0.0232, no better; 4: 0.0257;
            coeff_scale 0.5: 0.0245, 2: 0.0332; lr 2e-2: 0.0269, 5e-3: 0.0254). A step of one pair costs
            0.11 s, of four 0.24 s: 300 of 1 (about 35 s, 2.7% of pretraining with the ground truth) replace
            100 of 4. 128 pairs at 200 of 4 gave 0.0229: more pairs help too, at 0.44 s of ground truth each.
          With the least-squares start (TrainOptions.fit_start, on by default; training/least_squares_start.py):
            the fit alone 0.0211 in about 2 s (64 trajectories); then 300 of 1 at lr 3e-3 0.0173, below midpoint
            NFE 20 (0.0192), at lr 1e-2 0.0199, 1e-3 0.0200; 100 of 1 at 3e-3 0.0198. NFE 20: the fit alone
            0.0066 (midpoint NFE 20 0.0192), but 300 steps after it at 3e-3 0.0100 (the log-MSE steps trade
            RMSE for mean PSNR); NFE 8: fit 0.0364, then 300 of 1 0.0301.
          mnist_cond at g = 2 (demo batch): 100 of 4 0.0325, 300 of 1 0.0296 (midpoint at NFE 20: 0.0252); with
            the least-squares start 0.0363, then 300 of 1 at 3e-3 0.0295, at 1e-2 0.0308. The demo's batch is one
            draw: over four batches of 64 of the bench's evaluation stream (labels cycling 0-9; RMSE over midpoint
            NFE 20's, pooled over the 256 samples, per batch 0.8x-1.9x), g = 2 / g = 4: 300 of 1 1.47x / 1.15x,
            1200 of 1 1.32x / 1.09x; from 128 pairs 300 of 1 1.32x / 1.21x, 600 of 1 1.29x / 1.16x, 1200 of 1
            1.24x / 1.10x, 600 of 1 at lr 1e-2 1.41x / 1.12x. More steps gain at both scales, more pairs only at
            g = 2 at twice the ground truth: 1200 of 1 on the shared 64 pairs (about 110 s at 1 thread at NFE 10).
            The per-sample errors are heavy-tailed: at g = 2 four of the 256 samples (labels 0 and 1, hard for every
            NFE-10 solver: midpoint NFE 10 0.21-0.37 RMSE where midpoint NFE 20 has 0.03-0.06) carry the miss;
            without them 0.78x. The fit on the 64 pairs reached 0.61x: held-out samples, not the optimiser, limit it.
            Searching the least-squares start's grid warp (ns_fit_warps = WARPS) before the 1200 of 1: g = 2 1.07x
            (chose p = 1.19) / g = 4 1.00x (p = 1.41); with training seed 1 (its own 64 pairs) 1.31x / 1.03x, against
            1.31x / 1.22x from the grid as given (g = 2 chose p = 1 there). Fixed warps instead of the search: g = 2
            p = 1.41 1.37x, 1.68 1.24x; g = 4 p = 1.68 1.00x, 2 1.09x. Kept: the search.
          flux_mnist (bench evaluation batch, 64 samples; RMSE over midpoint NFE 20's): MNIST's 300 of 1 1.34x
            (end-to-end loss 1.34x, lr 1e-2 1.47x), 600 of 1 1.20x; 150 of 4 1.19x / 1.30x (two seeds), 300 of 4
            1.26x, 600 of 4 1.20x, 150 of 8 1.31x; at 150 of 4: lr 1e-2 1.39x, midpoint base 1.21x, time_scale 2
            1.20x, coeff_scale 0.5 1.21x, 128 pairs 1.24x, no least-squares start 1.85x. Every budget stops near
            1.2x; 150 of 4 gets there in less time than 300 of 1 (about 100 s against 130 s at load 3).
            The least-squares fit alone 1.43x (searching the warps 2^(-1/2)..2 of its grid chose the given
            one); 150 of 4 from a noise-preconditioned Euler start (solvers/preconditioning.py) sigma0 = 2
            2.32x, 0.5 1.27x.
          digits_vp, 128 pairs: 60 iterations of 16 0.42x (0.52x); 200 of 16 0.31x (midpoint base 0.34x,
            lr 2e-2 0.38x); 200 of 8 0.31x at half the cost (midpoint at NFE 20: 0.29x). With the
            least-squares start the demo got worse (RMSE / midpoint NFE 20: 1.10x at lr 1e-2, 1.19x at 3e-3,
            against 0.95x from plain Euler): ns_fit off here. Bench evaluation batch (256 samples), RMSE over
            midpoint NFE 20's: 200 of 8 1.02x (lr 2e-2 1.13x, end-to-end loss 1.15x, 256 pairs 1.02x); 400 of 8
            0.94x / 0.89x (two seeds; lr 5e-3 0.96x), 400 of 4 0.97x: 400 of 8, about 75 s of steps at 1 thread.
          moons2d with the least-squares start (demo, quiet machine): 1.10x midpoint NFE 20 (1.50x without).
          moons2d, 520 pairs, 600 iterations of 64: log-MSE 0.37x (lr 5e-3: 0.52x), the end-to-end RMS loss
            0.28x, and a higher mean PSNR too (57.1 vs 55.7 dB); 300 iterations 0.38x (lr 2e-2: 0.63x).
            (midpoint at NFE 20: 0.16x; the 2-D field's error sits in a few samples between the moons.)
          moons2d, bench evaluation batch (1024 samples), least-squares start, end-to-end loss, 64 pairs a step,
            RMSE over midpoint NFE 20's: 600 iterations at lr 1e-2 1.35x (3e-3 1.74x, 3e-2 1.18x, 1e-1 2.65x;
            batch 16 1.96x at 3e-2, 256 1.66x; log-MSE 1.98x; no fit 1.82x; midpoint base 1.69x; held-out
            keep-best 1.30x); 2000 iterations at lr 1e-2 1.12x, 1.5e-2 1.14x / 1.28x (two seeds), 2e-2 0.85x /
            0.87x / 0.74x (three seeds), 3e-2 1.05x (batch 128 1.06x), 5e-2 1.39x; 4000 at 3e-2 1.15x; 1000
            at 2e-2 1.24x. 2000 of 64 at 2e-2 take about 70 s at 1 thread (the model pretrained in 84 s).
    """

    batch: int
    iterations: int
    train_batch: int
    lr: float
    cache_samples: int
    cache_grid: int
    sweep: Tuple[int, ...]
    sparse_sweep: Tuple[int, ...]
    ns_iterations: int = 200
    ns_train_batch: int = 16
    ns_lr: float = 1e-2
    ns_base: str = "euler"
    ns_loss: str = "log_mse"
    ns_fit: bool = True
    ns_fit_warps: Tuple[float, ...] = (1.0,)
    loss: str = "end_to_end"
    val_size: int = 1

    def budget(self, family: str) -> Dict[str, object]:
        """Training options of one solver family (bespoke-rk2 / bespoke-rk1, or bespoke-ns): iterations,
        batch_size, loss and lr."""
        if family == "bespoke-ns":
            return dict(iterations=self.ns_iterations, batch_size=self.ns_train_batch, loss=self.ns_loss, lr=self.ns_lr,
                        fit_start=self.ns_fit, fit_warps=self.ns_fit_warps)
        return dict(iterations=self.iterations, batch_size=self.train_batch, loss=self.loss, lr=self.lr)


_SWEEP = dict(sweep=(4, 6, 8, 10, 12, 16, 20), sparse_sweep=(4, 8, 12, 16))
DEMO_PRESETS: Dict[str, Preset] = {
    "mnist": Preset(batch=64, iterations=100, train_batch=4, lr=2e-2, cache_samples=64, cache_grid=16,
                    ns_iterations=300, ns_train_batch=1, ns_lr=3e-3, **_SWEEP),
    "mnist_cond": Preset(batch=64, iterations=250, train_batch=4, lr=3e-2, loss="log_mse", cache_samples=64,
                         cache_grid=16, ns_iterations=1200, ns_train_batch=1, ns_lr=3e-3, ns_fit_warps=WARPS, **_SWEEP),
    "flux_mnist": Preset(batch=64, iterations=100, train_batch=4, lr=2e-2, cache_samples=64, cache_grid=16,
                         ns_iterations=150, ns_train_batch=4, ns_lr=3e-3, **_SWEEP),
    "digits_vp": Preset(batch=256, iterations=60, train_batch=16, lr=1e-2, cache_samples=128, cache_grid=16,
                        ns_iterations=400, ns_train_batch=8, ns_fit=False, **_SWEEP),
    "moons2d": Preset(batch=1024, iterations=400, train_batch=128, lr=3e-2, cache_samples=1024, cache_grid=16,
                      ns_iterations=2000, ns_train_batch=64, ns_lr=2e-2, ns_loss="end_to_end", **_SWEEP),
}
_FALLBACK = DEMO_PRESETS["mnist"]
# --quick: a smoke run (minutes become seconds; the numbers are then not meaningful)
_QUICK = dict(batch=16, iterations=4, train_batch=4, cache_samples=16, cache_grid=8, sweep=(4, 8, 10), sparse_sweep=(4, 8),
              ns_iterations=4, ns_train_batch=4)
LOSSES = ("end_to_end", "bound", "log_mse")


def settings(model_name: str, batch: Optional[int] = None, iterations: Optional[int] = None,
             loss: Optional[str] = None, quick: bool = False) -> Preset:
    """The model's preset (its --quick variant for a smoke run), with the given values changed."""
    preset = DEMO_PRESETS.get(model_name, _FALLBACK)
    if quick:
        preset = Preset(**{**preset.__dict__, **_QUICK})
    for name, value in (("--batch", batch), ("--iterations", iterations)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if loss is not None and loss not in LOSSES:
        raise ValueError(f"--loss must be one of {LOSSES}, got {loss!r}")
    changes = {k: v for k, v in (("batch", batch), ("iterations", iterations), ("loss", loss)) if v is not None}
    return Preset(**{**preset.__dict__, **changes})


def check_nfes(nfe: Sequence[int]) -> List[int]:
    """The requested NFEs, sorted and deduplicated; each must be even (order 2 spends 2 per step)."""
    values = sorted(set(nfe))
    if not values or any(isinstance(n, bool) or not isinstance(n, int) or n < 2 or n % 2 for n in values):
        raise ValueError(f"--nfe values must be even integers >= 2 (an order-2 solver spends 2 evaluations "
                         f"per step), got {list(nfe)}")
    return values
