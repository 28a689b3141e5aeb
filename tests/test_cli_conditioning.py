"""Conditional models on the command line (cli/conditioning.py): a class-conditional model trains for its label
pool under guidance and samples the labels asked for; --conditions passes a model's own per-sample inputs;
bad flags and files are refused with messages that name them."""

from __future__ import annotations

import argparse
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import bespoke_ext as bx
from bespoke_ext.cli.conditioning import conditioning, training_pool
from bespoke_ext.models import ClassifierFreeGuidance
from bespoke_ext.models.embedded import load_embedded, read_card
from bespoke_ext.solvers import BespokeSolver

COND_MODEL = '''
import torch
SEEN = []   # the labels of every call, read back by the test

class CondFlow(torch.nn.Module):
    """A velocity that needs its per-sample label y."""
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(3, 3)
        self.emb = torch.nn.Embedding(4, 3)

    def forward(self, x, t, y):
        SEEN.append(y.clone())
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1)
        return self.lin(x) * (1 - t) + self.emb(y)

def make():
    return CondFlow()
'''


@pytest.fixture
def cond_model(tmp_path, monkeypatch):
    (tmp_path / "my_cond_models.py").write_text(COND_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_cond_models", raising=False)   # a fresh SEEN per test
    import my_cond_models
    return my_cond_models


def _train(tmp_path, *argv):
    from bespoke_ext.cli.train import add_train_arguments, run_train

    common = ["my_cond_models:make", "--shape", "3", "--steps", "2", "--iterations", "2", "--batch-size", "8",
              "--val-size", "8", "--val-every", "2", "--cache-samples", "16", "--cache-dir", str(tmp_path / "gt"),
              "--no-progress", "-o", str(tmp_path / "s.safetensors")]
    return run_train(add_train_arguments(argparse.ArgumentParser()).parse_args(common + list(argv)))


def _sample_args(*argv):
    from bespoke_ext.cli.sample import add_sample_arguments

    return add_sample_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def test_train_draws_every_sample_label_from_the_conditions_file(cond_model, tmp_path):
    pool = tmp_path / "labels.safetensors"
    save_file({"y": torch.tensor([1, 2, 1])}, str(pool))
    assert _train(tmp_path, "--conditions", str(pool)) == 0
    seen = torch.cat(cond_model.SEEN)
    assert seen.numel() > 100 and set(seen.tolist()) == {1, 2}       # per-sample rows of the pool, both drawn
    assert BespokeSolver.load(tmp_path / "s.safetensors").metadata["conditions"] == str(pool)


def test_train_without_the_conditions_a_model_needs_fails_before_ground_truth(cond_model, tmp_path):
    with pytest.raises((TypeError, ValueError), match="y"):
        _train(tmp_path)
    assert not any((tmp_path / "gt").glob("**/*.safetensors"))


def test_a_class_conditional_card_trains_guided_on_every_label():
    model = load_embedded("mnist_cond")
    args = argparse.Namespace(guidance=4.0, conditions=None)
    cond = conditioning(model.velocity, read_card("mnist_cond"), args)
    assert isinstance(cond.model, ClassifierFreeGuidance) and cond.model.guidance_scale == 3.0   # w = g - 1
    assert cond.model.null_value == 10 and cond.guidance == 4.0
    assert torch.equal(training_pool(cond)["y"], torch.arange(10))
    default = conditioning(model.velocity, read_card("mnist_cond"), argparse.Namespace(guidance=None, conditions=None))
    assert default.guidance == 2.0                                                               # the demo's g
    plain = conditioning(model.velocity, None, argparse.Namespace(guidance=None, conditions=None))
    assert plain.model is model.velocity and training_pool(plain) is None


def test_sample_writes_the_guided_samples_of_the_labels_asked_for(tmp_path, monkeypatch):
    from bespoke_ext.cli.sample import run_sample

    monkeypatch.chdir(tmp_path)
    solver = tmp_path / "g3.safetensors"
    BespokeSolver(1, order=1).save(solver, metadata={"guidance": 3.0})
    out = tmp_path / "s.safetensors"
    assert run_sample(_sample_args("mnist_cond", "--solver", str(solver), "--labels", "3,7", "-n", "5",
                                   "-o", str(out))) == 0
    with safe_open(str(out), "pt") as f:
        samples, labels, meta = f.get_tensor("samples"), f.get_tensor("labels"), f.metadata()
    assert labels.tolist() == [3, 7, 3, 7, 3] and meta["guidance"] == "3.0"   # the file's g when none is given
    velocity = ClassifierFreeGuidance(load_embedded("mnist_cond").velocity, 2.0, cond_key="y", null_value=10)
    x0 = torch.randn((5, 1, 28, 28), generator=torch.Generator().manual_seed(0))
    expected = bx.sample(velocity, x0, solver=BespokeSolver.load(solver), y=labels)
    torch.testing.assert_close(samples, expected, rtol=0, atol=1e-6)


def test_sample_warns_when_guided_otherwise_than_its_solver_was_trained(tmp_path, monkeypatch, capsys):
    from bespoke_ext.cli.sample import run_sample

    monkeypatch.chdir(tmp_path)
    solver = tmp_path / "g3.safetensors"
    BespokeSolver(1, order=1).save(solver, metadata={"guidance": 3.0})
    assert run_sample(_sample_args("mnist_cond", "--solver", str(solver), "--guidance", "2", "-n", "2")) == 0
    assert "trained at guidance g = 3, not 2" in capsys.readouterr().err


def test_sample_passes_conditions_rows_one_per_sample(cond_model, tmp_path, monkeypatch):
    from bespoke_ext.cli.sample import run_sample

    monkeypatch.chdir(tmp_path)
    rows = tmp_path / "rows.safetensors"
    save_file({"y": torch.tensor([0, 3, 2])}, str(rows))
    assert run_sample(_sample_args("my_cond_models:make", "--shape", "3", "--method", "euler", "--nfe", "2",
                                   "--conditions", str(rows), "-o", str(tmp_path / "s.safetensors"))) == 0
    assert all(y.tolist() == [0, 3, 2] for y in cond_model.SEEN)      # -n defaults to the file's 3 rows
    with pytest.raises(ValueError, match="holds 3 rows, one per sample, but -n asks for 4"):
        run_sample(_sample_args("my_cond_models:make", "--shape", "3", "--conditions", str(rows), "-n", "4"))


@pytest.mark.parametrize("argv, message", [
    (("moons2d", "--guidance", "2"), "--guidance applies to class-conditional models"),
    (("moons2d", "--labels", "1"), "--labels applies to class-conditional models"),
    (("mnist_cond", "--labels", "10"), r"--labels \[10\] outside the model's classes 0-9"),
    (("mnist_cond", "--labels", "1,a"), "--labels must be integers"),
    (("mnist_cond", "--guidance", "-1"), "--guidance must be a number >= 0"),
])
def test_bad_conditioning_flags_are_refused_by_name(argv, message, tmp_path, monkeypatch):
    from bespoke_ext.cli.sample import run_sample

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=message):
        run_sample(_sample_args(*argv, "--method", "euler", "--nfe", "1", "-n", "2"))


@pytest.mark.parametrize("tensors, message", [
    ({"label": torch.tensor([1, 2])}, r"takes its labels as 'y' \(its card\); the file holds \['label'\]"),
    ({"y": torch.tensor([1, 12])}, "holds labels outside the model's classes 0-9"),
    ({"y": torch.tensor([1.0, 2.0])}, "must hold integer class labels"),
    ({"y": torch.tensor([1, 2]), "z": torch.zeros(3)}, "the same leading dimension M"),
    ({"y": torch.tensor(1)}, "the same leading dimension M"),
])
def test_bad_conditions_files_are_refused_by_name(tensors, message, tmp_path, monkeypatch):
    from bespoke_ext.cli.sample import run_sample

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "c.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=message):
        run_sample(_sample_args("mnist_cond", "--conditions", str(path), "--method", "euler", "--nfe", "1"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    for bad, why in ((tmp_path / "junk.safetensors", "not a safetensors file"), (tmp_path / "none", "no such file")):
        with pytest.raises(ValueError, match=why):
            run_sample(_sample_args("mnist_cond", "--conditions", str(bad), "--method", "euler", "--nfe", "1"))
