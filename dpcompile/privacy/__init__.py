"""Privacy around the graph: noise (optimizer.py), Poisson sampling (sampling.py), accounting (accounting.py),
several ranks (distributed.py), and make_private (engine.py) tying them to a compiled model."""
from .accounting import PrivacyAccountant, get_epsilon, get_noise_multiplier
from .distributed import DistributedDPOptimizer, DistributedPoissonDataLoader
from .engine import PrivateTraining, make_private
from .optimizer import DPOptimizer
from .sampling import PoissonDataLoader

__all__ = ["DPOptimizer", "DistributedDPOptimizer", "PoissonDataLoader", "DistributedPoissonDataLoader",
           "PrivacyAccountant", "get_epsilon", "get_noise_multiplier", "make_private", "PrivateTraining"]
