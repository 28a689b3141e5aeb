"""Shared handling of the time argument of a velocity model.

A velocity model is called as ``model(x, t, **extras)`` with ``x`` of shape ``[B, *shape]`` and ``t``
either 0-dim (one time for the whole batch) or of shape ``[B]`` (one time per sample).
"""

from __future__ import annotations

import torch

__all__ = ["as_time", "math_dtype", "batch_view", "per_sample_time"]


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of time and schedule arithmetic for states of ``dtype``: at least float32 (in bfloat16,
    t = 0.9986 and 1 - 1e-3 both round to 1.0, where a noise or data predictor's coefficients divide by 0)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def as_time(t, x: torch.Tensor, name: str = "t", dtype=None) -> torch.Tensor:
    """Return ``t`` as a tensor in ``dtype`` (default ``x``'s dtype) on x's device, 0-dim or ``[B]``.

    Python numbers and 0-dim / one-element tensors become 0-dim tensors. The conversion keeps the
    autograd graph (``Tensor.to`` is differentiable), because training backpropagates through the
    time input.
    """
    if not torch.is_tensor(t):
        try:
            t = torch.as_tensor(float(t))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name} must be a float tensor (0-dim or [B]) or a number, got {type(t).__name__}") from exc
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"{name} must be a real-valued tensor, got dtype {t.dtype}")
    t = t.to(device=x.device, dtype=x.dtype if dtype is None else dtype)
    if t.dim() == 0:
        return t
    if t.dim() == 1 and t.shape[0] == x.shape[0]:
        return t
    if t.numel() == 1:
        return t.reshape(())
    raise ValueError(
        f"{name} must be 0-dim or of shape [B] = [{x.shape[0]}] to match x of shape {tuple(x.shape)}, "
        f"got shape {tuple(t.shape)}"
    )


def batch_view(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """View a 0-dim or ``[B]`` tensor so that it broadcasts against ``x`` of shape ``[B, *shape]``."""
    if v.dim() == 0:
        return v
    return v.reshape(v.shape[0], *([1] * (x.dim() - 1)))


def per_sample_time(t: torch.Tensor, batch: int) -> torch.Tensor:
    """Expand a 0-dim or ``[B]`` time to shape ``[B]`` (a broadcast view, no copy)."""
    return t.expand(batch) if t.dim() == 0 else t
