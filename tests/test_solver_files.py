"""Solver files: exact round trips; everything else refused with a clear error, no code run."""

from __future__ import annotations

import json
import os
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

from bespoke_ext.solvers import BespokeSolver, SolverFileError
from bespoke_ext.solvers.files import FORMAT_VERSION, read_solver_file, write_solver_file


def trained(steps=5, order=2, seed=0) -> BespokeSolver:
    solver = BespokeSolver(steps, order)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in solver.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return solver


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "solver.safetensors"
    solver = trained()
    solver.save(path, metadata={"model": "moons2d@abc123", "training": {"iterations": 300, "lr": 0.002}})
    return path, solver


@pytest.mark.parametrize("steps, order", [(1, 1), (7, 1), (1, 2), (10, 2)])
def test_round_trip_is_exact(tmp_path, steps, order):
    solver = trained(steps, order, seed=steps)
    solver.metadata = {"model": "tag"}
    path = tmp_path / "s.safetensors"
    solver.save(str(path), metadata={"note": "ok"})
    loaded = BespokeSolver.load(path)
    assert (loaded.steps, loaded.order, loaded.nfe) == (steps, order, order * steps)
    for (name, a), (_, b) in zip(solver.named_parameters(), loaded.named_parameters()):
        assert torch.equal(a, b) and b.dtype == torch.float64, name
    assert torch.equal(solver.step_coefficients().update, loaded.step_coefficients().update)
    assert loaded.metadata == {"model": "tag", "note": "ok"}
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically, nothing left behind


def test_file_is_plain_safetensors_with_json_metadata(saved):
    path, solver = saved
    f = read_solver_file(path, kind="BespokeSolver")
    assert f.version == FORMAT_VERSION and f.config == {"order": 2, "steps": 5}
    assert f.info["model"] == "moons2d@abc123" and f.info["training"]["iterations"] == 300
    assert set(f.tensors) == {"time_logits", "dt_logits", "log_s", "ds"}


def refused(path, match):
    with pytest.raises(SolverFileError, match=match) as info:
        BespokeSolver.load(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("keep", [0, 5, 8, 40, -200, -1])
def test_truncated_files_are_refused(saved, keep):
    path, _ = saved
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])
    refused(path, "too short|truncated|damaged|header")


def test_bit_flips_are_refused(saved):
    path, _ = saved
    data = path.read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    for position in (len(data) - 3, 8 + header_len + 5, 8 + header_len // 2, 3):
        flipped = bytearray(data)
        flipped[position] ^= 0x10
        path.write_bytes(bytes(flipped))
        refused(path, "checksum|damaged|header|format|JSON|holds")


def test_random_bytes_are_refused(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(os.urandom(4096))
    refused(path, "not a solver file")


def test_empty_and_missing_files_are_refused(tmp_path):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    refused(empty, "too short")
    refused(tmp_path / "missing.safetensors", "cannot read")


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    for name, writer in (("pickle.pt", lambda p: torch.save({"time_logits": _Exploit(str(marker))}, p)),
                         ("raw.pkl", lambda p: p.write_bytes(pickle.dumps(_Exploit(str(marker)))))):
        path = tmp_path / name
        writer(path)
        refused(path, "not a solver file")
        assert not marker.exists()


def test_a_foreign_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"weight": torch.zeros(3, 3)}, str(path))
    refused(path, "not a bespoke_ext solver file")
    save_file({"weight": torch.zeros(3)}, str(path), metadata={"format": "pt"})
    refused(path, "not a bespoke_ext solver file")


def test_a_newer_format_version_is_refused(tmp_path, monkeypatch):
    from bespoke_ext.solvers import files

    monkeypatch.setattr(files, "FORMAT_VERSION", FORMAT_VERSION + 1)
    path = tmp_path / "future.safetensors"
    trained().save(path)  # a valid file of the next version, checksum and all
    monkeypatch.undo()
    refused(path, f"version {FORMAT_VERSION + 1}, newer than this bespoke_ext reads \\({FORMAT_VERSION}\\)")


def test_another_kind_or_inconsistent_config_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    write_solver_file(path, kind="BNSSolver", config={}, tensors={"a": torch.zeros(2)}, info={})
    refused(path, "holds a 'BNSSolver', not a 'BespokeSolver'")
    tensors = {name: getattr(trained(3, 2), name).detach() for name in ("time_logits", "dt_logits", "log_s", "ds")}
    write_solver_file(path, kind="BespokeSolver", config={"order": 2, "steps": 4}, tensors=tensors, info={})
    refused(path, "do not match")
    write_solver_file(path, kind="BespokeSolver", config={"order": 3, "steps": 3}, tensors=tensors, info={})
    refused(path, "invalid solver config")
    tensors["ds"] = torch.full_like(tensors["ds"], float("nan"))
    write_solver_file(path, kind="BespokeSolver", config={"order": 2, "steps": 3}, tensors=tensors, info={})
    refused(path, "not a finite")


def test_metadata_must_be_json(tmp_path):
    with pytest.raises(ValueError, match="JSON-serialisable"):
        trained().save(tmp_path / "x.safetensors", metadata={"bad": object()})


def test_header_is_readable_json(saved):
    path, _ = saved
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    meta = json.loads(data[8:8 + n])["__metadata__"]
    assert meta["format"] == "bespoke_ext.solver" and meta["checksum"].startswith("sha256:")
    assert json.loads(meta["config"]) == {"order": 2, "steps": 5}
