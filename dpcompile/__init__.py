"""dpcompile: differentially private training as a torch.compile backend.

    model = torch.compile(model, backend="flashdp", options={"max_grad_norm": 1.0, "clipping": "per_layer"})

After `loss.backward()` every trainable parameter holds the sum of per-sample clipped gradients (no noise; the
optimizer wrapper adds it). See docs/ and README.md.
"""
from .codegen import ops as _ops  # noqa: F401  (registers the dpcompile:: custom ops)
from .backend import flashdp, flashdp_eager, register_backends
from .compile import DPCompiled, compile
from .errors import (CoverageError, DPCompileError, GraphBreakError, LossReductionError, OptionsError,
                     SampleInputError, SampleMixingError, UnsupportedGradientError)
from .explain import Plan, explain
from .options import DPOptions
from .privacy import (BatchMemoryManager, DistributedDPOptimizer, DistributedPoissonDataLoader, DPDataLoader,
                      DPOptimizer, EmptyBatchCollate, LogicalBatchError, ModuleValidator, PoissonBatchSampler,
                      PoissonDataLoader, PrivacyAccountant, PrivacyBudgetExceeded, PrivacyEngine, PrivateTraining,
                      fix, get_epsilon, get_noise_multiplier, load_checkpoint, make_private, save_checkpoint,
                      validate)

from . import memarc  # noqa: E402  (memory-efficient DP fine-tuning: side network, reversible, LoRA, adapters)
from . import data, hf  # noqa: E402  (offline models and corpora; transformers: per-sample LM loss, DPTrainer)

register_backends()

__all__ = [
    "compile", "DPCompiled", "explain", "Plan", "DPOptions", "flashdp", "flashdp_eager",
    "DPOptimizer", "DistributedDPOptimizer", "PoissonDataLoader", "DistributedPoissonDataLoader",
    "PrivacyAccountant", "get_epsilon", "get_noise_multiplier", "make_private",
    "PrivateTraining", "memarc",
    "PrivacyEngine", "PoissonBatchSampler", "DPDataLoader", "BatchMemoryManager", "EmptyBatchCollate",
    "save_checkpoint", "load_checkpoint", "validate", "fix", "ModuleValidator",
    "LogicalBatchError", "PrivacyBudgetExceeded",
    "DPCompileError", "GraphBreakError", "OptionsError", "UnsupportedGradientError", "SampleMixingError", "CoverageError",
    "LossReductionError", "SampleInputError",
]
__version__ = "0.1.0"
