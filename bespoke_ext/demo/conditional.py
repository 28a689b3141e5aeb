"""The demo's view of a model: the plain velocity field, or for a class-conditional model the
classifier-free-guided field at a guidance scale, with its label pool and the evaluation labels.

Guidance is given as g in the convention u_uncond + g (u_cond - u_uncond) (g = 1: the conditional
model; g > 1 sharper, less diverse samples), i.e. ClassifierFreeGuidance with w = g - 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from ..models import ClassifierFreeGuidance

__all__ = ["DemoModel", "demo_model", "DEFAULT_GUIDANCE"]

DEFAULT_GUIDANCE = 2.0


@dataclass
class DemoModel:
    """What the demo's stages need from a model (and what train_solvers / Reference read)."""

    name: str
    velocity: Callable
    shape: Tuple[int, ...]
    card: dict
    dtype: torch.dtype
    guidance: Optional[float] = None
    cond_key: Optional[str] = None
    num_classes: int = 0

    @property
    def conditional(self) -> bool:
        return self.cond_key is not None

    @property
    def conditions(self) -> Optional[Dict[str, Tensor]]:
        """The pool training draws one row of per sample: every label once."""
        return {self.cond_key: torch.arange(self.num_classes)} if self.conditional else None

    def extras(self, batch: int) -> Dict[str, Tensor]:
        """The evaluation batch's model inputs: labels 0, 1, ..., num_classes - 1, 0, 1, ... per sample."""
        return {self.cond_key: torch.arange(batch) % self.num_classes} if self.conditional else {}


def demo_model(em, guidance: Optional[float] = None) -> DemoModel:
    """``em``: an embedded model. ``guidance`` only for a class-conditional model (default 2)."""
    cond = em.card.get("conditioning")
    if cond is None:
        if guidance is not None:
            raise ValueError(f"--guidance applies to class-conditional models; {em.name!r} is unconditional")
        return DemoModel(em.name, em.velocity, tuple(em.shape), em.card, em.dtype)
    g = DEFAULT_GUIDANCE if guidance is None else guidance
    if isinstance(g, bool) or not isinstance(g, (int, float)) or not g >= 0:
        raise ValueError(f"--guidance must be a number >= 0 (g = 1: the conditional model), got {guidance!r}")
    guided = ClassifierFreeGuidance(em.velocity, guidance_scale=g - 1.0, cond_key=cond["key"],
                                    null_value=cond["null_label"])
    return DemoModel(em.name, guided, tuple(em.shape), em.card, em.dtype, guidance=float(g), cond_key=cond["key"],
                     num_classes=int(cond["num_classes"]))
