"""Poisson sampling of logical batches (sampling.py tells the whole story): the draw rule (`torch.rand(N, generator,
float64) < q`, or 53 bits of os.urandom per example in secure mode), `PoissonBatchSampler` (Opacus's
`UniformWithReplacementSampler`) with its checkpoints of the stream, and the split of its logical batches into
physical ones that the loaders of sampling.py hand out."""
from __future__ import annotations

import collections
import itertools
import math
import numbers
import os
import warnings
from typing import Any, Iterator, List, Mapping, NamedTuple, Optional

import torch
from torch.utils.data import Sampler

try:  # optional speed-up only (dp-accounting already pulls numpy in)
    import numpy as _np
except ImportError:  # pragma: no cover
    _np = None

_MANTISSA_BITS = 53
_MANTISSA_MASK = (1 << _MANTISSA_BITS) - 1


def _secure_uniform(n: int) -> torch.Tensor:
    """`n` independent uniforms on [0, 1) in float64, 53 random bits each, from the OS CSPRNG."""
    if n == 0:
        return torch.empty(0, dtype=torch.float64)
    buf = os.urandom(8 * n)
    # The low 53 bits of each 64-bit word: a non-negative integer k < 2**53, exactly representable
    # in float64, so k * 2**-53 is uniform on the grid {0, 2**-53, ..., 1 - 2**-53}.
    if _np is not None:
        k = _np.frombuffer(buf, dtype=_np.uint64) & _np.uint64(_MANTISSA_MASK)
        return torch.from_numpy(k.astype(_np.float64) * (2.0 ** -_MANTISSA_BITS))
    raw = torch.frombuffer(bytearray(buf), dtype=torch.int64)
    return (raw & _MANTISSA_MASK).to(torch.float64) * (2.0 ** -_MANTISSA_BITS)


def _indices_below(u: torch.Tensor, q: float) -> torch.Tensor:
    """Indices i (int64, increasing, on the CPU) with u[i] < q."""
    if _np is not None and u.device.type == "cpu":
        # numpy's flatnonzero is far faster than torch.nonzero on CPU for large N (same result)
        return torch.from_numpy(_np.flatnonzero(u.numpy() < q).astype(_np.int64, copy=False))
    return torch.nonzero(u < q).flatten().cpu()


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    return int(value)


def _check_rate(n: int, sample_rate: Optional[float], expected_batch_size: Optional[float]):
    """(q, q*N) from exactly one of sample_rate and expected_batch_size."""
    if (sample_rate is None) == (expected_batch_size is None):
        raise ValueError("give exactly one of sample_rate and expected_batch_size")
    if sample_rate is not None:
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Real):
            raise ValueError(f"sample_rate must be a number in (0, 1], got {sample_rate!r}")
        q = float(sample_rate)
        if not (0.0 < q <= 1.0):
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        return q, q * n
    if isinstance(expected_batch_size, bool) or not isinstance(expected_batch_size, numbers.Real):
        raise ValueError(
            f"expected_batch_size must be a number in (0, len(dataset)={n}], got {expected_batch_size!r}")
    ebs = float(expected_batch_size)
    q = ebs / n
    if not (0.0 < q <= 1.0):
        raise ValueError(f"expected_batch_size must be in (0, len(dataset)={n}] (sample rate in (0, 1]), "
                         f"got {expected_batch_size!r}")
    return q, ebs


def _check_generator(generator: Optional[torch.Generator], secure_mode: bool) -> Optional[torch.Generator]:
    """The sampling generator: the one given, or a fresh one seeded from the OS; None in secure mode."""
    if secure_mode and generator is not None:
        raise ValueError("generator cannot be combined with secure_mode=True: secure sampling draws from os.urandom")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator is None and not secure_mode:
        generator = torch.Generator()
        generator.manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))
    return generator


class BatchInfo(NamedTuple):
    """What a loader tells the optimizer about the logical batch a (physical) batch belongs to."""
    draw: int            #: its place in the sampler's stream of logical batches (0, 1, 2, ... over all passes)
    sample_rate: float   #: the q it was drawn with
    size: int            #: how many examples it holds


#: how many recent draws keep the generator state they started from (a checkpoint resumes at one of them; a
#: DataLoader's workers draw at most num_workers * prefetch_factor logical batches ahead of the training loop)
STATE_HISTORY = 256


class PoissonBatchSampler(Sampler[List[int]]):
    """A `batch_sampler` for `torch.utils.data.DataLoader`: every iteration yields `steps` logical batches, each
    the list of indices (increasing) of the examples drawn independently with probability q.

        sampler = PoissonBatchSampler(len(dataset), sample_rate=256 / len(dataset))
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=2, pin_memory=True,
                            collate_fn=EmptyBatchCollate(dataset, my_collate))   # an empty batch: 0-row tensors

    A batch may be empty ([]): torch's default_collate fails on an empty list, hence `EmptyBatchCollate`.
    Indices are drawn in the main process (never in the workers), as `torch.rand(N, generator, float64) < q`
    (the rule of PoissonDataLoader: equal seeds, equal batches) or, with secure_mode=True, from 53 bits of
    os.urandom per example (no generator then).

    num_samples: N. sample_rate: q in (0, 1] (or expected_batch_size=q*N). steps: logical batches per pass,
    default round(1/q) (one epoch in expectation); `len(sampler) == steps`. generator: a torch.Generator;
    default one seeded from the OS. Successive passes continue the stream.

    Attributes: `sample_rate` (may be changed between batches: each batch is drawn with the q of that moment,
    and reports it to the optimizer, which refuses to account a q it was not told), `draws` (logical batches
    drawn so far), `last_info`. `state_dict(position)` / `load_state_dict` checkpoint the stream.
    """

    def __init__(self, num_samples: int, sample_rate: Optional[float] = None, steps: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, secure_mode: bool = False, *,
                 expected_batch_size: Optional[float] = None) -> None:
        n = _check_int("num_samples", num_samples)
        q, _ = _check_rate(n, sample_rate, expected_batch_size)
        steps = max(1, round(1.0 / q)) if steps is None else _check_int("steps", steps)
        self.num_samples = n
        self.sample_rate: float = q
        self.steps: int = steps
        self.secure_mode = bool(secure_mode)
        self.generator = _check_generator(generator, self.secure_mode)
        self.draws = 0
        self.last_info: Optional[BatchInfo] = None
        self._states: "collections.OrderedDict[int, torch.Tensor]" = collections.OrderedDict()
        self._yielded: collections.deque = collections.deque(maxlen=4096)
        self._resume_remaining: Optional[int] = None

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.num_samples

    def __len__(self) -> int:
        return self.steps

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(N={self.num_samples}, sample_rate={self.sample_rate:.6g}, "
                f"steps={self.steps}, secure_mode={self.secure_mode}, draws={self.draws})")

    def sample_indices(self) -> torch.Tensor:
        """Draw one logical batch: the sampled indices (int64, increasing), each included w.p. q."""
        q = self.sample_rate
        if isinstance(q, bool) or not isinstance(q, numbers.Real) or not 0.0 < float(q) <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {q!r}")
        q = float(q)
        n = self.num_samples
        if self.secure_mode:
            u = _secure_uniform(n)
        else:
            self._states[self.draws] = self.generator.get_state()
            while len(self._states) > STATE_HISTORY:
                self._states.popitem(last=False)
            u = torch.rand(n, generator=self.generator, dtype=torch.float64, device=self.generator.device)
        idx = _indices_below(u, q)
        self.last_info = BatchInfo(self.draws, q, int(idx.numel()))
        self.draws += 1
        return idx

    def _pass_length(self) -> int:
        """Logical batches in this pass: `steps`, or the rest of the pass a checkpoint was taken in."""
        k, self._resume_remaining = self._resume_remaining, None
        return self.steps if k is None else k

    def __iter__(self) -> Iterator[List[int]]:
        yielded = self._yielded = collections.deque(maxlen=4096)  # read by the loaders, in the main process
        for _ in range(self._pass_length()):
            idx = self.sample_indices()
            yielded.append(self.last_info)
            yield idx.tolist()

    # -- checkpoints ---------------------------------------------------------------------------------------
    def state_dict(self, position: Optional[int] = None) -> dict:
        """The stream from logical batch `position` on (default: the next one to be drawn): N, q, steps, the
        draw number and the generator state before it (None in secure mode, which cannot be replayed).

        A DataLoader with workers draws ahead of the training loop; the checkpoint gives the position of the
        first logical batch the optimizer did not step on, whose state the sampler kept."""
        draws = self.draws if position is None else int(position)
        state = None
        if not self.secure_mode:
            if draws == self.draws:
                state = self.generator.get_state()
            elif draws in self._states:
                state = self._states[draws].clone()
            else:
                warnings.warn(f"{type(self).__name__}.state_dict: the generator state before logical batch {draws} "
                              f"is no longer kept (draws so far: {self.draws}); the checkpoint continues the stream "
                              "from the current state instead", stacklevel=2)
                draws, state = self.draws, self.generator.get_state()
        return {"num_samples": self.num_samples, "sample_rate": self.sample_rate, "steps": self.steps,
                "secure_mode": self.secure_mode, "draws": draws, "generator": state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the stream of a checkpoint: the next logical batch is its `draws`-th, and the next pass
        yields the rest of the pass it was in. N and q must be those of the checkpoint."""
        if int(state["num_samples"]) != self.num_samples:
            raise ValueError(f"the checkpoint's sampler drew from N={state['num_samples']} examples, this one from "
                             f"N={self.num_samples}: resume on the same dataset")
        if abs(float(state["sample_rate"]) - self.sample_rate) > 1e-12 * self.sample_rate:
            raise ValueError(f"the checkpoint's sampler drew with sample_rate={state['sample_rate']!r}, this one with "
                             f"{self.sample_rate!r}: resume with the q the optimizer accounts")
        draws = _check_int("draws", int(state["draws"]) + 1) - 1
        if not self.secure_mode:
            if state.get("generator") is None:
                raise ValueError("the checkpoint was taken in secure mode (no generator state): resume with "
                                 "secure_mode=True")
            self.generator.set_state(state["generator"])
        self.draws = draws
        self._states.clear()
        done = draws % self.steps
        self._resume_remaining = self.steps - done if done else None


#: Opacus's name for the same sampler (its arguments num_samples=, sample_rate=, generator=, steps= are taken)
UniformWithReplacementSampler = PoissonBatchSampler


def micro_batch_sizes(n: int, max_size: Optional[int]) -> List[int]:
    """Sizes of the consecutive micro-batches of a logical batch of n samples, at most max_size each (None: one),
    and none of 1 sample where that can be avoided: a compiled step specializes a batch of 1 (Dynamo's 0/1
    specialization), so a lone last sample would cost a whole compile mid-run. The last two micro-batches of
    (max_size, 1) become (max_size - 1, 2): the same samples, the same sum, as many micro-batches."""
    if n == 0:
        return []
    size = max_size or n
    sizes = [size] * (n // size) + ([n % size] if n % size else [])
    if len(sizes) >= 2 and sizes[-1] == 1 and size >= 3:
        sizes[-2:] = [size - 1, 2]
    return sizes


class _Chunk(NamedTuple):
    batch: BatchInfo  #: the logical batch
    index: int        #: this physical batch's place in it
    count: int        #: physical batches in it (an empty logical batch: one, with 0 rows)


class _PhysicalBatchSampler(Sampler[List[int]]):
    """Splits each logical batch of a PoissonBatchSampler into consecutive chunks of at most `max_size` indices
    (an empty one stays one empty chunk) and records, in order, which logical batch each chunk belongs to
    (`chunks`: DataLoader keeps the order of its batch_sampler, so the training loop pops one per batch)."""

    def __init__(self, logical: PoissonBatchSampler, max_size: Optional[int]) -> None:
        self.logical = logical
        self.max_size = max_size
        self.chunks: collections.deque = collections.deque()

    def __len__(self) -> int:  # the expected count (the real one is random)
        if self.max_size is None:
            return len(self.logical)
        return len(self.logical) * max(1, math.ceil(self.logical.expected_batch_size / self.max_size))

    def __iter__(self) -> Iterator[List[int]]:
        chunks = self.chunks = collections.deque()
        logical = self.logical
        for idx in logical:
            info = logical._yielded.popleft()
            bounds = list(itertools.accumulate(micro_batch_sizes(len(idx), self.max_size), initial=0))
            parts = [idx[i:j] for i, j in zip(bounds, bounds[1:])] or [[]]
            for j, part in enumerate(parts):
                chunks.append(_Chunk(info, j, len(parts)))
                yield part
