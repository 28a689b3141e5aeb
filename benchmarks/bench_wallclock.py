"""pytest-benchmark view of the wall-clock stage: every contender of `bespoke-ext bench --only wallclock`
(bespoke_ext/bench/wallclock.py: the model-evaluation floor, a plain loop, bespoke_ext.sample,
flow_matching, torchdiffeq, diffusers) on the same workloads, as pytest-benchmark groups.

    python -m pytest benchmarks/bench_wallclock.py --benchmark-only [--benchmark-json=RAW.json]

pytest-benchmark times the contenders of a group one after the other, so on a shared machine the load
can differ between them; the results file and REPORT.md come from `bespoke-ext bench`, which interleaves
them round by round. Use this file for pytest-benchmark's own tooling (--benchmark-compare, histograms).
Contenders whose library is not installed are skipped with the reason.
"""

import pytest
import torch

from bespoke_ext.bench.wallclock import LABELS, WORKLOADS, contenders, workload_model

CASES = [(w, nfe, c) for w, (_, _, nfes, _) in WORKLOADS.items() for nfe in nfes
         for c in LABELS if not c.endswith("_graph")]


@pytest.fixture(scope="module")
def workloads():
    cache = {}

    def get(name, nfe):
        if (name, nfe) not in cache:
            model_name, batch, _, _ = WORKLOADS[name]
            velocity, shape, _ = workload_model(model_name)
            x0 = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
            cache[(name, nfe)] = contenders(velocity, x0, nfe)
        return cache[(name, nfe)]

    return get


@pytest.mark.parametrize("workload, nfe, contender", CASES)
def test_wallclock(benchmark, workloads, workload, nfe, contender):
    runners, notes = workloads(workload, nfe)
    if contender not in runners:
        pytest.skip("; ".join(notes) or f"{contender} is not available here")
    model_name, batch, _, rounds = WORKLOADS[workload]
    benchmark.group = f"{workload} ({model_name}, batch {batch}), NFE {nfe}"
    benchmark.extra_info.update(workload=workload, model=model_name, batch=batch, nfe=nfe, contender=contender,
                                label=LABELS[contender])
    benchmark.pedantic(runners[contender], rounds=rounds, warmup_rounds=1, iterations=1)
