"""Validation ground truth kept in a trajectory cache's folder, so a second ``bx.train`` on the same cache
(another NFE, order or learning rate) does not solve its validation set again.

Training's validation set is noise drawn from its own stream (and, with conditions, one pool row per
sample), solved with dopri5 in groups. With 512 samples of an MNIST-sized model that solve costs
minutes, paid by every run. The cache folder already pins what the solve depends on through its spec
(model tag, inputs tag, condition rows, shape, dtype, tolerances, seed); what it does not pin is in
the key here (set size, stream seed, dopri5 group size: samples solved together share their steps).

On disk, next to the cache's shards:

    validation_<key>.json    record (written last): the key, the sha256 of the noise and of the file
    validation_<key>.npy     x(1) [V, *shape]

A record whose key, noise checksum, file checksum or shape does not match is ignored (solved again and
overwritten), never used: the noise is regenerated from the seed, so another torch's random stream
shows up as another checksum.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .atomic import atomic_write, atomic_write_json, sha256_file

__all__ = ["load_solved", "store_solved"]


def _paths(directory: Path, key: dict):
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return directory / f"validation_{digest}.json", directory / f"validation_{digest}.npy"


def _noise_sha(x0: Tensor) -> str:
    return hashlib.sha256(x0.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def load_solved(directory, key: dict, x0: Tensor) -> Optional[Tensor]:
    """x(1) of this validation noise stored in ``directory`` under ``key``, or None (absent or not this one)."""
    record_path, data_path = _paths(Path(directory), key)
    try:
        record = json.loads(record_path.read_text())
        if (record.get("key") != key or record.get("noise_sha256") != _noise_sha(x0)
                or record.get("sha256") != sha256_file(data_path)):
            return None
        x1 = torch.from_numpy(np.load(data_path, allow_pickle=False))
    except (OSError, ValueError):   # absent, unreadable, not JSON, not an array
        return None
    if x1.shape != x0.shape or x1.dtype != x0.dtype:
        return None
    return x1.to(x0.device)


def store_solved(directory, key: dict, x0: Tensor, x1: Tensor) -> None:
    """Keep x(1) for ``load_solved`` (atomic: an interrupted write leaves nothing a later run would use)."""
    record_path, data_path = _paths(Path(directory), key)
    arr = x1.detach().cpu().contiguous().numpy()
    atomic_write(data_path, lambda f: np.save(f, arr, allow_pickle=False))
    atomic_write_json(record_path, {"key": key, "noise_sha256": _noise_sha(x0), "sha256": sha256_file(data_path)})
