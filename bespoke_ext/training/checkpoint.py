"""Training checkpoints: everything needed to continue a run as if it had never stopped.

A checkpoint holds the solver's parameters, the best solver so far, the optimizer's state, the batch
generator's state, the iteration count, the history, the accumulated wall-clock and the validation set's
ground truth (a resume does not solve it again), plus a fingerprint
of the run (model tag, shape, steps, order, batch size, seed, options that change results). It is
written atomically (temporary file, fsync, rename) by rank 0 only, and read with
``torch.load(weights_only=True)``: tensors, numbers, strings and containers only, no code runs.

Resuming with a different fingerprint is refused with the differing fields named. ``iterations`` may
differ only where the result is still the run a fresh call would make, or an explicit extension
(``check_iterations``): a finished run can be extended, and the learning rate of iteration i always
follows the schedule of the ``iterations`` asked for now.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ..groundtruth.atomic import atomic_write

__all__ = ["save_checkpoint", "load_checkpoint", "check_fingerprint", "check_iterations", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION"]

CHECKPOINT_FORMAT = "bespoke_ext.train_checkpoint"
CHECKPOINT_VERSION = 1


def save_checkpoint(path, state: Dict[str, Any]) -> None:
    """Write ``state`` (plus format and version) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(state, format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION)
    atomic_write(path, lambda f: torch.save(payload, f))


_ZIP_MAGIC = b"PK\x03\x04"


def load_checkpoint(path) -> Optional[Dict[str, Any]]:
    """The state saved at ``path`` (None when there is no file); clear errors for foreign or damaged files."""
    path = Path(path)
    if not path.exists():
        return None
    with open(path, "rb") as f:
        head = f.read(9)
    if not head.startswith(_ZIP_MAGIC):   # torch.save writes a zip archive: this file is something else
        kind = " (a safetensors file: a saved solver?)" if head[8:9] == b"{" else ""
        raise ValueError(f"{path} is not a bespoke_ext training checkpoint{kind}; checkpoint= names the file "
                         f"train() saves its progress to: give it a path of its own")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise ValueError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); "
                         f"delete it to start over") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a bespoke_ext training checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint {path} has version {state.get('version')}, this package reads {CHECKPOINT_VERSION}")
    return state


def check_fingerprint(path, saved_json: str, current: Dict[str, Any]) -> None:
    """Refuse to resume a different run (all fields but ``iterations`` must match)."""
    saved = json.loads(saved_json)
    diff = [f"{k}: checkpoint has {saved.get(k)!r}, this run {current.get(k)!r}"
            for k in sorted(set(saved) | set(current)) if k != "iterations" and saved.get(k) != current.get(k)]
    if diff:
        raise ValueError(f"checkpoint {path} belongs to a different training run ({'; '.join(diff)}); "
                         f"use another checkpoint path or delete this one")


def check_iterations(path, saved: int, done: int, current: int, schedule: str) -> None:
    """Refuse a resume whose ``iterations`` would silently give another run than the one asked for.

    ``saved``: the iterations the checkpoint was made for, ``done``: those it completed, ``current``: this
    call's. Fewer than ``done`` would return a solver trained longer than asked; an unfinished cosine run
    resumed with another total would mix two learning-rate schedules (the cosine depends on the total).
    Extending a finished run, or any change under the constant schedule, is allowed.
    """
    if current < done:
        raise ValueError(f"checkpoint {path} has already trained {done} iterations, more than iterations={current}; "
                         f"ask for iterations >= {done}, or use another checkpoint path for a shorter run")
    if current != saved and done < saved and schedule != "constant":
        raise ValueError(f"checkpoint {path} is an unfinished run of iterations={saved} (at iteration {done}); "
                         f"resuming it with iterations={current} would switch its {schedule} learning-rate "
                         f"schedule midway. Resume with iterations={saved} (and extend it once finished), or "
                         f"use another checkpoint path")
