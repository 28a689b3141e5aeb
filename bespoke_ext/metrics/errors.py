"""Sample-level errors against ground truth (method.md §1; x and its ground truth y share the noise x0).

    ||v||        = sqrt(mean over the non-batch elements of v^2)          per-sample RMS
    RMSE(x, y)   = mean over the batch of ||x - y||
    PSNR(x, y)   = mean over the batch of 10 log10(R^2 / MSE_b),  MSE_b = ||x - y||^2
                   with R the data range (2 for data in [-1, 1], so R^2 = 4)

The one home of these formulas: training's validation, the demo and the benchmarks all call them.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

__all__ = ["per_sample_rms", "rmse", "psnr_from_rms", "per_sample_psnr", "psnr"]


def _check_pair(x: Tensor, y: Tensor, names: Tuple[str, str] = ("x", "y")) -> None:
    for name, v in zip(names, (x, y)):
        if not torch.is_tensor(v) or not v.is_floating_point() or v.dim() < 1:
            raise ValueError(f"{name} must be a floating-point tensor [batch, ...], got "
                             f"{type(v).__name__ if not torch.is_tensor(v) else (v.dtype, tuple(v.shape))}")
    if x.shape != y.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")


def per_sample_rms(v: Tensor) -> Tensor:
    """||v|| per sample: sqrt of the mean of v^2 over every dimension but the first, [B] (float64).

    Differentiable everywhere: at v_b = 0 (a sample solved exactly) sqrt's derivative is infinite and
    autograd would give 0 * inf = NaN; the gradient there is 0 instead, the minimum-norm subgradient (as
    the fused rk_residual's). The values are those of the plain sqrt.
    """
    ms = v.double().reshape(v.shape[0], -1).pow(2).mean(dim=1)
    exact = ms == 0
    return torch.where(exact, 0.0, torch.where(exact, 1.0, ms).sqrt())


def rmse(x: Tensor, y: Tensor) -> float:
    """Mean over the batch of the per-sample RMS of x - y."""
    _check_pair(x, y)
    return float(per_sample_rms(x - y).mean())


def psnr_from_rms(rms: Tensor, data_range: float = 2.0) -> Tensor:
    """10 log10(data_range^2 / rms^2) in dB, elementwise (rms: per-sample RMS errors; float64)."""
    if not (isinstance(data_range, (int, float)) and data_range > 0):
        raise ValueError(f"data_range must be a positive number, got {data_range!r}")
    return 10.0 * torch.log10(data_range ** 2 / rms.double().pow(2))


def per_sample_psnr(x: Tensor, y: Tensor, data_range: float = 2.0) -> Tensor:
    """10 log10(data_range^2 / MSE_b) in dB per sample, [B] (float64; inf where x_b == y_b)."""
    _check_pair(x, y)
    return psnr_from_rms(per_sample_rms(x - y), data_range)


def psnr(x: Tensor, y: Tensor, data_range: float = 2.0) -> float:
    """Mean over the batch of 10 log10(data_range^2 / MSE_b) in dB (data_range 2: data in [-1, 1]).

    Averaged in dB, as method.md §1 defines it. A sample with x == y has infinite PSNR, and so has
    the mean then: identical tensors are reported as inf, never as an arbitrary cap.
    """
    return float(per_sample_psnr(x, y, data_range).mean())
