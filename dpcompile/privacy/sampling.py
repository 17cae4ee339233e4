"""Poisson sampling of logical batches, split into physical micro-batches.

The accountants assume Poisson sampling: every example joins each logical batch independently with
probability q, so a logical batch has a Binomial(N, q) size and may be empty. A compiled model
returns the *sum* of per-sample clipped gradients of whatever batch it sees (any size, 0 included),
and the DPOptimizer adds noise once per logical batch and divides by the *expected* batch size q·N.

Three ways to get such batches, all drawing with one rule (`torch.rand(N, generator, float64) < q`, or 53
bits of os.urandom per example in secure mode), so equal seeds give equal batches:

- `PoissonBatchSampler`: a `batch_sampler` for a plain `torch.utils.data.DataLoader` (workers, pinned
  memory, your collate_fn); wrap the collate_fn in `EmptyBatchCollate` so that an empty logical batch
  collates to 0-row tensors.
- `DPDataLoader`: that DataLoader, built from yours (`DPDataLoader.from_data_loader`), one logical batch per
  iteration; `BatchMemoryManager` splits its logical batches into physical ones (Opacus's loop).
- `PoissonDataLoader`: one list of micro-batches per logical batch (the nested loop of `make_private`).

Every logical batch has a draw number (its place in the sampler's stream). The loaders tell the optimizer
they are attached to which logical batch each batch they hand out belongs to, so that it can refuse a step
over two logical batches; the sampler keeps the generator state before each recent draw, so that a
checkpoint resumes the stream at the first logical batch the optimizer did not step on
(privacy/checkpoint.py).

The sampler and the draw rule are samplers.py, the collation of (empty) batches collate.py; their names
stay importable from here.
"""
from __future__ import annotations

import numbers
import warnings
from typing import Any, Callable, Iterator, List, Mapping, Optional

import torch
from torch.utils.data import DataLoader, default_collate

# moved to collate.py and samplers.py; kept importable from here (sampling.X, as before)
from .collate import (EmptyBatchCollate, _empty_like_batch, _is_fast_tensor_dataset,  # noqa: F401
                      _passthrough, _TensorRows)
from .samplers import (_MANTISSA_BITS, _MANTISSA_MASK, STATE_HISTORY, BatchInfo,  # noqa: F401
                       PoissonBatchSampler, UniformWithReplacementSampler, _check_generator, _check_int,
                       _check_rate, _Chunk, _indices_below, _np, _PhysicalBatchSampler, _secure_uniform,
                       micro_batch_sizes)

__all__ = ["PoissonDataLoader", "PoissonBatchSampler", "DPDataLoader", "BatchMemoryManager", "EmptyBatchCollate",
           "BatchInfo", "UniformWithReplacementSampler"]


def _loader_settings(data_loader: DataLoader) -> dict:
    """The settings of a DataLoader that a Poisson version of it keeps: workers, pinned memory, their seeds."""
    settings = dict(num_workers=data_loader.num_workers, pin_memory=data_loader.pin_memory,
                    timeout=data_loader.timeout, worker_init_fn=data_loader.worker_init_fn,
                    multiprocessing_context=data_loader.multiprocessing_context, generator=data_loader.generator,
                    persistent_workers=data_loader.persistent_workers)
    if data_loader.num_workers > 0:
        settings["prefetch_factor"] = data_loader.prefetch_factor
    device = getattr(data_loader, "pin_memory_device", "")
    if device:
        settings["pin_memory_device"] = device
    return settings


def _user_collate(data_loader: DataLoader) -> Optional[Callable]:
    """The loader's collate_fn, None for torch's default (so that a TensorDataset can be indexed directly)."""
    fn = data_loader.collate_fn
    if isinstance(fn, EmptyBatchCollate):
        fn = fn.collate_fn
    return None if fn is default_collate else fn


def _warn_ignored_settings(data_loader: DataLoader, stacklevel: int) -> None:
    if getattr(data_loader, "drop_last", False):
        warnings.warn("the data loader has drop_last=True, which means nothing under Poisson sampling: every "
                      "logical batch holds the examples drawn (a Binomial(N, q) number), none is dropped, and "
                      "the last batch of a pass is no smaller than the others", stacklevel=stacklevel + 1)


def _notify(optimizer, info: Optional[BatchInfo], first: bool = True, last: bool = True, count: int = 1) -> None:
    if optimizer is not None and info is not None:
        optimizer.note_physical_batch(draw=info.draw, sample_rate=info.sample_rate, first=first, last=last,
                                      count=count)


class DPDataLoader(DataLoader):
    """A torch DataLoader of Poisson logical batches (Opacus's DPDataLoader): `batch_sampler` is a
    PoissonBatchSampler (drawing with `generator`), `collate_fn` an EmptyBatchCollate around yours, and
    everything else (workers, pinned memory, worker_init_fn, ...) is a DataLoader's; `worker_generator` is the
    DataLoader's own generator (the workers' seeds), kept apart so that the sampling stream does not depend on
    how many times the loader was iterated. Each iteration yields one collated logical batch (maybe with 0
    rows); `BatchMemoryManager` splits them into physical batches.

    `DPDataLoader.from_data_loader(loader)` keeps a DataLoader's dataset, collate_fn and settings, with
    q = batch_size / N (a drop_last=True is warned about: it means nothing under Poisson sampling).

    When an optimizer is attached (`attach_optimizer`; make_private and PrivacyEngine do it), every batch handed
    out tells it which logical batch it is (`DPOptimizer.note_physical_batch`)."""

    def __init__(self, dataset: Any, *, sample_rate: Optional[float] = None,
                 expected_batch_size: Optional[float] = None, steps: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, secure_mode: bool = False,
                 collate_fn: Optional[Callable[[List[Any]], Any]] = None,
                 worker_generator: Optional[torch.Generator] = None, **loader_kwargs) -> None:
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TypeError("dataset must be a map-style dataset with __len__ and __getitem__")
        if len(dataset) < 1:
            raise ValueError("dataset is empty: Poisson sampling needs at least one example")
        for bad in ("batch_size", "shuffle", "sampler", "batch_sampler", "drop_last"):
            if bad in loader_kwargs:
                raise ValueError(f"DPDataLoader draws its own Poisson batches: {bad}= cannot be given")
        loader_kwargs["in_order"] = True  # the loaders pair batches with their logical batch by order
        sampler = PoissonBatchSampler(len(dataset), sample_rate, steps, generator, secure_mode,
                                      expected_batch_size=expected_batch_size)
        super().__init__(dataset, batch_sampler=sampler, collate_fn=EmptyBatchCollate(dataset, collate_fn),
                         generator=worker_generator, **loader_kwargs)
        self._dp_optimizer = None

    @classmethod
    def from_data_loader(cls, data_loader: DataLoader, *, generator: Optional[torch.Generator] = None,
                         secure_mode: bool = False, steps: Optional[int] = None,
                         sample_rate: Optional[float] = None) -> "DPDataLoader":
        """A DPDataLoader over `data_loader`'s dataset with its collate_fn and settings; q = sample_rate, or
        batch_size / N (the batch size is the expected logical batch size)."""
        if isinstance(data_loader, DPDataLoader):
            return data_loader
        dataset = data_loader.dataset
        if sample_rate is None:
            batch_size = getattr(data_loader, "batch_size", None)
            if not batch_size:
                raise ValueError("the data loader needs a batch_size: it sets the expected batch size q*N")
            sample_rate = batch_size / len(dataset)
        _warn_ignored_settings(data_loader, stacklevel=3)
        settings = _loader_settings(data_loader)
        settings["worker_generator"] = settings.pop("generator")
        return cls(dataset, sample_rate=sample_rate, steps=steps, generator=generator, secure_mode=secure_mode,
                   collate_fn=_user_collate(data_loader), **settings)

    @property
    def sample_rate(self) -> float:
        return self.batch_sampler.sample_rate

    @property
    def expected_batch_size(self) -> float:
        return self.batch_sampler.expected_batch_size

    def attach_optimizer(self, optimizer) -> None:
        """Tell `optimizer` the logical batch of every batch handed out (None: stop)."""
        self._dp_optimizer = optimizer

    def __iter__(self):
        return _TrackedIterator(super().__iter__(), self)


class _TrackedIterator:
    """A DataLoader iterator that tells the loader's optimizer which logical batch each batch is."""

    def __init__(self, it, loader: DPDataLoader) -> None:
        self._it = it
        self._loader = loader

    def __iter__(self):
        return self

    def __len__(self) -> int:
        return len(self._it)

    def __next__(self):
        batch = next(self._it)
        yielded = self._loader.batch_sampler._yielded
        _notify(self._loader._dp_optimizer, yielded.popleft() if yielded else None)
        return batch


class BatchMemoryManager:
    """Splits every logical batch of a DPDataLoader into physical batches of at most `max_physical_batch_size`
    examples, for the loop Opacus users write (step() after every physical batch)::

        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=64, optimizer=optimizer) as batches:
            for x, y in batches:              # plain collated batches; an empty logical batch: one with 0 rows
                optimizer.zero_grad()
                criterion(model(x), y).backward()
                optimizer.step()              # steps (noise, accountant) at the end of each logical batch only

    Each physical batch is collated on its own (by the loader's collate_fn, in its workers: the new DataLoader
    keeps the loader's settings). Before handing one out the manager tells the optimizer which logical batch it
    belongs to and whether it is the last of it: step() on a physical batch that is not the last returns
    without stepping, and zero_grad() inside a logical batch keeps the clipped sums of its earlier physical
    batches (as Opacus does). Gradients of two logical batches at one step, a second step() for one logical
    batch, or a step over a logical batch the loop left unfinished (leaving the `with` block in the middle of
    one) are refused (errors name what happened and the fix). `len()` is the expected number of physical
    batches."""

    def __init__(self, *, data_loader: DataLoader, max_physical_batch_size: int, optimizer) -> None:
        from .optimizer import DPOptimizer

        if isinstance(data_loader, PoissonDataLoader):
            raise TypeError("BatchMemoryManager splits the logical batches of a DPDataLoader; a PoissonDataLoader "
                            "already yields each logical batch as a list of micro-batches (its "
                            "max_physical_batch_size): loop over them directly")
        sampler = getattr(data_loader, "batch_sampler", None)
        if not isinstance(data_loader, DataLoader) or not isinstance(sampler, PoissonBatchSampler):
            raise TypeError("BatchMemoryManager splits Poisson logical batches: give it the data loader that "
                            "PrivacyEngine.make_private returned (a DPDataLoader), or a DataLoader whose "
                            "batch_sampler is a PoissonBatchSampler")
        if not isinstance(optimizer, DPOptimizer):
            raise TypeError(f"BatchMemoryManager needs the DPOptimizer that steps these batches, got "
                            f"{type(optimizer).__name__}")
        self.max_physical_batch_size = _check_int("max_physical_batch_size", max_physical_batch_size)
        self.optimizer = optimizer
        self.data_loader = data_loader
        self._split = _PhysicalBatchSampler(sampler, self.max_physical_batch_size)
        collate_fn = data_loader.collate_fn
        if not isinstance(collate_fn, EmptyBatchCollate):
            collate_fn = EmptyBatchCollate(data_loader.dataset, collate_fn)
        self._loader = DataLoader(data_loader.dataset, batch_sampler=self._split, collate_fn=collate_fn,
                                  in_order=True, **_loader_settings(data_loader))

    def __enter__(self) -> "BatchMemoryManager":
        return self

    def __exit__(self, *exc) -> bool:
        self.optimizer.note_batches_end()
        return False

    def __len__(self) -> int:
        return len(self._split)

    def __iter__(self) -> Iterator[Any]:
        for batch in self._loader:
            chunk = self._split.chunks.popleft()
            _notify(self.optimizer, chunk.batch, first=chunk.index == 0, last=chunk.index == chunk.count - 1)
            yield batch


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
        num_workers, pin_memory, worker_generator, **loader_kwargs: with num_workers > 0 or pin_memory=True the
            micro-batches are fetched and collated by a torch DataLoader with these settings (timeout,
            worker_init_fn, prefetch_factor, persistent_workers, ...; worker_generator is its `generator`, which
            seeds the workers); the indices are still drawn here, in the main process.

    Attributes `sample_rate` (q) and `expected_batch_size` (q·N, a float) are both set, whichever
    was given; `batch_sampler` is the PoissonBatchSampler that draws the logical batches. Inclusion
    is decided as `u < q` with u uniform on a grid of step 2**-53 (float64), so the realised
    inclusion probability exceeds q by less than 2**-53.
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
        num_workers: int = 0,
        pin_memory: bool = False,
        worker_generator: Optional[torch.Generator] = None,
        **loader_kwargs: Any,
    ) -> None:
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TypeError("dataset must be a map-style dataset with __len__ and __getitem__")
        n = len(dataset)
        if n < 1:
            raise ValueError("dataset is empty: Poisson sampling needs at least one example")
        q, _ = _check_rate(n, sample_rate, expected_batch_size)
        if max_physical_batch_size is not None:
            max_physical_batch_size = _check_int("max_physical_batch_size", max_physical_batch_size)
        if steps is not None:
            steps = _check_int("steps", steps)
        if isinstance(num_workers, bool) or not isinstance(num_workers, numbers.Integral) or num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
        for bad in ("batch_size", "shuffle", "sampler", "batch_sampler", "drop_last"):
            if bad in loader_kwargs:
                raise ValueError(f"PoissonDataLoader draws its own Poisson batches: {bad}= cannot be given")
        self.batch_sampler = PoissonBatchSampler(n, q, steps, _check_generator(generator, bool(secure_mode)),
                                                 bool(secure_mode))
        self.dataset = dataset
        self.max_physical_batch_size: Optional[int] = max_physical_batch_size
        self.collate_fn: Callable[[List[Any]], Any] = collate_fn if collate_fn is not None else default_collate
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.loader_kwargs = dict(loader_kwargs, generator=worker_generator)
        # Direct tensor indexing, only where it is exactly what collating the items would give.
        self._fast_tensors = _is_fast_tensor_dataset(dataset, collate_fn)
        self._one_item: Any = None
        self._torch_loader: Optional[DataLoader] = None
        self._split: Optional[_PhysicalBatchSampler] = None
        self._dp_optimizer = None

    # -- the sampler's attributes --------------------------------------------------------------------------
    @property
    def sample_rate(self) -> float:
        return self.batch_sampler.sample_rate

    @sample_rate.setter
    def sample_rate(self, value: float) -> None:
        self.batch_sampler.sample_rate = value

    @property
    def expected_batch_size(self) -> float:
        return self.batch_sampler.expected_batch_size

    @property
    def steps(self) -> int:
        return self.batch_sampler.steps

    @steps.setter
    def steps(self, value: int) -> None:
        self.batch_sampler.steps = _check_int("steps", value)

    @property
    def generator(self) -> Optional[torch.Generator]:
        return self.batch_sampler.generator

    @property
    def secure_mode(self) -> bool:
        return self.batch_sampler.secure_mode

    def __len__(self) -> int:
        return self.steps

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(N={len(self.dataset)}, sample_rate={self.sample_rate:.6g}, "
            f"expected_batch_size={self.expected_batch_size:.6g}, "
            f"max_physical_batch_size={self.max_physical_batch_size}, steps={self.steps}, "
            f"secure_mode={self.secure_mode})"
        )

    def attach_optimizer(self, optimizer) -> None:
        """Tell `optimizer` the logical batch of every list of micro-batches handed out (None: stop)."""
        self._dp_optimizer = optimizer

    def state_dict(self, position: Optional[int] = None) -> dict:
        return self.batch_sampler.state_dict(position)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.batch_sampler.load_state_dict(state)

    def sample_indices(self) -> torch.Tensor:
        """Draw one logical batch: the sampled indices (int64, increasing), each included w.p. q."""
        return self.batch_sampler.sample_indices()

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
        if self.num_workers > 0 or self.pin_memory:
            yield from self._iter_torch_loader()
            return
        for _ in range(self.batch_sampler._pass_length()):
            idx = self.sample_indices()
            if idx.numel() == 0:
                _notify(self._dp_optimizer, self.batch_sampler.last_info)
                yield [self._empty()]
                continue
            sizes = micro_batch_sizes(idx.numel(), self.max_physical_batch_size)
            group = [self._collate(chunk) for chunk in torch.split(idx, sizes)]
            _notify(self._dp_optimizer, self.batch_sampler.last_info, count=len(group))
            yield group

    def _iter_torch_loader(self) -> Iterator[List[Any]]:
        """The same logical batches, their micro-batches fetched and collated by a torch DataLoader."""
        if self._torch_loader is None:
            self._split = _PhysicalBatchSampler(self.batch_sampler, self.max_physical_batch_size)
            if self._fast_tensors:
                dataset, collate = _TensorRows(self.dataset), _passthrough
            else:
                dataset, collate = self.dataset, EmptyBatchCollate(self.dataset, self.collate_fn)
            self._torch_loader = DataLoader(dataset, batch_sampler=self._split, collate_fn=collate,
                                            num_workers=self.num_workers, pin_memory=self.pin_memory,
                                            in_order=True, **self.loader_kwargs)
        group: List[Any] = []
        for batch in self._torch_loader:
            chunk = self._split.chunks.popleft()
            group.append(batch)
            if chunk.index == chunk.count - 1:
                _notify(self._dp_optimizer, chunk.batch, count=len(group))
                yield group
                group = []
