"""An analytic flow model: the exact marginal velocity for a Gaussian-mixture data distribution.

Path (OT): x_t = t x1 + (1 - t) x0, x0 ~ N(0, I), x1 ~ sum_k w_k N(mu_k, s_k^2 I) in R^D.

Given component k, x_t ~ N(t mu_k, v_k I) with v_k = t^2 s_k^2 + (1 - t)^2, and (Gaussian
conditioning, the pair (x1, x_t) being jointly Gaussian)

    E[x1 | x_t, k] = mu_k + (t s_k^2 / v_k) (x_t - t mu_k)
    E[x0 | x_t, k] = ((1 - t) / v_k) (x_t - t mu_k)
    u_k(x_t)       = E[x1 - x0 | x_t, k] = mu_k + c_k (x_t - t mu_k),  c_k = (t s_k^2 - (1 - t)) / v_k

The marginal velocity mixes them with the posterior component weights

    p(k | x_t) = softmax_k( log w_k - (D/2) log v_k - ||x_t - t mu_k||^2 / (2 v_k) ),

computed with a log-sum-exp (softmax) so that sharp components do not underflow:
    u(x_t, t) = sum_k p(k | x_t) u_k(x_t).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from ._time import as_time

__all__ = ["GaussianMixtureFlow"]


class GaussianMixtureFlow(nn.Module):
    """Exact velocity u(x, t) of the OT path towards an isotropic Gaussian mixture.

    Args:
        means: [K, D] component means (D = prod(shape)).
        stds: scalar or [K] component standard deviations (> 0).
        weights: [K] non-negative mixture weights (normalised here); uniform if None.
        shape: per-sample data shape, default (D,); e.g. (1, 8, 8) for image-shaped data.

    Buffers are stored in float64; calls compute in x's dtype (float32 or float64).
    """

    def __init__(self, means, stds=1.0, weights=None, shape: Optional[Sequence[int]] = None):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.dim() != 2 or means.shape[0] < 1:
            raise ValueError(f"means must have shape [K, D], got {tuple(means.shape)}")
        k, d = means.shape
        stds = torch.as_tensor(stds, dtype=torch.float64)
        if stds.dim() == 0:
            stds = stds.expand(k).clone()
        if stds.shape != (k,) or not bool((stds > 0).all()):
            raise ValueError(f"stds must be a positive scalar or a positive [K] = [{k}] tensor, got {stds.tolist() if stds.numel() < 20 else tuple(stds.shape)}")
        weights = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (k,) or not bool((weights >= 0).all()) or float(weights.sum()) <= 0:
            raise ValueError(f"weights must be a non-negative [K] = [{k}] tensor with positive sum, got shape {tuple(weights.shape)}")
        shape = (d,) if shape is None else tuple(int(s) for s in shape)
        if math.prod(shape) != d:
            raise ValueError(f"shape {shape} has {math.prod(shape)} elements, but means have D = {d}")
        self.shape = shape
        self.register_buffer("means", means)
        self.register_buffer("stds", stds)
        self.register_buffer("weights", weights / weights.sum())

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @classmethod
    def random(cls, dim: int = 2, components: int = 8, std: float = 0.05, seed: int = 0,
               shape: Optional[Sequence[int]] = None, spread: float = 1.0) -> "GaussianMixtureFlow":
        """A sharp mixture: means uniform in [-spread, spread]^D, equal narrow stds, random weights.

        Narrow components (std << distance between means) make the velocity change fast near t = 1,
        so low-NFE solvers (midpoint at NFE 10) are visibly off while the exact flow is known.
        """
        if dim < 1 or components < 1:
            raise ValueError(f"dim and components must be >= 1, got dim={dim}, components={components}")
        if std <= 0:
            raise ValueError(f"std must be positive, got {std}")
        g = torch.Generator().manual_seed(int(seed))
        means = (2.0 * torch.rand(components, dim, generator=g, dtype=torch.float64) - 1.0) * spread
        weights = 0.5 + torch.rand(components, generator=g, dtype=torch.float64)
        return cls(means, std, weights, shape=shape)

    def _posterior_terms(self, x: torch.Tensor, t):
        """Posterior weights p(k|x_t) [B, K], c_k, diff_k = x_t - t mu_k [B, K, D], means [K, D]."""
        b = x.shape[0]
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"x must have shape [B, {', '.join(map(str, self.shape))}], got {tuple(x.shape)}")
        t = as_time(t, x)
        xf = x.reshape(b, self.means.shape[1])                      # [B, D] (B = 0 too)
        tb = t.reshape(-1, 1) if t.dim() == 1 else t                # [B, 1] or 0-dim
        mu = self.means.to(x.dtype)                                 # [K, D]
        s2 = self.stds.to(x.dtype) ** 2                             # [K]
        v = tb * tb * s2 + (1.0 - tb) ** 2                          # v_k = t^2 s_k^2 + (1 - t)^2
        c = (tb * s2 - (1.0 - tb)) / v                              # c_k = (t s_k^2 - (1 - t)) / v_k
        tmu = (tb.unsqueeze(-1) if t.dim() == 1 else tb) * mu       # t mu_k, [B, K, D] or [K, D]
        diff = xf.unsqueeze(1) - tmu                                # x_t - t mu_k, [B, K, D]
        logits = torch.log(self.weights.to(x.dtype)) - 0.5 * xf.shape[1] * torch.log(v) - 0.5 * diff.pow(2).sum(-1) / v
        return torch.softmax(logits, dim=-1), c, diff, mu           # softmax = log-sum-exp normalised

    def forward(self, x: torch.Tensor, t, **extras) -> torch.Tensor:
        post, c, diff, mu = self._posterior_terms(x, t)
        # u = sum_k p_k (mu_k + c_k (x_t - t mu_k))
        u = post @ mu + torch.einsum("bk,bkd->bd", post * c, diff)
        return u.reshape(x.shape)

    def posterior(self, x: torch.Tensor, t) -> torch.Tensor:
        """p(k | x_t) as [B, K] (for inspection and tests)."""
        return self._posterior_terms(x, t)[0]

    def sample_data(self, n: int, generator: Optional[torch.Generator] = None, dtype=torch.float32) -> torch.Tensor:
        """n exact samples x1 of the mixture, shape [n, *shape] (on the buffers' device)."""
        dev = self.means.device
        k = torch.multinomial(self.weights, int(n), replacement=True, generator=generator)
        eps = torch.randn(int(n), self.dim, generator=generator, dtype=torch.float64, device=dev)
        x = self.means[k] + self.stds[k, None] * eps
        return x.to(dtype).reshape(int(n), *self.shape)

    def sample_noise(self, n: int, generator: Optional[torch.Generator] = None, dtype=torch.float32) -> torch.Tensor:
        """x0 ~ N(0, I), shape [n, *shape]."""
        return torch.randn(int(n), *self.shape, generator=generator, dtype=dtype, device=self.means.device)

    def extra_repr(self) -> str:
        return f"components={self.num_components}, dim={self.dim}, shape={self.shape}"
