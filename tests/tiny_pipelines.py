"""Tiny diffusers pipelines built from configs (no downloads: no VAE, text encoders or tokenizers; prompt
embeddings are given), shared by the integration and train-pipeline tests. Importable as a module, so the
command line can name them as ``tiny_pipelines:make_flux_pipe``."""

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

import transformers  # noqa: F401  (without it diffusers' FluxPipeline is a dummy object)


def make_flux_pipe() -> FluxPipeline:
    """A FluxPipeline with a 1 + 1 block transformer (2 heads of 16, joint and pooled dims 32, guidance
    embeddings) and dynamic shifting; the same weights on every call (seeded)."""
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=None,
                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                        transformer=transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


class NotFlux:
    """Has a transformer, but is no pipeline that pipeline_velocity supports."""

    transformer = torch.nn.Linear(2, 2)
    vae_scale_factor = 8
