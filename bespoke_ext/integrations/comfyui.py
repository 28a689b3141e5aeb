"""ComfyUI nodes for Bespoke solvers (the legacy node API, as comfy_extras/nodes_align_your_steps.py).

- ``BespokeSampler``: a solver file -> SAMPLER, ``comfy.samplers.KSAMPLER(sample_bespoke, extra_options=
  {"solver": solver})``; ComfyUI then calls ``sample_bespoke(model_k, noise, sigmas, extra_args=...,
  callback=..., disable=..., solver=solver)`` (integrations/kdiffusion.py).
- ``BespokeSigmas``: the same file -> SIGMAS, ``solver_sigmas(solver)`` = [1 - t_0, ..., 1 - t_{n-1}, 0],
  the only grid ``sample_bespoke`` accepts (or, with ``denoise`` < 1, its last steps, as AYS's node cuts
  its sigmas; a BespokeSolver resumes at any step, a NonStationarySolver only from the start, so for it
  BespokeSigmas refuses denoise < 1 itself).

Wire both into SamplerCustom (model, cfg, positive, negative, sampler, sigmas, latent_image) with a flow
model (ComfyUI model_sampling CONST: Flux, SD3, ...). Install: a folder ``ComfyUI/custom_nodes/
bespoke_ext_nodes/`` whose ``__init__.py`` re-exports ``NODE_CLASS_MAPPINGS`` and
``NODE_DISPLAY_NAME_MAPPINGS`` from this module (README, "ComfyUI nodes").

Importing this module needs neither ComfyUI nor diffusers; ``comfy`` is imported when the sampler node
runs, and its absence is an ImportError that says ComfyUI is needed.
"""

from __future__ import annotations

import os
from typing import Tuple

import torch

from ..solvers import load_solver
from .kdiffusion import resume_point, sample_bespoke, solver_sigmas

__all__ = ["BespokeSamplerNode", "BespokeSigmasNode", "NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS",
           "load_node_solver", "bespoke_sigmas"]

CATEGORY = "sampling/custom_sampling/bespoke"
_PATH_INPUT = ("STRING", {"default": "", "multiline": False,
                          "tooltip": "a solver file written by bespoke-ext train (BespokeSolver or NonStationarySolver)"})


def _comfy_samplers():
    try:
        import comfy.samplers as samplers
    except ImportError as exc:
        raise ImportError("BespokeSampler is a ComfyUI node: it needs ComfyUI's `comfy` package (run it inside "
                          "ComfyUI, from custom_nodes/bespoke_ext_nodes; see the README, 'ComfyUI nodes')") from exc
    return samplers


def load_node_solver(solver_path: str):
    """The solver in ``solver_path`` (``~`` expanded), in eval mode; a clear error for an empty or missing path."""
    path = os.path.expanduser(str(solver_path).strip())
    if not path:
        raise ValueError("BespokeSampler / BespokeSigmas: solver_path is empty; give a solver file "
                         "(bespoke-ext train -o solver.safetensors)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"BespokeSampler / BespokeSigmas: no solver file at {path!r}")
    return load_solver(path).eval()


def bespoke_sigmas(solver, denoise: float = 1.0) -> torch.Tensor:
    """The SIGMAS ``sample_bespoke`` takes for ``solver``: its whole grid, or for ``denoise`` < 1 the last
    round(steps * denoise) steps of it (AYS's rule), float32 on the CPU. A ValueError where the solver
    cannot start at that step (a NonStationarySolver, for any denoise that cuts its grid)."""
    sigmas = solver_sigmas(solver)
    denoise = float(denoise)
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise must be in (0, 1], got {denoise}")
    if denoise < 1.0:
        steps = max(1, round(solver.steps * denoise))
        # sample_bespoke's own check, made here so that ComfyUI shows the error on this node rather
        # than on the sampler that receives the sigmas
        resume_point(solver, solver.steps - steps, "use denoise = 1, its whole grid")
        sigmas = sigmas[-(steps + 1):]
    return sigmas


class BespokeSamplerNode:
    """SAMPLER from a solver file: ``KSAMPLER(sample_bespoke, extra_options={"solver": solver})``."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"solver_path": _PATH_INPUT}}

    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "get_sampler"
    CATEGORY = CATEGORY
    DESCRIPTION = "A trained Bespoke solver as a SAMPLER for SamplerCustom (flow models; use BespokeSigmas' sigmas)"

    def get_sampler(self, solver_path: str) -> Tuple[object]:
        samplers = _comfy_samplers()
        solver = load_node_solver(solver_path)
        return (samplers.KSAMPLER(sample_bespoke, extra_options={"solver": solver}),)


class BespokeSigmasNode:
    """SIGMAS from a solver file: the noise levels the solver was trained on (``solver_sigmas``)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"solver_path": _PATH_INPUT,
                             "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01})}}

    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "get_sigmas"
    CATEGORY = CATEGORY
    DESCRIPTION = "The sigmas a Bespoke solver was trained on, for SamplerCustom with BespokeSampler"

    def get_sigmas(self, solver_path: str, denoise: float = 1.0) -> Tuple[torch.Tensor]:
        if float(denoise) <= 0.0:  # ComfyUI's schedulers: no steps at all
            return (torch.FloatTensor([]),)
        return (bespoke_sigmas(load_node_solver(solver_path), denoise),)


NODE_CLASS_MAPPINGS = {"BespokeSampler": BespokeSamplerNode, "BespokeSigmas": BespokeSigmasNode}
NODE_DISPLAY_NAME_MAPPINGS = {"BespokeSampler": "Bespoke Sampler", "BespokeSigmas": "Bespoke Sigmas"}
