"""The ``bespoke-ext bench`` harness: every stage of the benchmark suite and the report it writes.

    suite          run(): the stages, the results file, report regeneration
    quality        RMSE / PSNR against ground truth versus NFE on every embedded model and the oracle
    wallclock      seconds per batch at equal NFE against flow_matching, torchdiffeq, diffusers, a plain loop
    kernels        the fused ops' tables: benchmarks/bench_ops.py run in-process, then report_ops
    training_cost  Bespoke training wall-clock against pretraining
    diffusers      diffusers' flow-mode schedulers as peer baselines on the same noise
    timing         interleaved timing rounds, medians, machine identity
    report         REPORT.md put together and written, with its plots and the README's performance section:
                   results (reads the results folder), report_format, report_targets, report_sections,
                   report_plots, report_ops (the kernel tables), readme (renders the README section and puts
                   it between the markers)
"""

from .suite import STAGES, default_out, run

__all__ = ["run", "STAGES", "default_out"]
