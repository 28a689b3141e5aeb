"""The compiled extension's import check: a library built for another torch is refused before it is
loaded, with both versions and the rebuild command; a library that fails to load says how to rebuild."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys

import pytest
import torch

import bespoke_ext
from bespoke_ext import extension
from bespoke_ext.extension import build_record_path, check_build, load_extension, read_build_record, write_build_record

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def fake_library(tmp_path):
    """Not a shared library: loading it fails ("invalid ELF header"), so a refusal that names torch
    versions proves the check ran before any loading."""
    path = tmp_path / "_C.cpython-311-x86_64-linux-gnu.so"
    path.write_bytes(b"not an ELF file" * 100)
    return str(path)


def test_the_installed_library_loads_through_the_check():
    module = load_extension()
    assert module is bespoke_ext._C
    assert hasattr(torch.ops.bespoke_ext, "rk_update")
    from bespoke_ext.extension import _C

    assert _C is module
    # once setup.py writes build records, the installed one must describe the torch imported
    record = read_build_record(module.__file__)
    if record is not None:
        assert record["torch"] == torch.__version__


def test_record_round_trip_and_a_match_passes(fake_library):
    path = write_build_record(fake_library)
    assert path == build_record_path(fake_library) and os.path.exists(path)
    record = read_build_record(fake_library)
    assert record["torch"] == torch.__version__ and record["cuda"] == torch.version.cuda
    assert record["library"] == os.path.basename(fake_library) and record["size"] == os.path.getsize(fake_library)
    assert check_build(fake_library) == record


def _tamper(library, **changes):
    path = build_record_path(library)
    with open(path) as f:
        record = json.load(f)
    record.update(changes)
    with open(path, "w") as f:
        json.dump(record, f)


def test_another_torch_is_refused_before_loading(fake_library):
    write_build_record(fake_library)
    _tamper(fake_library, torch="1.13.1+cu117", torch_git="0123abc")
    with pytest.raises(ImportError) as info:
        load_extension("bespoke_fake._C", origin=fake_library)
    message = str(info.value)
    assert "built against torch 1.13.1+cu117" in message and f"torch {torch.__version__} is imported" in message
    assert "pip install --no-build-isolation" in message
    assert "could not be loaded" not in message and "ELF" not in message  # refused, not attempted


def test_other_build_details_are_named(fake_library):
    write_build_record(fake_library)
    _tamper(fake_library, cuda="11.8", cxx11_abi=not torch.compiled_with_cxx11_abi())
    with pytest.raises(ImportError, match=rf"another build of torch {re.escape(torch.__version__)} \(cuda: built '11.8', now "
                                          r".*cxx11_abi: built"):
        check_build(fake_library)
    _tamper(fake_library, cuda=None if torch.version.cuda else "12.4", cxx11_abi=torch.compiled_with_cxx11_abi())
    with pytest.raises(ImportError, match=r"cuda: built"):  # a CPU build against a CUDA torch, or the reverse
        check_build(fake_library)
    # and the runtime side can be given: the same version string of another build (a nightly)
    write_build_record(fake_library)
    runtime = {**extension._torch_build(), "torch_git": "feedbeef"}
    with pytest.raises(ImportError, match=r"torch_git: built .*, now 'feedbeef'"):
        check_build(fake_library, runtime=runtime)


def test_a_record_of_another_file_is_ignored(fake_library):
    write_build_record(fake_library)
    _tamper(fake_library, torch="1.13.1")
    with open(fake_library, "ab") as f:
        f.write(b"rebuilt some other way")
    assert read_build_record(fake_library) is None  # size and hash no longer match: no false refusal
    with pytest.raises(ImportError) as info:
        load_extension("bespoke_fake._C", origin=fake_library)
    message = str(info.value)
    assert "could not be loaded" in message and "no build record" in message
    assert "1.13.1" not in message and "pip install --no-build-isolation" in message


def test_a_library_that_fails_to_load_says_how_to_rebuild(fake_library):
    with pytest.raises(ImportError, match=r"could not be loaded \(.*\); no build record.* rebuild it:\n .*pip install "
                                          r"--no-build-isolation"):
        load_extension("bespoke_fake._C", origin=fake_library)
    for broken in ("{", "[1, 2]", '{"torch": 3}'):
        with open(build_record_path(fake_library), "w") as f:
            f.write(broken)
        assert read_build_record(fake_library) is None


def test_a_missing_library_says_how_to_build():
    with pytest.raises(ImportError, match=r"is not built\. Build it:\n .*pip install --no-build-isolation --no-deps -e "):
        load_extension("bespoke_ext._missing")


def test_the_rebuild_command_of_a_source_checkout():
    library = bespoke_ext._C.__file__
    assert extension.rebuild_command(library) == f"{sys.executable} -m pip install --no-build-isolation --no-deps -e {REPO}"


def test_setup_py_can_load_this_file_by_path_without_loading_the_library(tmp_path, fake_library):
    spec = importlib.util.spec_from_file_location("_bespoke_ext_build_record", extension.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert "_C" not in vars(module)
    assert module.write_build_record(fake_library) == build_record_path(fake_library)
    assert read_build_record(fake_library)["torch"] == torch.__version__
