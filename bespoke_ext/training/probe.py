"""The model as training meets it: its device and state dtype, its weights frozen for the run, and the
probe: one call before any ground truth, so a model that breaks the contract fails at once with a message
naming what was expected, not deep inside an adaptive solve or a kernel."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Callable, Optional, Sequence

import torch

from ..groundtruth.inputs import STATE_DTYPES, dtype_hint, model_call_dtype, pool_size, take
from ..models.identity import reachable_state

__all__ = ["probe_model", "model_device_dtype", "frozen"]


def model_device_dtype(model, device=None, dtype: Optional[torch.dtype] = None, exclude=None):
    """(device, state dtype): the given ones, else those of the network the model computes with: of the
    modules it reaches (a module, a bound method's module, what a plain function calls:
    ``reachable_state``; ``exclude``, the solver, left out), the one with the most weights; a bf16/fp16
    model's states are float32 (it is called in its own dtype, see groundtruth/inputs.py)."""
    modules, _ = reachable_state(model, exclude)
    skip = _ids(exclude)

    def weights(m):
        return [p for p in m.parameters() if p.is_floating_point() and id(p) not in skip]

    main = max(modules, key=lambda m: sum(p.numel() for p in weights(m)), default=None)
    params = weights(main) if main is not None else []
    tensors = params + ([b for b in main.buffers() if b.is_floating_point()] if main is not None else [])
    device = torch.device(device) if device is not None else (tensors[0].device if tensors else torch.device("cpu"))
    weighted = params or tensors   # a model of buffers only (an analytic field) has its dtype there
    own = weighted[0].dtype if weighted else torch.float32
    return device, dtype or (own if own in STATE_DTYPES else torch.float32)


def _ids(module) -> set:
    return {id(p) for p in module.parameters()} if isinstance(module, torch.nn.Module) else set()


@contextmanager
def frozen(model, keep=None):
    """Weights frozen and eval mode while training, the caller's settings restored afterwards: those of
    every module the model reaches (``reachable_state``; a plain function's network too, whose weights
    would otherwise collect gradients of every loss) and of plain tensors that require grad; ``keep``
    (the solver being trained, which the model's object may hold too) keeps its gradients. Modes are
    restored with each module's own ``train(mode)``, parents first, so overrides (LoRA merges) run."""
    modules, tensors = reachable_state(model, keep)
    kept = _ids(keep)
    leaves = {id(p): p for m in modules for p in m.parameters() if id(p) not in kept}
    leaves.update((id(t), t) for t in tensors if id(t) not in kept)
    flags = [(p, p.requires_grad) for p in leaves.values()]
    modes = [(sub, sub.training) for m in modules for sub in m.modules()]   # parents before their children
    for p, _ in flags:
        p.requires_grad_(False)
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for sub, mode in modes:
            sub.train(mode)


def _probe_rows(conditions):
    """(rows, what they are) of the pool the probe calls with: rows 0 and 1, or, where an entry holds integers
    (class labels, token ids), the rows of its smallest and largest value, so that a pool reaching past what
    the model takes (labels 0-9 for an Embedding of 3) fails here, not midway through the ground truth."""
    m = pool_size(conditions)
    if not m:
        return None, ""
    for name, v in conditions.items():
        if not (v.is_floating_point() or v.is_complex() or v.dtype == torch.bool):
            flat = v.reshape(m, -1)
            low, high = int(flat.min(1).values.argmin()), int(flat.max(1).values.argmax())
            return torch.tensor([low, high]), f"those of the smallest and largest {name}"
    return torch.tensor([0, 1 % m]), "the first two"


def _describe(v) -> str:
    return f"{type(v).__name__} {tuple(v.shape)} {v.dtype} on {v.device}" if torch.is_tensor(v) else type(v).__name__


_TIME_HINTS = {
    "a 0-dim t": "it accepts t [2]: training calls it with one time per sample, but sampling and validation "
                 "with one 0-dim t for the whole batch; a model that needs [B] can expand it itself "
                 "(t.expand(x.shape[0]))",
    "t [2]": "it accepts a 0-dim t, as sampling passes it, but training calls it with one time per sample, "
             "t of shape [B]; a model that takes only a scalar time can be wrapped in "
             "bespoke_ext.models.adapters.ScalarTimeAdapter",
}


def probe_model(model: Callable, shape: Sequence[int], *, device: torch.device, dtype: torch.dtype,
                extras: Optional[dict] = None, conditions: Optional[dict] = None) -> None:
    """Two calls on a batch of 2 before any ground truth, as training will call the model: x [2, *shape] in
    the model's dtype (``dtype``, or its own bf16/fp16), t [2] (training's batched steps and ground-truth
    solves) and a 0-dim t (sampling and validation), two rows of the conditions pool (``_probe_rows``),
    model_extras. Raises a clear
    error unless the model accepts those names and returns a finite floating tensor of x's shape and dtype
    on ``device`` for both."""
    extras = dict(extras or {})
    call_dtype = model_call_dtype(model) or dtype
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0), dtype=dtype).to(device).to(call_dtype)
    rows, which = _probe_rows(conditions)
    cond = take(conditions, rows, device=device)
    names = ", ".join([f"{k}=<{_describe(v)}>" for k, v in cond.items()] + [f"{k}=..." for k in extras])
    rows_note = f", conditions rows {rows.tolist()} ({which})" if rows is not None else ""
    forms = {"t [2]": torch.tensor([0.25, 0.75], dtype=dtype, device=device),
             "a 0-dim t": torch.tensor(0.5, dtype=dtype, device=device)}

    def calls_with(form: str) -> bool:  # whether the model runs at all with this time form
        try:
            with torch.no_grad():
                model(x, forms[form], **extras, **cond)
            return True
        except Exception:
            return False

    for form, t in forms.items():
        call = (f"model(x, t{', ' + names if names else ''}) with x [2, {', '.join(map(str, shape))}] {call_dtype} "
                f"on {device} and {form}{rows_note}")
        other = "a 0-dim t" if form == "t [2]" else "t [2]"
        _probe_once(model, x, t, shape, dtype, extras, cond, call,
                    hint=lambda exc: f" ({_TIME_HINTS[form]})" if calls_with(other) else
                    dtype_hint(model, call_dtype) if "dtype" in str(exc).lower() else "")
    with torch.enable_grad():   # the losses differentiate through the model: its output must carry x's graph
        out = model(x.detach().requires_grad_(), forms["t [2]"], **extras, **cond)
    if not out.requires_grad:
        warnings.warn("bespoke_ext.train: the model's output does not depend on x through autograd (a forward under "
                      "torch.no_grad(), or a detached result): the losses differentiate through the model, so "
                      "training would follow a truncated gradient", RuntimeWarning, stacklevel=3)


def _probe_once(model, x, t, shape, dtype, extras: dict, cond: dict, call: str, hint) -> None:
    try:
        with torch.no_grad():
            out = model(x, t, **extras, **cond)
    except TypeError as exc:
        raise TypeError(f"the model probe {call} raised TypeError: {exc}{hint(exc)}. The model must accept x, t and "
                        f"every name in model_extras {sorted(extras)} and conditions {sorted(cond)} as keyword "
                        f"arguments") from exc
    except Exception as exc:
        raise RuntimeError(f"the model probe {call} failed before training: {type(exc).__name__}: {exc}{hint(exc)}"
                           ) from exc
    if not torch.is_tensor(out):
        raise TypeError(f"the model probe {call} returned {type(out).__name__}; expected a velocity tensor of "
                        f"x's shape {tuple(x.shape)} (a model returning a tuple or an object with .sample can be "
                        f"wrapped in bespoke_ext.models.adapters.VelocityAdapter, which unwraps it)")
    if out.shape != x.shape:
        raise ValueError(f"the model probe {call} returned shape {tuple(out.shape)}; expected x's shape "
                         f"{tuple(x.shape)} (is shape={tuple(shape)} the per-sample shape the model takes?)")
    # A bf16/fp16 model may return its own dtype or the state's (its velocity is cast to the state's dtype).
    allowed = {x.dtype, dtype}
    if not out.is_floating_point() or out.dtype not in allowed:
        raise ValueError(f"the model probe {call} returned dtype {out.dtype}; expected x's dtype {x.dtype} "
                         f"(pass dtype= the model's precision, torch.float32 or torch.float64, or make the model "
                         f"return its input's dtype)")
    if out.device != x.device:
        raise ValueError(f"the model probe {call} returned a tensor on {out.device}; expected the training device "
                         f"{x.device} (pass device='{out.device}', or move the model)")
    if not bool(torch.isfinite(out).all()):
        bad = int((~torch.isfinite(out)).sum())
        raise ValueError(f"the model probe {call} returned {bad} non-finite values (NaN or inf) of {out.numel()}; "
                         f"expected a finite velocity")
