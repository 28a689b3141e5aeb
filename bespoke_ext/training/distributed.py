"""torch.distributed glue: the same ``train`` call runs in one process or under ``torchrun``.

Detection: an initialised default process group is used as is; otherwise, when the standard launcher
variables are present (torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and WORLD_SIZE > 1,
the group is initialised here (gloo for CPU, nccl for CUDA) and kept for the rest of the process, so
that later ``train`` calls reuse it; it is destroyed at exit. (Destroying and re-initialising the
default group in one process races: a rank can read the other's stale gloo address from the launcher's
store and hang; measured here as an intermittent hang of the second of two train() calls.)

Division of work (every rank holds the same solver and optimizer state):
- every rank draws the same global batch (same generator), then takes its own contiguous slice;
- each rank back-propagates sum over its slice / (global batch size), and the gradients are summed
  across ranks, which is the average over the global batch: the single-process gradient up to the
  order of the summation;
- trajectory-cache shards and validation ground-truth groups are split round-robin by rank;
- only rank 0 writes checkpoints, solver files and plots.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Iterable, Tuple

import torch
import torch.distributed as dist

__all__ = ["DistContext", "distributed_context", "local_slice", "launched_by_torchrun", "resolve_device", "note_failure"]


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum across ranks (a no-op in one process)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def sum_gradients_(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``params`` across ranks, flattened into one message."""
        if not self.enabled:
            return
        params = [p for p in params if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
            offset += g.numel()


def launched_by_torchrun() -> bool:
    env = os.environ
    return all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")) and int(env["WORLD_SIZE"]) > 1


def distributed_context(device: torch.device) -> DistContext:
    """The process group this training runs in (initialising it from torchrun's variables if needed)."""
    if not dist.is_available():
        return DistContext()
    if dist.is_initialized():
        return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size())
    if not launched_by_torchrun():
        return DistContext()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    atexit.register(_destroy_at_exit)
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size())


_FAILED = []  # train() raised on this rank (caught or not: the CLI catches it)


def note_failure(exc_type) -> None:
    """Record that this rank failed, so that its exit skips the barrier the other ranks will never reach."""
    _FAILED.append(exc_type)


def _destroy_at_exit() -> None:
    # Destroy the group while the interpreter is alive (gloo worker threads left to the interpreter's
    # teardown abort the process: "terminate called without an active exception"), and, on a normal exit,
    # only once every rank got here, so that no rank tears its connections down under another's feet.
    # A rank exiting on an error skips the barrier: the others may be waiting in a collective it will
    # never join, and its closed connections make that collective fail there too, so the whole job stops
    # with the error instead of hanging until gloo's timeout.
    if dist.is_initialized():
        try:
            if not _FAILED:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def resolve_device(device) -> torch.device:
    """A CUDA device without an index means this process's GPU (LOCAL_RANK under torchrun), made current
    (nccl needs it before the group is initialised)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be a torch device or its name ('cpu', 'cuda', 'cuda:1'), got {device!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}, but this torch ({torch.__version__}) sees no CUDA device "
                         f"({'this torch is built without CUDA' if torch.version.cuda is None else 'none visible'})")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device={str(device)!r}, but only {torch.cuda.device_count()} CUDA device(s) are visible")
    if device.type == "cuda" and device.index is None:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local % max(1, torch.cuda.device_count()))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def local_slice(total: int, rank: int, world_size: int) -> Tuple[int, int]:
    """[start, stop) of this rank's share of ``total`` items: contiguous, as even as possible."""
    per, extra = divmod(total, world_size)
    start = rank * per + min(rank, extra)
    return start, start + per + (1 if rank < extra else 0)
