"""Conditional models on the command line: ``--guidance`` and ``--conditions`` of ``bespoke-ext train`` and
``bespoke-ext sample``, ``--labels`` of ``sample``.

    bespoke-ext train mnist_cond --guidance 2 --nfe 10                 (every label, classifier-free guided)
    bespoke-ext sample mnist_cond --solver bespoke-mnist_cond-rk2-nfe10.safetensors --labels 3,7 -n 8
    bespoke-ext train mypkg.models:make_model --shape 4,32,32 --conditions prompts.safetensors

- A model whose card names its conditioning (``card["conditioning"]``: the class-conditional embedded
  models, or a checkpoint with such a card) runs under classifier-free guidance g, in the convention
  u_uncond + g (u_cond - u_uncond) (g = 1: the conditional model, g = 0: the unconditional one; default 2,
  as the demo; ``sample`` defaults to the guidance its solver file was trained for). Training draws each
  sample's label from the pool of every class (or from ``--conditions``); sampling cycles through
  ``--labels`` (default: every class).
- Any model takes per-sample inputs from ``--conditions FILE``: a safetensors file of named tensors with one
  leading dimension M, passed as ``model(x, t, name=rows)``. ``train``: the pool each sample draws a row from
  (``bespoke_ext.train(..., conditions=)``); ``sample``: row i for sample i (M samples unless -n says, which
  must then be M).
A class-conditional model is never run on its null label alone by default: that is the unconditional field,
whatever the user meant.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
from torch import Tensor

from ..demo.conditional import DEFAULT_GUIDANCE

__all__ = ["add_condition_arguments", "read_conditions", "Conditioning", "conditioning", "training_pool",
           "parse_labels", "DEFAULT_GUIDANCE"]



def add_condition_arguments(parser: argparse.ArgumentParser, sampling: bool) -> None:
    """Add --guidance and --conditions (and, for ``sample``, --labels) to ``parser``."""
    g = parser.add_argument_group("conditional models (see bespoke_ext.cli.conditioning)")
    default = "the solver file's, else 2" if sampling else "2"
    g.add_argument("--guidance", type=float, default=None,
                   help=f"class-conditional models (their card names the conditioning): classifier-free guidance g, "
                        f"u_uncond + g (u_cond - u_uncond); 1: conditional, 0: unconditional (default {default})")
    what = "row i for sample i (-n defaults to M)" if sampling else "the pool each training sample draws a row from"
    g.add_argument("--conditions", default=None, metavar="FILE",
                   help=f"safetensors of per-sample model inputs by keyword name, one leading dimension M: {what}")
    if sampling:
        g.add_argument("--labels", default=None,
                       help="class-conditional models: labels cycled over the samples, e.g. 3 or 0,1,2 "
                            "(default: every class)")


def read_conditions(path, flag: str = "--conditions") -> Dict[str, Tensor]:
    """The named tensors of a safetensors file, checked: at least one, each with one leading dimension M >= 1
    shared by all (row m of every name belongs to one sample)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{flag} {path}: no such file")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{flag} {path}: not a safetensors file ({exc})") from None
    if not tensors:
        raise ValueError(f"{flag} {path}: the file holds no tensors (one per model keyword, e.g. y [M])")
    rows = {name: tuple(t.shape) for name, t in tensors.items()}
    leading = {s[0] if s else None for s in rows.values()}
    if None in leading or 0 in leading or len(leading) != 1:
        raise ValueError(f"{flag} {path}: every tensor needs the same leading dimension M >= 1 (one row per "
                         f"sample, the same sample in every name); got shapes {rows}")
    return tensors


@dataclass
class Conditioning:
    """The model the command runs and its per-sample inputs.

    model: the velocity field (a class-conditional model wrapped in ClassifierFreeGuidance).
    guidance: g, for a class-conditional model; None otherwise.
    pool: train's conditions {name: Tensor [M, ...]}, or None.
    key, num_classes: the class-conditional model's label keyword and class count (None, 0 otherwise).
    """

    model: Callable
    guidance: Optional[float] = None
    pool: Optional[Dict[str, Tensor]] = None
    key: Optional[str] = None
    num_classes: int = 0

    def describe(self) -> Optional[str]:
        """One line for the user, or None for a plain model."""
        if self.key is None:
            return None if self.pool is None else f"per-sample inputs {sorted(self.pool)} from --conditions"
        return f"class-conditional model: classifier-free guidance g = {self.guidance:g} on {self.key!r}"

    def sample_inputs(self, labels: Optional[str], num: Optional[int]) -> Dict[str, Tensor]:
        """``sample``'s per-sample inputs for ``num`` samples (None: as many as --conditions holds, else 16)."""
        if self.pool is not None:
            if labels is not None:
                raise ValueError("--labels and --conditions both give the labels: pass one")
            m = next(iter(self.pool.values())).shape[0]
            if num is not None and num != m:
                raise ValueError(f"--conditions holds {m} rows, one per sample, but -n asks for {num} samples")
            return dict(self.pool)
        num = 16 if num is None else num
        if self.key is None:
            if labels is not None:
                raise ValueError("--labels applies to class-conditional models (their card names the "
                                 "conditioning); pass a model's own inputs with --conditions")
            return {}
        return {self.key: _cycled(parse_labels(labels, self.num_classes), num)}


def parse_labels(text: Optional[str], num_classes: int) -> Tensor:
    """--labels as a long tensor (None: every class)."""
    if text is None:
        return torch.arange(num_classes)
    try:
        values = [int(s) for s in text.split(",")]
    except ValueError:
        raise ValueError(f"--labels must be integers separated by commas, e.g. 3 or 0,1,2; got {text!r}") from None
    bad = [v for v in values if not 0 <= v < num_classes]
    if bad:
        raise ValueError(f"--labels {bad} outside the model's classes 0-{num_classes - 1}")
    return torch.tensor(values, dtype=torch.long)


def _cycled(labels: Tensor, num: int) -> Tensor:
    return labels.repeat((num + labels.numel() - 1) // labels.numel())[:num]


def conditioning(model: Callable, card: Optional[dict], args: argparse.Namespace,
                 default_guidance: Optional[float] = None) -> Conditioning:
    """The command's model and inputs from --guidance / --conditions (module docstring).

    ``card``: the model's card, when it has one (its ``conditioning`` entry makes it class-conditional).
    ``default_guidance``: g when --guidance is not given (sample: its solver file's), else 2.
    """
    from ..models import ClassifierFreeGuidance

    pool = read_conditions(args.conditions) if args.conditions is not None else None
    spec = (card or {}).get("conditioning")
    if spec is None:
        if args.guidance is not None:
            raise ValueError("--guidance applies to class-conditional models whose card names their conditioning "
                             "(mnist_cond, or a checkpoint with such a card); guide a model of your own by returning "
                             "bespoke_ext.ClassifierFreeGuidance(model, w, cond_key=..., null_value=...) from its factory")
        return Conditioning(model, pool=pool)
    g = args.guidance if args.guidance is not None else (
        DEFAULT_GUIDANCE if default_guidance is None else float(default_guidance))
    if not g >= 0:
        raise ValueError(f"--guidance must be a number >= 0 (g = 1: the conditional model), got {g!r}")
    key, num_classes = spec["key"], int(spec["num_classes"])
    if pool is not None:
        if set(pool) != {key}:
            raise ValueError(f"--conditions: this class-conditional model takes its labels as {key!r} (its card); "
                             f"the file holds {sorted(pool)}")
        labels = pool[key]
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dim() != 1:
            raise ValueError(f"--conditions: {key!r} must hold integer class labels [M], got {labels.dtype} "
                             f"of shape {tuple(labels.shape)}")
        if bool(((labels < 0) | (labels >= num_classes)).any()):
            raise ValueError(f"--conditions: {key!r} holds labels outside the model's classes 0-{num_classes - 1}")
    guided = ClassifierFreeGuidance(model, guidance_scale=g - 1.0, cond_key=key, null_value=spec["null_label"])
    return Conditioning(guided, guidance=float(g), pool=pool, key=key, num_classes=num_classes)


def training_pool(cond: Conditioning) -> Optional[Dict[str, Tensor]]:
    """train's conditions: --conditions, or a class-conditional model's every class once."""
    if cond.pool is not None:
        return cond.pool
    return {cond.key: torch.arange(cond.num_classes)} if cond.key is not None else None
