"""diffusers and k-diffusion integrations: BespokeScheduler, pipeline_velocity, sample_bespoke.

The scheduler is driven by a diffusers-style loop (``for t in timesteps: out = model; x = step(out, t, x)``)
on a small analytic velocity field, and inside real FluxPipeline / StableDiffusion3Pipeline objects built
from tiny configs (no downloads: no VAE, text encoders or tokenizers; prompt embeddings given).
"""

import copy
import json
import warnings

import numpy as np
import pytest
import torch

import bespoke_ext as bx

from diffusers import FlowMatchEulerDiscreteScheduler
from tiny_pipelines import make_flux_pipe

from bespoke_ext.integrations.diffusers import BespokeScheduler, pipeline_velocity
from bespoke_ext.integrations.kdiffusion import sample_bespoke, solver_sigmas

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def field():
    from bespoke_ext.models.oracle import GaussianMixtureFlow

    return GaussianMixtureFlow.random(dim=4, components=5, std=0.15, seed=0)


def _x0(n=8, dim=4, seed=1):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def _loop(scheduler, model, x, begin=0, edit=None):
    """What a diffusers flow pipeline does with its scheduler (Flux: set_begin_index, then step per t)."""
    scheduler.set_timesteps(num_inference_steps=scheduler.steps)
    scheduler.set_begin_index(begin)
    for i, t in enumerate(scheduler.timesteps[begin:]):
        t_model = (1 - t.double() / scheduler.config.num_train_timesteps).float()
        noise_pred = -model(x, t_model)  # diffusers' flow output: noise - data = -u
        x = scheduler.step(noise_pred, t, x, return_dict=False)[0]
        if edit is not None:
            x = edit(i, x)
    return x


def _perturbed(solver, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in solver.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return solver


# -- 1. the scheduler -----------------------------------------------------------------------------

@pytest.mark.parametrize("order,method", [(1, "euler"), (2, "midpoint")])
def test_identity_solver_in_a_diffusers_loop_is_euler_or_midpoint(field, order, method):
    solver = bx.BespokeSolver(5, order)
    scheduler = BespokeScheduler.from_solver(solver)
    assert scheduler.steps == 5 and scheduler.order == order and len(scheduler.timesteps) == solver.nfe
    x0 = _x0()
    got = _loop(scheduler, field, x0)
    want = bx.sample(field, x0, method=method, nfe=solver.nfe)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert (got - x0).abs().max() > 0.1  # it moved


@pytest.mark.parametrize("make", [lambda: _perturbed(bx.BespokeSolver(4, 1)),
                                  lambda: _perturbed(bx.BespokeSolver(3, 2)),
                                  lambda: _perturbed(bx.NonStationarySolver(6, "midpoint"), scale=0.05)],
                         ids=["bespoke-rk1", "bespoke-rk2", "nonstationary"])
def test_trained_solver_in_a_diffusers_loop_equals_bx_sample(field, make):
    solver = make()
    x0 = _x0()
    got = _loop(BespokeScheduler.from_solver(solver), field, x0)
    want = bx.sample(field, x0, solver=solver)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    base_method = "euler" if isinstance(solver, bx.BespokeSolver) and solver.order == 1 else "midpoint"
    base = bx.sample(field, x0, method=base_method, nfe=solver.nfe)
    assert (want - base).abs().max() > 1e-3  # the perturbation matters, so the match is not trivial


def test_from_solver_takes_the_model_tag_that_training_recorded(tmp_path):
    from bespoke_ext.models.oracle import GaussianMixtureFlow

    model = GaussianMixtureFlow.random(dim=2, components=2, std=0.3, seed=0)
    solver = bx.BespokeSolver(2, 2)
    bx.train(model, solver, shape=(2,), iterations=2, batch_size=4, cache_samples=8, cache_grid=8, val_size=4,
             progress=False, cache_dir=str(tmp_path))
    tag = solver.metadata["training"]["model_tag"]
    assert tag.startswith("bespoke_ext.models.oracle.GaussianMixtureFlow:")
    assert BespokeScheduler.from_solver(solver).config.model_tag == tag
    path = tmp_path / "s.safetensors"
    solver.save(path)
    assert BespokeScheduler.from_solver(bx.BespokeSolver.load(path)).config.model_tag == tag
    assert BespokeScheduler.from_solver(solver, model_tag="mine").config.model_tag == "mine"


def test_save_pretrained_round_trip_is_json_and_exact(field, tmp_path):
    solver = _perturbed(bx.BespokeSolver(3, 2))
    scheduler = BespokeScheduler.from_solver(solver, trained_mu=0.8, model_tag="tiny")
    scheduler.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["scheduler_config.json"]
    config = json.loads((tmp_path / "scheduler_config.json").read_text())  # data only, no pickle
    assert config["_class_name"] == "BespokeScheduler" and config["trained_mu"] == 0.8
    loaded = BespokeScheduler.from_pretrained(tmp_path)
    back = loaded.to_solver()
    for (name, a), (_, b) in zip(solver.named_parameters(), back.named_parameters()):
        assert torch.equal(a, b), name
    x0 = _x0()
    assert torch.equal(_loop(loaded, field, x0), _loop(scheduler, field, x0))
    assert loaded.config.model_tag == "tiny"
    ns = _perturbed(bx.NonStationarySolver(5, "euler"), scale=0.05)
    BespokeScheduler.from_solver(ns).save_pretrained(tmp_path / "ns")
    loaded = BespokeScheduler.from_pretrained(tmp_path / "ns")
    assert torch.allclose(_loop(loaded, field, x0), bx.sample(field, x0, solver=ns), atol=1e-5, rtol=0)


def test_wrong_num_inference_steps_names_the_right_one():
    scheduler = BespokeScheduler.from_solver(bx.BespokeSolver(4, 2))
    with pytest.raises(ValueError, match="num_inference_steps=4"):
        scheduler.set_timesteps(num_inference_steps=8)
    with pytest.raises(ValueError, match="num_inference_steps=4"):
        scheduler.set_timesteps(sigmas=[1.0, 0.8, 0.6, 0.4, 0.2])  # a pipeline's linspace of the wrong length
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scheduler.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25])  # the pipelines' default linspace: fine, silent
    assert len(scheduler.timesteps) == 8
    with pytest.raises(TypeError, match="num_inference_steps must be an integer, got 3.7"):
        scheduler.set_timesteps(3.7)   # was truncated to 3
    scheduler.set_timesteps(np.int64(4))
    with pytest.warns(UserWarning, match="custom sigmas are ignored"):   # other length with the right steps
        scheduler.set_timesteps(4, sigmas=[1.0, 0.5])


def test_from_config_of_another_scheduler_is_refused_not_a_one_step_solver(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    with pytest.raises(ValueError, match="not a BespokeScheduler's .*from_solver"):
        BespokeScheduler.from_config(FlowMatchEulerDiscreteScheduler().config)
    # Its own config (what from_pretrained reads) still builds the same solver.
    scheduler = BespokeScheduler.from_solver(_perturbed(bx.BespokeSolver(3, 2)))
    again = BespokeScheduler.from_config(scheduler.config)
    assert again.steps == 3 and torch.equal(again.timesteps, scheduler.timesteps)


def test_timesteps_and_sigmas_follow_diffusers_conventions():
    solver = _perturbed(bx.BespokeSolver(3, 2))
    scheduler = BespokeScheduler.from_solver(solver)
    scheduler.set_timesteps(3)
    te = solver.eval_times()
    assert scheduler.timesteps.dtype == torch.float32 and scheduler.timesteps.shape == (6,)
    assert torch.allclose(scheduler.timesteps.double(), (1 - te) * 1000, atol=1e-3)
    assert scheduler.sigmas.shape == (7,) and scheduler.sigmas[-1] == 0
    assert torch.allclose(scheduler.sigmas[:-1] * 1000, scheduler.timesteps, atol=1e-3)
    assert scheduler.config.use_flow_sigmas and not scheduler.config.use_dynamic_shifting
    assert scheduler.init_noise_sigma == 1.0
    # scale_noise at the begin index: the flow path at that sigma (img2img's first latents)
    scheduler.set_begin_index(2)
    mixed = scheduler.scale_noise(torch.ones(2, 4), scheduler.timesteps[2:3], torch.zeros(2, 4))
    assert torch.allclose(mixed, torch.full((2, 4), 1 - float(scheduler.sigmas[2])))
    with pytest.raises(ValueError, match="float timesteps"):
        scheduler.step(torch.zeros(2, 4), 500, torch.zeros(2, 4))


def test_starting_at_a_step_boundary_continues_the_trajectory(field):
    """img2img / strength < 1: timesteps[t_start * order:] and set_begin_index(t_start * order)."""
    solver = _perturbed(bx.BespokeSolver(4, 2))
    scheduler = BespokeScheduler.from_solver(solver)
    x0 = _x0()
    states = {}
    full = _loop(scheduler, field, x0, edit=lambda i, x: states.setdefault(i, x))  # keeps each state
    resumed = _loop(scheduler, field, states[3], begin=4)  # after 4 evaluations = 2 steps
    assert torch.allclose(resumed, full, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="cannot start"):
        _loop(scheduler, field, states[2], begin=3)  # mid-step: x_i is gone
    ns = BespokeScheduler.from_solver(bx.NonStationarySolver(4))
    with pytest.raises(ValueError, match="cannot start"):
        _loop(ns, field, x0, begin=2)  # every step reads x_0


def test_the_sample_passed_in_is_used(field):
    """A callback_on_step_end that replaces the latents is respected (a copy equals, an edit changes)."""
    solver = _perturbed(bx.BespokeSolver(3, 2))
    x0 = _x0()
    plain = _loop(BespokeScheduler.from_solver(solver), field, x0)
    copied = _loop(BespokeScheduler.from_solver(solver), field, x0, edit=lambda i, x: x.clone())
    edited = _loop(BespokeScheduler.from_solver(solver), field, x0, edit=lambda i, x: x + 0.1 * (i == 1))
    assert torch.equal(copied, plain)
    assert (edited - plain).abs().max() > 1e-3


def test_mu_different_from_the_trained_one_warns():
    scheduler = BespokeScheduler.from_solver(bx.BespokeSolver(2, 1), trained_mu=0.5)
    with pytest.warns(UserWarning, match="mu=1"):
        scheduler.set_timesteps(2, mu=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scheduler.set_timesteps(2, mu=0.5)
        BespokeScheduler.from_solver(bx.BespokeSolver(2, 1)).set_timesteps(2, mu=1.0)  # nothing recorded
    strict = BespokeScheduler.from_solver(bx.BespokeSolver(2, 1), trained_mu=0.5, strict=True)
    with pytest.raises(ValueError, match="mu"):
        strict.set_timesteps(2, mu=1.0)


# -- 2. real pipelines from tiny configs ------------------------------------------------------------

H = W = 32  # pixels; no VAE: vae_scale_factor 8, latents 4 x 4


def _embeds(pooled, seed):
    """Two rows (one per sample) of each prompt embedding the pipelines take, as if encoded once."""
    g = torch.Generator().manual_seed(seed)
    return {f"{neg}{name}": torch.randn(2, *shape, generator=g) for neg in ("", "negative_")
            for name, shape in (("prompt_embeds", (7, 32)), ("pooled_prompt_embeds", (pooled,)))}


def _flux_pipe():
    return make_flux_pipe(), _embeds(pooled=32, seed=2)


def _sd3_pipe():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)
    pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None,
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None, transformer=transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe, _embeds(pooled=64, seed=3)


@pytest.fixture(scope="module")
def flux():
    return _flux_pipe()


@pytest.fixture(scope="module")
def sd3():
    return _sd3_pipe()


def _counting(transformer):
    calls = []
    return calls, transformer.register_forward_pre_hook(lambda *a: calls.append(1))


def _run(pipe, embeds, latents, steps, **kw):
    return pipe(**embeds, latents=latents, height=H, width=W, num_inference_steps=steps, output_type="latent",
                **kw).images


@pytest.mark.parametrize("true_cfg", [1.0, 2.0])
def test_flux_euler_through_bx_sample_equals_the_pipeline(flux, true_cfg):
    pipe, embeds = flux
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    velocity = pipeline_velocity(pipe, height=H, width=W, guidance_scale=2.5, true_cfg_scale=true_cfg)
    latents = torch.randn(2, *velocity.latent_shape, generator=torch.Generator().manual_seed(4))
    want = _run(pipe, embeds, latents, 4, guidance_scale=2.5, true_cfg_scale=true_cfg)
    grid = 1 - pipe.scheduler.sigmas.double()  # the pipeline's shifted grid (mu from the sequence length)
    got = bx.sample(velocity, latents, method="euler", time_grid=grid, **embeds)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    other = bx.sample(pipeline_velocity(pipe, height=H, width=W, guidance_scale=5.0, true_cfg_scale=true_cfg),
                      latents, method="euler", time_grid=grid, **embeds)
    assert (other - want).abs().max() > 1e-4  # the guidance embedding is really applied


@pytest.mark.parametrize("make", [lambda: _perturbed(bx.BespokeSolver(3, 2), 0.2),
                                  lambda: _perturbed(bx.NonStationarySolver(4), 0.05)], ids=["rk2", "ns"])
def test_bespoke_scheduler_inside_flux_makes_nfe_calls_and_equals_bx_sample(flux, make):
    pipe, embeds = flux
    solver = make()
    velocity = pipeline_velocity(pipe, height=H, width=W)
    pipe.scheduler = BespokeScheduler.from_solver(solver, trained_mu=velocity.mu)
    latents = torch.randn(2, *velocity.latent_shape, generator=torch.Generator().manual_seed(5))
    calls, handle = _counting(pipe.transformer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the pipeline's mu is the trained one: no warning
        got = _run(pipe, embeds, latents, pipe.scheduler.steps)
    handle.remove()
    assert len(calls) == solver.nfe
    want = bx.sample(velocity, latents, solver=solver, **embeds)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=f"num_inference_steps={solver.steps}"):
        _run(pipe, embeds, latents, solver.steps + 1)
    pipe.scheduler = BespokeScheduler.from_solver(solver, trained_mu=velocity.mu + 0.3)
    with pytest.warns(UserWarning, match="mu="):
        _run(pipe, embeds, latents, solver.steps)


def test_flux_shift_settings_travel_with_the_trained_mu(flux, tmp_path):
    # a scheduler config with its own shift settings: FluxPipeline computes each run's mu from its
    # scheduler's config, so a BespokeScheduler that only records trained_mu (and keeps the default
    # settings) sees another mu at the trained resolution and warns; with scheduler_settings it does not
    pipe, embeds = flux
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=64,
                                                     max_image_seq_len=1024, base_shift=0.3, max_shift=2.0)
    velocity = pipeline_velocity(pipe, height=H, width=W)
    settings = velocity.scheduler_settings
    assert settings["max_shift"] == 2.0 and settings["base_image_seq_len"] == 64
    assert settings["trained_seq_len"] == velocity.latent_shape[0]
    solver = _perturbed(bx.BespokeSolver(2, 2), 0.1)
    latents = torch.randn(2, *velocity.latent_shape, generator=torch.Generator().manual_seed(6))
    pipe.scheduler = BespokeScheduler.from_solver(solver, trained_mu=velocity.mu)
    with pytest.warns(UserWarning, match="mu="):
        _run(pipe, embeds, latents, solver.steps)
    BespokeScheduler.from_solver(solver, **settings).save_pretrained(tmp_path)
    pipe.scheduler = BespokeScheduler.from_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _run(pipe, embeds, latents, solver.steps)
    assert torch.allclose(got, bx.sample(velocity, latents, solver=solver, **embeds), atol=1e-5, rtol=0)


def test_sd3_euler_with_cfg_through_bx_sample_equals_the_pipeline(sd3):
    pipe, embeds = sd3
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    velocity = pipeline_velocity(pipe, height=H, width=W, guidance_scale=4.0)
    latents = torch.randn(2, *velocity.latent_shape, generator=torch.Generator().manual_seed(6))
    want = _run(pipe, embeds, latents, 4, guidance_scale=4.0)
    got = bx.sample(velocity, latents, method="euler", time_grid=1 - pipe.scheduler.sigmas.double(), **embeds)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    unguided = pipeline_velocity(pipe, height=H, width=W, guidance_scale=1.0)
    other = bx.sample(unguided, latents, method="euler", time_grid=1 - pipe.scheduler.sigmas.double(), **embeds)
    assert (other - want).abs().max() > 1e-3  # CFG is really applied
    positive = {k: v for k, v in embeds.items() if not k.startswith("negative")}
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        velocity(latents, torch.tensor(0.0), **positive)


def test_sd3_with_cfg_trains_with_one_time_per_sample_and_its_time_input_carries_gradient(sd3, tmp_path):
    # training calls the field with t [B]: SD3's CFG doubles the batch, and t [B] did not expand to 2B (every
    # guided SD3 training crashed in the probe); the timestep was detached, so no loss reached the time grid
    pipe, embeds = sd3
    velocity = pipeline_velocity(pipe, height=H, width=W, guidance_scale=4.0)
    latents = torch.randn(2, *velocity.latent_shape, generator=torch.Generator().manual_seed(8))
    t = torch.tensor([0.3, 0.6], requires_grad=True)
    per_sample = velocity(latents, t, **embeds)
    for i in range(2):  # t [B] means each sample at its own time
        alone = velocity(latents[i:i + 1], t[i].detach(), **{k: v[i:i + 1] for k, v in embeds.items()})
        assert torch.allclose(per_sample[i:i + 1], alone, atol=1e-5, rtol=0)
    (g,) = torch.autograd.grad(per_sample.square().sum(), t)
    assert bool((g != 0).all())
    conditions = {k: torch.cat([v, v]) for k, v in embeds.items()}  # a pool of 4 rows
    solver = bx.train(velocity, bx.BespokeSolver(2, 2), shape=velocity.latent_shape, iterations=2, batch_size=2,
                      conditions=conditions, loss="end_to_end", cache_samples=4, val_size=2, val_every=2,
                      progress=False, keep_best=False, cache_dir=str(tmp_path / "gt"))
    assert solver.time_logits.abs().max() > 0  # the grid moved: its gradient came through the timestep


def test_a_bf16_flux_transformer_takes_float32_prompt_encodings(flux):
    # a float32 text encoder's encodings with a bf16 transformer failed inside it ("mat1 and mat2 must have
    # the same dtype"); they are cast to the dtype the transformer is called in
    pipe32, embeds = flux
    pipe16 = make_flux_pipe()
    pipe16.transformer.to(torch.bfloat16)
    positive = {k: v for k, v in embeds.items() if not k.startswith("negative")}
    v16 = pipeline_velocity(pipe16, height=H, width=W, guidance_scale=2.5)
    v32 = pipeline_velocity(pipe32, height=H, width=W, guidance_scale=2.5)
    x = torch.randn(2, *v32.latent_shape, generator=torch.Generator().manual_seed(9))
    got = bx.sample(v16, x, method="midpoint", nfe=4, **positive)
    want = bx.sample(v32, x, method="midpoint", nfe=4, **positive)
    assert got.dtype == torch.float32 and bool(torch.isfinite(got).all())
    assert (got - want).abs().max() <= 0.05 * want.abs().max()  # bf16's rounding, not another field


def test_bespoke_scheduler_inside_sd3_after_save_and_load(sd3, tmp_path):
    pipe, embeds = sd3
    solver = _perturbed(bx.BespokeSolver(3, 2), 0.2)
    pipe.scheduler = BespokeScheduler.from_solver(solver)
    pipe.save_pretrained(tmp_path)  # the whole pipeline: model_index.json names the scheduler's module
    loaded = type(pipe).from_pretrained(tmp_path, **{k: None for k, v in pipe.components.items() if v is None})
    assert isinstance(loaded.scheduler, BespokeScheduler)
    loaded.set_progress_bar_config(disable=True)
    velocity = pipeline_velocity(pipe, height=H, width=W, guidance_scale=4.0)
    latents = torch.randn(2, *velocity.latent_shape, generator=torch.Generator().manual_seed(7))
    calls, handle = _counting(loaded.transformer)
    got = _run(loaded, embeds, latents, loaded.scheduler.steps, guidance_scale=4.0)
    handle.remove()
    assert len(calls) == solver.nfe  # CFG batches [uncond, cond]: one forward per evaluation
    want = bx.sample(velocity, latents, solver=solver, **embeds)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    fresh = bx.sample(velocity, latents, method="midpoint", nfe=solver.nfe, **embeds)
    assert (want - fresh).abs().max() > 1e-3


def test_sd3_at_another_resolution_than_trained_warns(sd3, tmp_path):
    """SD3's shift is fixed (no mu to compare): the latents' shape recorded at training tells the resolution."""
    pipe, embeds = sd3
    velocity = pipeline_velocity(pipe, height=H, width=W, guidance_scale=4.0)
    pipe.scheduler = BespokeScheduler.from_solver(bx.BespokeSolver(2, 1), **velocity.scheduler_settings)
    assert pipe.scheduler.config.trained_latent_shape == list(velocity.latent_shape)
    same = torch.randn(2, *velocity.latent_shape, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run(pipe, embeds, same, 2, guidance_scale=4.0)
    larger = torch.randn(2, 4, 2 * H // 8, 2 * W // 8, generator=torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning, match=r"per-sample shape \(4, 8, 8\).*trained on \(4, 4, 4\)") as caught:
        pipe(**embeds, latents=larger, height=2 * H, width=2 * W, num_inference_steps=2, output_type="latent",
             guidance_scale=4.0)
    assert sum("BespokeScheduler" in str(w.message) for w in caught) == 1   # once per trajectory
    pipe.scheduler.save_pretrained(tmp_path)                                  # it travels with the config
    strict = BespokeScheduler.from_pretrained(tmp_path, strict=True)
    assert strict.config.trained_latent_shape == list(velocity.latent_shape)
    strict.set_timesteps(2)
    with pytest.raises(ValueError, match="per-sample shape"):
        strict.step(torch.zeros_like(larger), strict.timesteps[0], larger)


def test_pipeline_velocity_checks_latent_shape_and_pipeline(flux):
    pipe, embeds = flux
    velocity = pipeline_velocity(pipe, height=H, width=W)
    with pytest.raises(ValueError, match="per-sample shape"):
        velocity(torch.zeros(2, 5, 4), torch.tensor(0.0), **embeds)

    class NotAPipeline:
        transformer = torch.nn.Linear(2, 2)
        vae_scale_factor = 8

    with pytest.raises(NotImplementedError, match="Flux and SD3"):
        pipeline_velocity(NotAPipeline(), height=H, width=W)


# -- 3. k-diffusion convention ------------------------------------------------------------------------

def _denoiser(field):
    """A k-diffusion flow denoiser D(x, sigma) = x + sigma u(x, 1 - sigma) (ComfyUI CONST: x - sigma * out)."""
    def model(x, sigma, **extra):
        s = sigma.reshape(-1, *([1] * (x.dim() - 1)))
        return x + s * field(x, 1 - sigma[0])
    return model


def _sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """k-diffusion's sample_euler (k_diffusion/sampling.py) with s_churn = 0, its default."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma_hat = sigmas[i]
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = (x - denoised) / sigma_hat  # to_d
        dt = sigmas[i + 1] - sigma_hat
        x = x + d * dt
    return x


def test_flow_velocity_with_one_time_per_sample(field):
    # bx.train's bound loss calls the model with t [B]: sigma must broadcast per sample
    from bespoke_ext.integrations.kdiffusion import flow_velocity

    def per_sample_denoiser(x, sigma):
        return x + sigma.reshape(-1, 1) * field(x, 1 - sigma)

    u = flow_velocity(per_sample_denoiser)
    x = _x0(4)
    t = torch.tensor([0.2, 0.7, 0.4, 0.9])
    torch.testing.assert_close(u(x, t), field(x, t), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(u(x, torch.tensor(0.3)), field(x, torch.full((4,), 0.3)), rtol=1e-5, atol=1e-5)


def test_sample_bespoke_identity_solver_equals_k_diffusion_sample_euler(field):
    solver = bx.BespokeSolver(6, 1)
    sigmas = solver_sigmas(solver)
    assert sigmas[0] == 1 and sigmas[-1] == 0 and sigmas.shape == (7,)
    x0 = _x0()
    model = _denoiser(field)
    got = sample_bespoke(model, x0, sigmas, solver=solver, disable=True)
    assert torch.allclose(got, _sample_euler(model, x0, sigmas), atol=1e-5, rtol=0)
    assert torch.allclose(got, bx.sample(field, x0, method="euler", nfe=6), atol=1e-5, rtol=0)
    assert (got - x0).abs().max() > 0.1


@pytest.mark.parametrize("make", [lambda: bx.BespokeSolver(4, 2), lambda: _perturbed(bx.BespokeSolver(4, 2)),
                                  lambda: _perturbed(bx.NonStationarySolver(6), 0.05)],
                         ids=["midpoint", "bespoke-rk2", "nonstationary"])
def test_sample_bespoke_equals_bx_sample(field, make):
    solver = make()
    x0 = _x0()
    seen = []
    got = sample_bespoke(_denoiser(field), x0, solver_sigmas(solver), solver=solver, disable=True,
                         callback=lambda d: seen.append((d["i"], float(d["sigma"]), sorted(d))))
    assert torch.allclose(got, bx.sample(field, x0, solver=solver), atol=1e-5, rtol=0)
    sig = solver_sigmas(solver)
    assert [i for i, _, _ in seen] == list(range(solver.steps))  # once per step
    assert [s for _, s, _ in seen] == [float(v) for v in sig[:-1]]
    assert seen[0][2] == ["denoised", "i", "sigma", "sigma_hat", "x"]


def test_sample_bespoke_resumes_on_a_suffix_of_its_sigmas(field):
    solver = _perturbed(bx.BespokeSolver(5, 2))
    x0 = _x0()
    path = bx.sample(field, x0, solver=solver, return_intermediates=True)  # states at solver.times()
    got = sample_bespoke(_denoiser(field), path[2], solver_sigmas(solver)[2:], solver=solver, disable=True)
    assert torch.allclose(got, path[-1], atol=1e-5, rtol=0)
    ns = bx.NonStationarySolver(4)
    with pytest.raises(ValueError, match="cannot resume"):
        sample_bespoke(_denoiser(field), x0, solver_sigmas(ns)[1:], solver=ns, disable=True)


@pytest.mark.parametrize("make", [lambda: _perturbed(bx.BespokeSolver(5, 2)), lambda: _perturbed(bx.NonStationarySolver(5), 0.05)],
                         ids=["bespoke-rk2", "nonstationary"])
def test_sample_bespoke_stops_on_a_prefix_of_its_sigmas(field, make):
    # ComfyUI's SplitSigmas high half (two experts, or two samplers): the state at the last sigma
    solver = make()
    x0 = _x0()
    path = bx.sample(field, x0, solver=solver, return_intermediates=True)  # states at solver.times()
    sig = solver_sigmas(solver)
    head = sample_bespoke(_denoiser(field), x0, sig[:3], solver=solver, disable=True)
    assert torch.allclose(head, path[2], atol=1e-5, rtol=0)
    if isinstance(solver, bx.BespokeSolver):   # and the low half finishes it
        tail = sample_bespoke(_denoiser(field), head, sig[2:], solver=solver, disable=True)
        assert torch.allclose(tail, path[-1], atol=1e-5, rtol=0)
    middle = sample_bespoke(_denoiser(field), x0, sig[:5], solver=solver, disable=True)
    assert torch.allclose(middle, path[4], atol=1e-5, rtol=0)


def test_sample_bespoke_refuses_non_flow_models_and_foreign_sigmas(field):
    solver = bx.BespokeSolver(4, 1)
    model, x0 = _denoiser(field), _x0()
    karras = torch.tensor([14.61, 4.0, 1.2, 0.3, 0.0])  # an SD-style (VE) schedule
    with pytest.raises(ValueError, match="not a flow model"):
        sample_bespoke(model, x0, karras, solver=solver)
    with pytest.raises(ValueError, match="not this solver's grid"):
        sample_bespoke(model, x0, torch.linspace(1, 0, 4), solver=solver)
    with pytest.raises(TypeError, match="solver="):
        sample_bespoke(model, x0, solver_sigmas(solver))

    EPS, CONST = type("EPS", (), {}), type("CONST", (), {})

    class Wrapped:  # ComfyUI: model_k.inner_model.inner_model.model_sampling
        def __init__(self, sampling):
            self.inner_model = type("Inner", (), {"inner_model": type("M", (), {"model_sampling": sampling})()})()

        def __call__(self, x, sigma, **kw):
            return model(x, sigma, **kw)

    with pytest.raises(ValueError, match="model_sampling is EPS"):
        sample_bespoke(Wrapped(EPS()), x0, solver_sigmas(solver), solver=solver)
    flow = type("ModelSamplingFlux", (CONST,), {})()
    got = sample_bespoke(Wrapped(flow), x0, solver_sigmas(solver), solver=solver, disable=True)
    assert torch.allclose(got, bx.sample(field, x0, method="euler", nfe=4), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_train_for_a_pipeline_then_sample_inside_it(flux, tmp_path):
    """The recipe: bx.train(pipeline_velocity(...), solver, conditions=prompt embeddings), save_pretrained,
    install with from_pretrained; the pipeline then samples what bx.sample does."""
    pipe, embeds = flux
    velocity = pipeline_velocity(pipe, height=H, width=W)
    conditions = {k: embeds[k] for k in ("prompt_embeds", "pooled_prompt_embeds")}
    solver = bx.train(velocity, bx.BespokeSolver(2, 2), shape=velocity.latent_shape, iterations=4, batch_size=2,
                      conditions=conditions, cache_samples=8, val_size=4, gt_group_size=8,
                      val_every=2, lr=5e-2, progress=False, cache_dir=str(tmp_path / "gt"),
                      keep_best=False)
    assert any(not torch.equal(p, torch.zeros_like(p)) for p in solver.parameters())  # it trained
    BespokeScheduler.from_solver(solver, **velocity.scheduler_settings).save_pretrained(tmp_path / "sched")
    pipe.scheduler = BespokeScheduler.from_pretrained(tmp_path / "sched")
    latents = torch.randn(2, *velocity.latent_shape, generator=torch.Generator().manual_seed(8))
    got = _run(pipe, embeds, latents, pipe.scheduler.steps)
    want = bx.sample(velocity, latents, solver=solver, **conditions)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_scheduler_loop_on_device(field, device):
    """The tables follow set_timesteps(device=...): a loop on the device equals bx.sample there."""
    model = copy.deepcopy(field).to(device)  # the module-scoped fixture stays on the CPU
    solver = _perturbed(bx.BespokeSolver(3, 2))
    scheduler = BespokeScheduler.from_solver(solver)
    scheduler.set_timesteps(scheduler.steps, device=device)
    assert scheduler.timesteps.device.type == torch.device(device).type
    x0 = _x0().to(device)
    x = x0
    for t in scheduler.timesteps:
        x = scheduler.step(-model(x, (1 - t.double() / 1000).float()), t, x, return_dict=False)[0]
    assert torch.allclose(x, bx.sample(model, x0, solver=solver), atol=1e-5, rtol=0)


@pytest.mark.parametrize("make", [_flux_pipe, _sd3_pipe], ids=["flux", "sd3"])
def test_a_pipeline_run_leaves_its_velocity_model_tag_alone(make):
    # diffusers attaches a hook registry to the transformer at the pipeline's first call: how it is run, not
    # the field; a tag that changed with it would refuse a checkpoint made before the run
    from bespoke_ext.models.identity import model_tag

    pipe, embeds = make()
    before = model_tag(pipeline_velocity(pipe, height=H, width=W))
    _run(pipe, {k: v[:1] for k, v in embeds.items()}, None, 2)
    assert model_tag(pipeline_velocity(pipe, height=H, width=W)) == before
    pipe.transformer._scale = 2.0   # a private setting added to the transformer still counts
    assert model_tag(pipeline_velocity(pipe, height=H, width=W)) != before
