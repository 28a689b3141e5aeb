"""Wall-clock at equal NFE, same noise: bespoke_ext.sample against the tools a user would otherwise run.

Contenders (all from the same x0, NFE model evaluations each; medians are steady state, after warm-up rounds,
and each contender's first call is reported beside them):

    floor              NFE calls of the model on a fixed input under inference mode: what the model alone
                       costs; no sampler can be faster. Overhead = contender / floor.
    plain loop         a hand-written midpoint loop in PyTorch (inference mode, torch.add with alpha)
    bespoke_ext        bespoke_ext.sample(method="midpoint", nfe=NFE)
    bespoke            bespoke_ext.sample(solver=BespokeSolver(NFE // 2, order=2)): what a Bespoke user runs
                       (an untrained solver: the cost does not depend on the learned values)
    bespoke_ext dpm    bespoke_ext.sample(method="dpm++2m"): same method as diffusers' DPM-Solver++ below
    flow_matching      flow_matching's ODESolver(model).sample(method="midpoint") on the same time grid
    torchdiffeq        torchdiffeq.odeint(method="midpoint") on the same fixed grid, under no_grad
    diffusers dpm/unipc  the diffusers scheduler loop (bench_diffusers.py), one evaluation per step, the
                       scheduler made once and set_timesteps called per batch, as a pipeline does
With cuda_graph (CUDA x0): bespoke_ext and bespoke again with cuda_graph=True, and the floor's calls
captured in one CUDA graph (the floor for graphed sampling).

The midpoint contenders compute the same samples; ``same_samples`` reports each one's largest deviation
from bespoke_ext's result so that a faster contender cannot be faster by doing something else.
Optional libraries (flow_matching, diffusers) drop out with a note when missing.
"""

from __future__ import annotations

import importlib.util
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .diffusers import SCHEDULERS, diffusers_missing, diffusers_sample, make_scheduler
from .timing import compare, interleaved

__all__ = ["WORKLOADS", "QUICK_WORKLOADS", "LABELS", "contenders", "first_calls", "same_samples", "plain_midpoint",
           "workload_model", "architecture_model", "run_wallclock", "wallclock_targets"]

# name -> (embedded model, batch, NFEs, rounds). The 2-D MLP at batch 16 is overhead-bound (a model call costs
# a few hundred microseconds, like a sampler's per-step bookkeeping), at batch 256 it is not quite; the U-Net is
# model-bound. Round times spread by 30-100% on 2 busy cores (IQR / median), so the median of n rounds is
# uncertain by roughly IQR / sqrt(n): many rounds where the differences are small and rounds are cheap; about
# 20-40 s per workload in all.
OVERHEAD_MODEL = "moons2d"
WORKLOADS: Dict[str, Tuple[str, int, Tuple[int, ...], int]] = {
    "mlp2d-b16": (OVERHEAD_MODEL, 16, (10, 20), 150),
    "mlp2d-b256": (OVERHEAD_MODEL, 256, (10, 20), 30),
    "mlp2d-b4096": (OVERHEAD_MODEL, 4096, (10,), 20),
    "unet-mnist-b16": ("mnist", 16, (10,), 10),
}
QUICK_WORKLOADS = {"mlp2d-b16": (OVERHEAD_MODEL, 16, (10,), 2), "unet-mnist-b4": ("mnist", 4, (10,), 2)}

LABELS = {
    "floor": "model-evaluation floor",
    "plain_loop": "plain PyTorch loop (midpoint)",
    "bespoke_ext": "bespoke_ext.sample (midpoint)",
    "bespoke": "bespoke_ext.sample (Bespoke order 2)",
    "bespoke_ext_dpm": "bespoke_ext.sample (dpm++2m)",
    "flow_matching": "flow_matching ODESolver (midpoint)",
    "torchdiffeq": "torchdiffeq odeint (midpoint, fixed grid)",
    "diffusers-dpm++2m": "diffusers DPMSolverMultistepScheduler loop",
    "diffusers-unipc": "diffusers UniPCMultistepScheduler loop",
    "floor_graph": "model-evaluation floor, CUDA graph",
    "bespoke_ext_graph": "bespoke_ext.sample (midpoint), cuda_graph=True",
    "bespoke_graph": "bespoke_ext.sample (Bespoke order 2), cuda_graph=True",
}
MIDPOINT = ("plain_loop", "bespoke_ext", "bespoke", "flow_matching", "torchdiffeq", "bespoke_ext_graph",
            "bespoke_graph")  # the contenders that compute the same samples


def _missing(module: str) -> Optional[str]:
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed: its contender is skipped"
    return None


def plain_midpoint(model: Callable, x0: Tensor, nfe: int) -> Callable[[], Tensor]:
    """The loop a user would write by hand: midpoint, uniform steps, times prepared once."""
    steps = nfe // 2
    h = 1.0 / steps
    times = [(torch.tensor(i * h, dtype=x0.dtype, device=x0.device),
              torch.tensor((i + 0.5) * h, dtype=x0.dtype, device=x0.device)) for i in range(steps)]

    def run():
        with torch.inference_mode():
            x = x0
            for t, tm in times:
                xm = torch.add(x, model(x, t), alpha=h / 2)
                x = torch.add(x, model(xm, tm), alpha=h)
            return x

    return run


def _floor(model: Callable, x0: Tensor, nfe: int) -> Callable[[], None]:
    t = torch.tensor(0.5, dtype=x0.dtype, device=x0.device)

    def run():
        with torch.inference_mode():
            for _ in range(nfe):
                model(x0, t)

    return run


def _floor_graph(model: Callable, x0: Tensor, nfe: int) -> Callable[[], None]:
    """The floor's nfe calls captured once in a CUDA graph, then replayed (warm-up on a side stream first,
    as capture requires)."""
    static_x = x0.clone()
    t = torch.tensor(0.5, dtype=x0.dtype, device=x0.device)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(2):
            model(static_x, t)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        for _ in range(nfe):
            model(static_x, t)
    return graph.replay


def contenders(model: Callable, x0: Tensor, nfe: int, *, cuda_graph: bool = False
               ) -> Tuple[Dict[str, Callable[[], object]], List[str]]:
    """(name -> zero-argument runner, notes on contenders left out). ``nfe`` must be even (midpoint)."""
    from ..sampling import sample
    from ..solvers import BespokeSolver

    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 2 or nfe % 2:
        raise ValueError(f"nfe must be an even integer >= 2 (midpoint makes 2 evaluations per step), got {nfe!r}")
    if cuda_graph and not x0.is_cuda:
        raise ValueError("cuda_graph contenders need x0 on a CUDA device")
    steps = nfe // 2
    grid = torch.linspace(0.0, 1.0, steps + 1, dtype=x0.dtype, device=x0.device)
    solver = BespokeSolver(steps, order=2).to(x0.device)
    runners: Dict[str, Callable[[], object]] = {
        "floor": _floor(model, x0, nfe),
        "plain_loop": plain_midpoint(model, x0, nfe),
        "bespoke_ext": lambda: sample(model, x0, method="midpoint", nfe=nfe),
        "bespoke": lambda: sample(model, x0, solver=solver),
        "bespoke_ext_dpm": lambda: sample(model, x0, method="dpm++2m", nfe=nfe),
    }
    notes = []
    if _missing("flow_matching") is None:
        from flow_matching.solver import ODESolver

        fm = ODESolver(velocity_model=model)
        # time_grid with step_size=None: exactly these steps (a float step_size can round to one more step)
        runners["flow_matching"] = lambda: fm.sample(x_init=x0, step_size=None, time_grid=grid, method="midpoint")
    else:
        notes.append(_missing("flow_matching"))
    from torchdiffeq import odeint

    def torchdiffeq_run():
        with torch.no_grad():
            return odeint(lambda t, x: model(x, t), x0, grid, method="midpoint")[-1]

    runners["torchdiffeq"] = torchdiffeq_run
    note = diffusers_missing()
    if note is None:
        for method in SCHEDULERS:
            # Made once, as a pipeline holds its scheduler (this also imports diffusers' modules now, so no
            # contender's first call pays for that); set_timesteps still runs in every call.
            scheduler = make_scheduler(method)
            runners[method] = (lambda m=method, s=scheduler: diffusers_sample(m, model, x0, nfe, scheduler=s))
    else:
        notes.append(note)
    if cuda_graph:
        runners["floor_graph"] = _floor_graph(model, x0, nfe)
        runners["bespoke_ext_graph"] = lambda: sample(model, x0, method="midpoint", nfe=nfe, cuda_graph=True)
        runners["bespoke_graph"] = lambda: sample(model, x0, solver=solver, cuda_graph=True)
    return runners, notes


def first_calls(runners: Dict[str, Callable[[], object]],
                sync: Optional[Callable[[], None]] = None) -> Dict[str, float]:
    """Seconds of each contender's first call (program building, lazy initialisation, CUDA-graph capture), one
    after the other: a single, noisy sample each, reported beside the steady-state medians, never mixed in."""
    out = {}
    for name, run in runners.items():
        start = time.perf_counter()
        run()
        if sync is not None:
            sync()
        out[name] = time.perf_counter() - start
    return out


def same_samples(runners: Dict[str, Callable[[], object]], reference: str = "bespoke_ext") -> Dict[str, float]:
    """Largest absolute deviation of each midpoint contender's result from the reference's."""
    if reference not in runners:
        return {}
    ref = runners[reference]()
    return {name: float((runners[name]() - ref).abs().max()) for name in MIDPOINT if name in runners}


def architecture_model(model_name: str, device="cpu") -> Tuple[Callable, Tuple[int, ...]]:
    """(velocity, per-sample shape) of an embedded model's architecture with seeded random weights: it costs
    what the trained model costs per evaluation, and needs no weights file."""
    from ..models.adapters import VelocityAdapter
    from ..models.nets import build_net
    from ..models.pretrain import PRESETS

    if model_name not in PRESETS:
        raise ValueError(f"unknown model {model_name!r}: expected one of the pretraining presets {sorted(PRESETS)}")
    p = PRESETS[model_name]
    torch.manual_seed(0)
    net = build_net(p["net"], p["net_kwargs"]).to(device).eval().requires_grad_(False)
    return VelocityAdapter(net, prediction=p["prediction"], schedule=p["schedule"]).eval(), tuple(p["shape"])


def workload_model(model_name: str, device="cpu") -> Tuple[Callable, Tuple[int, ...], Optional[str]]:
    """(velocity, per-sample shape, note): the embedded model, or its architecture with random weights where
    the weights (or safetensors, to read them) are not there; the note says which."""
    from ..models.embedded import list_embedded, load_embedded

    if model_name in list_embedded():
        try:
            em = load_embedded(model_name, device=device)
            return em.velocity, em.shape, None
        except ImportError as exc:
            why = f"its weights cannot be read here ({exc})"
    else:
        why = "its embedded weights are not there"
    velocity, shape = architecture_model(model_name, device)
    note = f"{model_name}: {why}; timed its architecture with random weights (same cost per evaluation)"
    return velocity, shape, note


def run_wallclock(*, quick: bool, seed: int = 0, workloads: Optional[Dict[str, tuple]] = None, device="cpu",
                  warmup: int = 1, say: Callable[[str], None] = print) -> dict:
    """The wall-clock section of the results file (also the GPU benchmark's, with device="cuda": then the
    CUDA-graph contenders join and every call is timed to its last kernel)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    workloads = workloads or (QUICK_WORKLOADS if quick else WORKLOADS)
    section: dict = {"statistic": f"median and IQR of interleaved rounds (every contender once per round, order "
                                  f"rotating), steady state after {warmup} warm-up round(s); ratios per round, then "
                                  f"their median and IQR (bench_timing.compare); "
                                  f"first call: one timed call per contender before any other (includes building "
                                  f"programs, lazy initialisation and CUDA-graph capture)",
                     "device": str(device), "labels": LABELS, "workloads": {}, "notes": []}
    for name, (model_name, batch, nfes, rounds) in workloads.items():
        velocity, shape, note = workload_model(model_name, device)
        if note:
            section["notes"].append(note)
        x0 = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed)).to(device)
        for nfe in nfes:
            started = time.perf_counter()
            runners, notes = contenders(velocity, x0, nfe, cuda_graph=cuda)
            section["notes"] += [n for n in notes if n not in section["notes"]]
            sync = torch.cuda.synchronize if cuda else None
            first = first_calls(runners, sync)
            deviation = same_samples(runners)
            times = interleaved(runners, rounds=rounds, warmup=warmup, sync=sync)
            stats = compare(times, references=("flow_matching", "torchdiffeq"))
            for contender, seconds in first.items():
                stats[contender]["first_call_s"] = seconds
            key = f"{name}-nfe{nfe}"
            section["workloads"][key] = {"model": model_name, "batch": batch, "shape": list(shape), "nfe": nfe,
                                         "rounds": rounds, "stats": stats, "same_samples_max_abs_diff": deviation,
                                         "seconds": round(time.perf_counter() - started, 1)}
            fastest = "bespoke_ext_graph" if cuda else "bespoke_ext"
            say(f"wallclock: {key}: {LABELS[fastest]} {stats[fastest]['x_floor']:.2f}x floor, "
                f"{stats[fastest]['torchdiffeq_over_self']:.2f}x faster than torchdiffeq")
    section["targets"] = wallclock_targets(section)
    return section


def overhead_limit(workload: dict) -> float:
    """sample()'s allowed time over the floor: 1.15x for the 2-D MLP at batch <= 16 (a model call there costs
    a few hundred microseconds, so 10 us of bookkeeping a step is 3%), 1.10x for larger batches and models."""
    return 1.15 if workload["model"] == OVERHEAD_MODEL and workload["batch"] <= 16 else 1.10


def wallclock_targets(section: dict) -> List[dict]:
    """The issues' targets for the workloads measured. CPU: sample() overhead over the floor at most
    overhead_limit (1.15x where the 2-D MLP's batch is small enough for sampler bookkeeping to rival a model
    call, 1.10x elsewhere) and >= 1.3x faster per batch than flow_matching's ODESolver on the 2-D MLP. GPU: with
    CUDA-graph capture >= 3x faster than torchdiffeq's fixed grid for the small model (the 2-D MLP) at NFE 10."""
    out = []
    cuda = section.get("device", "cpu").startswith("cuda")
    for key, w in section["workloads"].items():
        s = w["stats"]
        small = w["model"] == OVERHEAD_MODEL
        if cuda:
            if small and w["nfe"] == 10 and "bespoke_ext_graph" in s:
                r = s["bespoke_ext_graph"]["torchdiffeq_over_self"]
                out.append({"target": f"GPU: with CUDA-graph capture >= 3x faster than torchdiffeq fixed-grid ({key})",
                            "value": r, "met": r >= 3.0})
            continue
        r, limit = s["bespoke_ext"]["x_floor"], overhead_limit(w)
        out.append({"target": f"sample() overhead over the model-evaluation floor <= {limit:.2f}x ({key})",
                    "value": r, "met": r <= limit})
        if small and "flow_matching" in s:
            r = s["bespoke_ext"]["flow_matching_over_self"]
            out.append({"target": f">= 1.3x faster per batch than flow_matching's ODESolver ({key})",
                        "value": r, "met": r >= 1.3})
    return out
