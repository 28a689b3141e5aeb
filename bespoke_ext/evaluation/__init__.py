"""Evaluation: quality metrics, the digit classifiers behind the FCD, figures, and ``bespoke-ext demo``.

    metrics      rmse, psnr (method.md §1), frechet_distance, sliced_wasserstein
    classifier   load_classifier / train_classifier: the small CNNs whose features the FCD compares
    plots        sample grids, RMSE-vs-NFE curves, learned t(r) and s(r)
    report       the results table (markdown, JSON) and the NFE at which an error curve reaches a value
    demo         the demo's stages, ``add_demo_arguments`` / ``run_demo`` for the command line, ``run``
"""

from .classifier import load_classifier, train_classifier
from .metrics import frechet_distance, psnr, rmse, sliced_wasserstein

__all__ = ["rmse", "psnr", "frechet_distance", "sliced_wasserstein", "load_classifier", "train_classifier"]
