"""pytest-benchmark view of the quality stage at NFE 10: time per batch of each fixed-NFE solver on each model,
with its RMSE and PSNR against the ground truth from the same noise in extra_info (the quality numbers are
exact, the times are pytest-benchmark's back-to-back ones).

    python -m pytest benchmarks/bench_quality.py --benchmark-only --benchmark-json=RAW.json

The models, evaluation noise, ground truth and solver settings are those of `bespoke-ext bench --only quality`
(bespoke_ext/bench/quality.py); Bespoke rows use the solver files that stage trained or reused
(benchmarks/results/<model>/solvers/) and are skipped until they exist. diffusers rows are skipped when
diffusers is not installed.
"""

from pathlib import Path

import pytest

from bespoke_ext import metrics
from bespoke_ext.bench.diffusers import SCHEDULERS, diffusers_missing, diffusers_sample
from bespoke_ext.bench.quality import evaluation_noise, find_solver, quality_models, settings, solver_search_path
from bespoke_ext.compare import ground_truth
from bespoke_ext.sampling import sample

NFE = 10
RESULTS = Path(__file__).parent / "results"
METHODS = ("bespoke-ns", "bespoke-rk2", "bespoke-rk1", "euler", "midpoint", "heun", "dpm++2m", *SCHEDULERS)
MODELS = {qm.name: qm for qm in quality_models()}


@pytest.fixture(scope="module")
def setups():
    cache = {}

    def get(name):
        if name not in cache:
            qm = MODELS[name]
            cfg = settings(qm, quick=False)
            x0 = evaluation_noise(qm, cfg.batch, seed=0)
            truth = ground_truth(qm.velocity, x0).x
            cache[name] = (qm, cfg, x0, truth)
        return cache[name]

    return get


def _runner(qm, cfg, x0, method):
    if method.startswith("bespoke-"):
        found = find_solver(qm, method, NFE, solver_search_path(qm, RESULTS), cfg)
        if found is None:
            pytest.skip(f"no trained {method} solver for {qm.name}: run `bespoke-ext bench --only quality` first")
        return lambda: sample(qm.velocity, x0, solver=found[0])
    if method in SCHEDULERS:
        note = diffusers_missing()
        if note:
            pytest.skip(note)
        return lambda: diffusers_sample(method, qm.velocity, x0, NFE)
    return lambda: sample(qm.velocity, x0, method=method, nfe=NFE)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("method", METHODS)
def test_quality(benchmark, setups, model, method):
    qm, cfg, x0, truth = setups(model)
    run = _runner(qm, cfg, x0, method)
    benchmark.group = f"{model}, NFE {NFE}, batch {cfg.batch}"
    x = benchmark.pedantic(run, rounds=3, warmup_rounds=1, iterations=1)
    benchmark.extra_info.update(model=model, method=method, nfe=NFE, rmse=metrics.rmse(x, truth),
                                psnr=metrics.psnr(x, truth))
