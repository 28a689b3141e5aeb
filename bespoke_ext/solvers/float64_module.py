"""Solvers keep their parameters and tables in float64 wherever they are moved.

A solver is a few dozen numbers that sample a model in any state dtype: its coefficients are computed in
float64 and handed to the kernels in float32/float64 (ops.py), so nothing is gained by storing them in a
lower precision, and much is lost: ``.half()`` on a learned solver (or on a module holding one next to its
half-precision network, ``holder.to(torch.bfloat16)``) would round its time logits and a non-stationary
solver's base tables, so a fresh solver would no longer sample exactly like Euler or midpoint and a trained
one would drift from what was validated. Device moves apply as usual; dtype casts leave the solver as it is.
"""

from __future__ import annotations

from torch import nn

__all__ = ["Float64Module"]


class Float64Module(nn.Module):
    """An nn.Module whose floating tensors follow ``.to(device)`` / ``.cuda()`` but ignore dtype casts
    (``.half()``, ``.float()``, ``.to(torch.bfloat16)``), themselves or through a parent module."""

    def _apply(self, fn, recurse=True):
        def keep_dtype(t):
            moved = fn(t)
            return moved if moved.dtype == t.dtype else t.to(device=moved.device)

        return super()._apply(keep_dtype, recurse)
