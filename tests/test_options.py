"""DPOptions: validation (every malformed option raises OptionsError naming it), thresholds, cache key, round-trip."""
from __future__ import annotations

import math

import pytest
import torch

import dpcompile
from dpcompile import DPOptions, OptionsError

BAD = [
    ({"bogus": 1}, "bogus"),
    ({"max_grad_norm": 1.0, "clip_fn": "abadi", "Clipping": "flat"}, "Clipping"),
    ({"clipping": "per-layer"}, "clipping"),
    ({"clipping": "FLAT"}, "clipping"),
    ({"clipping": ""}, "clipping"),
    ({"clipping": []}, "clipping"),
    ({"clipping": ()}, "clipping"),
    ({"clipping": [[]]}, "clipping"),
    ({"clipping": [["a"], []]}, "clipping"),
    ({"clipping": [["a", "b"], ["c", "a"]]}, "'a'"),
    ({"clipping": [["a", "a"]]}, "'a'"),
    ({"clipping": [["a", 1]]}, "clipping"),
    ({"clipping": [["a"], [None]]}, "clipping"),
    ({"clipping": ["a", "b"]}, "clipping"),  # names, not groups of names
    ({"clipping": [("a",), "b"]}, "clipping"),
    ({"clipping": 3}, "clipping"),
    ({"clipping": None}, "clipping"),
    ({"clipping": {"g": ["a"]}}, "clipping"),
    ({"clipping": frozenset(["a"])}, "clipping"),
    ({"max_grad_norm": -1.0}, "max_grad_norm"),
    ({"max_grad_norm": 0}, "max_grad_norm"),
    ({"max_grad_norm": 0.0}, "max_grad_norm"),
    ({"max_grad_norm": -0.0}, "max_grad_norm"),
    ({"max_grad_norm": math.inf}, "max_grad_norm"),
    ({"max_grad_norm": -math.inf}, "max_grad_norm"),
    ({"max_grad_norm": math.nan}, "max_grad_norm"),
    ({"max_grad_norm": True}, "max_grad_norm"),
    ({"max_grad_norm": False}, "max_grad_norm"),
    ({"max_grad_norm": "1.0"}, "max_grad_norm"),
    ({"max_grad_norm": None}, "max_grad_norm"),
    ({"max_grad_norm": [1.0]}, "max_grad_norm"),
    ({"max_grad_norm": {}}, "max_grad_norm"),
    ({"max_grad_norm": ()}, "max_grad_norm"),
    ({"max_grad_norm": {"g": -1.0}}, "max_grad_norm"),
    ({"max_grad_norm": {"g": 0}}, "max_grad_norm"),
    ({"max_grad_norm": {"g": math.nan}}, "max_grad_norm"),
    ({"max_grad_norm": {"g": math.inf}}, "max_grad_norm"),
    ({"max_grad_norm": {"g": True}}, "max_grad_norm"),
    ({"max_grad_norm": {"g": "1"}}, "max_grad_norm"),
    ({"max_grad_norm": {1: 1.0}}, "max_grad_norm"),
    ({"max_grad_norm": {"a": 1.0, "b": -2.0}}, "max_grad_norm"),
    ({"clip_fn": "Abadi"}, "clip_fn"),
    ({"clip_fn": "auto"}, "clip_fn"),
    ({"clip_fn": None}, "clip_fn"),
    ({"clip_fn": 1}, "clip_fn"),
    ({"clip_fn": ["abadi"]}, "clip_fn"),
    ({"loss_reduction": "none"}, "loss_reduction"),
    ({"loss_reduction": "Mean"}, "loss_reduction"),
    ({"loss_reduction": None}, "loss_reduction"),
    ({"batch_arg": -1}, "batch_arg"),
    ({"batch_arg": True}, "batch_arg"),
    ({"batch_arg": False}, "batch_arg"),
    ({"batch_arg": 1.0}, "batch_arg"),
    ({"batch_arg": ["x"]}, "batch_arg"),
    ({"batch_arg": b"x"}, "batch_arg"),
    ({"batch_dim": 1.0}, "batch_dim"),
    ({"batch_dim": "0"}, "batch_dim"),
    ({"batch_dim": None}, "batch_dim"),
    ({"batch_dim": True}, "batch_dim"),
    ({"probes": 0}, "probes"),
    ({"probes": 1}, "probes"),
    ({"probes": -32}, "probes"),
    ({"probes": 32.0}, "probes"),
    ({"probes": True}, "probes"),
    ({"probes": "32"}, "probes"),
    ({"probes": None}, "probes"),
    ({"probes": 3, "probe_variant": "hutchpp"}, "probes"),  # 1 residual probe: not accountable
    ({"probe_variant": "rademacher"}, "probe_variant"),
    ({"probe_variant": "Hutchinson"}, "probe_variant"),
    ({"probe_variant": None}, "probe_variant"),
    ({"strategy": "random"}, "strategy"),
]


@pytest.mark.parametrize("opts,needle", BAD, ids=[repr(o) for o, _ in BAD])
def test_malformed_option_raises_naming_it(opts, needle):
    with pytest.raises(OptionsError) as info:
        DPOptions.parse(opts)
    assert needle in str(info.value)
    assert isinstance(info.value, dpcompile.DPCompileError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("value", [10**400, {"g": 10**400}], ids=["float", "dict"])
def test_max_grad_norm_overflowing_int(value):
    with pytest.raises(OptionsError, match="max_grad_norm"):
        DPOptions.parse({"max_grad_norm": value})


GOOD = [
    None, {},
    {"max_grad_norm": 2}, {"max_grad_norm": 0.5}, {"max_grad_norm": 1e-12}, {"max_grad_norm": 1e300},
    {"max_grad_norm": {"b": 1.0, "a": 3}},
    {"clipping": "flat"}, {"clipping": "per_layer"}, {"clipping": "per_param"},
    {"clipping": [["w", "b"], ["v"]]}, {"clipping": (("w",), ("b", "v"))},
    {"clip_fn": "abadi"}, {"clip_fn": "automatic"},
    {"loss_reduction": "sum"}, {"loss_reduction": "mean"},
    {"batch_arg": None}, {"batch_arg": "x"}, {"batch_arg": 0}, {"batch_arg": 3},
    {"batch_dim": 0}, {"batch_dim": 1}, {"batch_dim": -1},
    {"max_grad_norm": {"g0": 1.0, "g1": 2.0}, "clipping": [["w"], ["b"]], "clip_fn": "automatic",
     "loss_reduction": "sum", "batch_arg": "input_ids", "batch_dim": 1},
    {"strategy": "randomized"},
    {"probes": 2}, {"probes": 64}, {"probe_variant": "hutchpp"}, {"probe_variant": "hutchpp", "probes": 4},
    {"strategy": "randomized", "probes": 16, "probe_variant": "hutchinson"},
]


@pytest.mark.parametrize("opts", GOOD, ids=[repr(o) for o in GOOD])
def test_valid_options_parse_and_round_trip(opts):
    o = DPOptions.parse(opts)
    for k, v in (opts or {}).items():
        if k == "max_grad_norm":
            assert o.total_max_grad_norm() == pytest.approx(
                math.sqrt(sum(c * c for c in v.values())) if isinstance(v, dict) else v)
        elif k == "clipping" and not isinstance(v, str):
            assert o.clipping == tuple(tuple(g) for g in v)
        else:
            assert getattr(o, k) == v
    again = DPOptions.parse(o.as_dict())
    assert again == o and again.cache_key() == o.cache_key()
    assert DPOptions.parse(again.as_dict()) == o
    hash(o)  # frozen and hashable (tuples, not lists)


def test_defaults():
    o = DPOptions.parse(None)
    assert o == DPOptions() == DPOptions.parse({})
    assert (o.max_grad_norm, o.clipping, o.clip_fn, o.loss_reduction, o.batch_arg, o.batch_dim) == \
        (1.0, "per_layer", "abadi", "mean", None, 0)
    assert (o.strategy, o.probes, o.probe_variant) == ("auto", 32, "hutchinson") and not o.uses_randomized()
    assert set(o.as_dict()) == set(DPOptions.KEYS)


@pytest.mark.parametrize("C", [1.0, 0.3, 7])
@pytest.mark.parametrize("G", [1, 2, 3, 10])
def test_threshold_for_float(C, G):
    o = DPOptions.parse({"max_grad_norm": C})
    assert o.threshold_for("anything", G) == pytest.approx(C / math.sqrt(G))
    assert o.total_max_grad_norm() == pytest.approx(C)
    assert sum(o.threshold_for(str(g), G) ** 2 for g in range(G)) == pytest.approx(C * C)


def test_threshold_for_dict():
    o = DPOptions.parse({"max_grad_norm": {"enc": 3.0, "dec": 4, "head": 0.5}})
    assert o.threshold_for("enc", 3) == 3.0 and o.threshold_for("dec", 3) == 4.0
    assert o.threshold_for("head", 99) == 0.5  # the dict value, regardless of the group count
    assert o.total_max_grad_norm() == pytest.approx(math.sqrt(9 + 16 + 0.25))
    with pytest.raises(OptionsError, match="'missing'") as info:
        o.threshold_for("missing", 3)
    assert "max_grad_norm" in str(info.value)


def test_dict_threshold_order_is_irrelevant():
    a = DPOptions.parse({"max_grad_norm": {"a": 1.0, "b": 2.0}})
    b = DPOptions.parse({"max_grad_norm": {"b": 2, "a": 1}})
    assert a == b and a.cache_key() == b.cache_key()


# two valid values per option; changing any single one must change the key
VARIANTS = {
    "max_grad_norm": [1.0, 2.0, {"g": 1.0}, {"g": 2.0}, {"g": 1.0, "h": 1.0}, {"h": 1.0}],
    "clipping": ["flat", "per_layer", "per_param", [["a"], ["b"]], [["a", "b"]], [["a"]]],
    "clip_fn": ["abadi", "automatic"],
    "loss_reduction": ["sum", "mean"],
    "batch_arg": [None, "x", "y", 0, 1, "0"],
    "batch_dim": [0, 1, -1],
    "strategy": ["auto", "direct", "ghost", "single_pass", "two_pass", "randomized", {"*": "ghost"}, {"*.weight": "ghost"},
                 {"a*": "direct", "*": "ghost"}, {"*": "ghost", "a*": "direct"}, {"*": "randomized"}],
    "single_pass_budget_mb": [1, 256, 0.5],
    "probes": [4, 32, 33],
    "probe_variant": ["hutchinson", "hutchpp"],
}
BASES = [{}, {"max_grad_norm": {"g": 1.5}, "clipping": [["w"]], "clip_fn": "automatic",
              "loss_reduction": "sum", "batch_arg": 2, "batch_dim": 1}]


@pytest.mark.parametrize("key", list(VARIANTS))
@pytest.mark.parametrize("base", BASES, ids=["defaults", "nondefault"])
def test_cache_key_changes_with_every_option(key, base):
    assert set(VARIANTS) == set(DPOptions.KEYS)
    keys = {}
    for v in VARIANTS[key]:
        o = DPOptions.parse({**base, key: v})
        keys.setdefault(o.cache_key(), []).append(v)
        assert DPOptions.parse({**base, key: v}).cache_key() == o.cache_key()  # deterministic
    assert all(len(vs) == 1 for vs in keys.values()), keys


def test_cache_key_equal_for_equal_options():
    a = DPOptions.parse({"max_grad_norm": 2, "clipping": [["a", "b"]], "batch_arg": "x"})
    b = DPOptions.parse({"batch_arg": "x", "clipping": (("a", "b"),), "max_grad_norm": 2.0})
    assert a == b and a.cache_key() == b.cache_key()
    assert DPOptions().cache_key() == DPOptions.parse({"max_grad_norm": 1}).cache_key()
    assert isinstance(a.cache_key(), str) and len(a.cache_key()) == 64


def test_compile_rejects_bad_option_immediately():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(OptionsError, match="bogus"):
        dpcompile.compile(model, bogus=1)
    with pytest.raises(OptionsError, match="max_grad_norm"):
        dpcompile.compile(model, max_grad_norm=-1.0)
    with pytest.raises(OptionsError, match="clipping"):
        dpcompile.compile(model, clipping=[["weight"], ["weight"]])
    assert model.weight.grad is None  # nothing ran


def test_compile_keeps_parsed_options():
    c = dpcompile.compile(torch.nn.Linear(2, 2), max_grad_norm=3, clip_fn="automatic")
    assert c.options == DPOptions.parse({"max_grad_norm": 3.0, "clip_fn": "automatic"})


@pytest.mark.parametrize("bad", ["fast", "", {"*": "fast"}, {1: "ghost"}, {}, ["ghost"], None])
def test_strategy_option_is_validated(bad):
    with pytest.raises(OptionsError, match="strategy"):
        DPOptions.parse({"strategy": bad})


def test_randomized_is_only_used_where_asked():
    assert DPOptions.parse({"strategy": "randomized"}).uses_randomized()
    o = DPOptions.parse({"strategy": {"lm_head.*": "direct", "blocks.*": "randomized"}})
    assert o.uses_randomized() and o.forced_strategy("blocks.0.fc.weight") == "randomized"
    assert o.forced_strategy("lm_head.weight") == "direct" and o.forced_strategy("wte.weight") == "auto"
    for s in ("auto", "direct", "ghost", "single_pass", "two_pass", {"*": "ghost"}):
        assert not DPOptions.parse({"strategy": s}).uses_randomized()


def test_forced_strategy_first_matching_glob_wins():
    o = DPOptions.parse({"strategy": {"lm_head.*": "single_pass", "*.weight": "ghost"}})
    assert o.forced_strategy("lm_head.weight") == "single_pass"
    assert o.forced_strategy("blocks.0.fc.weight") == "ghost"
    assert o.forced_strategy("blocks.0.fc.bias") == "auto"
    assert DPOptions.parse({"strategy": "direct"}).forced_strategy("anything") == "direct"


@pytest.mark.parametrize("bad", [0, -1, float("inf"), "1", True])
def test_single_pass_budget_is_validated(bad):
    with pytest.raises(OptionsError, match="single_pass_budget_mb"):
        DPOptions.parse({"single_pass_budget_mb": bad})
