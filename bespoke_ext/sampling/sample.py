"""``sample``: a drop-in for flow_matching's ``ODESolver(model).sample(x_init=x0, ...)``."""

from __future__ import annotations

import functools
import weakref
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor, nn

from .adaptive import ADAPTIVE_METHODS, TORCHDIFFEQ_METHODS, check_tolerances, solve_adaptive
from ..solvers.dpm_solver import DPM_METHOD, dpm_solver_program
from ..solvers.tableaus import TABLEAUS, canonical_method, fixed_step_program
from ..solvers.time_grid import (
    DEFAULT_TIME_GRID, as_time_grid, check_step_size, record_plan, refuse_grid_gradients, step_size_grid,
    steps_for_nfe, uniform_grid,
)
from .cuda_graph import execute_graphed
from .executor import StateDtype, execute
from ..groundtruth.inputs import as_positional, velocity_of, dtype_hint_on_error, first_tensor, model_call_dtype
from ..integers import as_int
from ..program import Program

__all__ = ["sample", "METHODS", "DEFAULT_METHOD", "SOLVER_LIKE_EXTRAS"]

METHODS = (*TABLEAUS, DPM_METHOD, *TORCHDIFFEQ_METHODS)
DEFAULT_METHOD = "euler"  # flow_matching's default


class _Required:
    """The default of sample()'s two leading arguments: given positionally or by keyword, never left out."""

    def __repr__(self) -> str:
        return "<required>"


_REQUIRED = _Required()


# Inside a torch.compile'd function sample() runs eagerly, a graph break: its preparation (argument checks,
# per-model caches keyed weakly on the module, program building) is Python bookkeeping Dynamo cannot
# trace, and the work it launches is already fused. To compile the model calls, compile the model:
# sample(torch.compile(model), x0, ...).
@torch.compiler.disable(reason="bespoke_ext.sample runs eagerly; compile the model instead")
def sample(model: Callable = _REQUIRED, x0: Tensor = _REQUIRED, /, *, solver=None, method: Optional[str] = None,
           nfe: Optional[int] = None, step_size: Optional[float] = None, time_grid=None,
           atol: float = 1e-5, rtol: float = 1e-5, return_intermediates: bool = False,
           enable_grad: bool = False, return_stats: bool = False, cuda_graph: bool = False,
           **model_extras):
    """Solve dx/dt = model(x, t, **model_extras) from x(time_grid[0]) = x0 (t = 0 noise, t = 1 data).

    Arguments mean what they mean in flow_matching's ``ODESolver.sample``:

    - ``method``: every name flow_matching (torchdiffeq) accepts. "euler" (the default, as in
      flow_matching), "midpoint", "heun" (torchdiffeq's "heun2", also accepted), "heun3" and "rk4"
      (torchdiffeq's 3/8-rule RK4) run as executor programs with torchdiffeq's coefficients and
      arithmetic; "dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun" and "scipy_solver"
      (adaptive, ``atol``/``rtol``) and "explicit_adams", "implicit_adams" / "fixed_adams"
      (multistep, on the fixed grid) run through torchdiffeq, called as flow_matching calls it.
      Beyond flow_matching, "dpm++2m" (DPM-Solver++(2M) on the OT path, for comparison).
      With no nfe / step_size / time_grid either, that is one Euler step, as in flow_matching.
    - ``time_grid`` (default [0., 1.]): increasing or decreasing times. Fixed-step methods step
      from point to point unless ``step_size`` or ``nfe`` is given; intermediates are reported at
      these points (linearly interpolated inside a step, as torchdiffeq does).
    - ``step_size``: fixed steps of this size from time_grid[0] (the last one shortened); for the
      fixed-step and multistep methods (an error with the adaptive ones, where flow_matching
      requires None).
    - ``nfe`` (beyond flow_matching): exactly this many model evaluations with uniform steps over
      [time_grid[0], time_grid[-1]]; a ValueError if the method cannot make exactly that many (and
      for the torchdiffeq methods, whose NFE is decided at run time).
    - ``solver``: a learned solver (``BespokeSolver``) instead of ``method``; it fixes its own time
      grid (``solver.times()``, where intermediates are then reported) and NFE.
    - ``return_intermediates``: return the states at the time_grid points stacked, [T, *x0.shape].
    - ``enable_grad``: keep the autograd graph (to x0, the model and a solver's parameters).
      Otherwise the loop runs under ``torch.no_grad()``, as flow_matching's does: nothing is
      recorded and the results are ordinary tensors without history, yet a model that needs
      autograd inside (classifier or energy guidance: ``with torch.enable_grad(): x =
      x.detach().requires_grad_(); torch.autograd.grad(...)``) works as it does with
      flow_matching. (``torch.inference_mode`` forbids that, and gains little here: on a small MLP
      (CPU, midpoint, 20 evaluations, medians of three runs on a shared machine) no_grad took
      0.99-1.07x inference mode's time at batch 16 and 1.00-1.08x at batch 4096, within the noise.)

    Beyond flow_matching:

    - ``return_stats``: also return a SampleStats (nfe, network_forwards, steps, method); the NFE
      is counted for every method, the adaptive and multistep ones included.
    - ``cuda_graph``: for CUDA x0 and fixed-step methods or solvers, capture the whole run, model
      included, in a CUDA graph on the first call and replay it afterwards (sampling/cuda_graph.py);
      no effect for CPU tensors; an error with the torchdiffeq methods or enable_grad.

    The model is called as ``model(x, t, **model_extras)`` with t a 0-dim tensor in x's dtype and
    must return a new tensor of x's shape and device (checked on the first call; a model that writes
    every velocity into one preallocated tensor is refused where a solver still needs the velocity it
    wrote over: Heun, RK4, multistep and learned solvers). A floating-point
    output of another dtype, such as the float16 / bfloat16 outputs of a model run under
    ``torch.autocast`` for a float32 state, is cast to the state's dtype (CUDA graphs included);
    the first evaluation decides, so a model's outputs must keep one dtype through the run. A
    bfloat16 / float16 module (most of its weight elements in that dtype) given a float32 or float64 x0 is called
    in its own dtype, x cast for each call, while the state stays in x0's dtype, as ``bx.train``
    calls it: sample a low-precision model from a float32 x0 (a low-precision x0 keeps the state in
    that precision, rounding every step).
    ``return_stats`` and ``cuda_graph`` are not passed on as model extras, and extras named like
    solver arguments (``steps``, ``num_steps``, ``num_inference_steps``, ``stepsize``,
    ``time_steps``, ``solver_method``, ...; see ``SOLVER_LIKE_EXTRAS``) are a TypeError naming the
    argument: a model taking ``**kwargs`` would swallow them while the solver silently did its
    default. (Bind a model input that really has such a name with
    ``functools.partial(model, steps=...)``.)

    Under ``torch.compile`` (a compiled function that calls sample) sample runs eagerly, a graph break:
    compile the model itself for faster model calls, ``sample(torch.compile(model), x0, ...)``. An
    object with a ``velocity`` field, such as an embedded model (``bespoke_ext.models.load_embedded``),
    is sampled through it, as ``bespoke_ext.train`` does.

    ``model`` and ``x0`` may be given by keyword, as flow_matching's ``sample(x_init=...)`` habit
    suggests; given positionally, the keywords ``x0=`` and ``model=`` are free for the model's own
    inputs: ``sample(net, noise, x0=image)`` calls ``net(x, t, x0=image)``.
    """
    model, x0 = _leading_arguments(model, x0, model_extras)
    model = velocity_of(model)
    _check_model_and_x0(model, x0)
    _check_extras(model_extras)
    low = model_call_dtype(model)
    given, model = model, as_positional(model)   # a model flow_matching's keyword call reaches but ours would not
    if low is not None and x0.dtype != low:
        # a bf16/fp16 module and a float32/float64 state: called in its own dtype, the state kept in
        # x0's, as bx.train trained and validated the solver (a bf16 state would round every step)
        model = _cast_outputs(model, low)
    if cuda_graph and enable_grad:
        raise ValueError("cuda_graph=True replays an inference-only run; it cannot be combined with enable_grad=True")
    refuse_grid_gradients(time_grid, enable_grad)
    if solver is not None:
        program = _solver_program(solver, x0, method=method, nfe=nfe, step_size=step_size,
                                  time_grid=time_grid, intermediates=return_intermediates,
                                  enable_grad=enable_grad)
    else:
        name = _method_name(method)
        if name not in TORCHDIFFEQ_METHODS:
            program = _fixed_program(name, time_grid, nfe=nfe, step_size=step_size, intermediates=return_intermediates)
        else:
            grid = as_time_grid(time_grid)
            step = _check_torchdiffeq_args(name, nfe=nfe, step_size=step_size, atol=atol, rtol=rtol,
                                           cuda_graph=cuda_graph)
            with dtype_hint_on_error(given, low or x0.dtype):
                traj, stats = solve_adaptive(model, x0, grid, atol=atol, rtol=rtol, extras=model_extras,
                                             enable_grad=enable_grad, method=name, step_size=step)
            return _result(traj[-1], traj, stats, return_intermediates, return_stats)
    with dtype_hint_on_error(given, low or x0.dtype):
        if cuda_graph and x0.is_cuda:
            final, traj, stats = execute_graphed(
                program, model if isinstance(model, StateDtype) else _cast_outputs(model), x0, model_extras)
        else:  # the executor casts outputs of another dtype itself, from the first that needs it
            final, traj, stats = execute(program, model, x0, model_extras, enable_grad=enable_grad)
    return _result(final, traj, stats, return_intermediates, return_stats)


# One wrapper per model, alive as long as the model: CUDA graphs are cached per model object, so
# the wrapper handed to them must be the same object on every call.
_WRAPPERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _cast_outputs(model: Callable, call_dtype: Optional[torch.dtype] = None) -> StateDtype:
    try:
        wrapper = _WRAPPERS.get(model)
        if wrapper is None or wrapper.call_dtype != call_dtype:
            wrapper = _WRAPPERS[model] = StateDtype(weakref.ref(model), call_dtype)
        return wrapper
    except TypeError:  # not hashable or not weak-referenceable: a wrapper for this call
        return StateDtype(model, call_dtype)


# Extras that name a solver argument (compared lower-case, without "_" and "-"), with the argument
# meant. A model taking **kwargs would swallow them and the solver would do its default.
_USE_NFE = "nfe= (model evaluations), step_size= or time_grid="
SOLVER_LIKE_EXTRAS = {
    **dict.fromkeys(("steps", "step", "nsteps", "numsteps", "numberofsteps", "nbsteps", "maxsteps",
                     "solversteps", "samplingsteps", "numsamplingsteps", "samplesteps", "inferencesteps",
                     "numinferencesteps", "ninferencesteps", "numtimesteps", "ntimesteps", "numiters",
                     "niters"), _USE_NFE),
    **dict.fromkeys(("nfe", "nfes", "numnfe", "nnfe", "numfe", "numevals", "nevals", "numfunctionevals",
                     "numfunctionevaluations", "numfunctionevaluation", "maxnfe"), "nfe="),
    **dict.fromkeys(("method", "methods", "solver", "solvers", "solvermethod", "odemethod", "solvername",
                     "methodname", "odesolver", "sampler", "integrator"),
                    "method= (a method name) or solver= (a learned solver)"),
    # (not "dt": shortcut models take the step size as an input of their own)
    **dict.fromkeys(("stepsize", "stepsizes", "timestepsize", "stepwidth"), "step_size="),
    **dict.fromkeys(("timegrid", "tgrid", "timesteps", "timepoints", "times", "tspan", "teval", "tseq"),
                    "time_grid="),
    **dict.fromkeys(("tol", "tols", "tolerance", "abstol", "reltol", "atols", "rtols", "abstolerance",
                     "reltolerance"), "atol= / rtol="),
    **dict.fromkeys(("returnintermediate", "intermediates", "intermediate", "returnall",
                     "returntrajectory", "returnintermediatesteps"), "return_intermediates="),
    **dict.fromkeys(("enablegrads", "enablegradient", "enablegradients", "withgrad"),
                    "enable_grad="),
    **dict.fromkeys(("returnstat", "stats", "returnnfe"), "return_stats="),
    **dict.fromkeys(("cudagraphs", "usecudagraph", "usecudagraphs"), "cuda_graph="),
    **dict.fromkeys(("options", "odeoptions", "solveroptions"),
                    "nfe=, step_size=, atol= or rtol= (torchdiffeq options are not passed through)"),
}


def _check_extras(extras: dict, caller: str = "sample", more: Optional[dict] = None) -> None:
    """A TypeError for a model extra that looks like a solver argument of ``caller`` (``more``: names it
    lacks, such as compute_likelihood's solver, with what to use instead)."""
    known = {**SOLVER_LIKE_EXTRAS, **(more or {})}
    for key in extras:
        meant = known.get(key.lower().replace("_", "").replace("-", ""))
        if meant is not None:
            raise TypeError(
                f"{caller}() got {key}={_short_repr(extras[key])} as a model extra, but {key!r} looks like "
                f"a solver argument: the model would receive it and the solver would ignore it. Did you "
                f"mean {meant}? (If the model really takes an input named {key!r}, bind it with "
                f"functools.partial(model, {key}=...).)"
            )


def _short_repr(value) -> str:
    if torch.is_tensor(value):
        return f"<tensor {tuple(value.shape)}>"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _result(final, traj, stats, intermediates: bool, with_stats: bool):
    out = traj if intermediates else final
    return (out, stats) if with_stats else out


def _leading_arguments(model, x0, extras: dict):
    """model and x0, positional-only so that a model input named ``x0`` or ``model`` can still be an
    extra; a call that names them by keyword gets them from the keywords instead."""
    if model is _REQUIRED:
        if "model" not in extras:
            raise TypeError("sample() missing required argument 'model' (pos 1)")
        model = extras.pop("model")
    if x0 is _REQUIRED:
        if "x0" not in extras:
            raise TypeError("sample() missing required argument 'x0' (pos 2): the initial state, a tensor [batch, ...]")
        x0 = extras.pop("x0")
    return model, x0


def _check_model_and_x0(model: Callable, x0) -> None:
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, t, **extras), got {type(model).__name__}")
    if not torch.is_tensor(x0):
        raise TypeError(f"x0 must be a tensor [batch, ...], got {type(x0).__name__}")
    if not x0.is_floating_point():
        raise ValueError(f"x0 must be a floating-point tensor (float16/bfloat16/float32/float64), got {x0.dtype}")
    device = _module_device(model)
    if device is not None and device != x0.device:
        raise ValueError(f"x0 is on {x0.device} but the model's parameters are on {device}; "
                         f"move one of them (e.g. x0.to({str(device)!r}))")


def _module_device(module) -> Optional[torch.device]:
    """The device of a module's first parameter or buffer (None: not a module, none, or meta)."""
    if not isinstance(module, nn.Module):
        return None
    try:
        t = first_tensor(module, "_parameters")
        if t is None:
            t = first_tensor(module, "_buffers")
    except KeyError:  # an object that passes for a Module without its registries (a mock): ask it
        t = next(iter(module.parameters()), None)
        if t is None:
            t = next(iter(module.buffers()), None)
    return None if t is None or t.is_meta else t.device


def _method_name(method) -> str:
    if method is None:
        return DEFAULT_METHOD
    if not isinstance(method, str):
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    name = canonical_method(method)
    if name not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS} (or pass solver=)")
    return name


def _fixed_program(name: str, time_grid, *, nfe, step_size, intermediates: bool) -> Program:
    # The whole derivation (step grid, record plan, program) is memoised on its hashable inputs: at small
    # batch it was a third of sample()'s overhead over the model's own cost (0.3 ms a call).
    # the grid's dtype is part of it: step_size grids are laid out in that dtype, as torchdiffeq does.
    # The default grid is keyed without building its tensor (about 20 us a call with a model's caches cold).
    # a 0-dim tensor nfe / step_size is keyed by its value: a tensor hashes by identity, so one changed in
    # place would find the program of its old value
    if torch.is_tensor(nfe) and nfe.dim() == 0:
        nfe = nfe.item()
    if torch.is_tensor(step_size) and step_size.dim() == 0:
        step_size = step_size.item()
    if time_grid is None:
        key = (name, DEFAULT_TIME_GRID, torch.get_default_dtype(), nfe, type(nfe), step_size, type(step_size), intermediates)
    else:
        grid = as_time_grid(time_grid)
        key = (name, tuple(grid.tolist()), grid.dtype, nfe, type(nfe), step_size, type(step_size), intermediates)
    try:
        hash(key)
        memo = _steps_at_most(key[1], nfe, step_size, _MEMO_STEPS)
    except TypeError:  # an unhashable argument (a 1-element list): derive without the memo
        memo = False
    if not memo:   # long programs are not kept: a step-size sweep would hold every one of them
        return _derive_fixed_program(name, torch.tensor(key[1], dtype=key[2]), nfe=nfe, step_size=step_size,
                                     intermediates=intermediates, memo=False)
    return _memo_fixed_program(key)


# Programs of more steps are built for each call (their build costs little next to their run). A program
# holds about 2.4 KB per evaluation (its steps' views), so the memo's bound on steps bounds its memory: at
# most 128 programs of 256 steps (rk4: 1024 evaluations, 2.5 MB), about 0.3 GB in the worst case, where
# 4096 steps held up to 38 MB each, 10 GB over a step-size sweep.
_MEMO_STEPS = 256


def _steps_at_most(grid: Tuple[float, ...], nfe, step_size, bound: int) -> bool:
    """Whether the program will have at most ``bound`` steps (an upper estimate, before building it)."""
    if step_size is not None:
        step = check_step_size(step_size)
        return abs(grid[-1] - grid[0]) / step + 1 <= bound
    if nfe is not None:
        return as_int(nfe) is not None and as_int(nfe) <= bound
    return len(grid) - 1 <= bound


@functools.lru_cache(maxsize=128)
def _memo_fixed_program(key) -> Program:
    name, grid, dtype, nfe, _, step_size, _, intermediates = key
    return _derive_fixed_program(name, torch.tensor(grid, dtype=dtype), nfe=nfe, step_size=step_size,
                                 intermediates=intermediates)


def _derive_fixed_program(name: str, grid: Tensor, *, nfe, step_size, intermediates: bool, memo: bool = True) -> Program:
    step = check_step_size(step_size)
    if nfe is not None and step is not None:
        raise ValueError(f"give nfe or step_size, not both (got nfe={nfe!r}, step_size={step_size!r})")
    evals_per_step = TABLEAUS[name].stages if name in TABLEAUS else 1
    if nfe is not None:
        steps = steps_for_nfe(nfe, evals_per_step, name)
        steps_grid = uniform_grid(float(grid[0]), float(grid[-1]), steps)
    elif step is not None:
        steps_grid = step_size_grid(grid, step)
    else:
        steps_grid = grid.to(torch.float64)
    if name == DPM_METHOD and not (0.0 <= float(grid[0]) < float(grid[-1]) <= 1.0):
        raise ValueError(f"method {DPM_METHOD!r} integrates from noise to data: time_grid must increase "
                         f"inside [0, 1], got {grid.tolist()}")
    plan = record_plan(steps_grid, grid) if intermediates else None
    build = _cached_program if memo else _cached_program.__wrapped__
    return build(name, tuple(steps_grid.tolist()), None if plan is None else tuple(tuple(step) for step in plan))


@functools.lru_cache(maxsize=64)
def _cached_program(name: str, grid: Tuple[float, ...], plan) -> Program:
    """Fixed methods' programs depend only on these (hashable) arguments; building one costs about
    as much as a few fused launches, so repeated calls reuse it (programs are never mutated)."""
    steps_grid = torch.tensor(grid, dtype=torch.float64)
    if name == DPM_METHOD:
        return dpm_solver_program(steps_grid, plan)
    return fixed_step_program(TABLEAUS[name], steps_grid, plan)


def _check_torchdiffeq_args(name: str, *, nfe, step_size, atol, rtol, cuda_graph: bool) -> Optional[float]:
    """Arguments of the methods torchdiffeq runs; returns the step size (multistep methods)."""
    kind = "adaptive" if name in ADAPTIVE_METHODS else "a multistep method"
    if nfe is not None:
        what = ("it chooses its own NFE" if name in ADAPTIVE_METHODS else
                "its NFE is not a fixed multiple of its steps (RK4 start-up steps, corrector iterations); "
                "give step_size or time_grid")
        raise ValueError(f"method {name!r} is {kind}: {what} (see return_stats=True); drop nfe={nfe!r}")
    step = check_step_size(step_size)
    if step is not None and name in ADAPTIVE_METHODS:
        raise ValueError(f"method {name!r} is adaptive: step_size applies to fixed-step methods (flow_matching "
                         f"requires None too); drop step_size={step_size!r}")
    if cuda_graph:
        raise ValueError(f"cuda_graph=True needs a fixed program of steps; method {name!r} ({kind}) runs "
                         f"through torchdiffeq")
    check_tolerances(atol, rtol)
    return step


def _solver_program(solver, x0: Tensor, *, method, nfe, step_size, time_grid, intermediates: bool,
                    enable_grad: bool) -> Program:
    if method is not None:
        raise ValueError(f"give solver= or method=, not both (got method={method!r})")
    if step_size is not None or time_grid is not None:
        raise ValueError("a learned solver fixes its own time grid (solver.times()); step_size and "
                         "time_grid apply to method= only")
    if not callable(getattr(solver, "program", None)):
        raise TypeError(f"solver must be a learned solver such as BespokeSolver, got {type(solver).__name__}")
    if nfe is not None and nfe != solver.nfe:
        raise ValueError(f"this solver makes {solver.nfe} model evaluations; got nfe={nfe!r} "
                         f"(train a solver with that NFE, or drop nfe)")
    if isinstance(solver, nn.Module) and any(t.is_meta for t in solver.parameters()):
        raise ValueError("the solver's parameters are on the meta device (shapes only, no values): load or "
                         "initialise the solver on a real device first")
    device = _module_device(solver)
    if device is not None and device != x0.device:
        raise ValueError(f"the solver is on {device} but x0 is on {x0.device}; move it with solver.to(x0.device)")
    with torch.set_grad_enabled(enable_grad):
        program = solver.program(intermediates=intermediates)
    # One host sync per call, before the loop: a diverged solver fails here, not as NaN samples.
    if not (bool(torch.isfinite(program.coeffs).all()) and bool(torch.isfinite(program.times).all())):
        raise ValueError(f"the solver's coefficients are not finite ({solver!r}); was its training diverging?")
    return program
