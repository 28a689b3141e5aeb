"""Quality metrics: errors against ground truth and distances between distributions.

    errors       per_sample_rms, rmse, psnr (method.md §1): the one home of these formulas
    distances    frechet_distance, sliced_wasserstein
    classifier   load_classifier / train_classifier: the small CNNs whose features the FCD compares,
                 with their shipped weights (weights/)
"""

from .classifier import classifier_for_data, load_classifier, train_classifier
from .distances import (feature_moments, frechet_distance, frechet_distance_from_moments, projection_directions,
                        sliced_wasserstein)
from .errors import per_sample_psnr, per_sample_rms, psnr, psnr_from_rms, rmse

__all__ = [
    "per_sample_rms", "rmse", "psnr", "per_sample_psnr", "psnr_from_rms",
    "frechet_distance", "frechet_distance_from_moments", "feature_moments", "sliced_wasserstein", "projection_directions",
    "load_classifier", "train_classifier", "classifier_for_data",
]
