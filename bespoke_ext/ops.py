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

import math
from typing import Sequence

import torch
import torch.autograd.forward_ad as _fwad
from torch import Tensor

from .extension import _C  # noqa: F401  (checks the torch it was built against, then loads the library, which registers the ops)

__all__ = ["rk_update", "rk_update_out", "rk_residual", "MAX_TERMS"]

MAX_TERMS = 128  # the most terms one call combines: kMaxTerms of csrc/rk_common.h (tests hold the two equal)

_ops = torch.ops.bespoke_ext
# the overloads looked up once: a sampling loop calls these every step
_rk_update = _ops.rk_update.default
_rk_update_out = _ops.rk_update_out.default
_rk_residual = _ops.rk_residual.default


def _as_list(terms: Sequence[Tensor]) -> list:
    return terms if type(terms) is list else list(terms)


def _refuse_forward_ad(op: str, tensors) -> None:
    # torch's custom-op autograd has no forward mode: a dual input would come out with a zero tangent
    if _fwad._current_level >= 0 and any(_fwad.unpack_dual(t).tangent is not None for t in tensors):
        raise RuntimeError(f"{op}: forward-mode AD (torch.func.jvp / jacfwd, torch.autograd.forward_ad) is not "
                           f"supported by the fused ops (the tangent would be lost); reverse mode (backward, "
                           f"torch.autograd.grad, double backward) is")


def rk_update(terms: Sequence[Tensor], coeffs: Tensor) -> Tensor:
    """sum_j coeffs[..., j] * terms[j]; coeffs [k] or [N, k]. Differentiable in terms and coeffs."""
    terms = _as_list(terms)
    if _fwad._current_level >= 0:
        _refuse_forward_ad("rk_update", [*terms, coeffs])
    return _rk_update(terms, coeffs)


def rk_update_out(terms: Sequence[Tensor], coeffs: Tensor, out: Tensor) -> Tensor:
    """rk_update written into ``out`` (no allocation, no autograd); returns ``out``.

    ``out`` may be one of ``terms`` itself (each output element depends only on the same
    element of every term), which gives in-place updates such as x <- a x + b u. An ``out``
    that overlaps a term in any other way (a shifted or transposed view of it) is refused.
    As for torch's own ``out=`` ops, inputs that require grad are refused while grad mode is on,
    and ``out``'s version is bumped (a backward that saved it fails instead of reading the new values).
    """
    terms = _as_list(terms)
    if _fwad._current_level >= 0:
        _refuse_forward_ad("rk_update_out", [*terms, coeffs, out])
    _rk_update_out(terms, coeffs, out)
    return out


def rk_residual(terms: Sequence[Tensor], coeffs: Tensor, target: Tensor) -> Tensor:
    """Per-sample RMS of (rk_update(terms, coeffs) - target), shape [N], without forming it."""
    terms = _as_list(terms)
    if _fwad._current_level >= 0:
        _refuse_forward_ad("rk_residual", [*terms, coeffs, target])
    return _rk_residual(terms, coeffs, target)


# ---------------------------------------------------------------------------------------------
# Fake kernels: the same sizes, strides and dtypes as the real kernels (outputs contiguous).


def _check_fake(terms: Sequence[Tensor], coeffs: Tensor, *others: Tensor) -> None:
    # The real kernels' checks (csrc/rk_common.h, check_rk_args), so that meta tensors and traced graphs
    # refuse what eager calls refuse; ``others``: target / out, shaped like the terms.
    torch._check(len(terms) >= 1, lambda: "rk ops: `terms` must hold at least one tensor")
    t0, k = terms[0], len(terms)
    torch._check(k <= MAX_TERMS, lambda: f"rk ops: at most {MAX_TERMS} terms, got {k}")
    torch._check(t0.is_floating_point(), lambda: f"rk ops: terms must be floating point, got {t0.dtype}")
    for j, t in enumerate([*terms[1:], *others]):
        name = f"terms[{j + 1}]" if j < k - 1 else "target / out"
        torch._check(t.shape == t0.shape and t.dtype == t0.dtype and t.device == t0.device,
                     lambda: f"rk ops: {name} must match terms[0] ({tuple(t0.shape)} {t0.dtype} on {t0.device}), "
                             f"got {tuple(t.shape)} {t.dtype} on {t.device}")
    torch._check(coeffs.device == t0.device and coeffs.dtype in (torch.float32, torch.float64),
                 lambda: f"rk ops: `coeffs` must be float32 or float64 on the terms' device {t0.device}, "
                         f"got {coeffs.dtype} on {coeffs.device}")
    torch._check(coeffs.dim() in (1, 2), lambda: f"rk ops: `coeffs` must be [k] or [N, k], got {tuple(coeffs.shape)}")
    torch._check(coeffs.shape[-1] == k, lambda: f"rk ops: `coeffs` must have k = {k} columns, got {tuple(coeffs.shape)}")
    if coeffs.dim() == 2:
        torch._check(t0.dim() >= 1 and coeffs.shape[0] == t0.shape[0],
                     lambda: f"rk ops: per-sample `coeffs` [N, k] need N = the terms' leading size, got "
                             f"{tuple(coeffs.shape)} for terms {tuple(t0.shape)}")


@torch.library.register_fake("bespoke_ext::rk_update")
def _rk_update_fake(terms, coeffs):
    _check_fake(terms, coeffs)
    return torch.empty(terms[0].shape, dtype=terms[0].dtype, device=terms[0].device)


@torch.library.register_fake("bespoke_ext::rk_update_out")
def _rk_update_out_fake(terms, coeffs, out):
    _check_fake(terms, coeffs, out)
    return None


@torch.library.register_fake("bespoke_ext::rk_residual")
def _rk_residual_fake(terms, coeffs, target):
    _check_fake(terms, coeffs, target)
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


# Under create_graph (grad mode on in backward) the gradients must themselves be differentiable: they
# are then formed by eager torch ops from the same formulas (the fused backward ops have no autograd),
# so double backward, Hessian-vector products and gradient penalties work, at eager speed.


def _column(coeffs: Tensor, j: int, like: Tensor, acc: torch.dtype) -> Tensor:
    """coeffs[..., j] broadcastable against a term: a scalar when shared, [N, 1, ...] per sample."""
    c = coeffs[..., j].to(acc)
    return c if coeffs.dim() == 1 else c.reshape(c.shape + (1,) * (like.dim() - 1))


def _per_sample_sum(v: Tensor, per_sample: bool) -> Tensor:
    return v.reshape(v.shape[0], math.prod(v.shape[1:])).sum(1) if per_sample else v.sum()


def _eager_update_grads(g: Tensor, terms, coeffs: Tensor, need_terms: bool, need_coeffs: bool):
    """dL/dT_j = c_j g and dL/dc_j = sum g T_j (per sample for [N, k] coeffs), in the math type."""
    acc = torch.float64 if terms[0].dtype == torch.float64 else torch.float32
    g = g.to(acc)
    gterms = [(_column(coeffs, j, g, acc) * g).to(t.dtype) for j, t in enumerate(terms)] if need_terms else []
    gcoeffs = None
    if need_coeffs:
        gcoeffs = torch.stack([_per_sample_sum(g * t.to(acc), coeffs.dim() == 2) for t in terms], -1).to(coeffs.dtype)
    return gterms, gcoeffs


def _update_backward(ctx, grad):
    saved = ctx.saved_tensors
    terms, coeffs = list(saved[: ctx.k]), saved[ctx.k]
    need_terms, need_coeffs = _needs(ctx.needs_input_grad[0]), _needs(ctx.needs_input_grad[1])
    if torch.is_grad_enabled():
        gterms, gcoeffs = _eager_update_grads(grad, terms, coeffs, need_terms, need_coeffs)
    else:
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
    if torch.is_grad_enabled():
        # rms = sqrt(mean_i r_i^2), r = sum_j c_j T_j - y: d rms / d r_i = r_i / (M rms), 0 where rms = 0
        acc = torch.float64 if terms[0].dtype == torch.float64 else torch.float32
        r = sum(_column(coeffs, j, t, acc) * t.to(acc) for j, t in enumerate(terms)) - target.to(acc)
        m = math.prod(r.shape[1:])
        scale = torch.where(rms > 0, grad.to(acc) / (m * rms.to(acc)), torch.zeros((), dtype=acc))
        gr = scale.reshape(scale.shape + (1,) * (r.dim() - 1)) * r
        gterms, gcoeffs = _eager_update_grads(gr, terms, coeffs.unsqueeze(0).expand(r.shape[0], -1)
                                              if coeffs.dim() == 1 else coeffs, need_terms, need_coeffs)
        if gcoeffs is not None and coeffs.dim() == 1:
            gcoeffs = gcoeffs.sum(0)
        gtarget = (-gr).to(target.dtype) if need_target else None
    else:
        gterms, gcoeffs, gtarget = _ops.rk_residual_backward.default(
            grad.contiguous(), rms, terms, coeffs, target, need_terms, need_coeffs, need_target
        )
    return (_term_grads(gterms, k, need_terms), (gcoeffs if need_coeffs else None),
            (gtarget if need_target else None))


torch.library.register_autograd("bespoke_ext::rk_update", _update_backward, setup_context=_update_setup)
torch.library.register_autograd("bespoke_ext::rk_residual", _residual_backward, setup_context=_residual_setup)
