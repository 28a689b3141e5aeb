"""Models for the Bespoke-solver package: velocity fields u(x, t), t = 0 noise, t = 1 data.

- schedules: Gaussian paths (OT, cosine, VP, custom) with alpha, sigma and their derivatives
- adapters:  noise/data/velocity predictors -> velocity, classifier-free guidance, time mappings
- oracle:    GaussianMixtureFlow, an exact analytic velocity field
- nets:      MLPVelocity, UNetVelocity
- data:      moons, checkerboard, mnist, digits8 (scaled to [-1, 1])
- pretrain:  reproducible flow-matching pretraining of the embedded models
- identity:  model_tag, what a trajectory cache or a trained solver was made for
- embedded:  load_embedded / list_embedded, the shipped pre-trained models
"""

from .adapters import ClassifierFreeGuidance, DiffusersTimeAdapter, ScalarTimeAdapter, VelocityAdapter
from .identity import model_tag
from .embedded import DEFAULT_MODEL, EmbeddedModel, list_embedded, load_embedded
from .nets import MLPVelocity, UNetVelocity, build_net
from .oracle import GaussianMixtureFlow
from .schedules import CosineSchedule, CustomSchedule, OTSchedule, Schedule, VPSchedule, get_schedule

__all__ = [
    "Schedule", "OTSchedule", "CosineSchedule", "VPSchedule", "CustomSchedule", "get_schedule",
    "VelocityAdapter", "ClassifierFreeGuidance", "DiffusersTimeAdapter", "ScalarTimeAdapter",
    "GaussianMixtureFlow", "model_tag",
    "MLPVelocity", "UNetVelocity", "build_net",
    "EmbeddedModel", "load_embedded", "list_embedded", "DEFAULT_MODEL",
]
