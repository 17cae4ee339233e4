"""Privacy around the graph: noise (optimizer.py), Poisson sampling (sampling.py), accounting (accounting.py),
and make_private (engine.py) tying them to a compiled model."""
from .accounting import PrivacyAccountant, get_epsilon, get_noise_multiplier
from .engine import PrivateTraining, make_private
from .optimizer import DPOptimizer
from .sampling import PoissonDataLoader

__all__ = ["DPOptimizer", "PoissonDataLoader", "PrivacyAccountant", "get_epsilon", "get_noise_multiplier",
           "make_private", "PrivateTraining"]
