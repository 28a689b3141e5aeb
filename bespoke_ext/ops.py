"""Typed wrappers, fake kernels and autograd for the fused scaled Runge-Kutta ops.

Every solver step in this package is a linear combination of a few tensors with scalar
coefficients (method.md §3, §6):

    rk_update(terms, coeffs)            out = sum_j coeffs[..., j] * terms[j]
    rk_residual(terms, coeffs, target)  rms[n] = || sum_j coeffs[n?, j] * terms[j][n] - target[n] ||
                                        (per-sample RMS over the non-leading dimensions)

``coeffs`` is ``[k]`` (shared by all samples) or ``[N, k]`` (one row per sample along the
leading dimension), float32 or float64, on the terms' device, and is always a tensor: a
Python float would be baked into compiled and CUDA graphs. Math runs in float32 (float64 for
float64 terms); results have the terms' dtype.

The kernels live in ``csrc/`` (schemas in ``csrc/schemas.cpp``); this module registers fake
kernels (shapes for torch.compile / meta tensors) and autograd, whose backward passes are
ops of their own so compiled graphs see them.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .extension import _C  # noqa: F401  (checks the torch it was built against, then loads the library, which registers the ops)

__all__ = ["rk_update", "rk_update_out", "rk_residual"]

_ops = torch.ops.bespoke_ext
# the overloads looked up once: a sampling loop calls these every step
_rk_update = _ops.rk_update.default
_rk_update_out = _ops.rk_update_out.default
_rk_residual = _ops.rk_residual.default


def _as_list(terms: Sequence[Tensor]) -> list:
    return terms if type(terms) is list else list(terms)


def rk_update(terms: Sequence[Tensor], coeffs: Tensor) -> Tensor:
    """sum_j coeffs[..., j] * terms[j]; coeffs [k] or [N, k]. Differentiable in terms and coeffs."""
    return _rk_update(_as_list(terms), coeffs)


def rk_update_out(terms: Sequence[Tensor], coeffs: Tensor, out: Tensor) -> Tensor:
    """rk_update written into ``out`` (no allocation, no autograd); returns ``out``.

    ``out`` may be one of ``terms`` itself (each output element depends only on the same
    element of every term), which gives in-place updates such as x <- a x + b u. An ``out``
    that overlaps a term in any other way (a shifted or transposed view of it) is refused.
    """
    _rk_update_out(_as_list(terms), coeffs, out)
    return out


def rk_residual(terms: Sequence[Tensor], coeffs: Tensor, target: Tensor) -> Tensor:
    """Per-sample RMS of (rk_update(terms, coeffs) - target), shape [N], without forming it."""
    return _rk_residual(_as_list(terms), coeffs, target)


# ---------------------------------------------------------------------------------------------
# Fake kernels: the same sizes, strides and dtypes as the real kernels (outputs contiguous).


def _check_fake(terms: Sequence[Tensor], coeffs: Tensor) -> None:
    # Real kernels check everything; fake kernels check what decides output shapes.
    torch._check(len(terms) >= 1, lambda: "rk ops: `terms` must hold at least one tensor")
    torch._check(coeffs.dim() in (1, 2), lambda: f"rk ops: `coeffs` must be [k] or [N, k], got {tuple(coeffs.shape)}")


@torch.library.register_fake("bespoke_ext::rk_update")
def _rk_update_fake(terms, coeffs):
    _check_fake(terms, coeffs)
    return torch.empty(terms[0].shape, dtype=terms[0].dtype, device=terms[0].device)


@torch.library.register_fake("bespoke_ext::rk_update_out")
def _rk_update_out_fake(terms, coeffs, out):
    _check_fake(terms, coeffs)
    return None


@torch.library.register_fake("bespoke_ext::rk_residual")
def _rk_residual_fake(terms, coeffs, target):
    _check_fake(terms, coeffs)
    torch._check(terms[0].dim() >= 1, lambda: "rk_residual: terms need a leading sample dimension")
    return terms[0].new_empty((terms[0].shape[0],))


@torch.library.register_fake("bespoke_ext::rk_update_backward")
def _rk_update_backward_fake(grad, terms, coeffs, need_terms, need_coeffs):
    gterms = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in terms] if need_terms else []
    gcoeffs = torch.empty(coeffs.shape if need_coeffs else (0,), dtype=coeffs.dtype, device=coeffs.device)
    return gterms, gcoeffs


@torch.library.register_fake("bespoke_ext::rk_residual_backward")
def _rk_residual_backward_fake(grad, rms, terms, coeffs, target, need_terms, need_coeffs, need_target):
    gterms = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in terms] if need_terms else []
    gcoeffs = torch.empty(coeffs.shape if need_coeffs else (0,), dtype=coeffs.dtype, device=coeffs.device)
    gtarget = torch.empty(target.shape if need_target else (0,), dtype=target.dtype, device=target.device)
    return gterms, gcoeffs, gtarget


# ---------------------------------------------------------------------------------------------
# Autograd: the backward passes are the fused backward ops.


def _update_setup(ctx, inputs, output):
    terms, coeffs = inputs
    ctx.save_for_backward(*terms, coeffs)
    ctx.k = len(terms)


def _needs(flag) -> bool:
    # needs_input_grad holds a list of flags for a Tensor[] input
    return any(flag) if isinstance(flag, (list, tuple)) else bool(flag)


def _term_grads(gterms, k: int, need: bool):
    # a Tensor[] input takes a list of gradients back, one entry (or None) per term
    return list(gterms) if need else [None] * k


def _update_backward(ctx, grad):
    saved = ctx.saved_tensors
    terms, coeffs = list(saved[: ctx.k]), saved[ctx.k]
    need_terms, need_coeffs = _needs(ctx.needs_input_grad[0]), _needs(ctx.needs_input_grad[1])
    gterms, gcoeffs = _ops.rk_update_backward.default(grad.contiguous(), terms, coeffs, need_terms, need_coeffs)
    return _term_grads(gterms, ctx.k, need_terms), (gcoeffs if need_coeffs else None)


def _residual_setup(ctx, inputs, output):
    terms, coeffs, target = inputs
    ctx.save_for_backward(*terms, coeffs, target, output)
    ctx.k = len(terms)


def _residual_backward(ctx, grad):
    saved = ctx.saved_tensors
    k = ctx.k
    terms, coeffs, target, rms = list(saved[:k]), saved[k], saved[k + 1], saved[k + 2]
    need_terms, need_coeffs, need_target = (_needs(f) for f in ctx.needs_input_grad)
    gterms, gcoeffs, gtarget = _ops.rk_residual_backward.default(
        grad.contiguous(), rms, terms, coeffs, target, need_terms, need_coeffs, need_target
    )
    return (_term_grads(gterms, k, need_terms), (gcoeffs if need_coeffs else None),
            (gtarget if need_target else None))


torch.library.register_autograd("bespoke_ext::rk_update", _update_backward, setup_context=_update_setup)
torch.library.register_autograd("bespoke_ext::rk_residual", _residual_backward, setup_context=_residual_setup)
