"""PoissonDataLoader: Poisson logical batches (peers.md §9.4, §9.5), split into physical micro-batches.

All statistical tests use fixed generator seeds, so they are deterministic; their tolerances are
several standard deviations wide so that a correct sampler passes for (almost) any seed, and the
goodness-of-fit helper is shown to reject wrong distributions. The secure-mode tests cannot be
seeded; their tolerances are >= 6 standard deviations.
"""
from __future__ import annotations

import math
import os
import warnings
from collections import namedtuple

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats
from torch.utils.data import TensorDataset, default_collate

from dpcompile.privacy.sampling import PoissonDataLoader


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _index_loader(n: int, q: float, seed: int, **kw) -> PoissonDataLoader:
    """A loader over TensorDataset(arange(n)): micro-batches are [indices]."""
    return PoissonDataLoader(TensorDataset(torch.arange(n)), q, generator=_gen(seed), **kw)


def _logical_indices(micro_batches) -> torch.Tensor:
    return torch.cat([mb[0] for mb in micro_batches])


def _binomial_gof_pvalue(sizes: np.ndarray, n: int, q: float, min_expected: float = 5.0) -> float:
    """Chi-square goodness of fit of `sizes` to Binomial(n, q), tails pooled so every bin expects >= 5."""
    m = len(sizes)
    dist = stats.binom(n, q)
    ks = np.arange(n + 1)
    expected = m * dist.pmf(ks)
    core = np.flatnonzero(expected >= min_expected)
    lo, hi = core.min(), core.max()
    exp_bins = np.concatenate([[m * dist.cdf(lo - 1)], expected[lo : hi + 1], [m * dist.sf(hi)]])
    counts = np.bincount(np.asarray(sizes, dtype=np.int64), minlength=n + 1)
    obs_bins = np.concatenate([[counts[:lo].sum()], counts[lo : hi + 1], [counts[hi + 1 :].sum()]])
    keep = exp_bins > 0
    exp_bins, obs_bins = exp_bins[keep], obs_bins[keep]
    exp_bins *= obs_bins.sum() / exp_bins.sum()  # remove float round-off in the pooled tails
    return float(stats.chisquare(obs_bins, exp_bins).pvalue)


# ---------------------------------------------------------------------------------------------
# Batch-size distribution


def test_batch_sizes_are_binomial():
    n, q, steps = 1000, 0.05, 4000
    loader = _index_loader(n, q, seed=1234, steps=steps)
    sizes = np.array([sum(mb[0].shape[0] for mb in mbs) for mbs in loader])
    assert len(sizes) == steps
    mean, var = n * q, n * q * (1 - q)
    assert abs(sizes.mean() - mean) < 6 * math.sqrt(var / steps)  # ~0.65
    assert abs(sizes.var(ddof=1) - var) < 0.1 * var  # sd of the sample variance ~ 2.2 % here
    assert _binomial_gof_pvalue(sizes, n, q) > 1e-3


def test_batch_sizes_are_binomial_with_micro_batches_and_expected_batch_size():
    n, steps = 300, 3000
    loader = PoissonDataLoader(
        TensorDataset(torch.arange(n)),
        expected_batch_size=12,
        max_physical_batch_size=5,
        steps=steps,
        generator=_gen(99),
    )
    q = loader.sample_rate
    assert q == pytest.approx(12 / 300)
    sizes = np.array([_logical_indices(mbs).numel() for mbs in loader])
    assert abs(sizes.mean() - 12) < 6 * math.sqrt(n * q * (1 - q) / steps)
    assert _binomial_gof_pvalue(sizes, n, q) > 1e-3


def test_goodness_of_fit_helper_rejects_wrong_distributions():
    """Power check: the test above would catch a fixed batch size or a q off by 15 %."""
    n, q, m = 1000, 0.05, 4000
    rng = np.random.default_rng(0)
    assert _binomial_gof_pvalue(rng.binomial(n, 1.15 * q, size=m), n, q) < 1e-3
    assert _binomial_gof_pvalue(np.full(m, round(n * q)), n, q) < 1e-3
    # and accepts the right one
    assert _binomial_gof_pvalue(rng.binomial(n, q, size=m), n, q) > 1e-3


# ---------------------------------------------------------------------------------------------
# Independent inclusion


def _inclusion_matrix(n: int, q: float, steps: int, seed: int) -> np.ndarray:
    loader = _index_loader(n, q, seed=seed, steps=steps)
    m = np.zeros((steps, n), dtype=bool)
    for t, mbs in enumerate(loader):
        m[t, _logical_indices(mbs).numpy()] = True
    return m


def test_each_example_included_independently_with_probability_q():
    n, q, steps = 16, 0.25, 6000
    m = _inclusion_matrix(n, q, steps, seed=5)
    mf = m.astype(np.float64)

    freq = mf.mean(axis=0)
    sd1 = math.sqrt(q * (1 - q) / steps)  # ~0.0056
    assert np.all(np.abs(freq - q) < 6 * sd1), freq

    # every pair co-occurs with probability q**2
    co = mf.T @ mf / steps
    pairs = co[np.triu_indices(n, k=1)]
    sd2 = math.sqrt(q**2 * (1 - q**2) / steps)  # ~0.0031
    assert np.all(np.abs(pairs - q**2) < 6 * sd2), pairs

    # a few triples co-occur with probability q**3
    for a, b, c in [(0, 1, 2), (3, 8, 15), (4, 5, 11)]:
        f3 = (m[:, a] & m[:, b] & m[:, c]).mean()
        assert abs(f3 - q**3) < 6 * math.sqrt(q**3 * (1 - q**3) / steps)

    # consecutive logical batches are independent: P(i in B_t and i in B_{t+1}) = q**2
    lag = (m[1:] & m[:-1]).mean(axis=0)
    assert np.all(np.abs(lag - q**2) < 6 * math.sqrt(q**2 * (1 - q**2) / (steps - 1))), lag

    # per-example counts fit Binomial(steps, q) jointly
    counts = m.sum(axis=0)
    chi2 = ((counts - steps * q) ** 2 / (steps * q * (1 - q))).sum()
    assert stats.chi2.sf(chi2, df=n) > 1e-3


def test_sampling_rule_is_rand_below_q():
    """The documented rule: torch.rand(N, generator, float64) < q, indices in increasing order."""
    n, q, seed = 500, 0.1, 77
    loader = _index_loader(n, q, seed=seed, steps=5)
    ref = _gen(seed)
    for mbs in loader:
        expected = torch.nonzero(torch.rand(n, generator=ref, dtype=torch.float64) < q).flatten()
        assert torch.equal(_logical_indices(mbs), expected)


def test_sample_rate_one_takes_everything():
    loader = _index_loader(37, 1.0, seed=0, steps=4, max_physical_batch_size=10)
    assert len(loader) == 4
    for mbs in loader:
        assert [mb[0].shape[0] for mb in mbs] == [10, 10, 10, 7]
        assert torch.equal(_logical_indices(mbs), torch.arange(37))


# ---------------------------------------------------------------------------------------------
# Empty logical batches


class DictDataset:
    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {
            "x": torch.full((3,), float(i)),
            "label": i,
            "mask": torch.ones(2, dtype=torch.bool),
            "ids": torch.arange(4, dtype=torch.int32) + i,
        }


Pair = namedtuple("Pair", ["a", "b"])


class TupleDataset:
    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return (
            torch.full((2, 2), float(i), dtype=torch.float64),
            i,
            (torch.tensor([i], dtype=torch.int32), float(i)),
            Pair(torch.zeros(5, dtype=torch.float16), torch.tensor(i, dtype=torch.int16)),
        )


def _assert_same_layout(empty, ref):
    """`empty` has the structure, dtypes and trailing shapes of `ref`, with 0 rows."""
    if isinstance(ref, torch.Tensor):
        assert isinstance(empty, torch.Tensor)
        assert empty.shape[0] == 0
        assert empty.shape[1:] == ref.shape[1:]
        assert empty.dtype == ref.dtype
        assert empty.device == ref.device
    elif isinstance(ref, dict):
        assert isinstance(empty, dict) and empty.keys() == ref.keys()
        for k in ref:
            _assert_same_layout(empty[k], ref[k])
    elif isinstance(ref, (list, tuple)):
        assert type(empty) is type(ref) and len(empty) == len(ref)
        for e, r in zip(empty, ref):
            _assert_same_layout(e, r)
    else:
        raise AssertionError(f"unexpected leaf {ref!r}")


def _empty_and_nonempty(loader):
    empties, nonempty = [], []
    for mbs in loader:
        assert len(mbs) >= 1
        first = mbs[0]
        rows = (first[0] if isinstance(first, (list, tuple)) else first["x"]).shape[0]
        (empties if rows == 0 else nonempty).append(mbs)
    return empties, nonempty


@pytest.mark.parametrize("max_phys", [None, 1, 3])
def test_empty_batches_tensor_dataset(max_phys):
    n = 10
    ds = TensorDataset(
        torch.randn(n, 3, 4),
        torch.arange(n),
        torch.zeros(n, dtype=torch.bool),
        torch.ones(n, 2, dtype=torch.bfloat16),
    )
    loader = PoissonDataLoader(ds, 0.03, steps=60, generator=_gen(3), max_physical_batch_size=max_phys)
    empties, nonempty = _empty_and_nonempty(loader)
    assert empties and nonempty  # P(empty) = 0.97**10 ~ 0.74
    ref = nonempty[0][0]
    for mbs in empties:
        assert len(mbs) == 1  # exactly one 0-row micro-batch: the step (and its noise) still happens
        x, y, b, h = mbs[0]
        assert x.shape == (0, 3, 4) and x.dtype == torch.float32
        assert y.shape == (0,) and y.dtype == torch.int64
        assert b.shape == (0,) and b.dtype == torch.bool
        assert h.shape == (0, 2) and h.dtype == torch.bfloat16
        _assert_same_layout(mbs[0], ref)


def test_empty_batches_dict_dataset():
    loader = PoissonDataLoader(DictDataset(8), 0.05, steps=40, generator=_gen(4), max_physical_batch_size=2)
    empties, nonempty = _empty_and_nonempty(loader)
    assert empties and nonempty
    for mbs in empties:
        assert len(mbs) == 1
        e = mbs[0]
        assert e["x"].shape == (0, 3) and e["x"].dtype == torch.float32
        assert e["label"].shape == (0,) and e["label"].dtype == torch.int64
        assert e["mask"].shape == (0, 2) and e["mask"].dtype == torch.bool
        assert e["ids"].shape == (0, 4) and e["ids"].dtype == torch.int32
        _assert_same_layout(e, nonempty[0][0])


def test_empty_batches_tuple_dataset():
    loader = PoissonDataLoader(TupleDataset(8), 0.05, steps=40, generator=_gen(5))
    empties, nonempty = _empty_and_nonempty(loader)
    assert empties and nonempty
    ref = nonempty[0][0]
    for mbs in empties:
        assert len(mbs) == 1
        e = mbs[0]
        _assert_same_layout(e, ref)
        assert e[0].shape == (0, 2, 2) and e[0].dtype == torch.float64
        assert e[1].shape == (0,) and e[1].dtype == torch.int64
        assert e[2][0].shape == (0, 1) and e[2][0].dtype == torch.int32
        assert e[2][1].shape == (0,) and e[2][1].dtype == torch.float64
        assert isinstance(e[3], Pair)
        assert e[3].a.shape == (0, 5) and e[3].a.dtype == torch.float16
        assert e[3].b.shape == (0,) and e[3].b.dtype == torch.int16
    # empty micro-batches are fresh tensor objects each time
    if len(empties) >= 2:
        assert empties[0][0][0] is not empties[1][0][0]


def test_empty_micro_batch_runs_through_a_model():
    ds = TensorDataset(torch.randn(4, 3), torch.randn(4, 1))
    loader = PoissonDataLoader(ds, 1e-9, steps=1, generator=_gen(0))
    (micro_batches,) = list(loader)
    model = torch.nn.Linear(3, 1)
    for x, y in micro_batches:
        ((model(x) - y) ** 2).sum().backward()
    assert model.weight.grad is not None and torch.count_nonzero(model.weight.grad) == 0


# ---------------------------------------------------------------------------------------------
# Micro-batch splitting


class ListDataset:
    """A plain map-style dataset (general collate path)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor(i), torch.full((2,), float(i))


@given(
    n=st.integers(1, 80),
    q=st.sampled_from([0.02, 0.1, 0.3, 0.7, 1.0]),
    max_phys=st.integers(1, 9),
    seed=st.integers(0, 2**31),
    tensor_dataset=st.booleans(),
)
def test_micro_batches_partition_the_logical_batch(n, q, max_phys, seed, tensor_dataset):
    ds = TensorDataset(torch.arange(n), torch.arange(n).float()[:, None]) if tensor_dataset else ListDataset(n)
    split = PoissonDataLoader(ds, q, steps=4, generator=_gen(seed), max_physical_batch_size=max_phys)
    whole = PoissonDataLoader(ds, q, steps=4, generator=_gen(seed))
    for mbs, (one,) in zip(split, whole, strict=True):
        sizes = [mb[0].shape[0] for mb in mbs]
        ids = torch.cat([mb[0] for mb in mbs])
        if one[0].numel() == 0:
            assert sizes == [0]
            continue
        # consecutive chunks of max_phys, the last one possibly shorter, none empty; a lone last sample is moved
        # into the last chunk but one, so that the last two are (max_phys - 1, 2)
        if len(sizes) >= 2 and max_phys >= 3 and one[0].numel() % max_phys == 1:
            assert sizes[-2:] == [max_phys - 1, 2]
            sizes = sizes[:-2] + [max_phys]
        assert all(s == max_phys for s in sizes[:-1]) and 1 <= sizes[-1] <= max_phys
        assert len(mbs) == math.ceil(one[0].numel() / max_phys)
        # nothing lost, nothing duplicated, increasing order
        assert torch.equal(ids, one[0])
        assert bool(torch.all(ids[1:] > ids[:-1]))
        # the features travel with their index
        feats = torch.cat([mb[1] for mb in mbs]).reshape(-1, 1 if tensor_dataset else 2)
        assert torch.equal(feats[:, 0], ids.float())


def test_tensor_dataset_fast_path_matches_item_collation():
    n = 50
    ds = TensorDataset(torch.randn(n, 3), torch.arange(n), torch.randint(0, 2, (n, 2), dtype=torch.uint8))
    fast = PoissonDataLoader(ds, 0.2, steps=10, generator=_gen(8), max_physical_batch_size=4)
    slow = PoissonDataLoader(
        ds, 0.2, steps=10, generator=_gen(8), max_physical_batch_size=4, collate_fn=default_collate
    )
    for a, b in zip(fast, slow, strict=True):
        assert len(a) == len(b)
        for ma, mb in zip(a, b):
            assert type(ma) is type(mb) and len(ma) == len(mb)
            for ta, tb in zip(ma, mb):
                assert ta.dtype == tb.dtype and torch.equal(ta, tb)


def test_custom_collate_and_overridden_getitem_are_used():
    class Shifted(TensorDataset):
        def __getitem__(self, i):
            return (self.tensors[0][i] + 1000,)

    ds = Shifted(torch.arange(20))
    loader = PoissonDataLoader(ds, 0.5, steps=3, generator=_gen(1))
    for mbs in loader:
        for (ids,) in mbs:
            assert ids.numel() == 0 or bool(torch.all(ids >= 1000))

    seen = []

    def collate(items):
        seen.append(len(items))
        return default_collate(items)

    loader = PoissonDataLoader(TensorDataset(torch.arange(20)), 0.5, steps=3, generator=_gen(1), collate_fn=collate)
    total = sum(_logical_indices(mbs).numel() for mbs in loader)
    assert total > 0 and sum(seen) == total  # (no empty batch here: P = 3 * 2**-20)


# ---------------------------------------------------------------------------------------------
# Reproducibility


def _as_lists(loader):
    return [_logical_indices(mbs).tolist() for mbs in loader]


def test_same_seed_same_batches_and_passes_differ():
    a = _index_loader(200, 0.1, seed=42, steps=5, max_physical_batch_size=7)
    b = _index_loader(200, 0.1, seed=42, steps=5, max_physical_batch_size=7)
    a1, a2 = _as_lists(a), _as_lists(a)
    b1, b2 = _as_lists(b), _as_lists(b)
    assert a1 == b1 and a2 == b2
    assert a1 != a2  # the second pass continues the generator
    assert len({tuple(x) for x in a1}) == len(a1)  # batches within a pass differ
    assert _as_lists(_index_loader(200, 0.1, seed=43, steps=5)) != _as_lists(_index_loader(200, 0.1, seed=42, steps=5))


def test_default_generator_is_seeded_from_the_os():
    torch.manual_seed(0)
    a = PoissonDataLoader(TensorDataset(torch.arange(200)), 0.5, steps=2)
    torch.manual_seed(0)
    b = PoissonDataLoader(TensorDataset(torch.arange(200)), 0.5, steps=2)
    assert isinstance(a.generator, torch.Generator)
    assert _as_lists(a) != _as_lists(b)


# ---------------------------------------------------------------------------------------------
# Secure mode


def test_secure_mode_sizes_are_plausible():
    n, q, steps = 2000, 0.1, 100
    torch.manual_seed(0)
    state = torch.get_rng_state()
    loader = PoissonDataLoader(TensorDataset(torch.arange(n)), q, steps=steps, secure_mode=True, max_physical_batch_size=64)
    assert loader.secure_mode and loader.generator is None
    sizes, firsts = [], []
    for mbs in loader:
        ids = _logical_indices(mbs)
        assert bool(torch.all(ids[1:] > ids[:-1]))
        assert all(mb[0].shape[0] <= 64 for mb in mbs)
        sizes.append(ids.numel())
        firsts.append(tuple(ids[:5].tolist()))
    sizes = np.array(sizes)
    sd = math.sqrt(n * q * (1 - q))  # ~13.4
    assert abs(sizes.mean() - n * q) < 6 * sd / math.sqrt(steps)
    assert np.all(np.abs(sizes - n * q) < 7 * sd)
    assert 0.5 * sd**2 < sizes.var(ddof=1) < 2 * sd**2
    assert len(set(firsts)) > 90  # batches differ
    assert torch.equal(torch.get_rng_state(), state)  # torch's PRNG is not used


def test_secure_mode_bit_conversion(monkeypatch):
    """u = (53 low bits of each 8 urandom bytes) * 2**-53: all-zero bytes give u = 0, all-one bytes u < 1."""
    ds = TensorDataset(torch.arange(6))
    calls = []

    def fake(fill):
        def urandom(k):
            calls.append(k)
            return bytes([fill]) * k

        return urandom

    monkeypatch.setattr(os, "urandom", fake(0x00))
    (mbs,) = list(PoissonDataLoader(ds, 1e-12, steps=1, secure_mode=True))
    assert calls == [8 * 6]
    assert torch.equal(_logical_indices(mbs), torch.arange(6))  # u = 0 < q

    monkeypatch.setattr(os, "urandom", fake(0xFF))
    (mbs,) = list(PoissonDataLoader(ds, 1 - 1e-15, steps=1, secure_mode=True))
    assert _logical_indices(mbs).numel() == 0  # u = 1 - 2**-53 >= q
    (mbs,) = list(PoissonDataLoader(ds, 1.0, steps=1, secure_mode=True))
    assert torch.equal(_logical_indices(mbs), torch.arange(6))  # u < 1 always


def test_secure_mode_rejects_generator():
    with pytest.raises(ValueError, match="generator"):
        PoissonDataLoader(TensorDataset(torch.arange(5)), 0.5, generator=_gen(0), secure_mode=True)


# ---------------------------------------------------------------------------------------------
# len, steps, attributes, validation


@pytest.mark.parametrize(
    "n, q, steps",
    [(1000, 0.01, 100), (1000, 0.3, 3), (10, 1.0, 1), (10, 0.7, 1), (1000, 0.001, 1000), (7, 0.5, 2)],
)
def test_default_steps_is_one_epoch_in_expectation(n, q, steps):
    loader = _index_loader(n, q, seed=0)
    assert loader.steps == steps == len(loader)
    assert len(list(loader)) == steps
    assert loader.sample_rate == q
    assert isinstance(loader.expected_batch_size, float)
    assert loader.expected_batch_size == pytest.approx(q * n)


def test_expected_batch_size_and_explicit_steps():
    loader = PoissonDataLoader(TensorDataset(torch.arange(1000)), expected_batch_size=50, generator=_gen(0))
    assert loader.sample_rate == pytest.approx(0.05)
    assert loader.expected_batch_size == 50.0 and isinstance(loader.expected_batch_size, float)
    assert len(loader) == 20
    loader = PoissonDataLoader(TensorDataset(torch.arange(1000)), expected_batch_size=1000, steps=7, generator=_gen(0))
    assert loader.sample_rate == 1.0 and len(loader) == 7 and len(list(loader)) == 7
    assert "PoissonDataLoader(N=1000" in repr(loader)


DS = TensorDataset(torch.arange(10))


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((DS,), {}, "sample_rate and expected_batch_size"),
        ((DS, 0.5), {"expected_batch_size": 5}, "sample_rate and expected_batch_size"),
        ((DS, 0.0), {}, "sample_rate"),
        ((DS, -0.1), {}, "sample_rate"),
        ((DS, 1.5), {}, "sample_rate"),
        ((DS, float("nan")), {}, "sample_rate"),
        ((DS, "0.5"), {}, "sample_rate"),
        ((DS,), {"expected_batch_size": 0}, "expected_batch_size"),
        ((DS,), {"expected_batch_size": -2}, "expected_batch_size"),
        ((DS,), {"expected_batch_size": 11}, "expected_batch_size"),
        ((TensorDataset(torch.empty(0, 3)), 0.5), {}, "dataset"),
        ((DS, 0.5), {"max_physical_batch_size": 0}, "max_physical_batch_size"),
        ((DS, 0.5), {"max_physical_batch_size": -1}, "max_physical_batch_size"),
        ((DS, 0.5), {"max_physical_batch_size": 2.5}, "max_physical_batch_size"),
        ((DS, 0.5), {"steps": 0}, "steps"),
        ((DS, 0.5), {"steps": -3}, "steps"),
        ((DS, 0.5), {"steps": 1.5}, "steps"),
        ((DS, 0.5), {"generator": _gen(0), "secure_mode": True}, "generator"),
    ],
)
def test_validation_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        PoissonDataLoader(*args, **kwargs)


def test_not_a_map_style_dataset():
    with pytest.raises(TypeError, match="dataset"):
        PoissonDataLoader(iter(range(10)), 0.5)


def test_numpy_fast_path_matches_torch_fallback(monkeypatch):
    """The optional numpy speed-up gives exactly what the pure-torch path gives (plain and secure)."""
    from dpcompile.privacy import samplers as sampling  # the draw rule and its numpy speed-up live there

    with_np = _as_lists(_index_loader(3000, 0.05, seed=11, steps=4))
    monkeypatch.setattr(sampling, "_np", None)
    assert _as_lists(_index_loader(3000, 0.05, seed=11, steps=4)) == with_np

    fixed = os.urandom(8 * 3000)
    monkeypatch.setattr(os, "urandom", lambda k: fixed[:k])
    torch_u = sampling._secure_uniform(3000)
    monkeypatch.setattr(sampling, "_np", np)
    numpy_u = sampling._secure_uniform(3000)
    assert torch_u.dtype == numpy_u.dtype == torch.float64
    assert torch.equal(torch_u, numpy_u)
    assert 0.0 <= float(numpy_u.min()) and float(numpy_u.max()) < 1.0


# ---------------------------------------------------------------------------------------------
# PoissonBatchSampler under a torch DataLoader; DPDataLoader; BatchMemoryManager; checkpoints of the stream

from torch.utils.data import DataLoader  # noqa: E402

from dpcompile.privacy.sampling import (BatchMemoryManager, DPDataLoader, EmptyBatchCollate,  # noqa: E402
                                        PoissonBatchSampler)


def _dict_collate(items):
    """A user's collate_fn: a dict batch with a string list (which an empty batch must not carry over)."""
    return {"x": torch.stack([it["x"] for it in items]), "label": torch.tensor([it["label"] for it in items]),
            "name": [f"ex{it['label']}" for it in items]}


@pytest.mark.parametrize("num_workers,pin_memory", [(0, False), (2, True)])
def test_batch_sampler_under_a_dataloader(num_workers, pin_memory):
    """The plain-DataLoader recipe: workers, pinned memory, a custom collate_fn, empty batches; the batches are
    those of the documented rule, in order."""
    n, q, steps, seed = 12, 0.1, 30, 21
    ds = DictDataset(n)
    sampler = PoissonBatchSampler(n, q, steps=steps, generator=_gen(seed))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pin_memory.*")  # no accelerator on a CPU machine
        loader = DataLoader(ds, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                            collate_fn=EmptyBatchCollate(ds, _dict_collate))
        batches = list(loader)
    ref = _gen(seed)
    assert len(batches) == len(loader) == steps
    empty = 0
    for b in batches:
        want = torch.nonzero(torch.rand(n, generator=ref, dtype=torch.float64) < q).flatten()
        assert torch.equal(b["label"], want)
        assert b["x"].shape == (len(want), 3) and b["name"] == [f"ex{i}" for i in want.tolist()]
        if len(want) == 0:
            empty += 1
            assert b["x"].dtype == torch.float32 and b["label"].dtype == torch.int64 and b["name"] == []
    assert empty >= 3  # P(empty) = 0.9**12 = 0.28
    assert sampler.draws == steps


def test_sampler_and_poisson_loader_draw_the_same_batches():
    ds = TensorDataset(torch.arange(40))
    sampler = PoissonBatchSampler(40, 0.2, steps=6, generator=_gen(3))
    loader = PoissonDataLoader(ds, 0.2, steps=6, generator=_gen(3))
    assert [list(b) for b in sampler] == _as_lists(loader)


def test_dp_data_loader_keeps_the_settings_and_warns_about_drop_last():
    ds = DictDataset(30)
    user = DataLoader(ds, batch_size=5, shuffle=True, drop_last=True, num_workers=2, collate_fn=_dict_collate,
                      persistent_workers=True, prefetch_factor=3)
    with pytest.warns(UserWarning, match="drop_last=True, which means nothing under Poisson sampling"):
        dp = DPDataLoader.from_data_loader(user, generator=_gen(0))
    assert isinstance(dp.batch_sampler, PoissonBatchSampler) and dp.sample_rate == pytest.approx(5 / 30)
    assert (dp.num_workers, dp.persistent_workers, dp.prefetch_factor, dp.drop_last) == (2, True, 3, False)
    assert isinstance(dp.collate_fn, EmptyBatchCollate) and dp.collate_fn.collate_fn is _dict_collate
    assert len(dp) == 6 and all("name" in b for b in dp)


def test_make_private_keeps_the_loader_settings():
    """dpcompile.make_private with a DataLoader: its collate_fn and workers are kept (the compile is lazy)."""
    import dpcompile

    ds = DictDataset(30)
    model = torch.nn.Linear(3, 2)
    user = DataLoader(ds, batch_size=6, num_workers=2, collate_fn=_dict_collate)
    _, _, loader = dpcompile.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), user,
                                          noise_multiplier=1.0, max_grad_norm=1.0, max_physical_batch_size=2,
                                          generator=_gen(4), backend="flashdp_eager")
    assert isinstance(loader, PoissonDataLoader) and loader.num_workers == 2 and loader.collate_fn is _dict_collate
    same = PoissonDataLoader(ds, expected_batch_size=6, max_physical_batch_size=2, generator=_gen(4),
                             collate_fn=_dict_collate)
    for a, b in zip(loader, same, strict=True):  # workers or not: the same micro-batches
        assert [mb["label"].tolist() for mb in a] == [mb["label"].tolist() for mb in b]
        assert all(len(mb["label"]) <= 2 for mb in a)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_batch_memory_manager_splits_and_tells_the_optimizer(num_workers):
    import dpcompile

    ds = TensorDataset(torch.arange(50), torch.randn(50, 2))
    loader = DPDataLoader(ds, sample_rate=0.2, steps=8, generator=_gen(6), num_workers=num_workers)
    model = torch.nn.Linear(2, 1)
    opt = dpcompile.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
                                max_grad_norm=1.0, expected_batch_size=10.0)
    told = []
    opt.note_physical_batch = lambda **kw: told.append(kw)
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=3, optimizer=opt) as batches:
        assert len(batches) == 8 * 4  # expected: ceil(10 / 3) physical batches per logical one
        got = [ids for ids, _ in batches]
    ref = _gen(6)
    logical = [torch.nonzero(torch.rand(50, generator=ref, dtype=torch.float64) < 0.2).flatten() for _ in range(8)]
    k = 0
    for draw, want in enumerate(logical):
        parts = list(torch.split(want, 3)) or [want]
        if len(parts) >= 2 and len(parts[-1]) == 1:  # (3, 1) ends as (2, 2): no lone sample (a compile of its own)
            parts[-2:] = [want[-4:-2], want[-2:]]
        for j, part in enumerate(parts):
            assert torch.equal(got[k], part)
            assert told[k] == dict(draw=draw, sample_rate=0.2, first=j == 0, last=j == len(parts) - 1, count=1)
            k += 1
    assert k == len(got)


def test_sampler_checkpoint_resumes_the_stream_despite_prefetching():
    """Workers draw logical batches ahead of the loop: the state kept before each draw resumes at the first
    batch the loop did not use, and the next pass is the rest of the interrupted one."""
    ds = TensorDataset(torch.arange(60))
    whole = [b[0].tolist() for b in DPDataLoader(ds, sample_rate=0.1, steps=10, generator=_gen(8))]
    loader = DPDataLoader(ds, sample_rate=0.1, steps=10, generator=_gen(8), num_workers=2, prefetch_factor=2)
    it = iter(loader)
    used = [next(it)[0].tolist() for _ in range(3)]
    assert used == whole[:3] and loader.batch_sampler.draws > 3  # drawn ahead
    state = loader.batch_sampler.state_dict(position=3)
    del it
    resumed = DPDataLoader(ds, sample_rate=0.1, steps=10, generator=_gen(99))
    resumed.batch_sampler.load_state_dict(state)
    rest = [b[0].tolist() for b in resumed]
    assert rest == whole[3:] and len(list(resumed)) == 10  # then whole passes again
    with pytest.raises(ValueError, match="sample_rate"):
        PoissonBatchSampler(60, 0.2).load_state_dict(state)


@given(n=st.integers(0, 600), max_size=st.one_of(st.none(), st.integers(1, 130)))
def test_micro_batch_sizes_cover_the_batch_in_as_many_pieces_and_leave_no_lone_sample(n, max_size):
    """The same samples in the same number of micro-batches as a plain split, none larger than max_size, and no
    micro-batch of 1 where the batch and max_size allow it (a batch of 1 is a graph of its own: a compile)."""
    from dpcompile.privacy.samplers import micro_batch_sizes

    sizes = micro_batch_sizes(n, max_size)
    size = max_size or max(n, 1)
    assert sum(sizes) == n and len(sizes) == math.ceil(n / size)
    assert all(1 <= s <= size for s in sizes)
    if 1 in sizes:
        assert n == 1 or size <= 2, sizes


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_micro_batches_of_a_batch_of_2k_plus_1_have_no_lone_sample(workers):
    """A logical batch of 2 * 4 + 1 samples at micro-batch 4: (4, 3, 2), not (4, 4, 1), with and without the
    DataLoader path; the union of the micro-batches is the logical batch."""
    data = TensorDataset(torch.arange(40.0))
    loader = PoissonDataLoader(data, expected_batch_size=9, max_physical_batch_size=4, steps=60,
                               generator=torch.Generator().manual_seed(3), num_workers=workers)
    seen = 0
    for micro_batches in loader:
        sizes = [mb[0].shape[0] for mb in micro_batches]
        rows = torch.cat([mb[0] for mb in micro_batches])
        assert rows.unique().numel() == rows.numel() == sum(sizes)
        if sum(sizes) >= 3:
            assert 1 not in sizes, sizes
        seen += sum(sizes) % 4 == 1 and sum(sizes) > 1
    assert seen >= 3  # the case happened
