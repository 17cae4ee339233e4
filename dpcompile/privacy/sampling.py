"""Poisson sampling of logical batches, split into physical micro-batches.

The accountants assume Poisson sampling: every example joins each logical batch independently with
probability q, so a logical batch has a Binomial(N, q) size and may be empty. A compiled model
returns the *sum* of per-sample clipped gradients of whatever batch it sees (any size, 0 included),
and the DPOptimizer adds noise once per logical batch and divides by the *expected* batch size q·N.
`PoissonDataLoader` produces exactly what that contract needs: one list of micro-batches per
logical batch, never dropping or duplicating a sampled example, with a 0-row micro-batch for an
empty logical batch (so the step, and its noise, still happens).
"""
from __future__ import annotations

import numbers
import os
from typing import Any, Callable, Iterator, List, Mapping, Optional

import torch
from torch.utils.data import TensorDataset, default_collate

try:  # optional speed-up only (dp-accounting already pulls numpy in)
    import numpy as _np
except ImportError:  # pragma: no cover
    _np = None

__all__ = ["PoissonDataLoader"]

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


def _empty_like_batch(batch: Any) -> Any:
    """Slice every tensor of a collated (nested tuple/list/dict) structure to its first 0 rows."""
    if isinstance(batch, torch.Tensor):
        return batch[:0]
    if isinstance(batch, Mapping):
        items = {k: _empty_like_batch(v) for k, v in batch.items()}
        try:
            return type(batch)(items)
        except TypeError:
            return items
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_empty_like_batch(v) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_empty_like_batch(v) for v in batch)
    return batch


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    return int(value)


class PoissonDataLoader:
    """Poisson-sampled logical batches, each a list of physical micro-batches.

    Every logical batch includes each of the N examples independently with probability
    q = `sample_rate` (or q = `expected_batch_size` / N), which is what the privacy accountants
    assume. Its size is therefore Binomial(N, q): it varies and can be 0. The sampled indices, in
    increasing order, are split into consecutive micro-batches of at most `max_physical_batch_size`
    examples (None: a single micro-batch) so that large logical batches fit in memory; no sampled
    example is dropped or duplicated. An empty logical batch yields one micro-batch with 0 rows and
    the dataset's trailing shapes and dtypes, so the model still runs and the optimizer still adds
    its noise for that step.

    Intended loop (the optimizer divides by the *expected* batch size, never the realised one)::

        loader = PoissonDataLoader(dataset, expected_batch_size=256, max_physical_batch_size=64)
        for micro_batches in loader:            # one logical (Poisson) batch
            for x, y in micro_batches:          # physical micro-batches, at most max_physical_batch_size each
                model(x, y).backward()          # clipped sums accumulate in .grad
            optimizer.step(); optimizer.zero_grad()   # noise once per logical batch

    Args:
        dataset: a map-style dataset (`__len__` and `__getitem__`). A plain
            `torch.utils.data.TensorDataset` is indexed directly (`tensor[idx]`) instead of
            collating items one by one, when no `collate_fn` is given.
        sample_rate: q in (0, 1]. Give exactly one of `sample_rate` and `expected_batch_size`.
        expected_batch_size: q·N, in (0, N].
        max_physical_batch_size: the largest micro-batch (>= 1); None: no split.
        steps: logical batches per pass (`for` loop) over the loader; default round(1/q), one epoch
            in expectation. `len(loader) == steps`.
        generator: a `torch.Generator` for reproducible sampling; default a fresh one seeded from
            the OS. Successive passes continue from the generator's state, so they differ.
        secure_mode: draw the inclusion decisions from `os.urandom` (a CSPRNG), 53 bits per example.
            Incompatible with `generator`.
        collate_fn: turns a list of dataset items into a micro-batch; default
            `torch.utils.data.default_collate`.

    Attributes `sample_rate` (q) and `expected_batch_size` (q·N, a float) are both set, whichever
    was given. Inclusion is decided as `u < q` with u uniform on a grid of step 2**-53 (float64), so
    the realised inclusion probability exceeds q by less than 2**-53.
    """

    def __init__(
        self,
        dataset: Any,
        sample_rate: Optional[float] = None,
        *,
        expected_batch_size: Optional[float] = None,
        max_physical_batch_size: Optional[int] = None,
        steps: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        secure_mode: bool = False,
        collate_fn: Optional[Callable[[List[Any]], Any]] = None,
    ) -> None:
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TypeError("dataset must be a map-style dataset with __len__ and __getitem__")
        n = len(dataset)
        if n < 1:
            raise ValueError("dataset is empty: Poisson sampling needs at least one example")

        if (sample_rate is None) == (expected_batch_size is None):
            raise ValueError("give exactly one of sample_rate and expected_batch_size")
        if sample_rate is not None:
            if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Real):
                raise ValueError(f"sample_rate must be a number in (0, 1], got {sample_rate!r}")
            q = float(sample_rate)
            if not (0.0 < q <= 1.0):
                raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
            ebs = q * n
        else:
            if isinstance(expected_batch_size, bool) or not isinstance(expected_batch_size, numbers.Real):
                raise ValueError(
                    f"expected_batch_size must be a number in (0, len(dataset)={n}], got {expected_batch_size!r}"
                )
            ebs = float(expected_batch_size)
            q = ebs / n
            if not (0.0 < q <= 1.0):
                raise ValueError(
                    f"expected_batch_size must be in (0, len(dataset)={n}] (sample rate in (0, 1]), "
                    f"got {expected_batch_size!r}"
                )

        if max_physical_batch_size is not None:
            max_physical_batch_size = _check_int("max_physical_batch_size", max_physical_batch_size)
        if steps is None:
            steps = max(1, round(1.0 / q))
        else:
            steps = _check_int("steps", steps)

        if secure_mode and generator is not None:
            raise ValueError(
                "generator cannot be combined with secure_mode=True: secure sampling draws from os.urandom"
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator is None and not secure_mode:
            generator = torch.Generator()
            generator.manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))

        self.dataset = dataset
        self.sample_rate: float = q
        self.expected_batch_size: float = ebs
        self.max_physical_batch_size: Optional[int] = max_physical_batch_size
        self.steps: int = steps
        self.generator: Optional[torch.Generator] = generator
        self.secure_mode: bool = bool(secure_mode)
        self.collate_fn: Callable[[List[Any]], Any] = collate_fn if collate_fn is not None else default_collate
        # Direct tensor indexing, only where it is exactly what collating the items would give.
        self._fast_tensors = (
            collate_fn is None
            and isinstance(dataset, TensorDataset)
            and type(dataset).__getitem__ is TensorDataset.__getitem__
        )
        self._one_item: Any = None

    def __len__(self) -> int:
        return self.steps

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(N={len(self.dataset)}, sample_rate={self.sample_rate:.6g}, "
            f"expected_batch_size={self.expected_batch_size:.6g}, "
            f"max_physical_batch_size={self.max_physical_batch_size}, steps={self.steps}, "
            f"secure_mode={self.secure_mode})"
        )

    def sample_indices(self) -> torch.Tensor:
        """Draw one logical batch: the sampled indices (int64, increasing), each included w.p. q."""
        n = len(self.dataset)
        if self.secure_mode:
            u = _secure_uniform(n)
        else:
            u = torch.rand(n, generator=self.generator, dtype=torch.float64, device=self.generator.device)
        return _indices_below(u, self.sample_rate)

    def _collate(self, idx: torch.Tensor) -> Any:
        if self._fast_tensors:
            return [t[idx.to(t.device)] for t in self.dataset.tensors]
        return self.collate_fn([self.dataset[i] for i in idx.tolist()])

    def _empty(self) -> Any:
        if self._fast_tensors:
            return [t[:0] for t in self.dataset.tensors]
        if self._one_item is None:  # collated once; sliced afresh so callers never share tensor objects
            self._one_item = self.collate_fn([self.dataset[0]])
        return _empty_like_batch(self._one_item)

    def __iter__(self) -> Iterator[List[Any]]:
        for _ in range(self.steps):
            idx = self.sample_indices()
            if idx.numel() == 0:
                yield [self._empty()]
                continue
            size = self.max_physical_batch_size or idx.numel()
            yield [self._collate(chunk) for chunk in torch.split(idx, size)]
