"""The cached ground truth: a fixed set of noise samples solved once on a fine time grid (method.md §6).

For every sample the cache stores x(g_k) and u_k = dx/dt(g_k) = u(x(g_k), g_k) at every point g_k of a
fine grid. Any time in [0, 1] is then read back by cubic Hermite interpolation (hermite.py), which is
differentiable in t, so one cache serves every NFE, both base orders and the time gradients of the
loss, at the cost of one adaptive solve per sample instead of one per sample and iteration.

On disk (a folder):

    manifest.json            format, version, the spec (model tag, inputs tag, condition rows, shape,
                             dtype, tolerances, grid, sample count, shard size, seed), "complete", and
                             per shard its file names and sha256 checksums
    shard_00000.json         record of a finished shard (written last, so its presence means done)
    shard_00000.x.npy        states     [S, G+1, *shape]   (S samples of the shard)
    shard_00000.u.npy        velocities [S, G+1, *shape]
    shard_00000.rows.npy     int64 [S]: each trajectory's row of the conditions pool (only with conditions)
    validation_<key>.*       training's validation ground truth, solved for this cache (validation_store.py)

Version 2 (this one) added the inputs tag (constant extras' values and the conditions pool,
``models.identity.inputs_tag``), the pool's row count and the rows files; a version-1 cache is refused
(it cannot say what it was solved with).

Generation runs shard by shard with a progress bar; every file is written atomically, so an
interrupted build resumes with the first unfinished shard. The noise of shard s, then its trajectories'
condition rows, come from a generator seeded by (seed, s) alone, so the cache does not depend on how
many processes built it (shard s is built by rank s mod world_size). Opening checks the spec against what the caller expects, each shard's
shape, dtype and checksum; shards are memory-mapped, and loaded into memory only when small.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .atomic import atomic_write, atomic_write_json, sha256_file
from ..models.identity import inputs_tag
from .hermite import hermite_coefficients, hermite_interpolate
from .inputs import check_conditions, for_positions, pool_size, take
from .odesolve import check_tolerance, solve_trajectories

__all__ = ["CacheSpec", "TrajectoryCache", "build_cache", "finalize_cache", "shard_noise", "shard_rows",
           "CACHE_FORMAT", "CACHE_VERSION", "DEFAULT_IN_MEMORY_BYTES"]

CACHE_FORMAT = "bespoke_ext.trajectory_cache"
CACHE_VERSION = 2
DEFAULT_IN_MEMORY_BYTES = 1 << 30  # caches up to 1 GiB are read into memory; larger ones stay mapped
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class CacheSpec:
    """Everything a cache's contents depend on (two caches with equal specs hold the same data)."""

    model_tag: str
    shape: Tuple[int, ...]
    dtype: str
    rtol: float
    atol: float
    grid: Tuple[float, ...]
    num_samples: int
    shard_size: int
    seed: int
    inputs_tag: str = ""       # models.identity.inputs_tag(constant extras, conditions pool)
    condition_rows: int = 0    # M, the rows of the conditions pool (0: no conditions)

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "grid", tuple(float(g) for g in self.grid))
        if self.dtype not in _DTYPES:
            raise ValueError(f"cache dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if not self.shape or min(self.shape) < 1:
            raise ValueError(f"shape must be a non-empty tuple of positive sizes, got {self.shape}")
        check_tolerance(self.rtol, self.atol)
        g = self.grid
        if len(g) < 2 or g[0] != 0.0 or g[-1] != 1.0 or any(b <= a for a, b in zip(g, g[1:])):
            raise ValueError("the cache grid must be strictly increasing from exactly 0.0 to exactly 1.0")
        if self.num_samples < 1 or self.shard_size < 1:
            raise ValueError(f"num_samples and shard_size must be >= 1, got {self.num_samples}, {self.shard_size}")
        if not isinstance(self.condition_rows, int) or self.condition_rows < 0:
            raise ValueError(f"condition_rows must be an integer >= 0, got {self.condition_rows!r}")

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_samples / self.shard_size)

    def shard_range(self, s: int) -> Tuple[int, int]:
        return s * self.shard_size, min((s + 1) * self.shard_size, self.num_samples)

    def to_json(self) -> dict:
        d = asdict(self)
        d["shape"], d["grid"] = list(self.shape), list(self.grid)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "CacheSpec":
        names = {f.name for f in fields(cls)}
        missing = names - set(d)
        if missing:
            raise ValueError(f"cache manifest lacks the fields {sorted(missing)}")
        return cls(**{k: d[k] for k in names})

    def differences(self, other: "CacheSpec") -> List[str]:
        """What differs between this (expected) spec and ``other`` (the cache's), one named line each."""
        what = {"model_tag": "model_tag (the model's weights and settings)",
                "inputs_tag": "inputs_tag (the values of the constant model_extras and the conditions pool)",
                "condition_rows": "condition_rows (rows of the conditions pool)"}
        out = []
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a == b:
                continue
            if f.name == "grid":
                out.append(_grid_difference(b, a))
            else:
                out.append(f"{what.get(f.name, f.name)}: cache has {b!r}, expected {a!r}")
        return out


def _grid_difference(cached: Tuple[float, ...], expected: Tuple[float, ...]) -> str:
    """The grids' difference in words: their sizes, or (same size, other spacing) the first differing point."""
    if len(cached) != len(expected):
        return f"grid: cache has {len(cached)} points, expected {len(expected)} (cache_grid)"
    i = next(j for j, (x, y) in enumerate(zip(cached, expected)) if x != y)
    return (f"grid: both have {len(cached)} points but another spacing: point {i} is {cached[i]:.9g} in the cache, "
            f"expected {expected[i]:.9g} (cache_grid_kind)")


def _shard_draws(spec: CacheSpec, s: int) -> Tuple[Tensor, Optional[Tensor]]:
    digest = hashlib.sha256(f"bespoke_ext.cache:{spec.seed}:{s}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2 ** 63 - 1))
    a, b = spec.shard_range(s)
    noise = torch.randn(b - a, *spec.shape, generator=g, dtype=_DTYPES[spec.dtype])
    rows = torch.randint(spec.condition_rows, (b - a,), generator=g) if spec.condition_rows else None
    return noise, rows


def shard_noise(spec: CacheSpec, s: int) -> Tensor:
    """The noise x0 of shard s, [S, *shape] on the CPU: depends on (seed, s) only."""
    return _shard_draws(spec, s)[0]


def shard_rows(spec: CacheSpec, s: int) -> Optional[Tensor]:
    """The condition rows of shard s's trajectories, int64 [S] (None without conditions): drawn after the
    noise from the same (seed, s) generator, so they too are independent of the process count."""
    return _shard_draws(spec, s)[1]


def _keys(spec: CacheSpec) -> Tuple[str, ...]:
    return ("x", "u", "rows") if spec.condition_rows else ("x", "u")


def _names(s: int) -> Dict[str, str]:
    return {"record": f"shard_{s:05d}.json", "x": f"shard_{s:05d}.x.npy", "u": f"shard_{s:05d}.u.npy",
            "rows": f"shard_{s:05d}.rows.npy"}


def _read_manifest(directory: Path) -> dict:
    path = directory / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no trajectory cache at {directory}: {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"trajectory cache {directory}: manifest.json is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path} is not a bespoke_ext trajectory cache manifest (format {manifest.get('format') if isinstance(manifest, dict) else None!r})")
    if manifest.get("version") != CACHE_VERSION:
        raise ValueError(f"trajectory cache {directory} has format version {manifest.get('version')}, this package "
                         f"reads version {CACHE_VERSION} only (older caches do not record what the model was called "
                         f"with); delete the folder or use another cache_dir, and the cache is built again")
    return manifest


def _check_spec(directory: Path, found: CacheSpec, expected: Optional[CacheSpec]) -> None:
    if expected is None:
        return
    diff = expected.differences(found)
    if diff:
        raise ValueError(f"trajectory cache {directory} was made for something else ({'; '.join(diff)}); "
                         f"use another cache folder or delete this one")


def _shard_done(directory: Path, spec: CacheSpec, s: int) -> bool:
    names = _names(s)
    if not (directory / names["record"]).is_file():
        return False
    try:
        for key in _keys(spec):
            arr = np.load(directory / names[key], mmap_mode="r")
            if arr.shape != (_shard_shape(spec, s)[:1] if key == "rows" else _shard_shape(spec, s)):
                return False
    except (OSError, ValueError):
        return False
    return True


def _shard_shape(spec: CacheSpec, s: int) -> Tuple[int, ...]:
    a, b = spec.shard_range(s)
    return (b - a, len(spec.grid), *spec.shape)


@torch.no_grad()
def _velocities(model: Callable, states: Tensor, grid: Tensor, extras: dict, chunk: int,
                cond: Optional[dict] = None) -> Tensor:
    """u(x(g_k), g_k) for states [G+1, S, *shape], evaluated in batched chunks of samples."""
    g1, s = states.shape[:2]
    flat = states.reshape(g1 * s, *states.shape[2:])
    times = grid.to(states.dtype).repeat_interleave(s)
    out = torch.empty_like(flat)
    for a in range(0, flat.shape[0], chunk):
        part = slice(a, min(a + chunk, flat.shape[0]))
        out[part] = model(flat[part], times[part], **extras, **for_positions(cond, part, s))
    return out.reshape(states.shape)


def build_cache(model: Callable, directory, spec: CacheSpec, *, model_extras: Optional[dict] = None,
                device="cpu", group_size: int = 512, chunk_size: int = 65536, progress: bool = True,
                rank: int = 0, world_size: int = 1, finalize: Optional[bool] = None,
                conditions: Optional[dict] = None) -> Path:
    """Solve and store the shards of ``spec`` that are not on disk yet; return the folder.

    ``conditions``: the pool {name: Tensor [M, ...]} with M = ``spec.condition_rows``; every trajectory is
    solved with the pool's row ``shard_rows(spec, s)[j]`` (stored in the shard). When ``spec.inputs_tag`` is
    set it must be ``inputs_tag(model_extras, conditions)``.

    With ``world_size`` > 1 this process builds shards ``rank, rank + world_size, ...`` only; after
    every process has returned (a barrier), one of them calls ``finalize_cache``. ``finalize``
    defaults to True for a single process.
    """
    from tqdm.auto import tqdm

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    manifest_path = directory / "manifest.json"
    if manifest_path.exists():
        manifest = _read_manifest(directory)
        _check_spec(directory, CacheSpec.from_json(manifest["spec"]), spec)
        if manifest.get("complete"):
            return directory
    else:
        # Every rank may write the same incomplete manifest; the writes are atomic and identical.
        atomic_write_json(manifest_path, {"format": CACHE_FORMAT, "version": CACHE_VERSION,
                                          "spec": spec.to_json(), "complete": False, "shards": []})
    extras = dict(model_extras or {})
    pool = check_conditions(conditions, extras)
    if pool_size(pool) != spec.condition_rows:
        raise ValueError(f"the conditions pool has {pool_size(pool)} rows, the cache spec says condition_rows = "
                         f"{spec.condition_rows}")
    if spec.inputs_tag and spec.inputs_tag != inputs_tag(extras, pool):
        raise ValueError("the cache spec's inputs_tag is not that of these model_extras and conditions "
                         "(models.identity.inputs_tag(model_extras, conditions))")
    grid = torch.tensor(spec.grid, dtype=torch.float64)
    todo = [s for s in range(rank, spec.num_shards, world_size) if not _shard_done(directory, spec, s)]
    total = sum(spec.shard_range(s)[1] - spec.shard_range(s)[0] for s in todo)
    bar = tqdm(total=total, desc="ground-truth cache", unit="traj", disable=not progress or total == 0,
               leave=False, position=rank)
    try:
        for s in todo:
            x0, rows = _shard_draws(spec, s)
            x0 = x0.to(device)
            cond = take(pool, rows, device=device)
            states = solve_trajectories(model, x0, grid, rtol=spec.rtol, atol=spec.atol, model_extras=extras,
                                        group_size=group_size, progress=bar, conditions=cond)  # [G+1, S, *shape]
            vel = _velocities(model, states, grid.to(device), extras, chunk_size, cond)
            names = _names(s)
            record = {"index": s, "samples": x0.shape[0], "files": {}, "sha256": {}}
            data_of = [("x", states), ("u", vel)] + ([("rows", rows)] if rows is not None else [])
            for key, data in data_of:
                arr = (data.numpy() if key == "rows" else data.transpose(0, 1).contiguous().cpu().numpy())  # [S, ...]
                atomic_write(directory / names[key], lambda f, a=arr: np.save(f, a, allow_pickle=False))
                record["files"][key] = names[key]
                record["sha256"][key] = sha256_file(directory / names[key])
            atomic_write_json(directory / names["record"], record)                # last: marks the shard done
    finally:
        bar.close()
    if finalize if finalize is not None else world_size == 1:
        finalize_cache(directory)
    return directory


def finalize_cache(directory) -> Path:
    """Collect the shard records into the manifest and mark the cache complete."""
    directory = Path(directory)
    manifest = _read_manifest(directory)
    spec = CacheSpec.from_json(manifest["spec"])
    shards = []
    for s in range(spec.num_shards):
        path = directory / _names(s)["record"]
        if not path.is_file():
            raise RuntimeError(f"trajectory cache {directory}: shard {s} is missing; run the build again to finish it")
        shards.append(json.loads(path.read_text()))
    manifest.update(complete=True, shards=shards)
    atomic_write_json(directory / "manifest.json", manifest)
    return directory


class TrajectoryCache:
    """A finished trajectory cache, opened for reading.

    Args:
        directory: the cache folder.
        expect: the spec the caller needs; any difference is refused with the differing fields named.
        verify: check every shard's sha256 (reads every byte once); shapes and dtypes are always checked.
        device: where returned tensors live.
        in_memory: bytes up to which the whole cache is read into memory (else shards stay memory-mapped);
            True / False force either.
    """

    def __init__(self, directory, expect: Optional[CacheSpec] = None, *, verify: bool = True, device="cpu",
                 in_memory=DEFAULT_IN_MEMORY_BYTES):
        self.directory = Path(directory)
        manifest = _read_manifest(self.directory)
        self.spec = CacheSpec.from_json(manifest["spec"])
        _check_spec(self.directory, self.spec, expect)
        if not manifest.get("complete"):
            raise ValueError(f"trajectory cache {self.directory} is incomplete (interrupted build); "
                             f"run the build again to finish it")
        spec = self.spec
        if len(manifest.get("shards", [])) != spec.num_shards:
            raise ValueError(f"trajectory cache {self.directory}: manifest lists {len(manifest.get('shards', []))} "
                             f"shards, the spec needs {spec.num_shards}")
        self.device = torch.device(device)
        self.dtype = _DTYPES[spec.dtype]
        self.grid = torch.tensor(spec.grid, dtype=torch.float64, device=self.device)
        self._x: List[np.ndarray] = []
        self._u: List[np.ndarray] = []
        rows: List[np.ndarray] = []
        np_dtype = np.dtype(spec.dtype)
        for s, record in enumerate(manifest["shards"]):
            stores = [("x", self._x), ("u", self._u)] + ([("rows", rows)] if spec.condition_rows else [])
            for key, store in stores:
                if key not in record.get("files", {}):
                    raise ValueError(f"trajectory cache {self.directory}: shard {s} has no {key!r} file")
                path = self.directory / record["files"][key]
                if not path.is_file():
                    raise ValueError(f"trajectory cache {self.directory}: shard file {path.name} is missing")
                if verify and sha256_file(path) != record["sha256"][key]:
                    raise ValueError(f"trajectory cache {self.directory}: {path.name} fails its checksum (damaged or "
                                     f"replaced); delete the cache folder and build it again")
                try:
                    arr = np.load(path, mmap_mode="r", allow_pickle=False)
                except ValueError as exc:
                    raise ValueError(f"trajectory cache {self.directory}: cannot read {path.name} ({exc})") from exc
                want_shape, want_dtype = ((_shard_shape(spec, s)[:1], np.dtype(np.int64)) if key == "rows"
                                          else (_shard_shape(spec, s), np_dtype))
                if arr.shape != want_shape or arr.dtype != want_dtype:
                    raise ValueError(f"trajectory cache {self.directory}: {path.name} holds {arr.dtype} {arr.shape}, "
                                     f"expected {want_dtype} {want_shape}")
                store.append(arr)
        # Each trajectory's row of the conditions pool [N] (small: always in memory, on the CPU).
        self._rows = torch.from_numpy(np.concatenate([np.array(r) for r in rows])) if rows else None
        if self._rows is not None and self._rows.numel() and (int(self._rows.min()) < 0
                                                              or int(self._rows.max()) >= spec.condition_rows):
            raise ValueError(f"trajectory cache {self.directory}: condition rows outside [0, {spec.condition_rows})")
        nbytes = 2 * spec.num_samples * len(spec.grid) * math.prod(spec.shape) * np_dtype.itemsize
        self.in_memory = bool(in_memory) if isinstance(in_memory, bool) else nbytes <= int(in_memory)
        if self.in_memory:
            # [N, G+1, *shape] on the device: gathers are plain indexing.
            self._xt = torch.cat([torch.from_numpy(np.array(a)) for a in self._x]).to(self.device)
            self._ut = torch.cat([torch.from_numpy(np.array(a)) for a in self._u]).to(self.device)

    @property
    def num_samples(self) -> int:
        return self.spec.num_samples

    @property
    def shape(self) -> Tuple[int, ...]:
        return self.spec.shape

    def __len__(self) -> int:
        return self.spec.num_samples

    def __repr__(self) -> str:
        return (f"TrajectoryCache({str(self.directory)!r}, samples={self.num_samples}, grid={len(self.spec.grid)} points, "
                f"shape={self.shape}, {'in memory' if self.in_memory else 'memory-mapped'})")

    def _check_index(self, idx: Tensor) -> Tensor:
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_samples):
            raise IndexError(f"sample indices must lie in [0, {self.num_samples}), got [{int(idx.min())}, {int(idx.max())}]")
        return idx

    def gather(self, idx, k) -> Tuple[Tensor, Tensor]:
        """States and velocities at grid indices ``k`` [T] of samples ``idx`` [B]: two [T, B, *shape]."""
        idx = self._check_index(idx)
        k = torch.as_tensor(k, dtype=torch.long).reshape(-1)
        if self.in_memory:
            i, kk = idx.to(self.device), k.to(self.device)
            return (self._xt[i[None, :], kk[:, None]], self._ut[i[None, :], kk[:, None]])
        # Memory-mapped: read only the requested rows, shard by shard (numpy fancy indexing on a memmap).
        ss = self.spec.shard_size
        idx_np, k_np = idx.cpu().numpy(), k.cpu().numpy()
        out = [np.empty((len(k_np), len(idx_np), *self.shape), dtype=self.spec.dtype) for _ in range(2)]
        shard_of = idx_np // ss
        for s in np.unique(shard_of):
            pos = np.nonzero(shard_of == s)[0]
            local = idx_np[pos] - s * ss
            for o, store in zip(out, (self._x, self._u)):
                o[:, pos] = store[s][local[None, :], k_np[:, None]]
        return tuple(torch.from_numpy(o).to(self.device) for o in out)

    def states(self, idx, times: Tensor) -> Tensor:
        """x(times) for samples ``idx``: [T, B, *shape], differentiable in ``times`` [T] (Hermite)."""
        idx = self._check_index(idx)
        b, t = idx.numel(), times.numel()
        k, coeffs = hermite_coefficients(self.grid, times.reshape(-1).to(self.device))
        x, u = self.gather(idx, torch.cat([k, k + 1]))                           # [2T, B, *shape]
        flat = lambda v: v.reshape(t * b, *self.shape)
        rows = coeffs.repeat_interleave(b, dim=0)                                  # one row per (time, sample)
        out = hermite_interpolate(flat(x[:t]), flat(u[:t]), flat(x[t:]), flat(u[t:]), rows)
        return out.reshape(t, b, *self.shape)

    def rows(self, idx) -> Optional[Tensor]:
        """The conditions pool's row of samples ``idx``: int64 [B] on the CPU (None for a cache without conditions)."""
        idx = self._check_index(idx)
        return None if self._rows is None else self._rows[idx]

    def noise(self, idx) -> Tensor:
        """x0 of samples ``idx``: [B, *shape]."""
        return self.gather(idx, [0])[0][0]

    def endpoints(self, idx) -> Tuple[Tensor, Tensor]:
        """(x0, x(1)) of samples ``idx``: two [B, *shape]."""
        x, _ = self.gather(idx, [0, len(self.spec.grid) - 1])
        return x[0], x[1]
