"""Seeded, reproducible flow-matching pretraining of the embedded models.

Loss (conditional path, x_t = alpha_t x1 + sigma_t x0, x0 ~ N(0, I), x1 ~ data, t ~ U[0, 1]):

    L = E || f_theta(x_t, t) - target ||^2,   target = alpha'_t x1 + sigma'_t x0   (velocity)
                                                       x0                          (noise)
                                                       x1                          (data)

For the OT path the velocity target is x1 - x0. Adam with linear warm-up then cosine decay, gradient
clipping, and an exponential moving average (EMA) of the weights; the EMA weights are exported.

Presets (``PRESETS``):
    moons2d    MLP, two-moons 2-D data, velocity, OT path
    mnist      U-Net, 4500 real MNIST digits 1x28x28, velocity, OT path
    digits_vp  U-Net, sklearn 8x8 digits, NOISE prediction, VP schedule (use via VelocityAdapter)
    mnist_cond class-conditional U-Net, 4500 real MNIST digits with their labels, velocity, OT path;
               labels dropped to the null label 10% of the time, so one network is both the
               conditional and the unconditional model of classifier-free guidance. It starts
               from the mnist preset's shipped weights with a zero label embedding (so at step 0
               it is exactly the unconditional model) and learns the labels on top; its card's
               wall-clock counts both trainings.
    flux_mnist a tiny diffusers FluxTransformer2DModel with learned class embeddings as prompts, real MNIST
               digits with labels, diffusers' rectified-flow objective (models/flux_mnist.py), 10% label
               dropout; runs in diffusers' FluxPipeline

``pretrain(name, out_dir)`` writes ``<name>.safetensors`` and the model card ``<name>.json``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Optional

import torch

from . import data as data_mod
from .nets import NETS, build_net
from .schedules import get_schedule

__all__ = ["PRESETS", "pretrain", "flow_matching_loss", "sha256_file", "CARD_FORMAT_VERSION"]

CARD_FORMAT_VERSION = 1

PRESETS = {
    "moons2d": dict(
        description="MLP velocity field for the two-moons 2-D toy data (OT path)",
        data="moons", data_kwargs=dict(n=100000), shape=(2,),
        net="MLPVelocity", net_kwargs=dict(dim=2, hidden=256, layers=4, time_dim=64),
        prediction="velocity", schedule={"name": "ot"},
        iterations=6000, batch_size=512, lr=2e-3, warmup=200, ema_decay=0.999, grad_clip=1.0,
    ),
    "mnist": dict(
        description="U-Net velocity field for 28x28 MNIST digits (OT path), 4500 training digits",
        data="mnist", data_kwargs=dict(split="train"), shape=(1, 28, 28),
        net="UNetVelocity", net_kwargs=dict(in_channels=1, channels=[16, 32], time_dim=64, groups=8, attention=True),
        prediction="velocity", schedule={"name": "ot"},
        iterations=7000, batch_size=64, lr=2e-3, warmup=300, ema_decay=0.9995, grad_clip=1.0,
    ),
    "mnist_cond": dict(
        description=("class-conditional U-Net velocity field for 28x28 MNIST digits (OT path), 4500 training digits; "
                     "labels 0-9 as y, 10 = null label (classifier-free guidance)"),
        data="mnist", data_kwargs=dict(split="train"), shape=(1, 28, 28),
        net="UNetVelocity",
        net_kwargs=dict(in_channels=1, channels=[16, 32], time_dim=64, groups=8, attention=True, num_classes=10),
        prediction="velocity", schedule={"name": "ot"}, label_dropout=0.1, init_from="mnist",
        iterations=1500, batch_size=64, lr=1e-3, warmup=100, ema_decay=0.998, grad_clip=1.0,
    ),
    "flux_mnist": dict(
        description=("tiny diffusers FluxTransformer2DModel for 28x28 MNIST digits (rectified flow, diffusers' "
                     "convention), 4500 training digits; labels 0-9 as learned prompt embeddings, 10 = null prompt"),
        data="mnist", data_kwargs=dict(split="train"), shape=(1, 28, 28), trainer="flux_mnist",
        net="FluxMNIST", prediction="noise - data (diffusers flow output; velocity = -output)",
        net_kwargs=dict(transformer=dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 6, 6], guidance_embeds=False),
                        prompt_tokens=4, num_classes=10),
        schedule={"name": "ot"}, label_dropout=0.1,
        iterations=2800, batch_size=128, lr=1e-3, warmup=200, ema_decay=0.999, grad_clip=1.0,
    ),
    "digits_vp": dict(
        description="U-Net noise predictor for sklearn 8x8 digits under the VP schedule",
        data="digits8", data_kwargs=dict(split="train"), shape=(1, 8, 8),
        net="UNetVelocity", net_kwargs=dict(in_channels=1, channels=[32, 64], time_dim=64, groups=8, attention=True),
        prediction="noise", schedule={"name": "vp", "beta_min": 0.1, "beta_max": 20.0},
        iterations=8000, batch_size=128, lr=2e-3, warmup=300, ema_decay=0.9995, grad_clip=1.0,
    ),
}


def _flux_mnist(**kwargs):
    """The flux_mnist preset's network (models/flux_mnist.py; it imports diffusers, hence lazily)."""
    from .flux_mnist import FluxMNIST

    return FluxMNIST(**kwargs)


NETS.setdefault("FluxMNIST", _flux_mnist)  # so build_net and the model cards know it


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def flow_matching_loss(net, x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, prediction: str, schedule,
                       **extras) -> torch.Tensor:
    """Mean square error between net(x_t, t, **extras) and the conditional target of ``prediction``."""
    sch = get_schedule(schedule)
    view = (-1,) + (1,) * (x1.dim() - 1)
    a, s = sch.alpha(t).view(view), sch.sigma(t).view(view)
    xt = a * x1 + s * x0
    if prediction == "velocity":
        target = sch.d_alpha(t).view(view) * x1 + sch.d_sigma(t).view(view) * x0
    elif prediction == "noise":
        target = x0
    elif prediction == "data":
        target = x1
    else:
        raise ValueError(f"prediction must be 'velocity', 'noise' or 'data', got {prediction!r}")
    return (net(xt, t, **extras) - target).pow(2).mean()


def training_state(net, cfg: dict, iters: int):
    """(EMA copy, Adam, lr schedule: warm-up then cosine) of a pretraining run (every preset's)."""
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=cfg["lr"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, iters, min(cfg["warmup"], iters)))
    return ema, opt, sched


def training_step(loss: torch.Tensor, net, ema, opt, sched, step: int, cfg: dict, running: list, curve: list, bar,
                  iters: int) -> None:
    """One optimiser step of a pretraining loop (every preset's): backward, gradient clipping, Adam, the lr
    schedule, the EMA, and the loss curve (a point per 100 iterations, shown on the progress bar)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), cfg["grad_clip"])
    opt.step()
    sched.step()
    # EMA with a short warm-up so early weights do not linger in the average
    d = min(cfg["ema_decay"], (1.0 + step) / (10.0 + step))
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), net.parameters()):
            pe.lerp_(p, 1.0 - d)
        for be, b in zip(ema.buffers(), net.buffers()):
            be.copy_(b)
    running.append(loss.item())
    if (step + 1) % 100 == 0 or step + 1 == iters:
        curve.append([step + 1, sum(running[-100:]) / len(running[-100:])])
        bar.set_postfix(loss=f"{curve[-1][1]:.4f}")


def _init_from(net, name: str) -> dict:
    """Load the shipped weights of preset ``name`` into ``net`` (whose extra parameters, a label
    embedding, start at zero: the loaded model's field exactly); returns what was loaded."""
    from safetensors.torch import load_file

    from .embedded import WEIGHTS_DIR, read_card

    card = read_card(name)
    path = WEIGHTS_DIR / card["weights"]["file"]
    if sha256_file(path) != card["weights"]["sha256"]:
        raise ValueError(f"init_from {name!r}: weights file {path} does not match its card")
    missing, unexpected = net.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()}, strict=False)
    if unexpected or any(not k.startswith("label_embed.") for k in missing):
        raise ValueError(f"init_from {name!r}: weights do not fit (missing {missing}, unexpected {unexpected})")
    with torch.no_grad():
        net.label_embed.weight.zero_()
    return {"model": name, "weights_sha256": card["weights"]["sha256"],
            "wall_clock_seconds": card["training"]["wall_clock_seconds"]}


def _lr_factor(step: int, total: int, warmup: int, final: float = 0.02) -> float:
    """Linear warm-up to 1, then cosine decay to ``final``."""
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, p)))


def _machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
    }


@torch.no_grad()
def _heldout_loss(net, cfg, sch, seed: int, n: int = 1000) -> Optional[float]:
    """Loss of the exported (EMA) weights on held-out data with fixed noise and times."""
    labels = None
    if cfg["data"] == "moons":
        x1 = data_mod.moons(n=n, seed=seed + 1)
    elif cfg["data"] in ("mnist", "digits8"):
        x1, labels = data_mod.load_dataset(cfg["data"], split="test", return_labels=True)
        x1, labels = x1[:n], labels[:n]
    else:
        return None
    g = torch.Generator().manual_seed(seed + 2)
    x0 = torch.randn(x1.shape, generator=g)
    t = torch.rand(x1.shape[0], generator=g)
    conditional = "label_dropout" in cfg

    def loss(i):
        extras = {"y": labels[i:i + 250]} if conditional else {}
        return flow_matching_loss(net, x1[i:i + 250], x0[i:i + 250], t[i:i + 250], cfg["prediction"], sch, **extras)

    losses = [loss(i).item() * len(x1[i:i + 250]) for i in range(0, len(x1), 250)]
    return sum(losses) / len(x1)


def pretrain(name: str, out_dir=None, iterations: Optional[int] = None, seed: int = 0, progress: bool = True,
             batch_size: Optional[int] = None, weights_dtype: str = "float32") -> dict:
    """Train preset ``name`` and write ``<out_dir>/<name>.safetensors`` and ``<name>.json``.

    Args:
        name: a key of PRESETS.
        out_dir: output folder (created); default the package's weights folder.
        iterations, batch_size: override the preset.
        seed: seeds the initial weights, the data order, the noise and the times.
        progress: show a tqdm bar.
        weights_dtype: "float32" or "float16" for the exported weights.
    Returns the model card (also written as JSON).
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    if name not in PRESETS:
        raise ValueError(f"name: unknown pretraining preset {name!r}; expected one of {sorted(PRESETS)}")
    if weights_dtype not in ("float32", "float16"):
        raise ValueError(f"weights_dtype must be 'float32' or 'float16', got {weights_dtype!r}")
    cfg = copy.deepcopy(PRESETS[name])
    iters = int(cfg["iterations"] if iterations is None else iterations)
    bs = int(cfg["batch_size"] if batch_size is None else batch_size)
    if iters < 1 or bs < 1:
        raise ValueError(f"iterations and batch_size must be >= 1, got {iters}, {bs}")
    out = Path(out_dir) if out_dir is not None else Path(__file__).parent / "weights"
    out.mkdir(parents=True, exist_ok=True)
    if cfg.get("trainer") == "flux_mnist":  # a diffusers transformer: its own loop (models/flux_mnist.py)
        from .flux_mnist import pretrain_flux

        return pretrain_flux(name, cfg, out, iters, bs, seed=seed, progress=progress, weights_dtype=weights_dtype)

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    sch = get_schedule(cfg["schedule"])
    conditional = "label_dropout" in cfg
    if conditional:
        dataset, labels = data_mod.load_dataset(cfg["data"], **cfg["data_kwargs"], return_labels=True)
        null_label = cfg["net_kwargs"]["num_classes"]
    else:
        dataset = data_mod.load_dataset(cfg["data"], **({**cfg["data_kwargs"], "seed": seed} if cfg["data"] == "moons" else cfg["data_kwargs"]))
    net = build_net(cfg["net"], cfg["net_kwargs"])
    base = _init_from(net, cfg["init_from"]) if "init_from" in cfg else None
    ema, opt, sched = training_state(net, cfg, iters)

    start, cpu_start = time.perf_counter(), time.process_time()
    curve, running = [], []
    bar = tqdm(range(iters), desc=f"pretrain {name}", disable=not progress, mininterval=1.0)
    for step in bar:
        idx = torch.randint(0, dataset.shape[0], (bs,), generator=gen)
        x1 = dataset[idx]
        x0 = torch.randn(x1.shape, generator=gen)
        t = torch.rand(bs, generator=gen)
        extras = {}
        if conditional:  # label dropout: the null label teaches the unconditional model
            drop = torch.rand(bs, generator=gen) < cfg["label_dropout"]
            extras["y"] = torch.where(drop, torch.full_like(labels[idx], null_label), labels[idx])
        loss = flow_matching_loss(net, x1, x0, t, cfg["prediction"], sch, **extras)
        training_step(loss, net, ema, opt, sched, step, cfg, running, curve, bar, iters)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    tail = running[-max(1, iters // 20):]
    final_loss = sum(tail) / len(tail)
    ema.eval()
    heldout = _heldout_loss(ema, cfg, sch, seed)

    dtype = {"float32": torch.float32, "float16": torch.float16}[weights_dtype]
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in ema.state_dict().items()}
    wpath = out / f"{name}.safetensors"
    # one metadata key only: safetensors writes a metadata map in hash order, which would make the
    # file (and its sha256) differ between identical runs
    save_file(tensors, str(wpath), metadata={"format": "pt"})
    os.chmod(wpath, 0o644)  # safetensors creates the file owner-only; shipped data must be readable
    n_data = int(dataset.shape[0])
    card = {
        "format_version": CARD_FORMAT_VERSION,
        "name": name,
        "description": cfg["description"],
        "data": {"name": cfg["data"], "options": cfg["data_kwargs"], "num_samples": n_data, "range": [-1.0, 1.0]},
        "shape": list(cfg["shape"]),
        "architecture": {"class": cfg["net"], "kwargs": cfg["net_kwargs"],
                         "num_parameters": sum(p.numel() for p in net.parameters())},
        "prediction": cfg["prediction"],
        "schedule": sch.to_dict(),
        "path": "x_t = alpha_t x1 + sigma_t x0, t = 0 noise, t = 1 data",
        **({"conditioning": {"key": "y", "num_classes": null_label, "null_label": null_label,
                             "label_dropout": cfg["label_dropout"],
                             "guidance": "ClassifierFreeGuidance(velocity, w, cond_key='y', null_value=null_label)"}}
           if conditional else {}),
        "training": {
            "objective": f"mean square error to the conditional {cfg['prediction']} target, t ~ U[0, 1]",
            "iterations": iters, "batch_size": bs, "lr": cfg["lr"], "optimizer": "Adam",
            "lr_schedule": f"linear warm-up {min(cfg['warmup'], iters)} steps, cosine decay to 0.02 x lr",
            "grad_clip": cfg["grad_clip"], "ema_decay": cfg["ema_decay"], "exported": "EMA weights",
            "seed": seed,
            "final_loss": final_loss,
            "final_loss_definition": "mean training loss over the last 5% of iterations",
            "heldout_loss": heldout,
            "loss_curve": curve[:: max(1, len(curve) // 50)],
            "wall_clock_seconds": round(wall + (base or {}).get("wall_clock_seconds", 0.0), 1),
            **({"initialised_from": base} if base else {}),
            # CPU seconds of this process (all threads): less sensitive than wall-clock to other load
            "cpu_seconds": round(cpu, 1),
            "machine": _machine(),
        },
        "weights": {"file": wpath.name, "dtype": weights_dtype, "bytes": wpath.stat().st_size,
                    "sha256": sha256_file(wpath)},
    }
    with open(out / f"{name}.json", "w") as f:
        json.dump(card, f, indent=2)
        f.write("\n")
    return card
