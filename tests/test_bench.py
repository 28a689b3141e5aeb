"""Smoke tests of the benchmark suite's code paths (bespoke_ext/bench/, `bespoke-ext bench`, the kernel
tables from a stand-in for benchmarks/bench_ops.py's output, benchmarks/bench_training.py's bookkeeping,
benchmarks/gpu/sampling.py): tiny models and settings, no timing assertions. diffusers and flow_matching
come with the test extra: a missing one fails here."""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from bespoke_ext.bench import diffusers as bench_diffusers
from bespoke_ext.bench import kernels as bench_kernels
from bespoke_ext.bench import report as bench_report
from bespoke_ext.bench import suite as bench
from bespoke_ext.bench import timing as bench_timing
from bespoke_ext.bench import wallclock as bench_wallclock
from bespoke_ext.bench import quality as bench_quality
from bespoke_ext.bench.quality import quality_targets
from bespoke_ext.compare import Row
from bespoke_ext.models.oracle import GaussianMixtureFlow
from bespoke_ext.sampling import sample

ROOT = Path(__file__).resolve().parents[1]
# diffusers' own set_timesteps calls np.array on a tensor (a NumPy 2 deprecation inside diffusers, not here)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is fastest, and on shared busy cores more threads spin (see demo.run)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _Counting(torch.nn.Module):
    """A tiny velocity field that counts its evaluations."""

    def __init__(self):
        super().__init__()
        self.field = GaussianMixtureFlow.random(dim=2, components=3, std=0.3, seed=0).float()
        self.calls = 0

    def forward(self, x, t, **extras):
        self.calls += 1
        return self.field(x, t)


def test_test_extra_is_installed():
    """The test extra installs these; the tests below then compare against them rather than skip."""
    assert bench_diffusers.diffusers_missing() is None
    assert importlib.util.find_spec("flow_matching") is not None


def test_diffusers_flow_mapping_converges_to_ground_truth():
    """Sign and time mapping: with more steps UniPC approaches the dopri5 ground truth, and DPM-Solver++ the
    ground truth of the ODE started where its grid starts (t = 1/num_train_timesteps); a wrong sign or time
    map would leave O(1) errors at every NFE."""
    m = GaussianMixtureFlow.random(dim=4, components=3, std=0.3, seed=1).double()
    x0 = m.sample_noise(32, torch.Generator().manual_seed(0), dtype=torch.float64)
    truth = sample(m, x0, method="dopri5", atol=1e-7, rtol=1e-7)
    start = 1.0 / bench_diffusers.FLOW_CONFIG["num_train_timesteps"]
    shifted = sample(m, x0, method="dopri5", atol=1e-7, rtol=1e-7,
                     time_grid=torch.tensor([start, 1.0], dtype=torch.float64))

    def error(method, nfe, reference):
        x = bench_diffusers.diffusers_sample(method, m, x0, nfe)
        return float((x - reference).pow(2).mean(1).sqrt().mean())

    assert error("diffusers-unipc", 80, truth) < 5e-4 < error("diffusers-unipc", 20, truth) < 0.02
    coarse, fine = error("diffusers-dpm++2m", 20, shifted), error("diffusers-dpm++2m", 80, shifted)
    assert fine < 2e-3 and fine < coarse / 3


def test_diffusers_makes_exactly_nfe_evaluations():
    model = _Counting()
    x0 = torch.randn(8, 2)
    for method in bench_diffusers.SCHEDULERS:
        scheduler = bench_diffusers.make_scheduler(method)
        first = bench_diffusers.diffusers_sample(method, model, x0, 7, scheduler=scheduler)
        model.calls = 0
        again = bench_diffusers.diffusers_sample(method, model, x0, 7, scheduler=scheduler)
        assert model.calls == 7 and torch.equal(first, again)  # a reused scheduler starts afresh


def test_without_diffusers_rows_are_skipped_with_a_note(monkeypatch):
    real = bench_diffusers.importlib.util.find_spec
    monkeypatch.setattr(bench_diffusers.importlib.util, "find_spec",
                        lambda name, *a: None if name == "diffusers" else real(name, *a))
    note = bench_diffusers.diffusers_missing()
    assert note and "pip install diffusers" in note
    with pytest.raises(ImportError, match="diffusers is not installed"):
        bench_diffusers.make_scheduler("diffusers-unipc")
    runners, notes = bench_wallclock.contenders(_Counting(), torch.randn(4, 2), 4)
    assert not set(runners) & set(bench_diffusers.SCHEDULERS) and note in notes


def test_contenders_make_nfe_evaluations_and_the_same_samples():
    model = _Counting()
    x0 = torch.randn(16, 2)
    runners, notes = bench_wallclock.contenders(model, x0, 6)
    assert not notes  # every peer library of the test extra is installed: no contender left out
    assert {"flow_matching", "torchdiffeq", *bench_diffusers.SCHEDULERS} <= set(runners)
    for name, run in runners.items():
        model.calls = 0
        run()
        assert model.calls == 6, name
    deviation = bench_wallclock.same_samples(runners)
    assert set(deviation) >= {"plain_loop", "bespoke", "torchdiffeq", "flow_matching"}
    assert max(deviation.values()) < 1e-5
    with pytest.raises(ValueError, match="even"):
        bench_wallclock.contenders(model, x0, 5)


def test_interleaved_timing_and_statistics():
    order = []
    runners = {name: (lambda n=name: order.append(n)) for name in ("floor", "a", "b")}
    times = bench_timing.interleaved(runners, rounds=4, warmup=1)
    assert {k: len(v) for k, v in times.items()} == {"floor": 4, "a": 4, "b": 4}
    assert order[:3] == ["floor", "a", "b"] and order[3:6] == ["a", "b", "floor"]  # rotates
    s = bench_timing.summarize([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (s["median_s"], s["q25_s"], s["q75_s"], s["iqr_s"], s["rounds"]) == (3.0, 2.0, 4.0, 2.0, 5)
    # Paired ratios follow each round's load; the ratio of medians mixes a fast round with a slow one.
    c = bench_timing.compare({"floor": [1.0, 2.0, 1.0, 2.0], "x": [1.1, 2.2, 1.1, 2.2], "ref": [4.0, 8.0, 4.0, 8.0]},
                             references=("ref",))
    assert c["x"]["x_floor"] == pytest.approx(1.1) and c["x"]["x_floor_iqr"] == pytest.approx(0.0)
    assert c["x"]["ref_over_self"] == pytest.approx(4 / 1.1)
    assert bench_timing.machine_id({"cpu": "AMD EPYC", "cpu_count": 2}) == "cpu-amd-epyc-2c"


def test_quality_targets():
    def row(method, nfe, rmse):
        return Row(method=method, label=method, nfe=nfe, rmse=rmse, psnr=0.0, seconds=0.0)

    rows = [row("bespoke-rk2", 10, 0.01), row("midpoint", 10, 0.02), row("diffusers-unipc", 10, 0.015),
            row("dopri5", 10, 0.001), row("bespoke-rk2", 20, 0.004), row("rk4", 20, 0.003),
            row("bespoke-rk1", 20, 0.002)]
    ahead, reach = quality_targets(rows)
    assert ahead["met"] and ahead["best_other"] == "diffusers-unipc"  # dopri5 is adaptive: not compared
    assert reach["best_other"] == "bespoke-rk1" and reach["best_baseline"] == "rk4"
    assert reach["ratio"] == pytest.approx(2.0) and not reach["met"]
    # with a non-stationary row: its two targets follow (midpoint at twice the NFE, 0.8x order 2)
    ns_rows = rows + [row("bespoke-ns", 10, 0.0075), row("midpoint", 20, 0.008)]
    *_, vs_midpoint, vs_order2 = quality_targets(ns_rows)
    assert vs_midpoint["best_other"] == "midpoint" and vs_midpoint["ratio"] == pytest.approx(0.9375)
    assert vs_midpoint["met"] and vs_order2["ratio"] == pytest.approx(0.75) and vs_order2["met"]
    *_, vs_order2 = quality_targets(rows + [row("bespoke-ns", 10, 0.0085)])
    assert vs_order2["best_other"] == "bespoke-rk2" and not vs_order2["met"]


def test_bench_quick_run_writes_results_and_report(tmp_path, monkeypatch):
    """Quality (oracle) then wall-clock and training (2-D model) in a second call: both land in one
    results file, and the report, plots and README section are regenerated from it."""
    monkeypatch.setattr(bench_wallclock, "QUICK_WORKLOADS", {"mlp2d": ("moons2d", 8, (4,), 1),
                                                             "unet": ("mnist", 2, (4,), 1)})
    quiet = dict(quick=True, out=tmp_path, machine="test", say=lambda s: None)
    path = bench.run(["quality"], models=["oracle-gmm64"], **quiet)
    bench.run(["wallclock", "training"], models=["moons2d"], **quiet)
    results = json.loads(path.read_text())
    assert {"quality", "wallclock", "training"} <= set(results) and results["quality"]["quick"]
    entry = results["quality"]["models"]["oracle-gmm64"]
    methods = {r["method"] for r in entry["rows"]}
    assert {"bespoke-ns", "bespoke-rk2", "bespoke-rk1", "euler", "midpoint", "heun", "rk4", "dopri5",
            "dpm++2m"} <= methods
    assert sorted(entry["solvers"]["trained_here"]) == ["ns-nfe10", "rk1-nfe10", "rk2-nfe10"]
    trained = results["training"]["models"]["moons2d"]
    assert set(trained["runs"]) == {"cached", "online", "nonstationary"}
    assert trained["runs"]["nonstationary"]["family"] == "bespoke-ns"
    now = trained["pretraining_now"]
    assert now["seconds"] > 0 and now["parts"][0]["card_iterations"] == 6000
    assert trained["runs"]["cached"]["fraction_of_pretraining_now"] == pytest.approx(
        trained["runs"]["cached"]["wall_seconds"] / now["seconds"])
    report = (tmp_path / "REPORT.md").read_text()
    assert "of pretraining now" in report and "training cost <= 3% of pretraining, bespoke-ns" in report
    for heading in ("## Targets", "## Quality versus NFE", "## Wall-clock at equal NFE", "## Training cost", "## GPU"):
        assert heading in report
    assert "GPU figures are missing" in report and "benchmarks/gpu/run.sh" in report
    assert (tmp_path / "test_quality_oracle-gmm64.png").is_file() and (tmp_path / "test_wallclock.png").is_file()
    assert (tmp_path / "readme_performance.md").read_text().startswith("## Performance")
    # A second quality run reuses the solvers trained by the first.
    bench.run(["quality"], models=["oracle-gmm64"], report=False, **quiet)
    reused = json.loads(path.read_text())["quality"]["models"]["oracle-gmm64"]["solvers"]
    assert reused["trained_here"] == [] and len(reused["files"]) == 3
    # ... but not once the preset's learning rate or least-squares start differs from the file's
    import dataclasses

    from bespoke_ext.bench import quality as bench_quality
    qm = bench_quality.oracle_model()
    cfg = bench_quality.settings(qm, quick=True)
    ns_file = tmp_path / "oracle-gmm64" / "solvers" / "bespoke-ns-nfe10.safetensors"
    assert bench_quality._reusable(ns_file, qm, "bespoke-ns", cfg) is not None
    assert bench_quality._reusable(ns_file, qm, "bespoke-ns", dataclasses.replace(cfg, ns_lr=cfg.ns_lr * 2)) is None
    assert bench_quality._reusable(ns_file, qm, "bespoke-ns", dataclasses.replace(cfg, ns_fit=not cfg.ns_fit)) is None
    for change in (dict(ns_iterations=cfg.ns_iterations + 1), dict(ns_iterations=cfg.ns_iterations - 1),
                   dict(ns_train_batch=cfg.ns_train_batch * 2)):
        assert bench_quality._reusable(ns_file, qm, "bespoke-ns", dataclasses.replace(cfg, **change)) is None, change


def test_merging_keeps_other_models_but_drops_entries_for_replaced_weights():
    from bespoke_ext.bench.quality import weights_id

    old = {"quick": False, "notes": ["a"], "models": {
        "oracle-gmm64": {"weights_sha256": weights_id("oracle-gmm64")},
        "moons2d": {"weights_sha256": "weights of a model since retrained"}}}
    new = {"quick": False, "notes": ["b"], "models": {"mnist": {}}}
    merged = bench._merge_models(old, new, "now")
    assert set(merged["models"]) == {"oracle-gmm64", "mnist"} and merged["notes"] == ["a", "b"]
    assert merged["models"]["mnist"]["measured_at"] == "now"


def test_merging_refreshes_a_model_in_its_place():
    from bespoke_ext.bench.quality import weights_id

    ids = {name: {"weights_sha256": weights_id(name)} for name in ("mnist", "moons2d", "oracle-gmm64")}
    old = {"quick": False, "models": {name: dict(v, old=True) for name, v in ids.items()}}
    new = {"quick": False, "models": {"moons2d": dict(ids["moons2d"], old=False), "new-model": {}}}
    merged = bench._merge_models(old, new, "now")
    assert list(merged["models"]) == ["mnist", "moons2d", "oracle-gmm64", "new-model"]
    assert [m.get("old") for m in merged["models"].values()] == [True, False, True, None]


def _fake_bench_ops_json(path, side_by_side=True):
    """A pytest-benchmark file as benchmarks/bench_ops.py writes it, two update cases and one backward case,
    with medians chosen so that every ratio of the tables is a round number: one benchmark per case timing
    the fused op, the other variants' times of the same rounds in extra_info["side_by_side"] (three rounds
    around the median), or, as older files, one benchmark per variant."""
    cases = [("rk_update", [1000, 2], 2000, {"fused_out": 1e-3, "fused": 2e-3, "eager_inplace": 1.5e-3,
                                              "eager": 5e-3, "compiled": 1e-3, "copy": 2e-4}),
             ("rk_update", [1 << 20], 1 << 20, {"fused_out": 1e-2, "eager_inplace": 1.2e-2}),
             ("rk_update_backward", [1000, 2], 2000, {"fused": 1e-3, "eager": 3e-3})]

    def info(op, shape, size, variant):
        return {"op": op, "shape": shape, "size": size, "k": 3, "dtype": "fp32", "coeffs": "shared",
                "threads": 1, "variant": variant, "elem_size": 4, "device": "cpu", "load1": 0.5}

    if side_by_side:
        benchmarks = []
        for op, shape, size, medians in cases:
            main, *others = medians
            e = info(op, shape, size, main)
            e["side_by_side"] = {name: [0.5 * medians[name], medians[name], 9 * medians[name]] for name in others}
            benchmarks.append({"stats": {"median": medians[main]}, "extra_info": e})
    else:
        benchmarks = [{"stats": {"median": median}, "extra_info": info(op, shape, size, variant)}
                      for op, shape, size, medians in cases for variant, median in medians.items()]
    path.write_text(json.dumps({"machine_info": {"node": "box", "cpu": {"brand_raw": "Test CPU"}, "torch": "9.9"},
                                "benchmarks": benchmarks}))
    return path


def test_kernel_tables_read_variants_measured_side_by_side_as_one_benchmark_per_variant(tmp_path):
    """The other variants' medians come from the fused op's own rounds (extra_info["side_by_side"]), and give
    the tables that the same medians give as separate benchmarks."""
    from bespoke_ext.bench import report_ops

    new = report_ops.write_ops_report(_fake_bench_ops_json(tmp_path / "new_raw.json"))[2]
    old = report_ops.write_ops_report(_fake_bench_ops_json(tmp_path / "old_raw.json", side_by_side=False))[2]
    assert new == old and "| 1000x2 | 3 | fp32 | shared | 1 | 1.0 | 1.5 | 2.5 | 1.0 | 0.4 | 0.08 |" in new


def test_kernel_tables_from_a_benchmark_file(tmp_path):
    """bespoke_ext.bench.report_ops (once benchmarks/report_ops.py): the tables, the JSON twin and the targets,
    and REPORT.md includes the table as written."""
    from bespoke_ext.bench import report_ops

    raw = _fake_bench_ops_json(tmp_path / "ops_box_raw.json")
    md, js, text = report_ops.write_ops_report(raw)
    assert (md, js) == (tmp_path / "ops_box.md", tmp_path / "ops_box.json") and md.read_text() == text
    assert text.startswith("Kernel benchmarks on box (Test CPU, torch 9.9, device cpu). Medians;")
    assert "median 0.5, max 0.5" in text
    # in-place 1.5 / 1.0, alloc 5 / 2, compiled 1 / 1; copy: 2 * 2000 * 4 B in 0.2 ms = 0.08 GB/s, so the
    # floor for k + 1 = 4 arrays is 0.4 ms against fused_out's 1 ms
    assert "| 1000x2 | 3 | fp32 | shared | 1 | 1.0 | 1.5 | 2.5 | 1.0 | 0.4 | 0.08 |" in text
    assert "| 1048576 | 3 | fp32 | shared | 1 | 10.0 | 1.2 |  |  |  |  |" in text
    assert "### rk_update_backward\n\n| shape | k | dtype | coeffs | threads | fused ms | eager / fused" in text
    assert "| 1000x2 | 3 | fp32 | shared | 1 | 1.0 | 3.0 |  |" in text
    targets = text.split("### Targets (issue 10)\n\n")[1].splitlines()
    assert targets == [
        "- fused_out >= 1.0x the eager in-place chain at every shape: met; worst 1.2 at 1048576 k=3 fp32 shared, "
        "1 thread(s) (median over cases 1.35)",
        "- fused_out >= 1.3x the in-place chain at >= 1M elements: MISSED; worst 1.2 at 1048576 k=3 fp32 shared, "
        "1 thread(s) (median over cases 1.2)",
        "- fused_out not slower than torch.compile: met; worst 1.0 at 1000x2 k=3 fp32 shared, 1 thread(s) "
        "(median over cases 1.0)",
        "- backward >= 2x eager autograd: met; worst 3.0 at 1000x2 k=3 fp32 shared, 1 thread(s) "
        "(median over cases 3.0)"]
    data = json.loads(js.read_text())
    assert data["machine"] == {"node": "box", "cpu": "Test CPU", "torch": "9.9", "device": "cpu"}
    assert data["targets"] == targets and len(data["rows"]) == 3
    assert [(r["op"], r["shape"]) for r in data["rows"]] == [("rk_update", [1000, 2]), ("rk_update", [1 << 20]),
                                                           ("rk_update_backward", [1000, 2])]
    assert data["rows"][0]["out_of_copy_bw"] == 0.4 and data["rows"][0]["copy_GBps"] == 0.08
    # the command benchmarks/gpu/run.sh runs, with an explicit output stem: the same tables
    (tmp_path / "gpu").mkdir()
    assert report_ops.main([str(raw), "--out", str(tmp_path / "gpu" / "ops_gpu")]) == 0
    assert (tmp_path / "gpu" / "ops_gpu.md").read_text() == text
    bench_report.write_report(tmp_path)
    report = (tmp_path / "REPORT.md").read_text()
    assert ("## Kernels: ops_box.md (benchmarks/bench_ops.py via bespoke_ext/bench/report_ops.py)\n\n"
            + text.strip()) in report
    assert "Other files" not in report  # the raw file and the JSON twin are inputs, not strays


def test_kernels_stage_runs_bench_ops_in_process_and_writes_the_tables(tmp_path, monkeypatch):
    """`bespoke-ext bench --only kernels` without a subprocess: pytest.main on benchmarks/bench_ops.py with its
    settings in the environment for the run only, then the tables from the JSON it wrote."""
    seen = {}

    def fake_pytest_main(args):
        seen.update(args=args, sizes=os.environ.get("BENCH_FLAT_SIZES"),
                    device=os.environ.get("BENCH_DEVICE"))
        _fake_bench_ops_json(Path(next(a for a in args if a.startswith("--benchmark-json=")).split("=", 1)[1]))
        print("pytest output, kept out of the terminal")
        return 0

    monkeypatch.setattr(pytest, "main", fake_pytest_main)
    monkeypatch.delenv("BENCH_FLAT_SIZES", raising=False)
    said = []
    section = bench_kernels.run_kernels(tmp_path, "box", quick=True, say=said.append)
    assert str(ROOT / "benchmarks" / "bench_ops.py") in seen["args"] and "--benchmark-only" in seen["args"]
    assert (seen["sizes"], seen["device"]) == (bench_kernels.QUICK_SIZES, "cpu")
    assert "BENCH_FLAT_SIZES" not in os.environ  # restored
    assert (section["table"], section["json"], section["raw"]) == ("ops_box.md", "ops_box.json", "ops_box_raw.json")
    table = (tmp_path / "ops_box.md").read_text()
    assert "| 1000x2 | 3 | fp32 | shared | 1 | 1.0 | 1.5 | 2.5 | 1.0 | 0.4 | 0.08 |" in table
    assert said == [f"kernels: pytest benchmarks/bench_ops.py (flat sizes {bench_kernels.QUICK_SIZES})"]

    def failing(args):
        print("E   something broke")
        return 1

    monkeypatch.setattr(pytest, "main", failing)
    with pytest.raises(RuntimeError, match="(?s)exit 1.*something broke"):
        bench_kernels.run_kernels(tmp_path / "other", "box", quick=False, say=said.append)


def test_bench_help_documents_the_kernels_stage(capsys):
    from bespoke_ext.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "kernels" in text and "benchmarks/bench_ops.py" in text and "ops_<machine>.md" in text


def test_report_reads_every_kind_of_results_file(tmp_path):
    (tmp_path / "ops_cpu.md").write_text("| op | fused ms |\n|---|---|\n| rk_update | 1.0 |\n")
    (tmp_path / "sampling_cpu.json").write_text(json.dumps(
        {"workload": "w", "results": {"256": {"median_s": {"floor": 0.1, "bespoke_ext": 0.105},
                                              "ratio_to_floor": {"floor": 1.0, "bespoke_ext": 1.05}}}}))
    gpu = tmp_path / "gpu-20990101"
    gpu.mkdir()
    stats = {"floor": {"median_s": 0.01, "iqr_s": 0.001, "x_floor": 1.0},
             "bespoke_ext_graph": {"median_s": 0.002, "iqr_s": 0.0001, "x_floor": 0.2}}
    (gpu / "sampling_gpu.json").write_text(json.dumps({
        "kind": "bespoke_ext.gpu_sampling", "machine": {"gpu": "H100"}, "labels": bench_wallclock.LABELS,
        "workloads": {"mlp2d-b4096-nfe10": {"model": "moons2d", "batch": 4096, "nfe": 10, "rounds": 5, "stats": stats}},
        "targets": [{"target": "GPU: with CUDA-graph capture >= 3x faster than torchdiffeq fixed-grid (mlp2d-nfe10)",
                     "value": 4.0, "met": True}]}))
    (tmp_path / "notes.txt").write_text("x")
    bench_report.write_report(tmp_path)
    report = (tmp_path / "REPORT.md").read_text()
    assert "rk_update | 1.0" in report and "bench_sampling.py" in report and "1.05x" in report
    assert "GPU figures are missing" not in report and "4.00x | met" in report
    assert "notes.txt" in report


def test_readme_section_goes_between_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{bench_report.README_BEGIN}\nold\n{bench_report.README_END}\n\n## Next\n")
    bench_report.insert_readme_section(readme, "## Performance\n\nnew\n")
    text = readme.read_text()
    assert text == (f"# x\n\n{bench_report.README_BEGIN}\n## Performance\n\nnew\n{bench_report.README_END}"
                    "\n\n## Next\n")
    # An older wording of the begin marker is found and brought up to date.
    readme.write_text("# x\n<!-- performance:begin (generated by an older tool) -->\nold\n<!-- performance:end -->\n")
    bench_report.insert_readme_section(readme, "new")
    assert readme.read_text() == f"# x\n{bench_report.README_BEGIN}\nnew\n{bench_report.README_END}\n"
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="markers"):
        bench_report.insert_readme_section(readme, "x")


def test_readme_training_table_comes_from_the_cpu_machine_that_measured_it(tmp_path):
    """Training cost is a ratio within one run: the README tables it from whichever CPU results file has a
    training section, naming that machine when it is not the one the other tables come from."""
    from bespoke_ext.bench.results import Results

    def machine(cpu):
        return {"cpu": cpu, "cpu_count": 2, "torch": "2.13.0+cpu", "python": "3.11.7", "threads": 1}

    run = {"wall_seconds": 30.0, "gt_seconds": 10.0, "fraction_of_pretraining": 0.01,
           "fraction_of_pretraining_now": 0.025}
    training = {"nfe": 10, "models": {"mnist": {"pretraining_seconds": 3000.0, "pretraining_now": {"seconds": 1200.0},
                                                "runs": {"cached": run}}}}
    res = Results(tmp_path)
    res.bench["cpu-a"] = {"machine": machine("CPU A"), "quality": None}
    res.bench["cpu-b"] = {"machine": machine("CPU B"), "training": training}
    section = bench_report.render_readme_section(res)
    assert "CPU A" in section.split("**Training cost**")[0]
    assert "same run, on CPU B" in section and "| mnist | 30 s: 2.5% (1.0%) | - | - | 1200 s (3000 s) |" in section
    res.bench["cpu-a"]["training"] = training  # its own: no second machine named
    assert "CPU B" not in bench_report.render_readme_section(res)


def test_committed_report_and_readme_follow_from_the_committed_results():
    """REPORT.md, readme_performance.md and the README's performance section are what the report code makes
    of benchmarks/results today (regenerate with `bespoke-ext bench --report-only --out benchmarks/results
    --readme README.md`)."""
    from bespoke_ext.bench.report_plots import write_plots

    folder = ROOT / "benchmarks" / "results"
    res = bench_report.load_results(folder)
    plots, paths = write_plots(res, draw=False)
    assert all(p.is_file() for p in paths)
    assert bench_report.render_report(res, plots) == (folder / "REPORT.md").read_text()
    section = bench_report.render_readme_section(res)
    assert section == (folder / "readme_performance.md").read_text()
    readme = (ROOT / "README.md").read_text()
    start = readme.index("<!-- performance:begin")
    assert readme[readme.index("-->", start) + 4:readme.index(bench_report.README_END)] == section


def _bench_training():
    spec = importlib.util.spec_from_file_location("bench_training", ROOT / "benchmarks" / "bench_training.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_training_matches_nfe_with_the_one_nfe_to_match():
    """bench_training.py interpolates log-log (bespoke_ext.compare.nfe_to_match), and the published
    training.json numbers follow from the curves stored beside them."""
    bt = _bench_training()
    # error ~ 1/NFE^2: log-log gives NFE 10 * sqrt(2) = 14.1 for 0.02 (log-linear in NFE would give 15.0)
    assert bt.base_nfe_to_match({10: 0.04, 20: 0.01}, 0.02) == (14.1, "interpolated")
    assert bt.base_nfe_to_match({"10": 0.04, "20": 0.01}, 0.05) == (10.0, "already at the smallest NFE measured")
    assert bt.base_nfe_to_match({10: 0.04, 20: 0.05}, 0.01)[0] is None
    committed = json.loads((ROOT / "benchmarks" / "results" / "training.json").read_text())
    runs = [r for e in committed["models"].values() for r in e["runs"].values()]
    assert runs and all("base_nfe_to_match_how" in r for r in runs)
    assert bt.rematch(json.loads(json.dumps(committed))) == committed


def test_report_marks_an_nfe_to_match_that_is_not_interpolated():
    from bespoke_ext.bench.report_sections import bench_training_section

    def run(nfe, how):
        return {"nfe": 10, "base_method": "midpoint", "base_rmse": 0.1, "best_rmse": 0.01, "ratio": 0.1,
                "base_nfe_to_match": nfe, "base_nfe_to_match_how": how}

    runs = {"a": run(20.5, "interpolated"), "b": run(170.2, "extrapolated beyond the largest NFE measured"),
            "c": run(None, "not reached: the error stops decreasing at the largest NFE measured"),
            "d": run(10.0, "already at the smallest NFE measured")}
    text = "\n".join(bench_training_section({"models": {"m": {"runs": runs}}}))
    assert "| 20.5 |" in text and "| ~170.2 (extrapolated) |" in text and "| not reached |" in text
    assert "| <= 10.0 |" in text


def test_default_results_folder_is_the_current_directory(tmp_path, monkeypatch):
    """Never the source tree: a run without --out writes ./bespoke-bench (quick runs in its quick/)."""
    from bespoke_ext import bench as bench_pkg
    from bespoke_ext.cli import main

    monkeypatch.chdir(tmp_path)
    assert bench.default_out(False) == Path("bespoke-bench")
    assert bench.default_out(True) == Path("bespoke-bench") / "quick"
    seen = {}
    monkeypatch.setattr(bench_pkg, "run", lambda stages, **kw: seen.update(kw, stages=stages))
    assert main(["bench", "--quick", "--only", "kernels"]) == 0
    assert seen["out"] == Path("bespoke-bench") / "quick" and seen["stages"] == ["kernels"]
    assert main(["bench", "--only", "kernels", "--out", "elsewhere"]) == 0 and seen["out"] == Path("elsewhere")


def test_report_only_regenerates_the_report_and_readme_without_measuring(tmp_path, monkeypatch, capsys):
    from bespoke_ext import bench as bench_pkg
    from bespoke_ext.cli import main

    def no_measuring(*a, **kw):
        raise AssertionError("--report-only must not run any stage")

    monkeypatch.setattr(bench_pkg, "run", no_measuring)
    results = tmp_path / "results"
    assert main(["bench", "--report-only", "--out", str(results)]) == 2  # no such folder
    assert "bespoke-ext bench" in capsys.readouterr().err
    results.mkdir()
    (results / "sampling_cpu.json").write_text(json.dumps(
        {"workload": "w", "results": {"256": {"median_s": {"floor": 0.1, "bespoke_ext": 0.105},
                                              "ratio_to_floor": {"floor": 1.0, "bespoke_ext": 1.05}}}}))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{bench_report.README_BEGIN}\nold\n{bench_report.README_END}\n")
    assert main(["bench", "--report-only", "--out", str(results), "--readme", str(readme)]) == 0
    assert "1.05x" in (results / "REPORT.md").read_text()
    section = (results / "readme_performance.md").read_text()
    assert section.startswith("## Performance") and section.rstrip() in readme.read_text()
    assert "old" not in readme.read_text()
    assert sorted(p.name for p in results.iterdir()) == ["REPORT.md", "readme_performance.md", "sampling_cpu.json"]
    assert main(["bench", "--report-only", "--only", "quality", "--out", str(results)]) == 2


def test_cli_parses_bench_options():
    from bespoke_ext.cli import build_parser

    args = build_parser().parse_args(["bench", "--quick", "--only", "quality", "kernels", "--threads", "1"])
    assert args.quick and args.only == ["quality", "kernels"] and args.threads == 1
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--only", "everything"])


def test_cli_bench_checks_its_inputs_before_measuring(tmp_path, monkeypatch):
    from bespoke_ext.cli import build_parser
    from bespoke_ext.cli.bench import run_bench

    monkeypatch.setattr("bespoke_ext.bench.run", lambda *a, **k: pytest.fail("measured before the checks"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_bench(build_parser().parse_args(["bench", "--report-only", "--out", str(empty)])) == 2
    assert not (empty / "REPORT.md").exists()
    tables = tmp_path / "tables"          # only a kernel table: a report can be written from it
    tables.mkdir()
    (tables / "ops_cpu-test.md").write_text((ROOT / "benchmarks/results/ops_cpu-amd-epyc-2c.md").read_text())
    assert run_bench(build_parser().parse_args(["bench", "--report-only", "--out", str(tables)])) == 0
    assert (tables / "REPORT.md").exists()
    for readme, message in ((tmp_path / "missing.md", "no such file"), (ROOT / "setup.py", "lacks the markers")):
        with pytest.raises(ValueError, match=message):
            run_bench(build_parser().parse_args(["bench", "--quick", "--out", str(tmp_path / "o"),
                                                 "--readme", str(readme)]))


def test_gpu_script_refuses_cleanly_without_a_gpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    spec = importlib.util.spec_from_file_location("gpu_sampling", ROOT / "benchmarks" / "gpu" / "sampling.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--out", str(tmp_path / "x.json")]) == 2
    assert "--device cpu" in capsys.readouterr().err


def test_wallclock_overhead_limit_depends_on_the_batch():
    """Issue 10's limits: 1.15x the floor for the 2-D MLP at batch 16, 1.10x at 256 and 4096 and for the U-Net."""
    def workload(model, batch, x_floor):
        return {"model": model, "batch": batch, "nfe": 10,
                "stats": {"bespoke_ext": {"x_floor": x_floor, "flow_matching_over_self": 1.2}}}
    section = {"device": "cpu", "workloads": {
        "mlp2d-b16-nfe10": workload("moons2d", 16, 1.14), "mlp2d-b256-nfe10": workload("moons2d", 256, 1.12),
        "mlp2d-b4096-nfe10": workload("moons2d", 4096, 1.02), "unet-mnist-b16-nfe10": workload("mnist", 16, 1.12)}}
    got = {t["target"]: t["met"] for t in bench_wallclock.wallclock_targets(section) if "overhead" in t["target"]}
    assert got == {"sample() overhead over the model-evaluation floor <= 1.15x (mlp2d-b16-nfe10)": True,
                   "sample() overhead over the model-evaluation floor <= 1.10x (mlp2d-b256-nfe10)": False,
                   "sample() overhead over the model-evaluation floor <= 1.10x (mlp2d-b4096-nfe10)": True,
                   "sample() overhead over the model-evaluation floor <= 1.10x (unet-mnist-b16-nfe10)": False}


def test_guided_targets_read_psnr_gains_and_variants_cover_the_conditional_models():
    rows = [Row("bespoke-rk2", "Bespoke order 2", 10, 0.03, 36.0, 1.0),
            Row("midpoint", "midpoint", 10, 0.05, 33.5, 1.0),
            Row("dpm++2m", "DPM-Solver++(2M)", 10, 0.06, 32.0, 1.0)]
    got = {t["target"].split(" over ")[1]: (round(t["gain_db"], 6), t["met"]) for t in bench_quality.guided_targets(rows)}
    assert got == {"midpoint at NFE 10": (2.5, False), "DPM-Solver++(2M) at NFE 10": (4.0, True)}
    variants = bench_quality.guided_variants()
    assert variants["mnist_cond-g2"] == ("mnist_cond", 2.0) and variants["mnist_cond-g4"] == ("mnist_cond", 4.0)
    assert "mnist-g2" not in variants  # unconditional models have no guided variant
    qm = bench_quality.quality_models(["mnist_cond-g4"])[0]
    assert qm.guidance == 4.0 and qm.extras(12)["y"].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert bench_quality.weights_id("mnist_cond-g4") == bench_quality.weights_id("mnist_cond")


def test_pretraining_replay_scales_timed_iterations_and_follows_init_from(monkeypatch):
    """replay() times the card's own loop (a fake here: 0.25 s per iteration for mnist, 0.5 s for
    mnist_cond), discards the first, warming run, grows k until a run lasts about ``seconds``, and adds
    the model a card was initialised from."""
    from bespoke_ext.models import pretraining_replay
    from bespoke_ext.models.embedded import read_card

    calls = []

    def fake_loop(name, iterations):
        calls.append((name, iterations))
        per = {"mnist_cond": 0.5, "mnist": 0.25}[name]
        return {"wall": per * iterations, "cpu": 0.9 * per * iterations, "call": per * iterations + 1.0}

    monkeypatch.setattr(pretraining_replay, "_loop_seconds", fake_loop)
    now = pretraining_replay.replay("mnist_cond", read_card("mnist_cond"), seconds=4.0)
    cond, base = read_card("mnist_cond")["training"], read_card("mnist")["training"]
    assert [p["model"] for p in now["parts"]] == ["mnist_cond", "mnist"]
    assert now["seconds"] == pytest.approx(0.5 * cond["iterations"] + 0.25 * base["iterations"])
    assert now["cpu_seconds"] == pytest.approx(0.9 * now["seconds"])
    # per model: a first run of 4 iterations, then one of about 4 s; never timed from the first run alone
    assert calls == [("mnist_cond", 4), ("mnist_cond", 8), ("mnist", 4), ("mnist", 16)]
    assert pretraining_replay.replay("x", {"name": "x", "training": {}}) is None
