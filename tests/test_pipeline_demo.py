"""The embedded diffusers-format model (flux_mnist: a tiny FluxTransformer2DModel trained on MNIST, labels
as learned prompt embeddings) and `bespoke-ext demo --model flux_mnist`, which runs diffusers' real
FluxPipeline with the Bespoke scheduler next to FlowMatchEuler and midpoint. Nothing is downloaded."""

import json
import time

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import bespoke_ext as bx
from bespoke_ext.models import flux_mnist as fm
from bespoke_ext.models.embedded import WEIGHTS_DIR, list_embedded, load_embedded
from bespoke_ext.models.pretrain import PRESETS, sha256_file

import transformers  # noqa: F401,E402  (without it diffusers' FluxPipeline is a dummy object)
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel  # noqa: E402

from bespoke_ext.integrations.diffusers import BespokeScheduler, pipeline_velocity  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a download attempt would fail loudly, not pass silently
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def model():
    return load_embedded(fm.NAME)


@pytest.fixture(scope="module")
def pipe(model):
    return fm.build_pipeline(model.net)


def _prompts(model, labels):
    return model.net.embeds(labels)


def _run(pipe, scheduler, latents, prompts, steps):
    pipe.scheduler = scheduler
    return pipe(**prompts, latents=latents, height=fm.HEIGHT, width=fm.WIDTH, num_inference_steps=steps,
                output_type="latent").images


def test_the_embedded_model_loads_and_matches_its_card(model):
    assert fm.NAME in list_embedded()
    card = model.card
    path = WEIGHTS_DIR / card["weights"]["file"]
    assert card["weights"]["sha256"] == sha256_file(path)
    assert path.stat().st_size < 3 * 1024 * 1024
    assert isinstance(model.net, fm.FluxMNIST) and isinstance(model.net.transformer, FluxTransformer2DModel)
    assert model.velocity is model.net and not model.net.training
    assert all(not p.requires_grad for p in model.net.parameters())
    n = sum(p.numel() for p in model.net.parameters())
    assert n == card["architecture"]["num_parameters"] and 100_000 < n < 1_000_000
    assert card["architecture"]["kwargs"] == PRESETS[fm.NAME]["net_kwargs"]
    assert model.net.transformer.config.in_channels == 4 * fm.LATENT_CHANNELS
    tr = card["training"]
    assert tr["wall_clock_seconds"] > 0 and tr["iterations"] == PRESETS[fm.NAME]["iterations"]
    assert tr["heldout_loss"] < tr["loss_curve"][0][1]  # it learned: held-out loss below the first 100 steps'
    assert card["diffusers"]["pipeline"] == "FluxPipeline" and card["conditioning"]["null_label"] == fm.NULL_LABEL
    prompts = _prompts(model, torch.tensor([3, fm.NULL_LABEL]))
    assert prompts["prompt_embeds"].shape == (2, 4, 32) and prompts["pooled_prompt_embeds"].shape == (2, 32)
    with pytest.raises(ValueError, match="labels"):
        _prompts(model, torch.tensor([fm.NULL_LABEL + 1]))


def test_latent_layout_is_fluxs_own_packing(model, pipe):
    x = torch.randn(3, *fm.IMAGE_SHAPE, generator=torch.Generator().manual_seed(0))
    z = fm.images_to_latents(x)
    assert z.shape == (3, *fm.LATENT_SHAPE)
    assert torch.equal(z, FluxPipeline._pack_latents(F.pixel_unshuffle(x, 2), 3, fm.LATENT_CHANNELS, 14, 14))
    assert torch.equal(fm.latents_to_images(z), x)
    assert torch.equal(F.pixel_shuffle(FluxPipeline._unpack_latents(z, fm.HEIGHT, fm.WIDTH, pipe.vae_scale_factor), 2), x)
    ids = FluxPipeline._prepare_latent_image_ids(1, 7, 7, torch.device("cpu"), torch.float32)
    assert torch.equal(model.net.image_ids, ids)


def test_image_velocity_is_the_pipelines_velocity(model, pipe):
    """FluxMNIST(x, t, y) (what load_embedded hands the rest of the package) = pipeline_velocity on the
    packed latents, and its sign is the velocity's: a step along it moves toward data."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, *fm.IMAGE_SHAPE, generator=g)
    labels = torch.tensor([0, 1, 7, fm.NULL_LABEL])
    t = torch.tensor([0.1, 0.4, 0.7, 0.9])
    velocity = pipeline_velocity(pipe, height=fm.HEIGHT, width=fm.WIDTH)
    want = fm.latents_to_images(velocity(fm.images_to_latents(x), t, **_prompts(model, labels)))
    got = model.velocity(x, t, y=labels)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    assert not torch.allclose(got, model.velocity(x, t, y=torch.tensor([5, 5, 5, 5])), atol=1e-3)  # labels matter
    x1 = bx.sample(model.velocity, x, method="midpoint", nfe=8, y=labels)
    assert torch.isfinite(x1).all() and float(x1.abs().max()) < 2.0  # digits in about [-1, 1]


def test_pipeline_runs_offline_and_draws_the_requested_digits(model, pipe):
    from bespoke_ext.metrics import load_classifier

    labels = torch.arange(20) % 10
    latents = fm.images_to_latents(torch.randn(20, *fm.IMAGE_SHAPE, generator=torch.Generator().manual_seed(2)))
    out = _run(pipe, FlowMatchEulerDiscreteScheduler(**fm.SCHEDULER_CONFIG), latents, _prompts(model, labels), 20)
    images = fm.latents_to_images(out)
    assert torch.isfinite(images).all() and float(images.abs().max()) < 2.0
    with torch.no_grad():
        predicted = load_classifier("mnist")(images.clamp(-1, 1)).argmax(-1)
    assert float((predicted == labels).float().mean()) >= 0.5  # the prompts steer the digit (chance: 0.1; 100 samples: 0.7)


@pytest.mark.parametrize("order", [1, 2])
def test_identity_bespoke_scheduler_in_the_pipeline_equals_euler_and_midpoint(model, pipe, order):
    """A fresh solver through the pipeline: order 1 is FlowMatchEuler on the same (unshifted) grid,
    order 2 is bx.sample's midpoint, to 1e-4."""
    labels = torch.arange(4) * 2
    prompts = _prompts(model, labels)
    latents = torch.randn(4, *fm.LATENT_SHAPE, generator=torch.Generator().manual_seed(3))
    nfe = 8
    got = _run(pipe, BespokeScheduler.from_solver(bx.BespokeSolver(nfe // order, order)), latents, prompts,
               nfe // order)
    if order == 1:
        want = _run(pipe, FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False), latents, prompts, nfe)
    else:
        velocity = pipeline_velocity(pipe, height=fm.HEIGHT, width=fm.WIDTH)
        want = bx.sample(velocity, latents, method="midpoint", nfe=nfe, **prompts)
    assert (got - want).abs().max() < 1e-4
    shifted = _run(pipe, FlowMatchEulerDiscreteScheduler(**fm.SCHEDULER_CONFIG), latents, prompts, nfe)
    assert (got - shifted).abs().max() > 1e-3  # FLUX.1's shifted grid is another solver: the check can fail


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    from bespoke_ext.cli import main

    out = tmp_path_factory.mktemp("pipeline-demo")
    start = time.perf_counter()
    code = main(["demo", "--model", fm.NAME, "--quick", "--nfe", "8", "--out", str(out), "--no-progress",
                 "--threads", "1"])
    seconds = time.perf_counter() - start
    assert code == 0
    return out, json.loads((out / "results.json").read_text()), seconds


def test_quick_demo_runs_the_pipeline_end_to_end(quick_demo):
    out, results, seconds = quick_demo
    assert seconds < 60
    rows = results["rows"]
    assert {r["method"] for r in rows} == {"ground truth", "bespoke", "flowmatch-euler", "midpoint", "dopri5"}
    assert [r["nfe"] for r in rows if r["method"] == "bespoke"] == [8]
    for method in ("flowmatch-euler", "midpoint"):
        assert 8 in [r["nfe"] for r in rows if r["method"] == method]
    for r in rows:
        assert r["distribution"]["FCD"] >= 0
        if r["method"] != "ground truth":
            assert 0 < r["rmse"] < 1 and r["psnr"] > 10
    s = results["summary"]
    assert s["model"] == fm.NAME and s["pipeline"] == "diffusers.FluxPipeline"
    target = s["targets"]["results"]
    assert set(target) == {"flowmatch-euler", "midpoint"} and all(isinstance(v["met"], bool) for v in target.values())
    assert 0 < s["training_cost_fraction"] < 1 and s["pretraining_seconds"] > 0
    assert s["pipeline_vs_bx_sample_max_abs"]["8"] < 1e-5  # the same samples through the pipeline and bx.sample
    for name in ("samples.png", "rmse_vs_nfe.png", "bespoke_schedules.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert "| Bespoke order 2 (BespokeScheduler) | 8 |" in (out / "results.md").read_text()


def test_quick_demo_scheduler_folder_reloads_into_the_pipeline(quick_demo, model, pipe):
    out, results, _ = quick_demo
    scheduler = BespokeScheduler.from_pretrained(out / "schedulers" / "bespoke-nfe8")
    solver = bx.BespokeSolver.load(out / "solvers" / "bespoke-rk2-nfe8.safetensors")
    assert scheduler.steps == 4 and scheduler.order == 2
    assert any(not torch.equal(p, torch.zeros_like(p)) for p in solver.parameters())  # it trained
    batch = load_file(str(out / "evaluation_batch.safetensors"))
    latents, labels = batch["latents"][:2], batch["labels"][:2]
    got = _run(pipe, scheduler, latents, _prompts(model, labels), scheduler.steps)
    velocity = pipeline_velocity(pipe, height=fm.HEIGHT, width=fm.WIDTH)
    want = bx.sample(velocity, latents, solver=solver, **_prompts(model, labels))
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_demo_dispatches_only_diffusers_models_to_the_pipeline_demo():
    from bespoke_ext.demo.pipeline_demo import is_pipeline_model, run

    assert is_pipeline_model(fm.NAME)
    assert not is_pipeline_model("mnist") and not is_pipeline_model("no-such-model") and not is_pipeline_model(None)
    with pytest.raises(ValueError, match="--guidance"):
        run(guidance=0.5)
    with pytest.raises(ValueError, match="--nfe"):
        run(nfe=[7])
