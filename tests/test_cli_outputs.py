"""The command line and the solver files where a run's output could be lost or wrong: output paths
checked before the work, a plot that cannot replace the solver, flags of the other solver family,
NaN samples, saves that fail, files that cannot sample, FIFOs, CUDA without CUDA."""

from __future__ import annotations

import argparse
import os

import pytest
import torch

from bespoke_ext.solvers import BespokeSolver, NonStationarySolver, SolverFileError, load_solver

from test_training import _cli_solver  # noqa: E402  (the solver `bespoke-ext train m <argv>` starts from)


@pytest.fixture
def cli(tmp_path, monkeypatch):
    """argv -> run_train's status, on a small Gaussian-mixture model importable as my_flow_models:make."""
    from bespoke_ext.cli.train import add_train_arguments, run_train

    (tmp_path / "my_flow_models.py").write_text(
        "from bespoke_ext.models.oracle import GaussianMixtureFlow\n"
        "def make():\n    return GaussianMixtureFlow.random(dim=3, components=4, std=0.2, seed=0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    common = ["my_flow_models:make", "--shape", "3", "--steps", "2", "--iterations", "2", "--batch-size", "8",
              "--val-size", "8", "--val-every", "2", "--cache-samples", "16", "--cache-dir", str(tmp_path / "gt"),
              "--no-progress"]
    return lambda *argv: run_train(add_train_arguments(argparse.ArgumentParser()).parse_args(common + list(argv)))


def test_a_png_output_keeps_the_solver_and_the_plot_beside_it(cli, tmp_path):
    out = tmp_path / "solver.png"
    assert cli("-o", str(out)) == 0
    assert BespokeSolver.load(out).steps == 2                       # not replaced by the learning curve
    assert (tmp_path / "solver.png.png").read_bytes()[:4] == b"\x89PNG"
    assert cli("-o", str(tmp_path / "s.safetensors"), "--plot", str(tmp_path / "new" / "curve")) == 0
    assert (tmp_path / "new" / "curve.png").stat().st_size > 1000   # its folder made, the name matplotlib writes


def test_an_unusable_output_is_refused_before_training(cli, tmp_path):
    (tmp_path / "afile").write_text("x")
    for bad, message in ((tmp_path, "is a folder"), (tmp_path / "afile" / "s.safetensors", "cannot write into")):
        with pytest.raises(ValueError, match=message):
            cli("-o", str(bad))
    assert not (tmp_path / "gt").exists()                           # nothing was solved or trained


def test_flags_of_the_other_family_are_refused():
    made = _cli_solver
    with pytest.raises(ValueError, match="--base is for --solver nonstationary"):
        made("--base", "midpoint")
    with pytest.raises(ValueError, match="--order is for --solver bespoke"):
        made("--solver", "nonstationary", "--order", "1")
    assert made("--solver", "nonstationary", "--base", "midpoint").base == "midpoint"


def test_init_runs_name_the_file_as_their_baseline(cli, tmp_path, capsys):
    first = tmp_path / "first.safetensors"
    assert cli("-o", str(first)) == 0
    capsys.readouterr()
    assert cli("--init", str(first), "-o", str(tmp_path / "second.safetensors")) == 0
    assert f"--init {first} " in capsys.readouterr().out


def test_sample_refuses_a_folder_output_and_non_finite_samples(tmp_path, monkeypatch):
    from bespoke_ext.cli.sample import add_sample_arguments, run_sample

    (tmp_path / "nan_model.py").write_text(
        "import torch\nclass M(torch.nn.Module):\n    shape = (3,)\n    def forward(self, x, t):\n"
        "        return x * float('nan')\ndef make():\n    return M()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    run = lambda *argv: run_sample(add_sample_arguments(argparse.ArgumentParser()).parse_args(list(argv)))  # noqa: E731
    with pytest.raises(ValueError, match="is a folder"):
        run("moons2d", "-o", str(tmp_path), "--nfe", "4")
    out = tmp_path / "s.safetensors"
    with pytest.raises(ValueError, match="4 of 4 samples hold NaN or inf.*nothing written"):
        run("nan_model:make", "-n", "4", "--nfe", "4", "-o", str(out))
    assert not out.exists()


def test_nonstationary_save_applies_the_file_schema(tmp_path):
    ns = NonStationarySolver(4)
    with torch.no_grad():
        ns.a_delta[0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        ns.save(tmp_path / "ns.safetensors")
    assert os.listdir(tmp_path) == []


def test_a_file_whose_values_cannot_sample_is_refused(tmp_path):
    solver = BespokeSolver(3, 2)
    with torch.no_grad():
        solver.ds.fill_(1e300)      # finite, but the step coefficients overflow float32
    path = tmp_path / "huge.safetensors"
    solver.save(path)
    with pytest.raises(SolverFileError, match="not finite in float32"):
        load_solver(path)


def test_a_failed_save_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "taken"
    target.mkdir()                  # os.replace onto a folder fails
    with pytest.raises(OSError):
        BespokeSolver(2, 1).save(target)
    assert sorted(os.listdir(tmp_path)) == ["taken"]


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(SolverFileError, match="not a regular file"):
        load_solver(fifo)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message for a machine without CUDA")
def test_map_location_cuda_without_cuda_is_a_clear_error(tmp_path):
    path = tmp_path / "s.safetensors"
    BespokeSolver(2, 1).save(path)
    with pytest.raises(ValueError, match="sees no CUDA device"):
        load_solver(path, map_location="cuda")
