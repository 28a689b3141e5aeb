"""Bespoke non-stationary solvers (BNS; Shaul et al., ICML 2024; method.md §9).

On a learned grid 0 = t_0 < ... < t_n = 1 every step may use every earlier velocity (NFE n, sample x_n):

    x_{i+1} = a_i x_0 + sum_{j=0..i} b_ij U_j,    U_j = u(x_j, t_j),    i = 0..n-1.

Free numbers: t_1..t_{n-1}, a_i, the lower triangle b_ij: n(n+5)/2 - 1 (74 at NFE 10). Every explicit
linear method with strictly increasing model times below 1 is a member (``from_solver``): Euler,
midpoint, heun3, DPM-Solver++(2M), BespokeSolvers of order 1 and 2 (not heun / rk4: repeated times, t = 1).

Parametrisation: a *base* member (times T, coefficients A, B; Euler / midpoint converted from the
program ``bespoke_ext.sample(method=..., nfe=...)`` runs, or any converted solver) plus learned offsets,
zero in a fresh solver. g is bespoke.py's relative softplus (exactly 1 at 0, positive, ratio <~1e10):
  - times: increments w_0 = dT_0 (fixed: normalising removes one degree of freedom), w_k = dT_k
    g(time_scale time_logits_{k-1}); t_k = sum_{j<k} w_j / sum_j w_j + e_k, e = T - cumsum(dT) / sum(dT)
    the base's re-normalisation rounding (~1e-16, 0 at both ends): t_0 = 0, t_n = 1, t = T bitwise
    at zero offsets, strictly increasing for every real parameter vector (increments >> |e|);
  - a_i = A_i + coeff_scale a_delta_i, b_ij = B_ij + coeff_scale b_delta_ij (a ~ 1, b ~ 1/n).
Units: Adam moves each raw number by ~lr per step whatever its gradient. Time logits are log relative
increments (as in BespokeSolver); a and b are in absolute units, so b moves ~n times faster relative
to its size than times and a: measured best (moons2d, NFE 10, 600 steps, log-MSE: 0.28x midpoint's
RMSE vs 0.40x with b in units of 1/n; midpoint-based, lr 5e-3).

Program: each state x_k has its own slot (a velocity may alias its input: none is reused), each U_j a
velocity slot. Step i is written relative to a reference state x_r, r = refs[i] <= i (the state the
base's own update starts from: Euler x_i, midpoint x_2m):

    x_{i+1} = x_r + (a_i - a_{r-1}) x_0 + sum_{j<=i} (b_ij - b_{r-1,j}) U_j    (r = 0: the formula itself)

For a fresh solver the differences are exact zeros, so each combination adds what the base adds, in
its order: samples equal the base's bitwise. Above the fused op's term limit (``max_terms()``) a step
is chained: partial sums go to one scratch slot, which leads the next chunk with coefficient 1
(reference first, U_i last, so a fresh solver keeps its bits). The coefficient table is one gather from
an [n, n + 2] matrix (reference, x_0, U_0..U_{n-1}) and a constant 1, differentiable in every raw
parameter. Training: through ``program()``, by default with the log-MSE of the final sample (the end-to-end
loss as an option; the bound loss is for scale-time solvers).
"""

from __future__ import annotations

import math
import os
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..integers import as_int
from ..program import Program, ProgramBuilder
from .bespoke import _BOUND, _SOFTPLUS_ONE, _clamp, _map_location, _relative_softplus, check_samples_finitely
from .files import SolverFileError, read_solver_file, write_solver_file
from .float64_module import Float64Module
from .nonstationary_conversion import NonStationaryTables, convert_program, method_program

__all__ = ["NonStationarySolver", "NonStationaryTables", "max_terms", "convert_program"]

BASES = ("euler", "midpoint")
_RAW = ("time_logits", "a_delta", "b_delta")
_BASE = ("base_times", "base_a", "base_b")


# -- the fused op's term limit -------------------------------------------------------------------

def max_terms() -> int:
    """The most terms one fused combination takes: ``bespoke_ext.ops.MAX_TERMS`` (kMaxTerms of
    csrc/rk_common.h, shared by the CPU and CUDA kernels)."""
    from .. import ops

    return ops.MAX_TERMS


_op_limit = max_terms  # for program(), whose argument has that name


# -- the solver ------------------------------------------------------------------------------------

def _dense(t: Tensor) -> Tensor:
    """A float64 CPU copy with canonical strides (a view's odd stride on a size-1 dimension survives
    .contiguous() and upsets byte views of it)."""
    return torch.empty(t.shape, dtype=torch.float64).copy_(t)


def _check_nfe(nfe) -> int:
    value = as_int(nfe)
    if value is None or value < 1:
        raise ValueError(f"nfe must be an integer >= 1, got {nfe!r}")
    return value


def _check_scale(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


class NonStationarySolver(Float64Module):
    """A learnable non-stationary solver with ``nfe`` model evaluations (method.md §9). Fresh, it samples
    bitwise like ``bespoke_ext.sample(model, x0, method=base, nfe=nfe)`` (base "euler", or "midpoint"
    with nfe even); ``from_solver`` starts from any other member. ``time_scale`` / ``coeff_scale``: the
    raw parameters' units (module docstring). Use with ``bespoke_ext.sample(model, x0, solver=solver)``."""

    supports_bound_loss = False  # trained on its final sample: loss="log_mse" (or "end_to_end")
    default_loss = "log_mse"  # bx.train's loss when none is given: the paper's
    KIND = "NonStationarySolver"
    identity_skip = True  # held next to a network, a solver is not part of the field (models/identity.py)

    def __init__(self, nfe: int, base: str = "euler", *, time_scale: float = 1.0, coeff_scale: float = 1.0):
        super().__init__()
        nfe = _check_nfe(nfe)
        if not isinstance(base, str) or base.lower() not in BASES:
            raise ValueError(f"base must be one of {BASES} (or use NonStationarySolver.from_solver), got {base!r}")
        if base.lower() == "midpoint" and nfe % 2:
            raise ValueError(f"a midpoint base makes 2 model evaluations per step, so nfe must be even; got nfe={nfe}")
        tables = convert_program(method_program(base.lower(), nfe))
        self._init(nfe, base.lower(), tables, time_scale=time_scale, coeff_scale=coeff_scale)

    def _init(self, nfe: int, base: str, tables: NonStationaryTables, *, time_scale, coeff_scale) -> None:
        n = nfe
        self._nfe = n
        self.base = base
        self.time_scale = _check_scale("time_scale", time_scale)
        self.coeff_scale = _check_scale("coeff_scale", coeff_scale)
        self.refs = tuple(tables.refs)
        _check_refs(self.refs, n)
        f64 = dict(dtype=torch.float64)
        self.time_logits = nn.Parameter(torch.zeros(n - 1, **f64))
        self.a_delta = nn.Parameter(torch.zeros(n, **f64))
        self.b_delta = nn.Parameter(torch.zeros(n * (n + 1) // 2, **f64))
        rows, cols = torch.tril_indices(n, n)
        self.register_buffer("base_times", _dense(tables.times))
        self.register_buffer("base_a", _dense(tables.a))
        self.register_buffer("base_b", _dense(tables.b[rows, cols]))
        self.metadata: dict = {}
        self.history = None  # set by bespoke_ext.train
        self._programs: dict = {}

    @classmethod
    def _from_tables(cls, tables: NonStationaryTables, base: str, **scales) -> "NonStationarySolver":
        solver = cls.__new__(cls)
        nn.Module.__init__(solver)
        solver._init(int(tables.a.numel()), base, tables, **scales)
        return solver

    @classmethod
    def from_solver(cls, source, nfe: Optional[int] = None, *, time_scale: float = 1.0,
                    coeff_scale: float = 1.0) -> "NonStationarySolver":
        """A fresh solver whose base is ``source`` (samples equal its own to float32 rounding; bitwise for
        euler / midpoint): a method name ("euler", "midpoint", "heun3", "dpm++2m"; needs ``nfe``), a learned solver
        with ``.program()`` (BespokeSolver, NonStationarySolver) or a Program. ValueError for non-members."""
        if isinstance(source, str):
            if nfe is None:
                raise ValueError(f"converting method {source!r} needs nfe=")
            if source.lower() in BASES:
                return cls(nfe, source, time_scale=time_scale, coeff_scale=coeff_scale)
            program, label = method_program(source, _check_nfe(nfe)), source.lower()
        elif isinstance(source, Program):
            program, label = source, source.method
        elif callable(getattr(source, "program", None)):
            with torch.no_grad():
                program = source.program()
            label = getattr(source, "method", type(source).__name__)
        else:
            raise TypeError(f"source must be a method name, a learned solver with .program() or a Program, "
                            f"got {type(source).__name__}")
        if nfe is not None and _check_nfe(nfe) != program.nfe:
            raise ValueError(f"{label!r} makes {program.nfe} model evaluations, not nfe={nfe}")
        solver = cls._from_tables(convert_program(program), str(label), time_scale=time_scale,
                                  coeff_scale=coeff_scale)
        solver.metadata["initialised_from"] = str(label)
        return solver

    # -- shape -----------------------------------------------------------------------------------
    @property
    def nfe(self) -> int:
        return self._nfe

    @property
    def steps(self) -> int:  # one evaluation per step (the program's steps), for BespokeSolver-shaped code
        return self._nfe

    @property
    def order(self) -> int:  # evaluations per step, for BespokeSolver-shaped code; not an order of accuracy
        return 1

    @property
    def num_parameters(self) -> int:
        """Raw learnable scalars: n(n+5)/2 - 1."""
        return sum(p.numel() for p in self.parameters())

    method = "bespoke-ns"  # names rows and programs

    def extra_repr(self) -> str:
        return f"nfe={self.nfe}, base={self.base!r}, time_scale={self.time_scale:g}, coeff_scale={self.coeff_scale:g}"

    # -- parametrisation ---------------------------------------------------------------------------
    def time_grid(self) -> Tensor:
        """The state times t_0..t_n [n+1] (float64, differentiable; t_0 = 0, t_n = 1)."""
        bt = self.base_times.double()
        d0 = bt[1:] - bt[:-1]
        zero = bt[:1] * 0
        g = _relative_softplus(self.time_scale * self.time_logits.double())
        w = torch.cat([d0[:1], d0[1:] * g])
        c, c0 = torch.cumsum(w, 0), torch.cumsum(d0, 0)
        correction = bt - torch.cat([zero, c0 / c0[-1]])  # exact zeros at both ends
        return torch.cat([zero, c / c[-1]]) + correction

    def coefficients(self) -> Tuple[Tensor, Tensor]:
        """a [n] and b [n, n] (lower triangular), float64, differentiable."""
        n = self._nfe
        a = self.base_a.double() + self.coeff_scale * self.a_delta.double()
        packed = self.base_b.double() + self.coeff_scale * self.b_delta.double()
        rows, cols = torch.tril_indices(n, n, device=packed.device)
        b = packed.new_zeros(n, n).index_put((rows, cols), packed)
        return a, b

    supports_least_squares_start = True  # linear in a and b on a fixed grid (training/least_squares_start.py)

    def default_lr(self, fitted: bool) -> Optional[float]:
        """``bx.train``'s lr for this solver when none is given: 1e-2 / nfe after the least-squares start,
        else None (TrainOptions' general 5e-3). The fit leaves a and b at their optimum for the grid, and
        Adam moves every raw number by about lr a step whatever its gradient: against b ~ 1/n (1/n² per
        step summed), the general 5e-3 knocked the fitted solver out of its basin at NFE >= 20. Measured
        (300 log-MSE steps, cosine, validation RMSE against the fit alone; 1 thread):
          - moons2d (32 pairs a step): NFE 10 fit 0.0114, lr 5e-3 0.0102, 2e-3 0.0100, 1e-3 0.0101;
            NFE 20 fit 0.00242, 5e-3 0.00401, 1e-3 0.00221, 5e-4 0.00218; NFE 30 fit 0.00145, 5e-3
            0.00459, 1e-3 0.00133, 5e-4 0.00112;
          - 64-d Gaussian mixture, NFE 10: fit 0.0030, 5e-3 0.168, 2e-3 0.025, 1e-3 0.00029 (at NFE 20-30
            the fit is at the ground truth's own tolerance, 1e-5-3e-5, and every lr only loses);
          - MNIST (64 pairs, one a step): NFE 10 fit 0.0240, 5e-3 0.0180, 3e-3 0.0178, 1e-3 0.0197 (the
            one case where 1e-2 / nfe gives up accuracy, 10%: the demo preset passes 3e-3); NFE 20 fit
            0.00734, 5e-3 0.0177, 3e-3 0.00998 (0.057 after 50 steps), 1e-3 0.00719, 5e-4 0.00734.
        Without the fit (a plain Euler or midpoint start) the steps have further to go, and the general lr
        measured as well as any (demo presets)."""
        return 1e-2 / self._nfe if fitted else None

    def set_coefficients(self, a: Tensor, b: Tensor) -> None:
        """Set the offsets so that ``coefficients()`` returns ``a`` [n] and the lower triangle of ``b`` [n, n]
        (to float64 rounding; the times are kept). The inverse of the parametrisation above."""
        n = self._nfe
        a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
        if tuple(a.shape) != (n,) or tuple(b.shape) != (n, n):
            raise ValueError(f"a NonStationarySolver with nfe {n} needs a of shape ({n},) and b of shape ({n}, {n}), "
                             f"got {tuple(a.shape)} and {tuple(b.shape)}")
        if not bool(torch.isfinite(a).all() and torch.isfinite(torch.tril(b)).all()):
            raise ValueError("coefficients must be finite")
        rows, cols = torch.tril_indices(n, n)
        with torch.no_grad():
            device = self.a_delta.device
            self.a_delta.copy_((a.to(device) - self.base_a.double()) / self.coeff_scale)
            self.b_delta.copy_((b.to(device)[rows.to(device), cols.to(device)] - self.base_b.double()) / self.coeff_scale)

    def set_times(self, times: Tensor) -> None:
        """Set the time logits so that ``times()`` returns ``times`` [n+1] (0 = t_0 < ... < t_n = 1; to float64
        rounding and within the parametrisation's bounded step ratio); the coefficients are kept."""
        n = self._nfe
        t = torch.as_tensor(times, dtype=torch.float64).detach().cpu()
        if tuple(t.shape) != (n + 1,) or float(t[0]) != 0.0 or float(t[-1]) != 1.0 or not bool((t[1:] > t[:-1]).all()):
            raise ValueError(f"times must be {n + 1} values increasing strictly from 0 to 1, got {t.tolist()}")
        bt = self.base_times.detach().double().cpu()
        d0, d = bt[1:] - bt[:-1], t[1:] - t[:-1]
        g = (d[1:] / d[0]) / (d0[1:] / d0[0])          # w_k / dT_k with w_0 = dT_0 (time_grid's normalisation)
        # The relative softplus inverted: softplus(clamp(c + l)) = g softplus(clamp(c)), clamp(z) = B tanh(z / B).
        one = torch.tensor(_SOFTPLUS_ONE, dtype=torch.float64)
        z = torch.log(torch.expm1(g * F.softplus(_clamp(one)))).clamp(-0.999 * _BOUND, 0.999 * _BOUND)
        logits = _BOUND * torch.atanh(z / _BOUND) - one
        with torch.no_grad():
            self.time_logits.copy_((logits / self.time_scale).to(self.time_logits.device))

    def times(self) -> Tensor:
        """The states' time grid t_0..t_n (float64, detached); the model sees t_0..t_{n-1}."""
        return self.time_grid().detach()

    def eval_times(self) -> Tensor:
        """Every model-evaluation time t_0..t_{n-1} (float64, detached)."""
        return self.time_grid()[:-1].detach()

    def step_coefficients(self):
        raise TypeError("a NonStationarySolver has no scale-time steps: the bound loss (method.md §5) is for "
                        "BespokeSolver; train it with loss='log_mse' (its paper's) or loss='end_to_end'")

    def lipschitz(self, L_tau: float = 1.0):
        raise TypeError("a NonStationarySolver has no per-step Lipschitz bound: train it with loss='log_mse' "
                        "(its paper's) or loss='end_to_end'")

    # -- sampling ----------------------------------------------------------------------------------
    def program(self, intermediates: bool = False, max_terms: Optional[int] = None) -> Program:
        """The executor's program; under autograd its tables carry the raw parameters' history.

        ``intermediates``: record the states at times() (n + 1). ``max_terms``: chain combinations above
        this many terms (default and cap: the op's limit). Without autograd the program is memoised
        against a copy of the parameters and base tables (compared by value) and the scales and refs."""
        limit = _op_limit() if max_terms is None else max_terms
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 2:
            raise ValueError(f"max_terms must be an integer >= 2, got {limit!r}")
        limit = min(limit, _op_limit())
        key = (bool(intermediates), limit)
        if torch.is_grad_enabled():
            return self._build_program(*key)
        memo = self._programs.get(key)
        state = [t.detach() for t in (*self.parameters(), *self.buffers())]
        # the plain settings the tables are computed from too: they are attributes, which a user may set
        settings = (float(self.time_scale), float(self.coeff_scale), tuple(self.refs))
        if memo is not None and memo[2] == settings and len(memo[0]) == len(state) and all(
                a.shape == b.shape and a.device == b.device and a.dtype == b.dtype and torch.equal(a, b)
                for a, b in zip(memo[0], state)):
            return memo[1]
        program = self._build_program(*key)
        self._programs[key] = ([s.clone() for s in state], program, settings)
        return program

    def _build_program(self, intermediates: bool, limit: int) -> Program:
        n = self._nfe
        t = self.time_grid()
        a, b = self.coefficients()
        refs = torch.tensor(self.refs, dtype=torch.long, device=a.device)
        a_prev = torch.cat([a.new_zeros(1), a])[refs]            # a_{r-1}, 0 for r = 0
        b_prev = torch.cat([b.new_zeros(1, n), b])[refs]         # b_{r-1, .}, 0 for r = 0
        matrix = torch.cat([a.new_ones(n, 1), (a - a_prev)[:, None], b - b_prev], dim=1)  # [n, n + 2]
        flat = torch.cat([matrix.reshape(-1), a.new_ones(1)])
        record = [float(v) for v in t.detach().cpu()] if intermediates else None
        builder, output, index = _instructions(n, self.refs, limit, record)
        return builder.build(output=output, times=t[:-1], coeffs=flat[torch.tensor(index, device=flat.device)])

    # -- files -------------------------------------------------------------------------------------
    def save(self, path: Union[str, os.PathLike], metadata: Optional[dict] = None) -> None:
        """Write a data-only solver file (solvers/files.py): raw offsets, base tables, config and
        ``self.metadata`` updated with ``metadata``."""
        info = {**self.metadata, **(metadata or {})}
        tensors = {name: _dense(getattr(self, name).detach()) for name in (*_RAW, *_BASE)}
        config = {"nfe": self._nfe, "base": self.base, "refs": list(self.refs),
                  "time_scale": self.time_scale, "coeff_scale": self.coeff_scale}
        write_solver_file(path, kind=self.KIND, config=config, tensors=tensors, info=info, check_schema=True)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], map_location=None) -> "NonStationarySolver":
        """Read a solver written by ``save``; SolverFileError naming the problem for any other file.
        Every tensor's shape is checked against the header's nfe before it is used.

        ``map_location``: where the solver goes, as for ``torch.load`` and ``BespokeSolver.load``: a
        device or a device string ("cuda:0"); None keeps it on the CPU."""
        device = _map_location(map_location)  # a bad device fails before the file is read
        f = read_solver_file(path, kind=cls.KIND)
        refuse = lambda why: SolverFileError(f"{os.fspath(path)}: {why}")
        cfg, keys = f.config, {"nfe", "base", "refs", "time_scale", "coeff_scale"}
        if set(cfg) != keys:
            raise refuse(f"config keys {sorted(cfg)} are not those of a {cls.KIND} ({sorted(keys)})")
        n = cfg["nfe"]
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 4096 or not isinstance(cfg["base"], str):
            raise refuse(f"invalid nfe {n!r} (an integer in [1, 4096]) or base {cfg['base']!r} (a string)")
        try:
            _check_refs(cfg["refs"], n)
        except ValueError as exc:
            raise refuse(f"invalid refs: {exc}") from None
        tri = n * (n + 1) // 2
        expected = {"time_logits": (n - 1,), "a_delta": (n,), "b_delta": (tri,), "base_times": (n + 1,),
                    "base_a": (n,), "base_b": (tri,)}
        if set(f.tensors) != set(expected):
            raise refuse(f"tensors {sorted(f.tensors)} are not those of a {cls.KIND} ({sorted(expected)})")
        for name, shape in expected.items():
            value = f.tensors[name]
            if tuple(value.shape) != shape:
                raise refuse(f"tensor {name!r} has shape {tuple(value.shape)}, but nfe {n} needs {shape}")
            if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
                raise refuse(f"tensor {name!r} is not a finite float tensor")
        bt = f.tensors["base_times"].to(torch.float64)
        if float(bt[0]) != 0.0 or float(bt[-1]) != 1.0 or not bool((bt[1:] > bt[:-1]).all()):
            raise refuse("base_times must increase strictly from 0 to 1")
        tables = NonStationaryTables(bt, f.tensors["base_a"], torch.zeros(n, n, dtype=torch.float64), cfg["refs"])
        try:
            solver = cls._from_tables(tables, cfg["base"], time_scale=cfg["time_scale"], coeff_scale=cfg["coeff_scale"])
        except ValueError as exc:
            raise refuse(f"invalid config {cfg} ({exc})") from None
        with torch.no_grad():
            for name in ("base_b", *_RAW):
                getattr(solver, name).copy_(f.tensors[name].to(torch.float64))
        solver.metadata = dict(f.info)
        check_samples_finitely(solver, path)
        return solver if device is None else solver.to(device)


def _check_refs(refs, n: int) -> None:
    if not isinstance(refs, (list, tuple)) or len(refs) != n:
        raise ValueError(f"refs must list one reference state per step ({n}), got {refs!r}")
    for i, r in enumerate(refs):
        if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= i:
            raise ValueError(f"step {i}'s reference state must be an integer in [0, {i}], got {r!r}")


def _instructions(n: int, refs: Tuple[int, ...], limit: int, record: Optional[List[float]]):
    """The program's instructions (they depend on n, refs and the limit only) and, per coefficient
    entry, its index into [matrix [n, n + 2] flattened, 1]."""
    width, one = n + 2, n * (n + 2)
    b = ProgramBuilder("bespoke-ns")
    states = [b.input] + [b.buffer() for _ in range(n)]  # x_0 .. x_n
    scratch = b.buffer() if any((refs[i] > 0) + i + 2 > limit for i in range(n)) else None
    vel = [b.velocity() for _ in range(n)]
    index: List[int] = []
    if record is not None:
        b.record(record[0], (states[0],))
        index.append(one)
    for i in range(n):
        b.eval(vel[i], states[i])
        terms = ([(states[refs[i]], i * width)] if refs[i] > 0 else []) + [(states[0], i * width + 1)]
        terms += [(vel[j], i * width + 2 + j) for j in range(i + 1)]
        while len(terms) > limit:  # chain: partial sums in the scratch slot, which leads the next chunk
            head, terms = terms[:limit], [(scratch, one)] + terms[limit:]
            b.combine(scratch, [s for s, _ in head])
            index.extend(c for _, c in head)
        b.combine(states[i + 1], [s for s, _ in terms])
        index.extend(c for _, c in terms)
        if record is not None:
            b.record(record[i + 1], (states[i + 1],))
            index.append(one)
        b.end_step()
    return b, states[n], index
