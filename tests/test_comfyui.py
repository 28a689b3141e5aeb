"""ComfyUI nodes (bespoke_ext.integrations.comfyui) against a fake `comfy` package.

The fake holds what the nodes touch, written as ComfyUI writes it (Comfy-Org/ComfyUI comfy/samplers.py,
comfy/model_sampling.py): KSAMPLER(sampler_function, extra_options, inpaint_options) whose sample() calls
sampler_function(model_k, noise_scaling(sigmas[0], noise, latent), sigmas, extra_args=..., callback=...,
disable=..., **extra_options), KSamplerX0Inpaint, and the CONST (flow) model sampling.
"""

import importlib
import sys
import types

import pytest
import torch

import bespoke_ext as bx
from bespoke_ext.integrations import comfyui
from bespoke_ext.integrations.kdiffusion import sample_bespoke, solver_sigmas

pytestmark = pytest.mark.usefixtures("one_thread")


class CONST:
    """comfy.model_sampling.CONST: flow matching, x = sigma * noise + (1 - sigma) * data."""
    sigma_max = 1.0

    def calculate_denoised(self, sigma, model_output, model_input):
        return model_input - model_output * sigma.reshape(sigma.shape[:1] + (1,) * (model_output.ndim - 1))

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return sigma * noise + (1.0 - sigma) * latent_image

    def inverse_noise_scaling(self, sigma, latent):
        return latent / (1.0 - sigma)


class _KSamplerX0Inpaint:
    def __init__(self, model, sigmas):
        self.inner_model, self.sigmas = model, sigmas

    def __call__(self, x, sigma, denoise_mask, model_options={}, seed=None):
        return self.inner_model(x, sigma, model_options=model_options, seed=seed)


class _KSAMPLER:
    """comfy.samplers.KSAMPLER, recording its construction."""
    made = []

    def __init__(self, sampler_function, extra_options={}, inpaint_options={}):
        self.sampler_function, self.extra_options, self.inpaint_options = sampler_function, extra_options, inpaint_options
        _KSAMPLER.made.append(self)

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        extra_args["denoise_mask"] = denoise_mask
        model_k = _KSamplerX0Inpaint(model_wrap, sigmas)
        ms = model_wrap.inner_model.model_sampling
        noise = ms.noise_scaling(sigmas[0], noise, latent_image, float(sigmas[0]) >= ms.sigma_max)
        total_steps = len(sigmas) - 1
        k_callback = None if callback is None else (lambda d: callback(d["i"], d["denoised"], d["x"], total_steps))
        samples = self.sampler_function(model_k, noise, sigmas, extra_args=extra_args, callback=k_callback,
                                        disable=disable_pbar, **self.extra_options)
        return ms.inverse_noise_scaling(sigmas[-1], samples)


@pytest.fixture
def fake_comfy(monkeypatch):
    comfy = types.ModuleType("comfy")
    samplers = types.ModuleType("comfy.samplers")
    model_sampling = types.ModuleType("comfy.model_sampling")
    samplers.KSAMPLER, samplers.KSamplerX0Inpaint = _KSAMPLER, _KSamplerX0Inpaint
    model_sampling.CONST = CONST
    comfy.samplers, comfy.model_sampling = samplers, model_sampling
    for name, mod in (("comfy", comfy), ("comfy.samplers", samplers), ("comfy.model_sampling", model_sampling)):
        monkeypatch.setitem(sys.modules, name, mod)
    _KSAMPLER.made.clear()
    return comfy


@pytest.fixture(scope="module")
def field():
    from bespoke_ext.models.oracle import GaussianMixtureFlow

    return GaussianMixtureFlow.random(dim=4, components=5, std=0.15, seed=0)


class _ToyFlowModel:
    """ComfyUI's model wrapper for a flow model: inner_model.model_sampling is CONST, the network's output
    is noise - data = -u(x, 1 - sigma), and the wrapper returns the denoised estimate."""

    def __init__(self, field, sampling):
        self.field, self.calls = field, 0
        self.inner_model = types.SimpleNamespace(model_sampling=sampling)

    def __call__(self, x, sigma, model_options={}, seed=None):
        self.calls += 1
        out = -self.field(x, 1 - sigma[0])
        return self.inner_model.model_sampling.calculate_denoised(sigma, out, x)


def _perturbed(solver, scale):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in solver.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return solver


SOLVERS = {"bespoke-rk2": lambda: _perturbed(bx.BespokeSolver(3, 2), 0.3),
           "bespoke-rk1": lambda: _perturbed(bx.BespokeSolver(4, 1), 0.3),
           "nonstationary": lambda: _perturbed(bx.NonStationarySolver(5, "euler"), 0.05)}


@pytest.fixture(params=sorted(SOLVERS))
def solver_file(request, tmp_path):
    solver = SOLVERS[request.param]()
    path = tmp_path / "solver.safetensors"
    solver.save(path)
    return solver, str(path)


def test_node_mappings_and_legacy_api():
    assert set(comfyui.NODE_CLASS_MAPPINGS) == set(comfyui.NODE_DISPLAY_NAME_MAPPINGS) == {"BespokeSampler", "BespokeSigmas"}
    for name, cls in comfyui.NODE_CLASS_MAPPINGS.items():
        inputs = cls.INPUT_TYPES()
        assert inputs["required"]["solver_path"][0] == "STRING"
        assert callable(getattr(cls(), cls.FUNCTION)) and isinstance(cls.CATEGORY, str)
    assert comfyui.BespokeSamplerNode.RETURN_TYPES == ("SAMPLER",)
    assert comfyui.BespokeSigmasNode.RETURN_TYPES == ("SIGMAS",)


def test_sampler_node_builds_the_ksampler_comfyui_calls(fake_comfy, solver_file, field):
    solver, path = solver_file
    (sampler,) = comfyui.BespokeSamplerNode().get_sampler(solver_path=path)
    assert isinstance(sampler, _KSAMPLER) and _KSAMPLER.made == [sampler]
    assert sampler.sampler_function is sample_bespoke
    assert set(sampler.extra_options) == {"solver"} and sampler.inpaint_options == {}
    loaded = sampler.extra_options["solver"]
    assert type(loaded) is type(solver)
    for (name, a), (_, b) in zip(solver.named_parameters(), loaded.named_parameters()):
        assert torch.equal(a, b), name

    (sigmas,) = comfyui.BespokeSigmasNode().get_sigmas(solver_path=path, denoise=1.0)
    assert torch.equal(sigmas, solver_sigmas(solver)) and sigmas.dtype == torch.float32
    assert sigmas[0] == 1 and sigmas[-1] == 0 and sigmas.shape == (solver.steps + 1,)

    # SamplerCustom's txt2img: an empty latent, noise scaled to sigmas[0] = 1, the KSAMPLER's function
    noise = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    flux_sampling = type("ModelSamplingFlux", (fake_comfy.model_sampling.CONST,), {})  # as ComfyUI's
    model = _ToyFlowModel(field, flux_sampling())
    steps_seen = []
    got = sampler.sample(model, sigmas, {"model_options": {}, "seed": 0}, lambda i, d, x, n: steps_seen.append((i, n)),
                         noise, latent_image=torch.zeros_like(noise), disable_pbar=True)
    assert model.calls == solver.nfe
    assert steps_seen == [(i, solver.steps) for i in range(solver.steps)]
    direct = sample_bespoke(_KSamplerX0Inpaint(_ToyFlowModel(field, CONST()), sigmas), noise, sigmas,
                            extra_args={"model_options": {}, "seed": 0, "denoise_mask": None}, disable=True,
                            solver=solver)
    assert torch.equal(got, direct)
    assert torch.allclose(got, bx.sample(field, noise, solver=solver), atol=1e-5, rtol=0)
    assert (got - noise).abs().max() > 0.1


def test_sigmas_node_denoise_is_a_suffix_sample_bespoke_resumes_on(fake_comfy, field, tmp_path):
    solver = _perturbed(bx.BespokeSolver(4, 2), 0.3)
    path = tmp_path / "s.safetensors"
    solver.save(path)
    (sigmas,) = comfyui.BespokeSigmasNode().get_sigmas(str(path), denoise=0.5)
    assert torch.equal(sigmas, solver_sigmas(solver)[2:])
    (sampler,) = comfyui.BespokeSamplerNode().get_sampler(str(path))
    # img2img: the latent is noised to sigmas[0] on the flow path; from there the solver's last 2 steps
    noise = torch.randn(6, 4, generator=torch.Generator().manual_seed(4))
    latent = torch.randn(6, 4, generator=torch.Generator().manual_seed(5))
    model = _ToyFlowModel(field, CONST())
    got = sampler.sample(model, sigmas, {}, None, noise, latent_image=latent, disable_pbar=True)
    start = float(sigmas[0]) * noise + (1 - float(sigmas[0])) * latent
    direct = sample_bespoke(_KSamplerX0Inpaint(_ToyFlowModel(field, CONST()), sigmas), start, sigmas,
                            extra_args={"denoise_mask": None}, disable=True, solver=solver)
    assert torch.equal(got, direct) and model.calls == 4
    (none,) = comfyui.BespokeSigmasNode().get_sigmas(str(path), denoise=0.0)
    assert none.numel() == 0


def test_sigmas_node_refuses_a_denoise_a_nonstationary_solver_cannot_start_from(tmp_path):
    """The error shows on BespokeSigmas, the node that made the cut, not later on the sampler."""
    solver = _perturbed(bx.NonStationarySolver(8, "euler"), 0.05)
    path = tmp_path / "ns.safetensors"
    solver.save(path)
    with pytest.raises(ValueError, match="NonStationarySolver cannot resume at step 4 of 8"):  # the sampler's error
        sample_bespoke(lambda x, s: x * 0, torch.randn(2, 2), solver_sigmas(solver)[4:], solver=solver, disable=True)
    with pytest.raises(ValueError, match="NonStationarySolver cannot resume at step 4 of 8"):
        comfyui.BespokeSigmasNode().get_sigmas(str(path), denoise=0.5)
    with pytest.raises(ValueError, match="NonStationarySolver cannot resume at step 7 of 8"):
        comfyui.bespoke_sigmas(solver, denoise=0.1)
    # no cut (denoise 1, or one that rounds to every step) is the whole grid, which it starts from
    for denoise in (1.0, 0.97):
        assert torch.equal(comfyui.bespoke_sigmas(solver, denoise), solver_sigmas(solver))
    (none,) = comfyui.BespokeSigmasNode().get_sigmas(str(path), denoise=0.0)
    assert none.numel() == 0


def test_without_comfyui_import_works_and_the_sampler_node_names_comfyui(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "comfy", None)  # `import comfy` raises ImportError
    monkeypatch.setitem(sys.modules, "comfy.samplers", None)
    importlib.reload(comfyui)  # importing the module needs no ComfyUI
    path = tmp_path / "s.safetensors"
    bx.BespokeSolver(2, 1).save(path)
    with pytest.raises(ImportError, match="ComfyUI"):
        comfyui.BespokeSamplerNode().get_sampler(str(path))
    (sigmas,) = comfyui.BespokeSigmasNode().get_sigmas(str(path))  # plain tensors: no ComfyUI needed
    assert torch.equal(sigmas, solver_sigmas(bx.BespokeSolver(2, 1)))


def test_bad_paths_are_clear_errors(fake_comfy, tmp_path):
    with pytest.raises(ValueError, match="solver_path is empty"):
        comfyui.BespokeSamplerNode().get_sampler("  ")
    with pytest.raises(FileNotFoundError, match="no solver file"):
        comfyui.BespokeSigmasNode().get_sigmas(str(tmp_path / "missing.safetensors"))
