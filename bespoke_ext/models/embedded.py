"""The pre-trained models that ship with the package (``weights/<name>.safetensors`` + ``<name>.json``).

Loading is data only: the card is JSON, the weights are safetensors (no pickle, no code runs). The
weights file's sha256 is checked against the card before anything is built from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import nn

from .adapters import VelocityAdapter
from .nets import build_net
from .pretrain import CARD_FORMAT_VERSION, sha256_file

__all__ = ["EmbeddedModel", "load_embedded", "list_embedded", "WEIGHTS_DIR", "DEFAULT_MODEL"]

WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_MODEL = "mnist"


@dataclass
class EmbeddedModel:
    """A loaded embedded model.

    Attributes:
        name: the model's name.
        velocity: velocity field u(x, t) (nn.Module, eval mode, frozen weights, adapters applied).
        shape: per-sample shape, e.g. (2,) or (1, 28, 28).
        card: the model card (dict from the JSON file).
        net: the bare network (its output is the card's ``prediction``).
    """

    name: str
    velocity: nn.Module
    shape: Tuple[int, ...]
    card: dict
    net: nn.Module = field(repr=False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def sample_noise(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """x0 ~ N(0, I) of shape [n, *shape] in the model's dtype (drawn on the CPU, then moved)."""
        x = torch.randn(int(n), *self.shape, generator=generator, dtype=self.dtype)
        return x.to(self.device)


def _dir(weights_dir) -> Path:
    return Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR


def list_embedded(weights_dir=None) -> list:
    """Names of the models with a card in the weights folder, sorted."""
    d = _dir(weights_dir)
    return sorted(p.stem for p in d.glob("*.json")) if d.is_dir() else []


def read_card(name: str, weights_dir=None) -> dict:
    """The model card of ``name`` (JSON), with a clear error if it is missing or malformed."""
    d = _dir(weights_dir)
    path = d / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"embedded model {name!r}: card {path} not found; available: {list_embedded(weights_dir)}")
    try:
        card = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"embedded model {name!r}: card {path} is not valid JSON ({exc})") from exc
    for key in ("architecture", "prediction", "schedule", "shape", "weights"):
        if key not in card:
            raise ValueError(f"embedded model {name!r}: card {path} lacks the field {key!r}")
    if card.get("format_version", 0) > CARD_FORMAT_VERSION:
        raise ValueError(f"embedded model {name!r}: card {path} has format_version {card['format_version']}, "
                         f"newer than this package reads ({CARD_FORMAT_VERSION})")
    return card


def load_embedded(name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device="cpu",
                  weights_dir=None, t_eps: Optional[float] = None) -> EmbeddedModel:
    """Load an embedded model as a ready velocity field u(x, t).

    Args:
        name: one of ``list_embedded()`` ("moons2d", "mnist", "digits_vp", "mnist_cond", "flux_mnist").
        dtype: float32 or float64 (weights are cast after loading).
        device: where to put the weights.
        weights_dir: folder with the cards and weights (default: the package's).
        t_eps: end-of-path clamp of the VelocityAdapter (default: per prediction type).
    Raises FileNotFoundError naming the file when the card or weights are absent, ValueError naming the
    file when the weights' sha256 differs from the card or their contents do not fit the architecture.
    """
    from safetensors.torch import load_file

    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be an embedded model name, one of {list_embedded(weights_dir)}; got {name!r}")
    card = read_card(name, weights_dir)
    wpath = _dir(weights_dir) / card["weights"].get("file", f"{name}.safetensors")
    if not wpath.is_file():
        raise FileNotFoundError(f"embedded model {name!r}: weights file {wpath} not found")
    digest = sha256_file(wpath)
    if digest != card["weights"].get("sha256"):
        raise ValueError(f"embedded model {name!r}: weights file {wpath} has sha256 {digest}, but its card says "
                         f"{card['weights'].get('sha256')}; the file is damaged or does not belong to this card")
    arch = card["architecture"]
    net = build_net(arch["class"], arch.get("kwargs", {}))
    try:
        state = load_file(str(wpath))
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise ValueError(f"embedded model {name!r}: cannot read weights file {wpath} ({exc})") from exc
    try:
        net.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"embedded model {name!r}: weights file {wpath} does not fit {arch['class']} ({exc})") from exc
    net = net.to(device=device, dtype=dtype).eval().requires_grad_(False)
    flux = arch["class"] == "FluxMNIST"  # the diffusers-format model (flux_mnist.py) is its own velocity
    velocity = net if flux else VelocityAdapter(net, prediction=card["prediction"], schedule=card["schedule"],
                                                t_eps=t_eps).eval()
    return EmbeddedModel(name=card.get("name", name), velocity=velocity, shape=tuple(card["shape"]), card=card, net=net)
