"""Solver files: exact round trips; everything else refused with a clear error, no code run."""

from __future__ import annotations

import gc
import json
import os
import pickle
import struct
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file

from bespoke_ext.solvers import BespokeSolver, SolverFileError
from bespoke_ext.solvers import files
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
        refused(path, "checksum|damaged|header|format|JSON|holds|config|tensor")


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


def raw_file(path, *, config, tensors, kind="BespokeSolver", info=None, version="1", checksum=True):
    """A solver file written by hand (no schema check), with a valid checksum unless told otherwise:
    what anyone can make, since the checksum is not a key."""
    config_json, info_json = json.dumps(config), json.dumps(info or {})
    meta = {"format": "bespoke_ext.solver", "format_version": version, "kind": kind, "config": config_json,
            "info": info_json, "checksum": files._checksum(kind, config_json, info_json, tensors) if checksum else "sha256:0"}
    path.write_bytes(save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta))
    return path


def raw_header(path, header, data=b""):
    """A file of an 8-byte length, this header (dict, str or bytes) and ``data``."""
    h = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def bespoke_tensors(steps=3, order=2):
    return {name: getattr(trained(steps, order), name).detach() for name in ("time_logits", "dt_logits", "log_s", "ds")}


def entry(shape, begin=0, dtype="F64", size=8):
    n = 1
    for d in shape:
        n *= d
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, begin + n * size]}


def meta(config, kind="BespokeSolver"):
    return {"format": "bespoke_ext.solver", "format_version": "1", "kind": kind, "config": json.dumps(config),
            "info": "{}", "checksum": "sha256:0"}


def test_another_kind_or_inconsistent_config_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    raw_file(path, kind="BNSSolver", config={}, tensors={"a": torch.zeros(2, dtype=torch.float64)})
    refused(path, "holds a 'BNSSolver', not a 'BespokeSolver'")
    tensors = bespoke_tensors(3, 2)
    raw_file(path, config={"order": 2, "steps": 4}, tensors=tensors)
    refused(path, r"config steps=4 does not match the tensor shapes, which are those of a BespokeSolver with order=2, steps=3")
    raw_file(path, config={"order": 3, "steps": 3}, tensors=tensors)
    refused(path, "config order=3 does not match")
    raw_file(path, config={"order": 2, "steps": 3.0}, tensors=tensors)
    refused(path, "config steps=3.0 does not match")  # a float is not the integer the shapes say
    raw_file(path, config={"order": 2, "steps": 3, "extra": 1}, tensors=tensors)
    refused(path, "config keys .* are not those of a BespokeSolver")
    raw_file(path, config={"order": 2, "steps": 3}, tensors={**tensors, "time_logits": torch.zeros(4, dtype=torch.float64)})
    refused(path, r"tensor shapes .* do not match a BespokeSolver with order=2, steps=3, which needs .*time_logits: \(5,\)")
    raw_file(path, config={"order": 3, "steps": 3}, tensors={k: v.reshape(-1)[:1] for k, v in tensors.items()})
    refused(path, "not those of any BespokeSolver")
    raw_file(path, config={"order": 2, "steps": 3}, tensors={k: v for k, v in tensors.items() if k != "ds"})
    refused(path, r"tensors \['dt_logits', 'log_s', 'time_logits'\] are not those of a BespokeSolver")
    raw_file(path, config={"order": 2, "steps": 3}, tensors={**tensors, "ds": torch.full_like(tensors["ds"], float("nan"))})
    refused(path, "'ds' is not a finite")
    raw_file(path, config={"order": 2, "steps": 3}, tensors={**tensors, "ds": tensors["ds"].to(torch.int64)})
    refused(path, "dtype 'I64'; solver parameters are floating point")


def test_the_writer_applies_the_same_schema(tmp_path):
    path = tmp_path / "x.safetensors"
    tensors = bespoke_tensors(3, 2)
    with pytest.raises(ValueError, match="config steps=4 does not match"):
        write_solver_file(path, kind="BespokeSolver", config={"order": 2, "steps": 4}, tensors=tensors, info={},
                          check_schema=True)
    with pytest.raises(ValueError, match="no solver file schema is registered for kind 'BNSSolver'"):
        write_solver_file(path, kind="BNSSolver", config={}, tensors={"a": torch.zeros(2)}, info={})
    with pytest.raises(ValueError, match="header would be .* bytes, more than readers accept"):
        trained(3, 2).save(path, metadata={"history": "x" * (files.MAX_HEADER_BYTES + 1)})
    assert not path.exists()
    broken = trained(3, 2)
    with torch.no_grad():
        next(broken.parameters())[0] = float("nan")
    with pytest.raises(ValueError, match="1 non-finite values .* finite parameters only"):
        broken.save(path)
    with pytest.raises(FileNotFoundError, match="its folder .*missing does not exist"):
        trained(3, 2).save(tmp_path / "missing" / "x.safetensors")
    assert not path.exists()
    # and a file of the other kind with a file, NonStationarySolver, follows its own schema
    n = 4
    ns = {"time_logits": torch.zeros(n - 1), "a_delta": torch.zeros(n), "b_delta": torch.zeros(10),
          "base_times": torch.linspace(0, 1, n + 1), "base_a": torch.ones(n), "base_b": torch.zeros(10)}
    ns = {k: v.double() for k, v in ns.items()}
    config = {"nfe": n, "base": "euler", "refs": [0, 1, 2, 3], "time_scale": 1.0, "coeff_scale": 1.0}
    write_solver_file(path, kind="NonStationarySolver", config=config, tensors=ns, info={}, check_schema=True)
    assert read_solver_file(path, kind="NonStationarySolver").config == config
    with pytest.raises(ValueError, match="which needs .*b_delta: \\(10,\\)"):
        write_solver_file(path, kind="NonStationarySolver", config=config, tensors={**ns, "b_delta": torch.zeros(9).double()},
                          info={}, check_schema=True)
    # unchecked writes (for tests) are refused by the reader with the same reason
    write_solver_file(path, kind="NonStationarySolver", config=config, tensors={**ns, "b_delta": torch.zeros(9).double()}, info={})
    with pytest.raises(SolverFileError, match="which needs .*b_delta: \\(10,\\)"):
        read_solver_file(path, kind="NonStationarySolver")


# -- hostile files: refused in under 1 s and 50 MB, before the solver is built --------------------------


def _peak_rss_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident size, to the current size
        return True
    except OSError:
        return False


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def refused_cheaply(path, match, monkeypatch):
    """Refused with a SolverFileError naming the file, in under 1 s, with under 50 MB of extra memory
    (peak resident size where Linux lets it be measured, and Python's own allocations), and without
    ever constructing a solver."""
    built = []
    original = BespokeSolver.__init__
    monkeypatch.setattr(BespokeSolver, "__init__", lambda self, *a, **k: built.append(a) or original(self, *a, **k))
    gc.collect()
    rss_measured = _peak_rss_reset()
    before = _status_kb("VmRSS") if rss_measured else 0
    tracemalloc.start()
    start = time.perf_counter()
    try:
        refused(path, match)
    finally:
        elapsed = time.perf_counter() - start
        python_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert elapsed < 1.0, elapsed
    assert python_peak < 50e6, python_peak
    if rss_measured:
        assert (_status_kb("VmHWM") - before) * 1024 < 50e6
    assert not built
    return elapsed, python_peak


def test_the_issues_file_claiming_a_billion_steps(tmp_path, monkeypatch):
    # a real 3-step solver's tensors, a header claiming 10**9 steps, a valid checksum
    path = raw_file(tmp_path / "claims.safetensors", config={"order": 2, "steps": 10**9}, tensors=bespoke_tensors(3, 2))
    assert path.stat().st_size < 2000
    refused_cheaply(path, "config steps=1000000000 does not match the tensor shapes, which are those of a BespokeSolver "
                          "with order=2, steps=3", monkeypatch)


@pytest.mark.parametrize("case", ["shapes", "near_cap", "elements", "header_length", "tensor_count", "huge_int",
                                  "negative", "bool_dim", "float_dim", "overlap", "gap", "too_many_dims", "entry_keys"])
def test_hostile_headers_are_refused_before_any_data(tmp_path, monkeypatch, case):
    path = tmp_path / f"{case}.safetensors"
    n = 10**9
    cfg = {"order": 2, "steps": n}
    full = {"time_logits": entry((2 * n - 1,)), "dt_logits": entry((n, 2)), "log_s": entry((n, 2)), "ds": entry((n, 2))}
    small = bespoke_tensors(3, 2)
    if case == "shapes":  # consistent with the config, but far more elements than the file holds
        raw_header(path, {"__metadata__": meta(cfg), **full}, b"\0" * 64)
        match = "more than 4194304 tensor elements"
    elif case == "near_cap":  # just under the cap and consistent, but the bytes are not there
        s = files.MAX_ELEMENTS // 8
        offs, h = 0, {"__metadata__": meta({"order": 2, "steps": s})}
        for name, shape in (("time_logits", (2 * s - 1,)), ("dt_logits", (s, 2)), ("log_s", (s, 2)), ("ds", (s, 2))):
            h[name] = entry(shape, offs)
            offs = h[name]["data_offsets"][1]
        raw_header(path, h, b"\0" * 64)
        match = "truncated or damaged tensor data: the header describes 33554424 bytes, the file holds 64"
    elif case == "elements":
        raw_header(path, {"__metadata__": meta(cfg), "a": entry((2**31, 2**31))})
        match = "more than 4194304 tensor elements"
    elif case == "header_length":
        path.write_bytes(struct.pack("<Q", 2**63) + b"{}" * 100)
        match = "declared header length 9223372036854775808"
    elif case == "tensor_count":
        raw_header(path, {"__metadata__": meta(cfg), **{f"t{i}": entry((0,)) for i in range(1000)}})
        match = "1000 tensors, more than a solver file may hold"
    elif case == "huge_int":  # longer than Python will parse
        raw_header(path, '{"__metadata__": %s, "ds": {"dtype": "F64", "shape": [1%s], "data_offsets": [0, 8]}}'
                   % (json.dumps(meta(cfg)), "0" * 5000))
        match = "header is not valid JSON"
    elif case == "negative":
        raw_header(path, {"__metadata__": meta(cfg), "ds": {"dtype": "F64", "shape": [-1, 2], "data_offsets": [0, 16]}})
        match = "is not a list of at most 4 non-negative integers"
    elif case == "bool_dim":
        raw_header(path, {"__metadata__": meta(cfg), "ds": {"dtype": "F64", "shape": [True], "data_offsets": [0, 8]}})
        match = "is not a list of at most 4 non-negative integers"
    elif case == "float_dim":
        raw_header(path, {"__metadata__": meta(cfg), "ds": {"dtype": "F64", "shape": [1e9], "data_offsets": [0, 8]}})
        match = "is not a list of at most 4 non-negative integers"
    elif case == "overlap":
        h = {"__metadata__": meta({"order": 2, "steps": 3}), **{k: entry(tuple(v.shape)) for k, v in small.items()}}
        raw_header(path, h, b"\0" * 8 * 48)
        match = "expected 0|expected 40|expected 48|damaged header"
    elif case == "gap":
        h = {"__metadata__": meta({"order": 2, "steps": 3}), "ds": entry((3, 2), 8)}
        raw_header(path, h, b"\0" * 56)
        match = "data at byte 8, expected 0"
    elif case == "too_many_dims":
        raw_header(path, {"__metadata__": meta(cfg), "ds": entry((1,) * 5)})
        match = "is not a list of at most 4"
    else:  # entry_keys
        raw_header(path, {"__metadata__": meta(cfg), "ds": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8], "x": 1}},
                   b"\0" * 8)
        match = "not a safetensors tensor entry"
    refused_cheaply(path, match, monkeypatch)


@pytest.mark.parametrize("case", ["nested_header", "nested_config", "nested_info", "utf8", "nan", "duplicate",
                                  "not_object", "metadata_values", "version", "empty_config"])
def test_every_parse_error_is_a_solver_file_error(tmp_path, monkeypatch, case):
    path = tmp_path / f"{case}.safetensors"
    small = bespoke_tensors(3, 2)
    good = {"order": 2, "steps": 3}
    deep = "[" * 100_000 + "]" * 100_000
    if case == "nested_header":
        raw_header(path, deep)
        match = "header is not valid JSON \\(or nested too deeply\\)"
    elif case in ("nested_config", "nested_info"):
        m = meta(good)
        m[case.split("_")[1]] = deep
        offs, h = 0, {"__metadata__": m}
        for name in sorted(small):
            h[name] = entry(tuple(small[name].shape), offs)
            offs = h[name]["data_offsets"][1]
        raw_header(path, h, b"\0" * offs)
        match = f"unreadable JSON {case.split('_')[1]} metadata \\(invalid, or nested too deeply\\)"
    elif case == "utf8":
        raw_header(path, b'{"__metadata__": {"format": "\xff\xfe"}}')
        match = "header is not valid JSON"
    elif case == "nan":
        m = meta(good)
        m["config"] = '{"order": 2, "steps": NaN}'
        offs, h = 0, {"__metadata__": m}
        for name in sorted(small):
            h[name] = entry(tuple(small[name].shape), offs)
            offs = h[name]["data_offsets"][1]
        raw_header(path, h, b"\0" * offs)
        match = "unreadable JSON config metadata"
    elif case == "duplicate":
        raw_header(path, '{"__metadata__": {"format": "bespoke_ext.solver"}, "__metadata__": {}}')
        match = "header is not valid JSON"
    elif case == "not_object":
        raw_header(path, "[1, 2, 3]")
        match = "header is not a JSON object"
    elif case == "metadata_values":
        raw_header(path, {"__metadata__": {"format": ["bespoke_ext.solver"]}})
        match = "not a bespoke_ext solver file"
    elif case == "version":
        raw_file(path, config=good, tensors=small, version="1" * 5000)
        match = "unreadable format_version"
    else:
        raw_file(path, config=good, tensors=small)
        path.write_bytes(path.read_bytes().replace(b'"config":"{', b'"config":"[', 1))
        match = "unreadable JSON config|not a JSON object|config must be a JSON object"
    refused_cheaply(path, match, monkeypatch)


def test_big_files_are_refused_by_size_and_damaged_big_ones_without_reading_them_in(tmp_path, monkeypatch):
    sparse = tmp_path / "sparse.safetensors"
    with open(sparse, "wb") as f:
        f.truncate(files.MAX_FILE_BYTES + 1)  # 32 MiB and a bit, sparse: no disk used
    refused_cheaply(sparse, "bytes, more than a solver file may have", monkeypatch)
    # a solver of the largest size accepted, with one flipped byte: streamed through the checksum
    steps = files.MAX_ELEMENTS // 8
    path = tmp_path / "big.safetensors"
    BespokeSolver(steps, 2).save(path)
    gc.collect()
    data = bytearray(path.read_bytes())
    assert len(data) > 32e6
    data[-5] ^= 1
    path.write_bytes(bytes(data))
    del data
    elapsed, python_peak = refused_cheaply(path, "checksum mismatch", monkeypatch)
    assert python_peak < 8e6  # chunks, not the 32 MB of tensor data


def test_the_biggest_accepted_solver_loads(tmp_path):
    steps = files.MAX_ELEMENTS // 8
    path = tmp_path / "big.safetensors"
    BespokeSolver(steps, 2).save(path)
    loaded = BespokeSolver.load(path)
    assert loaded.steps == steps and loaded.num_parameters == 8 * steps - 1 <= files.MAX_ELEMENTS


def test_files_written_before_these_checks_still_load():
    """Solver files committed with the benchmark results: the format (checksum included) is unchanged."""
    shipped = sorted(Path(__file__).resolve().parents[1].glob("benchmarks/results/*/solvers/*.safetensors"))
    assert shipped, "the benchmark results' solver files are committed with the repository"
    from bespoke_ext.solvers import load_solver

    for path in shipped:
        solver = load_solver(path)
        assert solver.nfe == int(path.stem.rsplit("nfe", 1)[1]) and path.stem.startswith(solver.method)


# -- map_location -----------------------------------------------------------------------------------------


def test_map_location(saved):
    path, solver = saved
    for where in (None, "cpu", torch.device("cpu")):
        loaded = BespokeSolver.load(path, map_location=where)
        assert all(p.device.type == "cpu" for p in loaded.parameters())
    meta_solver = BespokeSolver.load(path, map_location="meta")
    assert all(p.device.type == "meta" and p.dtype == torch.float64 for p in meta_solver.parameters())
    assert meta_solver.steps == solver.steps and meta_solver.metadata["model"] == "moons2d@abc123"
    with pytest.raises(ValueError, match="map_location 'gpu:0' is not a device"):
        BespokeSolver.load(path, map_location="gpu:0")
    with pytest.raises(TypeError, match="map_location must be a torch.device, a device string"):
        BespokeSolver.load(path, map_location={"cuda:0": "cpu"})


def test_map_location_nonstationary_and_load_solver(saved, tmp_path):
    """NonStationarySolver.load and load_solver take BespokeSolver.load's map_location, with its meaning."""
    from bespoke_ext.solvers import NonStationarySolver, load_solver

    bespoke_path, solver = saved
    ns = NonStationarySolver(6, "midpoint")
    with torch.no_grad():
        ns.b_delta.add_(0.01)
    ns_path = tmp_path / "ns.safetensors"
    ns.save(ns_path)
    for where in (None, "cpu", torch.device("cpu")):
        for loaded in (NonStationarySolver.load(ns_path, map_location=where), load_solver(ns_path, map_location=where),
                       load_solver(bespoke_path, map_location=where)):
            assert all(t.device.type == "cpu" for t in (*loaded.parameters(), *loaded.buffers()))
    meta_ns = NonStationarySolver.load(ns_path, map_location="meta")  # a device other than the default CPU
    assert all(t.device.type == "meta" for t in (*meta_ns.parameters(), *meta_ns.buffers())) and meta_ns.nfe == 6
    for path, cls in ((ns_path, NonStationarySolver), (bespoke_path, BespokeSolver)):
        loaded = load_solver(path, map_location="meta")
        assert type(loaded) is cls and all(p.device.type == "meta" for p in loaded.parameters())
    assert torch.equal(load_solver(ns_path, map_location="cpu").b_delta, ns.b_delta)
    with pytest.raises(ValueError, match="map_location 'gpu:0' is not a device"):
        NonStationarySolver.load(ns_path, map_location="gpu:0")
    with pytest.raises(TypeError, match="map_location must be a torch.device, a device string"):
        load_solver(ns_path, map_location={"cuda:0": "cpu"})


@pytest.mark.cuda
def test_map_location_cuda(saved):
    path, solver = saved
    loaded = BespokeSolver.load(path, map_location="cuda")
    assert all(p.is_cuda for p in loaded.parameters())
    torch.testing.assert_close(loaded.ds.cpu(), solver.ds, rtol=0, atol=0)
    from bespoke_ext.solvers import NonStationarySolver, load_solver

    ns_path = path.with_name("ns.safetensors")
    NonStationarySolver(4, "euler").save(ns_path)
    for loaded in (load_solver(ns_path, map_location="cuda"), load_solver(path, map_location="cuda")):
        assert all(t.is_cuda for t in (*loaded.parameters(), *loaded.buffers()))


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


def test_load_solver_reads_the_class_from_the_file(tmp_path):
    from bespoke_ext.solvers import BespokeSolver, NonStationarySolver, SolverFileError, load_solver

    scale_time, ns = BespokeSolver(3, order=2), NonStationarySolver(6, "midpoint")
    with torch.no_grad():
        ns.b_delta.add_(0.01)
    scale_time.save(tmp_path / "st.safetensors")
    ns.save(tmp_path / "ns.safetensors")
    loaded = load_solver(tmp_path / "ns.safetensors")
    assert type(loaded) is NonStationarySolver and torch.equal(loaded.coefficients()[1], ns.coefficients()[1])
    assert type(load_solver(tmp_path / "st.safetensors")) is BespokeSolver
    damaged = bytearray((tmp_path / "ns.safetensors").read_bytes())
    damaged[-1] ^= 1
    (tmp_path / "bad.safetensors").write_bytes(bytes(damaged))
    with pytest.raises(SolverFileError, match="checksum"):
        load_solver(tmp_path / "bad.safetensors")
