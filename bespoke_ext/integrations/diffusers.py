"""Bespoke solvers inside diffusers flow pipelines (Flux, SD3, Sana, Wan, ...).

    pipe.scheduler = BespokeScheduler.from_solver(solver)          # or .from_pretrained(dir)
    latents = pipe(..., num_inference_steps=pipe.scheduler.steps, output_type="latent").images

The scheduler replays the solver's program (``solver.program()``, the one ``bespoke_ext.sample`` runs)
one model evaluation per pipeline step (integrations/stepping.py): ``step`` returns the point where the
transformer is evaluated next (for a midpoint-based solver the half-step points too) and, after the last
evaluation, the sample x_n. Conventions (diffusers' FlowMatchEulerDiscreteScheduler): sigma = 1 - t
(t = 0 noise, t = 1 data), timesteps = sigma * num_train_timesteps, and the model output is
dx/dsigma = noise - data = -u; the sign is folded into the combination coefficients. States are kept in
float32 (float64 for float64 latents) and combined by the fused op ``bespoke_ext.ops.rk_update``.

``num_inference_steps`` means solver steps: a pipeline must pass ``scheduler.steps`` and makes
``steps * order`` = ``solver.nfe`` transformer evaluations (``order`` = evaluations per step, as for
diffusers' Heun scheduler). The config is JSON data only (the solver file's config, tensors as lists and
metadata), so ``save_pretrained`` / ``from_pretrained`` never unpickle anything. A learned time grid
absorbs the resolution shift it was trained at, so ``mu`` / ``sigmas`` from a pipeline are not applied;
``trained_mu`` records the pipeline's mu at training time and a different mu warns (raises if
``strict``). ``from_solver(solver, **pipeline_velocity(...).scheduler_settings)`` records it with the shift
settings it came from, which Flux pipelines read back from this scheduler's config, and the latents'
per-sample shape (``trained_latent_shape``): a trajectory started from latents of another shape (another
resolution; SD3's fixed shift has no mu to tell) warns too (raises if ``strict``).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from typing import List, Optional, Union

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from ..integers import as_int
from ..sampling.executor import tensor_version
from ..solvers import BespokeSolver, NonStationarySolver, read_solver_file, write_solver_file
from .pipelines import FLUX_SHIFT_DEFAULTS, pipeline_velocity
from .stepping import ProgramStepper, state_dtype

__all__ = ["BespokeScheduler", "pipeline_velocity"]

SCHEDULER_CONFIG_NAME = "scheduler_config.json"
SOLVER_KINDS = {cls.KIND: cls for cls in (BespokeSolver, NonStationarySolver)}
_MU_TOLERANCE = 1e-3


def solver_record(solver) -> dict:
    """A solver as JSON-ready data: what its solver file holds (kind, config, tensors as lists, info)."""
    kind = getattr(solver, "KIND", None)
    if kind not in SOLVER_KINDS or not isinstance(solver, SOLVER_KINDS[kind]):
        raise TypeError(f"BespokeScheduler takes a BespokeSolver or NonStationarySolver, got {type(solver).__name__}")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "solver.safetensors")
        solver.save(path)
        f = read_solver_file(path, kind=kind)
    tensors = {name: value.to(torch.float64).tolist() for name, value in f.tensors.items()}
    return {"solver_kind": kind, "solver_config": dict(f.config), "solver_tensors": tensors,
            "solver_info": dict(f.info)}


def solver_from_record(kind: str, config: dict, tensors: dict, info: Optional[dict] = None):
    """The solver a :func:`solver_record` describes, checked by the solver file reader."""
    if kind not in SOLVER_KINDS:
        raise ValueError(f"unknown solver kind {kind!r}; known: {sorted(SOLVER_KINDS)}")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "solver.safetensors")
            write_solver_file(path, kind=kind, config=dict(config), info=dict(info or {}),
                              tensors={k: torch.tensor(v, dtype=torch.float64) for k, v in tensors.items()})
            return SOLVER_KINDS[kind].load(path)
    except (ValueError, TypeError, RuntimeError) as exc:   # the reader's message names a temporary file
        shapes = {k: list(torch.tensor(v).shape) if isinstance(v, (list, int, float)) else type(v).__name__
                  for k, v in tensors.items()}
        raise ValueError(f"BespokeScheduler config (scheduler_config.json): its {kind} solver_tensors are not a "
                         f"valid solver (shapes {shapes}, solver_config {dict(config)}): "
                         f"{str(exc).replace(path, 'solver_tensors')}") from None


class BespokeScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler that samples with a Bespoke solver (module docstring).

    Build it with :meth:`from_solver` or :meth:`from_pretrained`; ``BespokeScheduler(steps=n,
    solver_order=k)`` alone is the identity solver (Euler for k = 1, midpoint for k = 2).
    """

    config_name = SCHEDULER_CONFIG_NAME
    _compatibles: List[str] = []
    order = 1  # replaced per instance by the solver's evaluations per step

    @register_to_config
    def __init__(self, steps: int = 1, solver_order: int = 1, solver_kind: str = "BespokeSolver",
                 solver_config: Optional[dict] = None, solver_tensors: Optional[dict] = None,
                 solver_info: Optional[dict] = None, num_train_timesteps: int = 1000, use_flow_sigmas: bool = True,
                 use_dynamic_shifting: bool = False, trained_mu: Optional[float] = None,
                 trained_shift: Optional[float] = None, trained_seq_len: Optional[int] = None,
                 guidance_scale: Optional[float] = None, model_tag: Optional[str] = None, strict: bool = False,
                 trained_latent_shape: Optional[List[int]] = None,
                 base_image_seq_len: int = FLUX_SHIFT_DEFAULTS["base_image_seq_len"],
                 max_image_seq_len: int = FLUX_SHIFT_DEFAULTS["max_image_seq_len"],
                 base_shift: float = FLUX_SHIFT_DEFAULTS["base_shift"],
                 max_shift: float = FLUX_SHIFT_DEFAULTS["max_shift"]):
        # base_/max_image_seq_len, base_/max_shift are not used here: FluxPipeline reads them from its
        # scheduler's config to compute the mu it passes to set_timesteps, so they must be those trained_mu
        # was computed from (``pipeline_velocity(...).scheduler_settings`` has them), or mu would differ
        if solver_tensors is None:
            if solver_kind == BespokeSolver.KIND:
                solver = BespokeSolver(steps, solver_order)
            elif solver_kind == NonStationarySolver.KIND:
                solver = NonStationarySolver(steps, (solver_config or {}).get("base", "euler"))
            else:
                raise ValueError(f"unknown solver kind {solver_kind!r}; known: {sorted(SOLVER_KINDS)}")
        else:
            solver = solver_from_record(solver_kind, solver_config or {}, solver_tensors, solver_info)
        if (solver.steps, solver.order) != (steps, solver_order):
            raise ValueError(f"config says steps={steps}, solver_order={solver_order} but the solver tables are "
                             f"those of steps={solver.steps}, order={solver.order}")
        with torch.no_grad():
            program = solver.program()
        self._stepper = ProgramStepper(program, velocity_sign=-1.0)
        self.order = solver.order
        self.nfe = solver.nfe
        self.init_noise_sigma = 1.0
        # Model times as the pipeline's transformer will see them: t rounded to float32 first, as
        # bespoke_ext.sample hands them to a model, so pipeline_velocity sees the same timesteps.
        t32 = self._stepper.eval_times.to(torch.float32).to(torch.float64)
        self._timesteps = ((1.0 - t32) * num_train_timesteps).to(torch.float32)
        self._sigmas = torch.cat([(1.0 - t32).to(torch.float32), torch.zeros(1)])
        self.timesteps = self._timesteps.clone()
        self.sigmas = self._sigmas.clone()
        self.num_inference_steps = steps
        self._step_index: Optional[int] = None
        self._begin_index: Optional[int] = None
        self._returned: Optional[torch.Tensor] = None
        self._returned_version = 0
        self._given_sigmas = False
        self._started = False
        self._resolution_warned = False

    # -- construction ----------------------------------------------------------------------------------
    @classmethod
    def from_solver(cls, solver, **config) -> "BespokeScheduler":
        """A scheduler for ``solver`` (BespokeSolver of order 1 or 2, NonStationarySolver). ``config``:
        the other settings (trained_mu, trained_shift, trained_seq_len, trained_latent_shape, guidance_scale,
        model_tag, strict, num_train_timesteps, Flux's shift settings, ...: for a pipeline,
        ``**pipeline_velocity(...).scheduler_settings``); model_tag defaults to the solver's metadata's."""
        record = solver_record(solver)
        clash = set(record) & set(config) | ({"steps", "solver_order"} & set(config))
        if clash:
            raise TypeError(f"from_solver: {sorted(clash)} come from the solver itself")
        # bx.train records the tag with the rest of the run, under metadata["training"]
        trained = solver.metadata.get("training") or {}
        config.setdefault("model_tag", trained.get("model_tag", solver.metadata.get("model_tag")))
        return cls(steps=solver.steps, solver_order=solver.order, **record, **config)

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """ConfigMixin.from_config for a BespokeScheduler's own config (what from_pretrained reads). Another
        scheduler's config (a pipeline's FlowMatchEulerDiscreteScheduler) holds no solver and would build a
        1-step identity solver: refused, pointing to from_solver."""
        given = dict(config or {})
        if "steps" not in given and "steps" not in kwargs:
            other = given.get("_class_name") or "another scheduler's"
            raise ValueError(f"BespokeScheduler.from_config: this config is not a BespokeScheduler's ({other} "
                             f"config, no solver in it). Build the scheduler from a trained solver: "
                             f"BespokeScheduler.from_solver(solver, num_train_timesteps=...), or "
                             f"BespokeScheduler.from_pretrained(folder) for a saved one")
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def to_solver(self):
        """A new solver module with this scheduler's parameters."""
        c = self.config
        if c.solver_tensors is not None:
            return solver_from_record(c.solver_kind, c.solver_config or {}, c.solver_tensors, c.solver_info)
        if c.solver_kind == NonStationarySolver.KIND:
            return NonStationarySolver(c.steps, (c.solver_config or {}).get("base", "euler"))
        return BespokeSolver(c.steps, c.solver_order)

    @property
    def steps(self) -> int:
        """The num_inference_steps a pipeline must pass (solver steps; nfe = steps * order)."""
        return self.config.steps

    # -- what pipelines call -----------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: Union[str, torch.device, None] = None,
                      sigmas: Optional[List[float]] = None, mu: Optional[float] = None,
                      timesteps: Optional[List[float]] = None):
        """Check the pipeline's request against the solver and reset for a new trajectory. The solver
        fixes its own grid: ``sigmas`` / ``timesteps`` values are not used (a warning if they are not the
        pipelines' default linspace), ``mu`` only compared with ``trained_mu``."""
        n = num_inference_steps
        if n is None and sigmas is not None:
            n = len(sigmas)
        if n is None and timesteps is not None:
            n = len(timesteps)
        steps = self.config.steps
        if n is not None and as_int(n) is None:   # 3.7 steps is a mistake, not 3
            raise TypeError(f"BespokeScheduler: num_inference_steps must be an integer, got {n!r}")
        if n is not None and as_int(n) != steps:
            raise ValueError(f"BespokeScheduler: the solver was trained for {steps} steps = {self.nfe} model "
                             f"evaluations; pass num_inference_steps={steps} (got {n})")
        pipeline_default = np.linspace(1.0, 1.0 / steps, steps)
        if sigmas is not None and (len(sigmas) != steps or not np.allclose(np.asarray(sigmas, dtype=np.float64),
                                                                          pipeline_default, atol=1e-6)):
            warnings.warn("BespokeScheduler: custom sigmas are ignored; the solver uses its own learned grid",
                          stacklevel=2)
        if timesteps is not None:
            warnings.warn("BespokeScheduler: custom timesteps are ignored; the solver uses its own learned grid",
                          stacklevel=2)
        self._resolution_warned = False
        self._check_mu(mu)
        self._given_sigmas = sigmas is not None
        self.num_inference_steps = steps
        self.timesteps = self._timesteps.to(device)
        self.sigmas = self._sigmas.to(device)
        self._stepper.coefficients(device, torch.float32)
        self._step_index = None
        self._begin_index = None
        self._returned = None
        self._started = False
        self._stepper.reset()

    def _check_mu(self, mu: Optional[float]) -> None:
        trained = self.config.trained_mu
        if mu is None or trained is None or abs(float(mu) - float(trained)) <= _MU_TOLERANCE:
            return
        self._off_resolution(f"the pipeline's shift mu={float(mu):.4g} differs from the mu={float(trained):.4g} "
                             f"the solver was trained at (another resolution?)", stacklevel=4)

    def _check_latent_shape(self, sample: torch.Tensor) -> None:
        trained = self.config.trained_latent_shape
        if trained is None or self._resolution_warned or tuple(sample.shape[1:]) == tuple(trained):
            return
        self._off_resolution(f"the pipeline's latents have per-sample shape {tuple(sample.shape[1:])}, the solver "
                             f"was trained on {tuple(trained)} (another resolution?)", stacklevel=4)

    def _off_resolution(self, what: str, stacklevel: int) -> None:
        """Warn once per trajectory (raise if strict) that the run is not at the solver's trained resolution."""
        message = (f"BespokeScheduler: {what}; its learned grid is tuned to the trained one. Train a solver "
                   f"for this resolution.")
        if self.config.strict:
            raise ValueError(message)
        self._resolution_warned = True
        warnings.warn(message, stacklevel=stacklevel)

    def step(self, model_output: torch.Tensor, timestep: Union[float, torch.Tensor], sample: torch.Tensor,
             generator: Optional[torch.Generator] = None, return_dict: bool = True,
             per_token_timesteps: Optional[torch.Tensor] = None, **kwargs):
        """One model evaluation: returns the next model input (after the last, the sample)."""
        if per_token_timesteps is not None:
            raise NotImplementedError("BespokeScheduler: per-token timesteps are not supported")
        if isinstance(timestep, (int, np.integer)) or (torch.is_tensor(timestep) and not timestep.is_floating_point()):
            raise ValueError("BespokeScheduler.step takes the float timesteps from scheduler.timesteps, not integer "
                             "indices")
        if self._step_index is None:
            self._init_step_index(timestep)
        k = self._step_index
        if k >= self.nfe:
            raise ValueError(f"BespokeScheduler: all {self.nfe} evaluations are done; call set_timesteps again")
        dtype = state_dtype(sample.dtype)
        # the state returned last, unless a callback replaced it or edited it in place (its version moved):
        # then the sample is taken as the new state
        mine = sample is self._returned and self._returned is not None and tensor_version(sample) == self._returned_version
        x = None if mine else sample.to(dtype)
        if not self._started:
            self._check_latent_shape(sample)
        if not self._started and not self._stepper.startable(k):
            raise ValueError(f"BespokeScheduler: the solver cannot start at evaluation {k} of {self.nfe} "
                             f"(img2img strength / begin index): it needs earlier states")
        prev = self._stepper.step(k, model_output.to(dtype), x)
        self._started = True
        self._step_index = k + 1
        prev = prev.to(model_output.dtype)
        self._returned, self._returned_version = prev, tensor_version(prev)
        if self._step_index == self.nfe:
            self._stepper.reset()
            self._returned = None
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)

    # -- helpers, as FlowMatchEulerDiscreteScheduler's -------------------------------------------------
    @property
    def step_index(self) -> Optional[int]:
        return self._step_index

    @property
    def begin_index(self) -> Optional[int]:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Where img2img / inpainting pipelines start (an evaluation index): refused outside the solver's
        evaluations. A pipeline that passes ``sigmas`` counts its steps in evaluations (len(timesteps)) but
        slices them by ``order``, so with an order-2 solver its strength s starts about (2 s - 1) of the way
        in: warned."""
        b = as_int(begin_index)
        if b is None or not 0 <= b < self.nfe:
            raise ValueError(f"BespokeScheduler: begin index {begin_index!r} is outside the solver's {self.nfe} "
                             f"evaluations ({self.config.steps} steps of order {self.order}): the img2img strength "
                             f"leaves no solver step to run; raise the strength")
        if b and self.order > 1 and self._given_sigmas:
            warnings.warn(f"BespokeScheduler: this pipeline passed sigmas, so it counts num_inference_steps as the "
                          f"solver's {self.nfe} evaluations and starts at evaluation {b} = step {b // self.order} of "
                          f"{self.config.steps}: with an order-{self.order} solver a strength s runs about (2 s - 1) "
                          f"of the steps, not s. Choose the strength for that, or use an order-1 solver",
                          stacklevel=2)
        self._begin_index = b

    @property
    def state_in_first_order(self) -> bool:
        """Whether the next evaluation is the first of a solver step."""
        return (self._step_index or 0) % self.order == 0

    def index_for_timestep(self, timestep, schedule_timesteps: Optional[torch.Tensor] = None) -> int:
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        indices = (schedule_timesteps == timestep).nonzero()
        if len(indices) == 0:
            raise ValueError(f"BespokeScheduler: timestep {float(timestep):.6g} is not on the solver's grid "
                             f"{[round(float(v), 4) for v in schedule_timesteps]}")
        return int(indices[0].item())

    def _init_step_index(self, timestep) -> None:
        if self._begin_index is None:
            if torch.is_tensor(timestep):
                timestep = timestep.to(self.timesteps.device)
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def scale_noise(self, sample: torch.Tensor, timestep: Union[float, torch.Tensor],
                    noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The flow path at the timestep's sigma: sigma * noise + (1 - sigma) * sample (img2img, inpainting)."""
        sigmas = self.sigmas.to(device=sample.device, dtype=sample.dtype)
        schedule_timesteps = self.timesteps.to(sample.device)
        timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1)
        if timestep.numel() == 0:
            raise ValueError("BespokeScheduler.scale_noise: no timestep given (the pipeline's img2img strength left "
                             "no solver step to run); raise the strength")
        if self.begin_index is None:
            indices = [self.index_for_timestep(t, schedule_timesteps) for t in timestep]
        elif self.step_index is not None:
            indices = [self.step_index] * timestep.shape[0]
        else:
            indices = [self.begin_index] * timestep.shape[0]
        sigma = sigmas[indices].flatten()
        while sigma.dim() < sample.dim():
            sigma = sigma.unsqueeze(-1)
        return sigma * noise + (1.0 - sigma) * sample

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps
