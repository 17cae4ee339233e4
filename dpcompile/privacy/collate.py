"""Collating Poisson batches, which may be empty: `EmptyBatchCollate` (an empty batch collates to 0-row tensors of
the dataset's structure) and the direct indexing of a plain TensorDataset (used by the loaders of sampling.py)."""
from __future__ import annotations

from typing import Any, Callable, List, Mapping, Optional

import torch
from torch.utils.data import TensorDataset, default_collate


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
    if isinstance(batch, list) and batch and all(isinstance(v, (str, bytes)) for v in batch):
        return []  # a batch of strings (default_collate keeps them as a list): no example's text in an empty batch
    if isinstance(batch, (tuple, list)):
        return type(batch)(_empty_like_batch(v) for v in batch)
    return batch


class EmptyBatchCollate:
    """collate_fn(items) for Poisson batches: `collate_fn(items)`, or for an empty batch the structure, dtypes
    and trailing shapes of one collated example (the dataset's first, fetched once per process) with 0 rows,
    so that the model runs on B = 0 (and the optimizer still adds that step's noise). torch's default_collate
    fails on []. Lists of strings become []; other non-tensor leaves are kept as they are."""

    def __init__(self, dataset: Any, collate_fn: Optional[Callable[[List[Any]], Any]] = None) -> None:
        if isinstance(collate_fn, EmptyBatchCollate):
            collate_fn = collate_fn.collate_fn
        self.dataset = dataset
        self.collate_fn = collate_fn if collate_fn is not None else default_collate
        self._one: Any = None

    def __call__(self, items: List[Any]) -> Any:
        if len(items):
            return self.collate_fn(items)
        if self._one is None:
            self._one = self.collate_fn([self.dataset[0]])
        return _empty_like_batch(self._one)

    def __getstate__(self):  # workers fetch their own example
        return {"dataset": self.dataset, "collate_fn": self.collate_fn, "_one": None}


class _TensorRows(torch.utils.data.Dataset):
    """A TensorDataset read a batch at a time (DataLoader's fetcher calls __getitems__): `[t[idx] for t in
    tensors]`, what default_collate of its items gives, without collating item by item (0 rows for [])."""

    def __init__(self, dataset: TensorDataset) -> None:
        self.tensors = dataset.tensors

    def __len__(self) -> int:
        return self.tensors[0].size(0)

    def __getitem__(self, i):
        return tuple(t[i] for t in self.tensors)

    def __getitems__(self, indices: List[int]):
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return [t[idx.to(t.device)] for t in self.tensors]


def _passthrough(batch: Any) -> Any:
    return batch


def _is_fast_tensor_dataset(dataset: Any, collate_fn: Optional[Callable]) -> bool:
    """Direct tensor indexing gives exactly what collating the items would (no collate_fn, a plain
    TensorDataset whose __getitem__ is TensorDataset's)."""
    return (collate_fn is None and isinstance(dataset, TensorDataset)
            and type(dataset).__getitem__ is TensorDataset.__getitem__)
