"""Checkpoints: a training run killed with SIGKILL and started again with the same command ends
bit-identical to an uninterrupted run; Ctrl-C saves the last complete iteration; a checkpoint of a
different run is refused."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from bespoke_ext.solvers import BespokeSolver
from bespoke_ext.training import train
from bespoke_ext.training.checkpoint import load_checkpoint


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py; so is the ``mixture`` factory


# The run under test; the script and the in-process reference both use exactly these arguments.
TRAIN_KW = dict(shape=(4,), iterations=30, batch_size=16, seed=7, checkpoint_every=3, cache_samples=64,
                val_size=32, val_every=5, progress=False, model_tag="mixture-4d")


SCRIPT = textwrap.dedent("""
    import json, sys, time
    import torch
    torch.set_num_threads(1)   # the same arithmetic as the in-process reference (and fast when shared)
    from bespoke_ext.models.oracle import GaussianMixtureFlow
    from bespoke_ext.solvers import BespokeSolver
    from bespoke_ext.training import train

    out, cache, ckpt, delay, kw = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), json.loads(sys.argv[5])
    oracle = GaussianMixtureFlow.random(dim=4, components=5, std=0.1, seed=0)

    class Slow(torch.nn.Module):
        # Slows the run down so that the test can kill it in the middle.
        def __init__(self):
            super().__init__()
            self.inner = oracle
        def forward(self, x, t):
            time.sleep(delay)
            return self.inner(x, t)

    solver = train(Slow(), BespokeSolver(3, 2), checkpoint=ckpt, cache_dir=cache, dtype=torch.float64, **kw)
    solver.save(out)
""")


def run_script(tmp_path, out, ckpt, delay, wait=True):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, str(script), str(out), str(tmp_path / "cache"), str(ckpt), str(delay), json.dumps(TRAIN_KW)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output
    return proc


def test_sigkill_then_rerun_matches_uninterrupted_run(tmp_path, mixture):
    # Uninterrupted reference, in this process (one thread, like the script); it also builds the cache.
    # The script's oracle is this one: GaussianMixtureFlow.random(dim=4, components=5, std=0.1).
    ref = train(mixture(4, std=0.1), BespokeSolver(3, 2), cache_dir=str(tmp_path / "cache"), dtype=torch.float64,
                **TRAIN_KW)
    ckpt, out = tmp_path / "train.ckpt", tmp_path / "out.safetensors"
    proc = run_script(tmp_path, out, ckpt, 0.01, wait=False)
    deadline = time.time() + 240
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        state = load_checkpoint(ckpt) if ckpt.exists() else None
        if state is not None and state["iteration"] >= 6:
            os.kill(proc.pid, signal.SIGKILL)
            killed_at = state["iteration"]
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert killed_at is not None and proc.returncode == -signal.SIGKILL, proc.stdout.read()
    assert load_checkpoint(ckpt)["iteration"] < 30      # it really died in the middle
    assert not out.exists()
    run_script(tmp_path, out, ckpt, 0.0)                # the same command again: resumes
    resumed = BespokeSolver.load(out)
    # The resumed run replays the same arithmetic from restored state (parameters, Adam moments, batch
    # generator, history, best solver): bit-identical in every run here. The comparison allows the last
    # bits only because two processes once differed there (tests/test_distributed.py).
    for (name, pa), pb in zip(ref.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-12, atol=1e-15, msg=name)
    h = resumed.metadata["training"]
    assert h["best_val_rmse"] == pytest.approx(ref.history.best_rmse, rel=1e-12)
    assert h["final_loss"] == pytest.approx(ref.history.loss[-1], rel=1e-12)
    assert h["best_iteration"] == ref.history.best_iteration


class InterruptAfter(torch.nn.Module):
    """Raises KeyboardInterrupt at the n-th call (a Ctrl-C in the middle of an iteration)."""

    def __init__(self, inner, calls):
        super().__init__()
        self.inner, self.left = inner, calls

    def forward(self, x, t):
        self.left -= 1
        if self.left == 0:
            raise KeyboardInterrupt
        return self.inner(x, t)


def test_keyboard_interrupt_saves_last_complete_iteration_and_resume_matches(tmp_path, mixture, monkeypatch):
    m = mixture(3, components=4, std=0.15, seed=1)
    kw = dict(shape=(3,), iterations=12, batch_size=8, seed=2, gt="online", val_size=8, val_every=4,
              progress=False, dtype=torch.float64, model_tag="mixture-3d", checkpoint_every=100)
    ref = train(m, BespokeSolver(2, 1), **kw)
    ckpt = tmp_path / "c.ckpt"
    # Online ground truth calls the model many times per iteration: interrupt somewhere in iteration ~5.
    with pytest.raises(KeyboardInterrupt):
        train(InterruptAfter(m, 700), BespokeSolver(2, 1), checkpoint=str(ckpt), **kw)
    state = load_checkpoint(ckpt)
    assert 0 < state["iteration"] < 12
    # The validation set's ground truth comes back from the checkpoint: solving it again would fail here.
    import bespoke_ext.training.validation as validation

    def no_solve(*args, **kwargs):
        raise AssertionError("the validation ground truth was solved again on resume")

    with monkeypatch.context() as patch:
        patch.setattr(validation, "solve_trajectories", no_solve)
        resumed = train(m, BespokeSolver(2, 1), checkpoint=str(ckpt), **kw)
    for pa, pb in zip(ref.parameters(), resumed.parameters()):
        assert torch.equal(pa, pb)
    assert ref.history.loss == resumed.history.loss and ref.history.val_rmse == resumed.history.val_rmse
    # Rerunning a finished run returns its result without training again.
    again = train(m, BespokeSolver(2, 1), checkpoint=str(ckpt), **kw)
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), ref.parameters()))


def test_checkpoint_of_another_run_is_refused(tmp_path, mixture):
    m = mixture(3, components=4, std=0.15, seed=1)
    ckpt = tmp_path / "c.ckpt"
    kw = dict(shape=(3,), iterations=2, batch_size=4, gt="online", val_size=4, progress=False, checkpoint=str(ckpt))
    train(m, BespokeSolver(2, 1), **kw)
    with pytest.raises(ValueError, match="lr: checkpoint has 0.005"):
        train(m, BespokeSolver(2, 1), lr=0.1, **{k: v for k, v in kw.items()})
    damaged = ckpt.read_bytes()
    ckpt.write_bytes(damaged[:len(damaged) // 2])
    with pytest.raises(ValueError, match="cannot be read.*delete it to start over"):
        train(m, BespokeSolver(2, 1), **kw)
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is not a bespoke_ext training checkpoint; checkpoint= names"):
        train(m, BespokeSolver(2, 1), **kw)
    solver_file = tmp_path / "solver.bespoke"
    BespokeSolver(2, 1).save(solver_file)
    with pytest.raises(ValueError, match=r"not a bespoke_ext training checkpoint \(a safetensors file"):
        train(m, BespokeSolver(2, 1), **{**kw, "checkpoint": str(solver_file)})


def test_a_finished_run_extends_from_the_solver_it_returned(tmp_path, mixture):
    """keep_best returns the best iterate, neither the start nor the last: given back with more iterations, it
    is the same run, which goes on from its last iterate."""
    m = mixture(3, components=4, std=0.15, seed=1)
    ckpt = tmp_path / "run.ckpt"
    kw = dict(shape=(3,), batch_size=4, gt="online", val_size=8, val_every=1, lr=0.05, progress=False,
              checkpoint=str(ckpt), model_tag="mixture-3d")
    best = train(m, BespokeSolver(2, 1), iterations=8, **kw)
    assert 0 < best.history.best_iteration < 8   # the case under test: the best iterate is a middle one
    extended = train(m, best, iterations=10, **kw)
    assert extended.history.iterations == 10 and extended.history.val_iteration[-1] == 10
    with pytest.raises(ValueError, match="solver_start"):   # a solver this run never held is still refused
        train(m, BespokeSolver(2, 2), iterations=12, **kw)


def test_checkpoint_never_resumes_into_another_starting_solver(tmp_path, mixture):
    """Same class and NFE, other start: a non-stationary solver on another base (other refs and tables), or
    converted from a trained solver, is refused; the same start resumes."""
    from bespoke_ext.solvers import NonStationarySolver

    m = mixture(3, components=4, std=0.15, seed=1)
    ckpt = tmp_path / "ns.ckpt"
    kw = dict(shape=(3,), iterations=2, batch_size=4, gt="online", val_size=4, progress=False, checkpoint=str(ckpt),
              loss="log_mse")
    train(m, NonStationarySolver(4, "euler"), **kw)
    for other in (NonStationarySolver(4, "midpoint"), NonStationarySolver.from_solver(BespokeSolver(2, 2))):
        with pytest.raises(ValueError, match="solver_start"):
            train(m, other, **kw)
    resumed = train(m, NonStationarySolver(4, "euler"), **{**kw, "iterations": 3})
    assert resumed.history.iterations == 3


def test_resume_with_other_iterations_only_where_the_run_stays_what_was_asked(tmp_path, mixture, monkeypatch):
    """Fewer iterations than done, or another total for an unfinished cosine run, are refused (the result
    would be a longer run, or a mix of two learning-rate schedules); extending a finished run and changing
    the total under the constant schedule resume."""
    from bespoke_ext.training import trainer

    m = mixture(3, components=4, std=0.15, seed=1)
    kw = dict(shape=(3,), batch_size=4, gt="online", val_size=4, progress=False, model_tag="mixture-3d",
              checkpoint_every=2)
    finished = tmp_path / "finished.ckpt"
    train(m, BespokeSolver(2, 1), iterations=4, checkpoint=str(finished), **kw)
    with pytest.raises(ValueError, match=r"already trained 4 iterations, more than iterations=3"):
        train(m, BespokeSolver(2, 1), iterations=3, checkpoint=str(finished), **kw)
    assert train(m, BespokeSolver(2, 1), iterations=6, checkpoint=str(finished), **kw).history.iterations == 6

    step = trainer._Run.step
    for schedule, refused in (("cosine", True), ("constant", False)):
        ckpt = tmp_path / f"{schedule}.ckpt"
        calls = []

        def stop_in_third(self, *args, **kwargs):   # Ctrl-C in iteration 3: the checkpoint holds 2 of 6
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return step(self, *args, **kwargs)

        with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
            patch.setattr(trainer._Run, "step", stop_in_third)
            train(m, BespokeSolver(2, 1), iterations=6, checkpoint=str(ckpt), lr_schedule=schedule, **kw)
        assert load_checkpoint(ckpt)["iteration"] == 2
        if refused:
            with pytest.raises(ValueError, match=r"unfinished run of iterations=6 \(at iteration 2\).*cosine"):
                train(m, BespokeSolver(2, 1), iterations=8, checkpoint=str(ckpt), lr_schedule=schedule, **kw)
        total = 6 if refused else 8
        resumed = train(m, BespokeSolver(2, 1), iterations=total, checkpoint=str(ckpt), lr_schedule=schedule, **kw)
        assert resumed.history.iterations == total
