"""Privacy around the graph: noise (optimizer.py: DPOptimizer; coverage.py: what the compiled graphs vouched for;
noise.py: the draw; step_guards.py: its guards), Poisson sampling (sampling.py: the loaders; samplers.py: the
sampler; collate.py: empty batches), accounting (accounting.py), several ranks (distributed.py), make_private
(engine.py) tying them to a compiled model, the Opacus-shaped PrivacyEngine (privacy_engine.py), checkpoints
(checkpoint.py), misuse refused (guards.py), and module checks before training (validate.py)."""
from .accounting import PrivacyAccountant, get_epsilon, get_noise_multiplier
from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import DistributedDPOptimizer, DistributedPoissonDataLoader
from .engine import PrivateTraining, make_private
from .guards import LogicalBatchError, PrivacyBudgetExceeded
from .optimizer import DPOptimizer
from .privacy_engine import PrivacyEngine
from .sampling import BatchMemoryManager, DPDataLoader, EmptyBatchCollate, PoissonBatchSampler, PoissonDataLoader
from .validate import GroupNorm, ModuleProblem, ModuleValidator, fix, validate

__all__ = ["DPOptimizer", "DistributedDPOptimizer", "PoissonDataLoader", "DistributedPoissonDataLoader",
           "PrivacyAccountant", "get_epsilon", "get_noise_multiplier", "make_private", "PrivateTraining",
           "PrivacyEngine", "PoissonBatchSampler", "DPDataLoader", "BatchMemoryManager", "EmptyBatchCollate",
           "save_checkpoint", "load_checkpoint", "LogicalBatchError", "PrivacyBudgetExceeded",
           "validate", "fix", "ModuleValidator", "ModuleProblem", "GroupNorm"]
