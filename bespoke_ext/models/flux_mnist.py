"""The embedded diffusers-format model: a tiny ``diffusers.FluxTransformer2DModel`` trained on MNIST.

Layout (no VAE; the pipeline runs with ``output_type="latent"`` and the latents are the image):

    image [B, 1, 28, 28]  --pixel_unshuffle(2)-->  latent [B, 4, 14, 14]  --Flux 2x2 pack-->  [B, 49, 16]

``images_to_latents`` / ``latents_to_images`` are exact inverses (a fixed permutation of the pixels), so
RMSE and PSNR are the same in either space. FluxPipeline is called with ``height = width = 112``: the
14x14 latent times its ``vae_scale_factor`` of 8 without a VAE. Its 49 image tokens of 16 values each
(a 4x4 pixel patch) go through the transformer.

Class labels are the prompts: a learned table (``ClassEmbeddings``, stored with the weights) maps label
0-9, and the null label 10 of classifier-free guidance (trained with 10% label dropout), to
``prompt_embeds`` [1, PROMPT_TOKENS, joint_attention_dim] and ``pooled_prompt_embeds`` [1, pooled dim].

Training objective, diffusers' rectified-flow convention (FluxPipeline): x_sigma = (1 - sigma) x_data +
sigma noise, sigma ~ U[0, 1]; the transformer, called with ``timestep = sigma`` (what FluxPipeline passes:
its timestep / 1000), predicts noise - data = dx/dsigma. In the package's time t = 1 - sigma (t = 0 noise)
the velocity is u = -(transformer output): ``FluxMNIST.forward(x, t, y)`` is that velocity on images.

    model = load_embedded("flux_mnist").net            # FluxMNIST (checked against its card's sha256)
    pipe = build_pipeline(model)                       # diffusers.FluxPipeline, FLUX.1's scheduler config
    latents = images_to_latents(torch.randn(4, 1, 28, 28))
    out = pipe(**model.embeds(torch.tensor([0, 1, 2, 3])), latents=latents, height=HEIGHT, width=WIDTH,
               num_inference_steps=8, output_type="latent").images
    digits = latents_to_images(out)                    # [4, 1, 28, 28] in about [-1, 1]
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import data as data_mod
from ._time import as_time, per_sample_time
from .nets import build_net

__all__ = ["NAME", "HEIGHT", "WIDTH", "IMAGE_SHAPE", "LATENT_SHAPE", "NULL_LABEL", "SCHEDULER_CONFIG",
           "FluxMNIST", "ClassEmbeddings", "build_model", "build_pipeline", "images_to_latents",
           "latents_to_images", "pretrain_flux"]

NAME = "flux_mnist"
IMAGE_SHAPE = (1, 28, 28)
LATENT_CHANNELS = 4             # the 2x2 pixel-unshuffle of a 28x28 digit: [4, 14, 14]
LATENT_SIZE = 14
VAE_SCALE_FACTOR = 8            # FluxPipeline's value without a VAE
HEIGHT = WIDTH = LATENT_SIZE * VAE_SCALE_FACTOR  # 112 "pixels": what the pipeline is called with
LATENT_SHAPE = ((LATENT_SIZE // 2) ** 2, 4 * LATENT_CHANNELS)  # packed: 49 tokens of 16
NUM_CLASSES = 10
NULL_LABEL = NUM_CLASSES
# FLUX.1's scheduler_config.json (dynamic shifting: mu from the sequence length, 49 tokens -> mu 0.465)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
# -- the latent layout ---------------------------------------------------------------------------------

def images_to_latents(x: Tensor) -> Tensor:
    """[B, 1, 28, 28] images -> [B, 49, 16] packed Flux latents (pixel-unshuffle 2, then Flux's 2x2 pack)."""
    if tuple(x.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(f"images must be [B, {', '.join(map(str, IMAGE_SHAPE))}], got {tuple(x.shape)}")
    z = F.pixel_unshuffle(x, 2)  # [B, 4, 14, 14]
    b, c, h, w = z.shape
    z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # FluxPipeline._pack_latents
    return z.reshape(b, (h // 2) * (w // 2), c * 4)


def latents_to_images(z: Tensor) -> Tensor:
    """The inverse of :func:`images_to_latents`: [B, 49, 16] -> [B, 1, 28, 28]."""
    if tuple(z.shape[1:]) != LATENT_SHAPE:
        raise ValueError(f"packed latents must be [B, {', '.join(map(str, LATENT_SHAPE))}], got {tuple(z.shape)}")
    b, h = z.shape[0], LATENT_SIZE
    z = z.reshape(b, h // 2, h // 2, LATENT_CHANNELS, 2, 2).permute(0, 3, 1, 4, 2, 5)  # _unpack_latents
    return F.pixel_shuffle(z.reshape(b, LATENT_CHANNELS, h, h), 2)


def _image_ids() -> Tensor:
    """FluxPipeline._prepare_latent_image_ids for the 7x7 token grid: (0, row, column) per token."""
    n = LATENT_SIZE // 2
    ids = torch.zeros(n, n, 3)
    ids[..., 1] = torch.arange(n)[:, None]
    ids[..., 2] = torch.arange(n)[None, :]
    return ids.reshape(n * n, 3)


# -- the model -------------------------------------------------------------------------------------------

class ClassEmbeddings(nn.Module):
    """Label -> (prompt_embeds [tokens, joint_dim], pooled_prompt_embeds [pooled_dim]); row NULL_LABEL
    is the null prompt (the unconditional model)."""

    def __init__(self, num_labels: int, tokens: int, joint_dim: int, pooled_dim: int):
        super().__init__()
        g = torch.Generator().manual_seed(0)  # overwritten by training / loading; fixed for reproducibility
        self.prompt = nn.Parameter(torch.randn(num_labels, tokens, joint_dim, generator=g))
        self.pooled = nn.Parameter(torch.randn(num_labels, pooled_dim, generator=g))

    def forward(self, labels: Tensor):
        labels = torch.as_tensor(labels, device=self.prompt.device).long().reshape(-1)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.prompt.shape[0]):
            raise ValueError(f"labels must lie in [0, {self.prompt.shape[0] - 1}], got {labels.tolist()}")
        return self.prompt[labels], self.pooled[labels]


class FluxMNIST(nn.Module):
    """The transformer and its class-embedding table. ``forward(x, t, y=None)``: the velocity u(x, t) on
    images [B, 1, 28, 28] for labels y ([B] or one label; default the null label), t = 0 noise, computed
    as FluxPipeline calls its transformer (module docstring)."""

    def __init__(self, transformer: dict, prompt_tokens: int = 4, num_classes: int = NUM_CLASSES):
        super().__init__()
        from diffusers import FluxTransformer2DModel

        self.transformer = FluxTransformer2DModel(**transformer)
        self.num_classes = int(num_classes)
        self.class_embeddings = ClassEmbeddings(self.num_classes + 1, int(prompt_tokens),
                                                transformer["joint_attention_dim"], transformer["pooled_projection_dim"])
        self.register_buffer("image_ids", _image_ids(), persistent=False)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def embeds(self, labels) -> Dict[str, Tensor]:
        """The pipeline's prompt inputs for ``labels``: {"prompt_embeds", "pooled_prompt_embeds"}, a row each."""
        prompt, pooled = self.class_embeddings(labels)
        return {"prompt_embeds": prompt, "pooled_prompt_embeds": pooled}

    def predict(self, latents: Tensor, sigma: Tensor, labels) -> Tensor:
        """The transformer's output (noise - data) on packed latents at noise level sigma ([B])."""
        e = self.embeds(labels)
        b = latents.shape[0]
        prompt, pooled = (v.expand(b, *v.shape[1:]) if v.shape[0] == 1 else v for v in e.values())
        txt_ids = torch.zeros(prompt.shape[1], 3, device=latents.device, dtype=latents.dtype)
        return self.transformer(hidden_states=latents, timestep=sigma, encoder_hidden_states=prompt,
                                pooled_projections=pooled, txt_ids=txt_ids,
                                img_ids=self.image_ids.to(latents.device, latents.dtype), return_dict=False)[0]

    def forward(self, x: Tensor, t, y=None, **extras) -> Tensor:
        if extras:
            raise TypeError(f"FluxMNIST takes x, t and labels y; got extra inputs {sorted(extras)}")
        t = per_sample_time(as_time(t, x), x.shape[0])
        # FluxPipeline's arithmetic: timestep = sigma * 1000 in float32, divided by 1000 for the transformer
        sigma = (((1.0 - t.to(torch.float64)) * 1000.0).to(torch.float32) / 1000).to(x.dtype)
        labels = torch.full((1,), self.null_label) if y is None else y
        return -latents_to_images(self.predict(images_to_latents(x), sigma, labels))


def build_model(kwargs: Optional[dict] = None) -> FluxMNIST:
    """A freshly initialised FluxMNIST from architecture kwargs (a card's ``architecture.kwargs``; default
    the flux_mnist pretraining preset's, models/pretrain.py)."""
    from .pretrain import PRESETS

    return build_net("FluxMNIST", copy.deepcopy(PRESETS[NAME]["net_kwargs"] if kwargs is None else kwargs))


def build_pipeline(model: FluxMNIST, scheduler=None):
    """A diffusers FluxPipeline around ``model.transformer``: no VAE, no text encoders or tokenizers (the
    prompts are ``model.embeds(labels)``), FlowMatchEulerDiscreteScheduler with FLUX.1's config unless
    ``scheduler`` is given. Call it with ``height=HEIGHT, width=WIDTH, output_type="latent"``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    pipe = FluxPipeline(scheduler=scheduler or FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=None,
                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                        transformer=model.transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- pretraining -----------------------------------------------------------------------------------------

def _loss(model: FluxMNIST, x1: Tensor, noise: Tensor, sigma: Tensor, labels: Tensor) -> Tensor:
    """|| transformer(x_sigma, sigma) - (noise - data) ||^2 on packed latents (diffusers' convention)."""
    z1, z0 = images_to_latents(x1), images_to_latents(noise)
    s = sigma.view(-1, 1, 1)
    return (model.predict((1 - s) * z1 + s * z0, sigma, labels) - (z0 - z1)).pow(2).mean()


@torch.no_grad()
def _heldout_loss(model: FluxMNIST, seed: int) -> float:
    x1, labels = data_mod.mnist(split="test", return_labels=True)
    g = torch.Generator().manual_seed(seed + 2)
    noise, sigma = torch.randn(x1.shape, generator=g), torch.rand(x1.shape[0], generator=g)
    total = sum(_loss(model, x1[i:i + 100], noise[i:i + 100], sigma[i:i + 100], labels[i:i + 100]).item()
                * len(x1[i:i + 100]) for i in range(0, len(x1), 100))
    return total / len(x1)


def pretrain_flux(name: str, cfg: dict, out: Path, iters: int, bs: int, seed: int = 0, progress: bool = True,
                  weights_dtype: str = "float32") -> dict:
    """Train the FluxMNIST preset ``cfg`` (models/pretrain.py's PRESETS entry) and write
    ``<out>/<name>.safetensors`` and its card ``<name>.json``, as ``pretrain`` does for the other presets."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from .pretrain import CARD_FORMAT_VERSION, _machine, sha256_file, training_state, training_step

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    dataset, labels = data_mod.load_dataset(cfg["data"], **cfg["data_kwargs"], return_labels=True)
    model = build_net(cfg["net"], cfg["net_kwargs"])
    ema, opt, sched = training_state(model, cfg, iters)  # Adam: AdamW without weight decay, as trained
    null = model.null_label

    start, cpu_start = time.perf_counter(), time.process_time()
    curve, running = [], []
    bar = tqdm(range(iters), desc=f"pretrain {name}", disable=not progress, mininterval=1.0)
    for step in bar:
        idx = torch.randint(0, dataset.shape[0], (bs,), generator=gen)
        x1 = dataset[idx]
        noise = torch.randn(x1.shape, generator=gen)
        sigma = torch.rand(bs, generator=gen)
        drop = torch.rand(bs, generator=gen) < cfg["label_dropout"]  # the null label: the unconditional model
        y = torch.where(drop, torch.full_like(labels[idx], null), labels[idx])
        loss = _loss(model, x1, noise, sigma, y)
        training_step(loss, model, ema, opt, sched, step, cfg, running, curve, bar, iters)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    tail = running[-max(1, iters // 20):]
    ema.eval()
    heldout = _heldout_loss(ema, seed)

    dtype = {"float32": torch.float32, "float16": torch.float16}[weights_dtype]
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in ema.state_dict().items()}
    wpath = out / f"{name}.safetensors"
    save_file(tensors, str(wpath), metadata={"format": "pt"})
    os.chmod(wpath, 0o644)
    import diffusers

    card = {
        "format_version": CARD_FORMAT_VERSION,
        "name": name,
        "description": cfg["description"],
        "data": {"name": cfg["data"], "options": cfg["data_kwargs"], "num_samples": int(dataset.shape[0]),
                 "range": [-1.0, 1.0]},
        "shape": list(cfg["shape"]),
        "architecture": {"class": cfg["net"], "kwargs": cfg["net_kwargs"],
                         "num_parameters": sum(p.numel() for p in model.parameters()),
                         "transformer_parameters": sum(p.numel() for p in model.transformer.parameters())},
        "prediction": cfg["prediction"],
        "schedule": {"name": "ot"},
        "path": "x_t = t x1 + (1 - t) x0 (t = 1 - sigma: diffusers' x_sigma = (1 - sigma) data + sigma noise)",
        "conditioning": {"key": "y", "num_classes": null, "null_label": null, "label_dropout": cfg["label_dropout"],
                         "guidance": "ClassifierFreeGuidance(velocity, w, cond_key='y', null_value=null_label), or "
                                     "FluxPipeline's true_cfg_scale with the null label's embeddings as negatives"},
        "diffusers": {"pipeline": "FluxPipeline", "transformer": "FluxTransformer2DModel",
                      "diffusers_version": diffusers.__version__, "height": HEIGHT, "width": WIDTH,
                      "latent_shape": list(LATENT_SHAPE), "scheduler_config": SCHEDULER_CONFIG,
                      "latents": "images_to_latents: pixel_unshuffle(2) then Flux's 2x2 pack; output_type='latent'"},
        "training": {
            "objective": ("mean square error of the transformer output to noise - data at x_sigma = (1 - sigma) data "
                          "+ sigma noise, sigma ~ U[0, 1], timestep = sigma (FluxPipeline's timestep / 1000)"),
            "iterations": iters, "batch_size": bs, "lr": cfg["lr"], "optimizer": "AdamW (no weight decay)",
            "lr_schedule": f"linear warm-up {min(cfg['warmup'], iters)} steps, cosine decay to 0.02 x lr",
            "grad_clip": cfg["grad_clip"], "ema_decay": cfg["ema_decay"], "exported": "EMA weights",
            "seed": seed, "final_loss": sum(tail) / len(tail),
            "final_loss_definition": "mean training loss over the last 5% of iterations",
            "heldout_loss": heldout, "loss_curve": curve[:: max(1, len(curve) // 50)],
            "wall_clock_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1), "machine": _machine(),
        },
        "weights": {"file": wpath.name, "dtype": weights_dtype, "bytes": wpath.stat().st_size,
                    "sha256": sha256_file(wpath)},
    }
    with open(out / f"{name}.json", "w") as f:
        json.dump(card, f, indent=2)
        f.write("\n")
    return card
