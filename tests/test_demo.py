"""`bespoke-ext demo` end to end, reduced (--quick), on the fastest embedded model of each kind (the 2-D
model: sliced Wasserstein; the 8x8 VP noise predictor: FCD, adapters): the table's structure, the
figures, the solver files, and the argument errors."""

import json
import math

import pytest

from bespoke_ext.cli.demo import add_demo_arguments
from bespoke_ext.compare import BASELINES
from bespoke_ext.demo import run

NFES = [8, 10]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


METRIC = {"moons2d": "SWD", "digits_vp": "FCD"}


@pytest.fixture(scope="module", params=sorted(METRIC))
def demo(request, tmp_path_factory):
    """One reduced demo per model through the command line, shared by the checks below."""
    from bespoke_ext.cli import main

    out = tmp_path_factory.mktemp(f"demo-{request.param}")
    code = main(["demo", "--model", request.param, "--quick", "--nfe", *map(str, NFES), "--out", str(out),
                 "--no-progress", "--threads", "1"])
    assert code == 0
    return out, json.loads((out / "results.json").read_text())


def test_table_has_every_method_with_finite_numbers(demo):
    _, results = demo
    rows = results["rows"]
    methods = {r["method"] for r in rows}
    assert methods == {"ground truth", "bespoke-ns", "bespoke-rk2", "bespoke-rk1", "dopri5", *BASELINES}
    metric = METRIC[results["summary"]["model"]]
    assert results["summary"]["distribution_metric"] == metric
    for r in rows:
        assert r["seconds"] > 0 and math.isfinite(r["seconds"])
        assert math.isfinite(r["distribution"][metric]) and r["distribution"][metric] >= 0
        if r["method"] == "ground truth":
            assert r["rmse"] == 0 and r["psnr"] == "inf"  # JSON has no infinity: written as a string
        else:
            assert r["rmse"] > 0 and math.isfinite(r["rmse"]) and math.isfinite(r["psnr"])


def test_nfe_column(demo):
    _, results = demo
    rows = results["rows"]
    for method in ("bespoke-rk1", "bespoke-rk2", "bespoke-ns"):
        assert sorted(r["nfe"] for r in rows if r["method"] == method) == NFES
    for method, (_, per_step) in BASELINES.items():
        nfes = [r["nfe"] for r in rows if r["method"] == method]
        assert nfes and all(n % per_step == 0 for n in nfes), (method, nfes)
        assert {n for n in NFES if n % per_step == 0} <= set(nfes)
    adaptive = [r["nfe"] for r in rows if r["method"] in ("dopri5", "ground truth")]
    assert len(adaptive) == 2 and min(adaptive) > 0
    assert max(r["nfe"] for r in rows if r["method"] == "ground truth") > max(NFES)


def test_summary_explains_gains_cost_and_stages(demo):
    out, results = demo
    s = results["summary"]
    rows = {(r["method"], r["nfe"]): r for r in results["rows"]}
    assert [c["nfe"] for c in s["comparisons"]] == NFES
    for c in s["comparisons"]:
        mine, mid = rows[("bespoke-rk2", c["nfe"])], rows[("midpoint", c["nfe"])]
        assert c["gain_over_midpoint_db"] == pytest.approx(mine["psnr"] - mid["psnr"])
        assert c["gain_over_midpoint_se_db"] > 0 and math.isfinite(c["gain_over_midpoint_se_db"])  # paired spread
        ns = c["nonstationary"]
        assert ns["gain_over_midpoint_db"] == pytest.approx(rows[("bespoke-ns", c["nfe"])]["psnr"] - mid["psnr"])
        assert ns["rmse_over_rk2"] == pytest.approx(rows[("bespoke-ns", c["nfe"])]["rmse"] / mine["rmse"])
        assert 0 < ns["training_seconds"] and 0 < ns["training_cost_fraction"] < s["training_cost_fraction"]
        assert 0 < c["bespoke_rk2_training_cost_fraction"] < s["training_cost_fraction"]
        # its iterations plus the ground truth (both rounded to 0.1 s, so a quick run's may round to the same figure)
        assert c["bespoke_rk2_training_seconds"] >= s["training_gt_seconds"]
    assert "targets" not in s  # internal targets belong to the benchmark report, not to what users read
    assert s["training_seconds"] > 0 and 0 < s["training_cost_fraction"]
    assert set(s["stages_seconds"]) == {"load", "ground truth", "train", "evaluate", "report"}
    # a quick run shares costs against the card's pretraining figure, and says so
    assert s["pretraining_source"] == "card" and s["pretraining_seconds"] == s["pretraining_card_seconds"] > 0
    md = (out / "results.md").read_text()
    assert md.startswith(f"| method | NFE | RMSE | PSNR (dB) | {s['distribution_metric']} |")
    assert "over midpoint" in md and "target" not in md and s["distribution_floor"] >= 0


def test_a_full_run_shares_training_cost_against_pretraining_replayed_now(monkeypatch):
    """Outside a quick run the cost's denominator is the pretraining loop timed in this run, not the card's
    figure (measured once under that day's load), and the summary says which it read."""
    import importlib

    from bespoke_ext.models import pretraining_replay

    demo_run = importlib.import_module("bespoke_ext.demo.run")  # the module (``run`` above is its function)
    calls = []

    def fake_replay(name, card):
        calls.append(name)
        return {"seconds": 123.4, "cpu_seconds": 120.0, "threads": 1, "parts": []}

    monkeypatch.setattr(pretraining_replay, "replay", fake_replay)
    em = type("EM", (), {"name": "mnist_cond", "card": {"name": "mnist_cond",
                                                       "training": {"wall_clock_seconds": 5000.0, "cpu_seconds": 900.0}}})
    clock, said = demo_run._Clock(), []
    ref = demo_run.pretraining_reference(em, False, clock, said.append)
    assert calls == ["mnist_cond"] and "pretraining replay" in clock.stages and said
    assert ref == {"seconds": 123.4, "cpu_seconds": 120.0, "source": "replayed", "card_seconds": 5000.0}
    words = demo_run.pretraining_words({"pretraining_source": "replayed", "pretraining_card_seconds": 5000.0})
    assert "replayed" in words and "5000 s" in words
    quick = demo_run.pretraining_reference(em, True, demo_run._Clock(), said.append)
    assert calls == ["mnist_cond"] and quick["source"] == "card" and quick["seconds"] == 5000.0
    assert quick["cpu_seconds"] == 900.0 and demo_run.pretraining_words({"pretraining_source": "card"}) == "from its card"


def test_every_figure_is_a_valid_png(demo):
    import matplotlib.image

    out, results = demo
    figures = results["summary"]["figures"]
    assert {p.split("/")[-1] for p in figures} == {"samples.png", "rmse_vs_nfe.png", "bespoke_schedules.png",
                                                   "nonstationary_schedules.png"}
    for path in figures:
        with open(path, "rb") as f:
            assert f.read(8) == PNG_MAGIC, path
        assert matplotlib.image.imread(path).ndim == 3


def test_solver_files_load_and_reproduce_the_table(demo):
    from safetensors.torch import load_file

    from bespoke_ext.metrics import rmse
    from bespoke_ext.models.embedded import load_embedded
    from bespoke_ext.sampling import sample
    from bespoke_ext.solvers import load_solver

    _, results = demo
    batch = load_file(results["summary"]["evaluation_batch"])
    model = results["summary"]["model"]
    files = results["summary"]["solver_files"]
    assert len(files) == 3 * len(NFES)
    em = load_embedded(model)
    rows = {(r["method"], r["nfe"]): r for r in results["rows"]}
    for path in files:
        solver = load_solver(path)
        assert solver.metadata["model"] == model and solver.nfe in NFES
        assert solver.metadata["model_weights_sha256"] == em.card["weights"]["sha256"]
        assert path.endswith(f"{solver.method}-nfe{solver.nfe}.safetensors")
        x = sample(em.velocity, batch["x0"], solver=solver)
        assert rmse(x, batch["ground_truth"]) == pytest.approx(rows[(solver.method, solver.nfe)]["rmse"], rel=1e-5)


def test_argument_errors_name_the_option(tmp_path):
    import argparse

    with pytest.raises(ValueError, match="--nfe"):
        run("moons2d", nfe=[9], out=tmp_path, quick=True, progress=False)
    with pytest.raises(ValueError, match="--model"):
        run("no-such-model", out=tmp_path, quick=True, progress=False)
    with pytest.raises(ValueError, match="--batch"):
        run("moons2d", out=tmp_path, batch=0, quick=True, progress=False)
    args = add_demo_arguments(argparse.ArgumentParser()).parse_args([])
    assert args.nfe == [8, 10] and args.out == "bespoke-demo" and args.model is None


def test_conditional_demo_model_guides_and_cycles_the_labels():
    from bespoke_ext.demo.conditional import demo_model
    from bespoke_ext.models import ClassifierFreeGuidance
    from bespoke_ext.models.embedded import load_embedded

    dm = demo_model(load_embedded("mnist_cond"), 4.0)
    assert isinstance(dm.velocity, ClassifierFreeGuidance) and dm.velocity.guidance_scale == 3.0  # g = 1 + w
    assert dm.conditional and dm.conditions["y"].tolist() == list(range(10))
    assert dm.extras(12)["y"].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert demo_model(load_embedded("mnist_cond")).guidance == 2.0
    plain = demo_model(load_embedded("moons2d"))
    assert not plain.conditional and plain.conditions is None and plain.extras(5) == {}
    with pytest.raises(ValueError, match="--guidance"):
        demo_model(load_embedded("moons2d"), 2.0)
    with pytest.raises(ValueError, match="--guidance"):
        demo_model(load_embedded("mnist_cond"), -1.0)
