"""`bespoke-ext train-pipeline`: a tiny FluxPipeline built from config in a module (tiny_pipelines.py, no downloads),
trained for a few iterations from an embeddings file; the saved scheduler samples what bx.sample does."""

import pytest
import torch

import bespoke_ext as bx

from safetensors.torch import save_file
from tiny_pipelines import make_flux_pipe

from bespoke_ext.cli import main
from bespoke_ext.cli.train_pipeline import PipelineTrainingError, load_embeddings
from bespoke_ext.integrations.diffusers import BespokeScheduler, pipeline_velocity
from bespoke_ext.solvers import load_solver

pytestmark = pytest.mark.usefixtures("one_thread")

H = W = 32  # pixels; no VAE: vae_scale_factor 8, packed latents [4, 16]

@pytest.fixture
def tiny(tmp_path):
    g = torch.Generator().manual_seed(2)
    embeds = {"prompt_embeds": torch.randn(3, 7, 32, generator=g), "pooled_prompt_embeds": torch.randn(3, 32, generator=g)}
    path = tmp_path / "embeds.safetensors"
    save_file(embeds, str(path))
    return tmp_path, path, embeds


def _args(tmp_path, embeddings, *extra, out="sched"):
    return ["train-pipeline", "tiny_pipelines:make_flux_pipe", "--embeddings", str(embeddings), "--height", str(H),
            "--width", str(W), "--guidance", "2.5", "--cache-dir", str(tmp_path / "gt"), "--cache-samples", "8",
            "--val-size", "4", "--val-every", "2", "--batch-size", "2", "--keep-last", "--no-progress", "-o", str(tmp_path / out),
            *extra]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--nfe", "4", "--iterations", "3", "--lr", "0.05"],
                                   ["--solver", "nonstationary", "--nfe", "3", "--iterations", "2", "--lr", "0.02",
                                    "--gradient-checkpointing"]], ids=["bespoke-rk2", "nonstationary-checkpointed"])
def test_train_pipeline_saves_a_scheduler_the_pipeline_samples_with(tiny, capsys, extra):
    tmp_path, embeddings, embeds = tiny
    assert main(_args(tmp_path, embeddings, *extra)) == 0
    assert "from_pretrained" in capsys.readouterr().out
    out = tmp_path / "sched"
    scheduler = BespokeScheduler.from_pretrained(out)
    solver = load_solver(out / "solver.safetensors")
    assert scheduler.config.guidance_scale == 2.5 and scheduler.nfe == solver.nfe
    assert any(not torch.equal(a, b) for a, b in zip(solver.parameters(), type(solver)(*_ctor(solver)).parameters()))

    pipe = make_flux_pipe()
    pipe.scheduler = scheduler
    velocity = pipeline_velocity(pipe, height=H, width=W, guidance_scale=2.5)
    assert scheduler.config.trained_mu == pytest.approx(velocity.mu)
    latents = torch.randn(3, *velocity.latent_shape, generator=torch.Generator().manual_seed(8))
    got = pipe(**embeds, latents=latents, height=H, width=W, guidance_scale=2.5, output_type="latent",
               num_inference_steps=scheduler.steps).images
    want = bx.sample(velocity, latents, solver=solver, **embeds)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert torch.allclose(bx.sample(velocity, latents, solver=scheduler.to_solver(), **embeds), want, atol=1e-6, rtol=0)


def _ctor(solver):
    return (solver.steps, solver.order) if isinstance(solver, bx.BespokeSolver) else (solver.nfe, solver.base)


def test_bad_embeddings_files_are_clear_errors(tiny, capsys):
    tmp_path, _, embeds = tiny
    velocity = pipeline_velocity(make_flux_pipe(), height=H, width=W)

    def write(name, tensors):
        path = tmp_path / name
        save_file(tensors, str(path))
        return path

    cases = [({"prompt_embeds": embeds["prompt_embeds"], "pooled_prompt_embeds": embeds["pooled_prompt_embeds"][:2]},
              "same leading dimension"),
             ({"prompt_embeds": embeds["prompt_embeds"]}, r"needs \['pooled_prompt_embeds'\]"),
             ({**embeds, "text_ids": torch.zeros(3, 3)}, r"\['text_ids'\] are not inputs"),
             ({**embeds, "prompt_embeds": torch.zeros(3, 7, 16)}, "dim = 32")]
    for i, (tensors, match) in enumerate(cases):
        with pytest.raises(PipelineTrainingError, match=match):
            load_embeddings(write(f"bad{i}.safetensors", tensors), velocity)
    rows = load_embeddings(write("ok.safetensors", embeds), velocity, dtype=torch.bfloat16)
    assert rows["prompt_embeds"].dtype == torch.bfloat16 and set(rows) == set(embeds)

    # through the command: exit status 2 and the message, before any training
    assert main(_args(tmp_path, tmp_path / "bad0.safetensors")) == 2
    assert "same leading dimension" in capsys.readouterr().err
    args = _args(tmp_path, tmp_path / "ok.safetensors")
    args[1] = "tiny_pipelines:NotFlux"
    assert main(args) == 2
    assert "supports Flux and SD3" in capsys.readouterr().err
    assert main(_args(tmp_path, tmp_path / "missing.safetensors")) == 2
    assert "no such file" in capsys.readouterr().err
