"""A model tag: what a trajectory cache (and a trained solver) was made for.

The tag is the class's qualified name plus a sha256 over the model's state (parameter and buffer
names, dtypes, shapes and values), so two models with the same weights share a tag and any change of
weights changes it. A bare function has no state: its tag is only its qualified name, so callers
wrapping a stateful object in a function should pass an explicit tag.
"""

from __future__ import annotations

import hashlib
import inspect

import torch

__all__ = ["model_tag"]


def _qualname(obj) -> str:
    # Functions and classes name themselves; any other object is named by its class.
    target = obj if inspect.isfunction(obj) or inspect.ismethod(obj) or isinstance(obj, type) else type(obj)
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(obj).__name__)}"


def model_tag(model) -> str:
    """``<module.Class>:<sha256 of the state, 16 hex digits>`` (or ``<module.function>`` for a function)."""
    name = _qualname(model)
    if not isinstance(model, torch.nn.Module):
        return name
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        v = value.detach().to("cpu").contiguous()
        h.update(f"{key}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return f"{name}:{h.hexdigest()[:16]}"
