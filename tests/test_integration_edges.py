"""The integrations at their edges: img2img begin indices, latents edited in place between steps,
solvers passed where files or other objects were meant, damaged scheduler configs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bespoke_ext as bx
from bespoke_ext.integrations.diffusers import BespokeScheduler, solver_from_record
from bespoke_ext.integrations.kdiffusion import sample_bespoke, solver_sigmas


def test_begin_index_outside_the_evaluations_is_refused_and_order_two_with_sigmas_warns():
    s = BespokeScheduler.from_solver(bx.BespokeSolver(4, 2))
    s.set_timesteps(4)
    s.set_begin_index(4)                       # pipelines honouring use_flow_sigmas: no warning
    with pytest.raises(ValueError, match="begin index 8 is outside the solver's 8 evaluations"):
        s.set_begin_index(8)
    s.set_timesteps(sigmas=np.linspace(1.0, 0.25, 4))   # Flux img2img passes sigmas
    with pytest.warns(UserWarning, match=r"\(2 s - 1\)"):
        s.set_begin_index(4)
    with pytest.raises(ValueError, match="no timestep given"):
        s.scale_noise(torch.zeros(2, 3), s.timesteps[8:], torch.zeros(2, 3))


def test_scheduler_steps_under_inference_mode():
    s = BespokeScheduler.from_solver(bx.BespokeSolver(3, 2))
    s.set_timesteps(3)
    with torch.inference_mode():   # inference tensors keep no version counter
        x = torch.ones(1, 4)
        for t in s.timesteps:
            x = s.step(-x, t, x, return_dict=False)[0]
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_latents_edited_in_place_between_steps_are_taken(dtype):
    def run(inplace):
        s = BespokeScheduler.from_solver(bx.BespokeSolver(3, 1))
        s.set_timesteps(3)
        x = torch.ones(1, 4, dtype=dtype)
        for i, t in enumerate(s.timesteps):
            x = s.step(torch.zeros_like(x), t, x, return_dict=False)[0]   # zero output: only the edit moves x
            if i == 0:
                x = x.mul_(0.5) if inplace else x * 0.5                   # a callback's edit
        return x

    assert torch.equal(run(True), run(False)) and torch.equal(run(True), torch.full((1, 4), 0.5, dtype=dtype))


@pytest.mark.parametrize("bad", ["solver.safetensors", {"steps": 3}, torch.nn.Linear(2, 2)])
def test_sample_bespoke_names_a_wrong_solver_argument(bad):
    denoiser = lambda x, sigma, **kw: torch.zeros_like(x)   # noqa: E731
    sigmas = solver_sigmas(bx.BespokeSolver(3, 2))
    with pytest.raises(TypeError, match=f"BespokeSolver or NonStationarySolver.*got {type(bad).__name__}"):
        sample_bespoke(denoiser, torch.randn(2, 3), sigmas, solver=bad)


def test_damaged_scheduler_config_names_the_config_not_a_temporary_file():
    record = BespokeScheduler.from_solver(bx.BespokeSolver(3, 2)).config
    tensors = dict(record.solver_tensors)
    tensors["log_s"] = tensors["log_s"][:-1]            # truncated
    with pytest.raises(ValueError, match=r"scheduler_config.json.*solver_tensors are not a valid solver") as info:
        solver_from_record(record.solver_kind, record.solver_config, tensors, record.solver_info)
    assert "/tmp" not in str(info.value)
    tensors["log_s"] = "not a tensor"
    with pytest.raises(ValueError, match="scheduler_config.json"):
        solver_from_record(record.solver_kind, record.solver_config, tensors, record.solver_info)
