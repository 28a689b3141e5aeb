"""A diffusers pipeline's transformer as a velocity field u(x, t) (t = 0 noise, t = 1 data).

``pipeline_velocity(pipe, height=..., width=...)`` returns a module ``model(x, t, prompt_embeds=...,
pooled_prompt_embeds=..., negative_prompt_embeds=..., negative_pooled_prompt_embeds=...)`` on the
pipeline's own latents (Flux: packed [B, L, 4C]; SD3: [B, C, h, w]) that calls the transformer exactly
as the pipeline's denoising loop does (the same timestep arithmetic and dtypes, the same guidance), and
returns u = -(model output), since diffusers' flow output is dx/dsigma with sigma = 1 - t. So
``bespoke_ext.sample(velocity, latents, method="euler", time_grid=1 - sigmas)`` is the pipeline run with
FlowMatchEulerDiscreteScheduler on those sigmas, and ``bespoke_ext.train(velocity, solver, conditions=
{"prompt_embeds": ..., "pooled_prompt_embeds": ...})`` trains a solver for the pipeline.

Guidance, as each pipeline applies it:
  - Flux: ``guidance_scale`` goes to the guidance embedding when ``transformer.config.guidance_embeds``
    (guidance-distilled: one forward per evaluation); ``true_cfg_scale`` > 1 with negative embeddings is
    the pipeline's true CFG, neg + s (cond - neg), two forwards.
  - SD3: ``guidance_scale`` > 1 is classifier-free guidance with the negative embeddings, one forward on
    [uncond, cond] stacked, uncond + g (cond - uncond).
``guidance_scale=None`` takes the pipeline's own default (``pipe.__call__``'s). Embeddings with one row
are expanded to the batch; otherwise they need one row per sample.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["pipeline_velocity", "FluxVelocity", "SD3Velocity", "FLUX_SHIFT_DEFAULTS"]

# The scheduler settings FluxPipeline computes its resolution shift mu from, with the defaults it uses
# when a scheduler's config lacks them (calculate_shift(image_seq_len, base_seq_len, max_seq_len,
# base_shift, max_shift): mu linear in the sequence length between the two anchors).
FLUX_SHIFT_DEFAULTS = dict(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)


def _call_default(pipe, name: str, fallback):
    param = inspect.signature(type(pipe).__call__).parameters.get(name)
    return fallback if param is None or param.default is inspect.Parameter.empty else param.default


class _Timestep(torch.autograd.Function):
    """sigma * 1000 = (1 - t) * 1000 in float32, rounded through float64 exactly as BespokeScheduler forms
    its timesteps (so pipeline and bx.sample see the same bits), with the gradient of (1 - t) * 1000: the
    learned time grid trains through the transformer's time input, as with any other model."""

    @staticmethod
    def forward(ctx, t: Tensor, scale: float) -> Tensor:
        ctx.scale, ctx.dtype = scale, t.dtype
        return ((1.0 - t.to(torch.float64)) * scale).to(torch.float32)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return (-ctx.scale * grad).to(ctx.dtype), None


def _timestep(t: Tensor, num_train_timesteps: float = 1000.0) -> Tensor:
    return _Timestep.apply(t, float(num_train_timesteps))


def _rows(e: Optional[Tensor], x: Tensor, name: str) -> Optional[Tensor]:
    """Prompt encodings for the latents x: one row per sample (a single row is repeated), in the dtype the
    transformer is called in (x's: a bf16 transformer gets bf16 x, a float32 text encoder gave float32)."""
    if e is None:
        return e
    batch = x.shape[0]
    if e.shape[0] == 1:
        e = e.expand(batch, *e.shape[1:])
    elif e.shape[0] != batch:
        raise ValueError(f"{name} has {e.shape[0]} rows; the latents have {batch} (pass one row, or one per sample)")
    return e.to(x.dtype) if e.is_floating_point() and e.dtype != x.dtype else e


def _check_shape(x: Tensor, shape: tuple, kind: str) -> None:
    if tuple(x.shape[1:]) != shape:
        raise ValueError(f"{kind} latents of this pipeline at the given height/width have per-sample shape {shape}, "
                         f"got {tuple(x.shape[1:])}")


class FluxVelocity(nn.Module):
    """FluxPipeline's transformer call (pipeline_flux.py's denoising loop) as a velocity field."""

    def __init__(self, transformer, image_ids: Tensor, latent_shape: tuple, guidance_scale: float,
                 true_cfg_scale: float = 1.0, mu: Optional[float] = None, shift_settings: Optional[dict] = None):
        super().__init__()
        self.transformer = transformer
        self.register_buffer("image_ids", image_ids, persistent=False)
        self.latent_shape = tuple(latent_shape)
        self.guidance_scale = float(guidance_scale)
        self.true_cfg_scale = float(true_cfg_scale)
        self.mu = mu  # the pipeline's dynamic shift at this resolution (for BespokeScheduler's trained_mu)
        self.shift_settings = dict(shift_settings or {})   # the scheduler settings mu was computed from

    @property
    def scheduler_settings(self) -> dict:
        """BespokeScheduler.from_solver's settings for a solver trained on this field: the trained mu, its
        sequence length and guidance, and the shift settings FluxPipeline computes a run's mu from (read
        from the scheduler's config, so a BespokeScheduler must carry the ones this mu came from)."""
        return dict(trained_mu=self.mu, trained_seq_len=int(self.latent_shape[0]), guidance_scale=self.guidance_scale,
                    trained_latent_shape=list(self.latent_shape), **self.shift_settings)

    def _forward(self, x: Tensor, timestep: Tensor, embeds: Tensor, pooled: Tensor) -> Tensor:
        tr = self.transformer
        guidance = None
        if tr.config.guidance_embeds:
            guidance = torch.full([1], self.guidance_scale, device=x.device, dtype=torch.float32).expand(x.shape[0])
        txt_ids = torch.zeros(embeds.shape[1], 3, device=x.device, dtype=tr.dtype)
        return tr(hidden_states=x, timestep=timestep / 1000, guidance=guidance, pooled_projections=pooled,
                  encoder_hidden_states=embeds, txt_ids=txt_ids, img_ids=self.image_ids.to(x.device, x.dtype),
                  return_dict=False)[0]

    def forward(self, x: Tensor, t: Tensor, prompt_embeds: Tensor, pooled_prompt_embeds: Tensor,
                negative_prompt_embeds: Optional[Tensor] = None,
                negative_pooled_prompt_embeds: Optional[Tensor] = None) -> Tensor:
        _check_shape(x, self.latent_shape, "Flux (packed)")
        b = x.shape[0]
        timestep = _timestep(t).expand(b).to(x.dtype)
        out = self._forward(x, timestep, _rows(prompt_embeds, x, "prompt_embeds"),
                            _rows(pooled_prompt_embeds, x, "pooled_prompt_embeds"))
        if self.true_cfg_scale > 1 and negative_prompt_embeds is not None and negative_pooled_prompt_embeds is not None:
            neg = self._forward(x, timestep, _rows(negative_prompt_embeds, x, "negative_prompt_embeds"),
                                _rows(negative_pooled_prompt_embeds, x, "negative_pooled_prompt_embeds"))
            out = neg + self.true_cfg_scale * (out - neg)
        return (-out).to(x.dtype)


class SD3Velocity(nn.Module):
    """StableDiffusion3Pipeline's transformer call (with its CFG) as a velocity field."""

    def __init__(self, transformer, latent_shape: tuple, guidance_scale: float):
        super().__init__()
        self.transformer = transformer
        self.latent_shape = tuple(latent_shape)
        self.guidance_scale = float(guidance_scale)

    @property
    def scheduler_settings(self) -> dict:
        """BespokeScheduler.from_solver's settings for a solver trained on this field (SD3's shift is fixed:
        no mu to record; the latents' shape tells the resolution)."""
        return dict(guidance_scale=self.guidance_scale, trained_latent_shape=list(self.latent_shape))

    def forward(self, x: Tensor, t: Tensor, prompt_embeds: Tensor, pooled_prompt_embeds: Tensor,
                negative_prompt_embeds: Optional[Tensor] = None,
                negative_pooled_prompt_embeds: Optional[Tensor] = None) -> Tensor:
        _check_shape(x, self.latent_shape, "SD3")
        b = x.shape[0]
        embeds = _rows(prompt_embeds, x, "prompt_embeds")
        pooled = _rows(pooled_prompt_embeds, x, "pooled_prompt_embeds")
        cfg = self.guidance_scale > 1
        if cfg:
            if negative_prompt_embeds is None or negative_pooled_prompt_embeds is None:
                raise ValueError("SD3 with guidance_scale > 1 applies classifier-free guidance: pass "
                                 "negative_prompt_embeds and negative_pooled_prompt_embeds (e.g. the encoding of '')")
            embeds = torch.cat([_rows(negative_prompt_embeds, x, "negative_prompt_embeds"), embeds])
            pooled = torch.cat([_rows(negative_pooled_prompt_embeds, x, "negative_pooled_prompt_embeds"), pooled])
            x_in = torch.cat([x, x])
        else:
            x_in = x
        timestep = _timestep(t).expand(b)  # 0-dim (sampling) or one per sample (training)
        timestep = torch.cat([timestep, timestep]) if cfg else timestep
        out = self.transformer(hidden_states=x_in, timestep=timestep, encoder_hidden_states=embeds,
                               pooled_projections=pooled, return_dict=False)[0]
        if cfg:
            uncond, text = out.chunk(2)
            out = uncond + self.guidance_scale * (text - uncond)
        return (-out).to(x.dtype)


def pipeline_velocity(pipe, *, height: int, width: int, guidance_scale: Optional[float] = None,
                      true_cfg_scale: float = 1.0) -> nn.Module:
    """The pipeline's transformer as a velocity model on its latents at ``height`` x ``width`` pixels
    (module docstring). Flux (FluxTransformer2DModel) and SD3 (SD3Transformer2DModel) pipelines."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    transformer = getattr(pipe, "transformer", None)
    vsf = pipe.vae_scale_factor
    if isinstance(transformer, FluxTransformer2DModel):
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        g = _call_default(pipe, "guidance_scale", 3.5) if guidance_scale is None else guidance_scale
        lh, lw = 2 * (int(height) // (vsf * 2)), 2 * (int(width) // (vsf * 2))
        channels = transformer.config.in_channels // 4
        ids = pipe._prepare_latent_image_ids(1, lh // 2, lw // 2, torch.device("cpu"), torch.float32)
        seq_len = (lh // 2) * (lw // 2)
        cfg = pipe.scheduler.config if getattr(pipe, "scheduler", None) is not None else {}
        shift = {k: cfg.get(k, default) for k, default in FLUX_SHIFT_DEFAULTS.items()}   # as FluxPipeline reads them
        mu = calculate_shift(seq_len, shift["base_image_seq_len"], shift["max_image_seq_len"], shift["base_shift"],
                             shift["max_shift"])
        return FluxVelocity(transformer, ids, (seq_len, channels * 4), g, true_cfg_scale, mu=float(mu),
                            shift_settings=shift)
    if isinstance(transformer, SD3Transformer2DModel):
        g = _call_default(pipe, "guidance_scale", 7.0) if guidance_scale is None else guidance_scale
        shape = (transformer.config.in_channels, int(height) // vsf, int(width) // vsf)
        return SD3Velocity(transformer, shape, g)
    raise NotImplementedError(f"pipeline_velocity supports Flux and SD3 pipelines (FluxTransformer2DModel, "
                              f"SD3Transformer2DModel); {type(pipe).__name__} has {type(transformer).__name__}")
