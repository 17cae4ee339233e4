""""This gradient was clipped, with these thresholds" is a run-time fact of the call that produced it
(dpcompile/clip_provenance.py): reused graphs, second instances, deep copies and reloaded models are covered, and
a gradient with a term no clipping graph produced is refused at step(), whatever ran earlier in the process."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import dpcompile
from dpcompile import DPOptimizer
from dpcompile.testing import oracle

C = 0.5


class MLPLoss(nn.Module):
    def __init__(self, d=5, h=7, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, 3))

    def forward(self, x, y):
        return ((self.net(x) - y) ** 2).sum()


def _loss(model, x, y):
    return ((model(x) - y) ** 2).sum()


def _batch(B, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 5, generator=g, dtype=torch.float64), torch.randn(B, 3, generator=g, dtype=torch.float64)


def _compile(model):
    return dpcompile.compile(model, backend="flashdp_eager", loss_reduction="sum", max_grad_norm=C,
                             clipping="flat")


def _optimizer(model, **kw):
    return DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=C,
                       expected_batch_size=4.0, loss_reduction="sum", **kw)


def _check_against_oracle(model, x, y):
    want = oracle.reference_clipped_grads(model.net, _loss, (x, y), max_grad_norm=C, clipping="flat")
    for name, p in model.net.named_parameters():
        torch.testing.assert_close(p.grad, want[name], atol=1e-10, rtol=1e-8)


def test_second_instance_reuses_the_graph_and_is_covered():
    """Dynamo hands the first instance's graph to the second without compiling: its gradients are vouched for
    by the call, and they match the oracle."""
    torch._dynamo.reset()
    for seed in range(3):  # three instances of one class, one process, no reset in between
        model = MLPLoss(seed=seed).double()
        x, y = _batch(4, seed)
        _compile(model)(x, y).backward()
        _check_against_oracle(model, x, y)
        _optimizer(model).step()  # accepted


def test_tap_memo_follows_the_tensors_passed_at_each_call():
    """The tap remembers the tensors of a graph's last call (clip_provenance._TAPPED): instances alternating
    through one graph each get their own records, and a warm memo still catches an unclipped term."""
    torch._dynamo.reset()
    a, b = MLPLoss(seed=0).double(), MLPLoss(seed=1).double()
    options = dict(loss_reduction="sum", max_grad_norm=C, clipping="flat")
    compiled = {id(m): torch.compile(m, backend="flashdp_eager", options=options) for m in (a, b)}
    opts = {id(a): _optimizer(a), id(b): _optimizer(b)}
    torch._dynamo.utils.counters.clear()
    for step, model in enumerate((a, a, b, a, b, b)):
        x, y = _batch(4, 10 + step)
        compiled[id(model)](x, y).backward()
        _check_against_oracle(model, x, y)
        opts[id(model)].step()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # one graph, so one record for both
    x, y = _batch(4, 20)
    loss = compiled[id(b)](x, y) + b.net[2].bias.sum()  # the memo holds b's tensors: the eager term is still seen
    loss.backward()
    with pytest.raises(dpcompile.CoverageError, match=r"net\.2\.bias.*no flashdp graph produced was added"):
        opts[id(b)].step()


def test_deep_copy_and_reloaded_model_are_covered():
    torch._dynamo.reset()
    model = MLPLoss().double()
    x, y = _batch(3, 1)
    _compile(model)(x, y).backward()
    _optimizer(model).step()
    twin = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    reloaded = MLPLoss(seed=5).double()
    reloaded.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    for m in (twin, reloaded):
        _compile(m)(x, y).backward()
        _check_against_oracle(m, x, y)
        _optimizer(m).step()


def test_eager_term_added_to_a_clipped_gradient_is_refused():
    """The parameter is also used outside the compiled call in the same backward."""
    torch._dynamo.reset()
    model = MLPLoss().double()
    x, y = _batch(4, 2)
    loss = _compile(model)(x, y) + model.net[0].weight.square().sum()
    loss.backward()
    with pytest.raises(dpcompile.CoverageError, match=r"net\.0\.weight.*no flashdp graph produced was added"):
        _optimizer(model).step()


def test_eager_backward_after_a_clipped_one_is_refused():
    """An earlier graph clipped the parameter; a later eager backward adds an unclipped term to its .grad."""
    torch._dynamo.reset()
    model = MLPLoss().double()
    x, y = _batch(4, 3)
    _compile(model)(x, y).backward()
    model(x, y).backward()  # eager: not clipped
    with pytest.raises(dpcompile.CoverageError, match="no flashdp graph produced was accumulated"):
        _optimizer(model).step()


def test_eager_gradient_on_a_parameter_clipped_in_an_earlier_step_is_refused():
    torch._dynamo.reset()
    model = MLPLoss().double()
    x, y = _batch(4, 4)
    _compile(model)(x, y).backward()
    opt = _optimizer(model)
    opt.step()
    model(x, y).backward()  # the next step's gradient comes from eager code alone
    with pytest.raises(dpcompile.CoverageError, match="no flashdp graph produced was accumulated"):
        opt.step()


def test_graph_of_another_backend_is_refused():
    torch._dynamo.reset()
    model = MLPLoss().double()
    x, y = _batch(4, 5)
    _compile(model)(x, y).backward()
    model.zero_grad(set_to_none=True)
    torch.compile(model, backend="eager")(x, y).backward()
    with pytest.raises(dpcompile.CoverageError, match="no flashdp graph produced"):
        _optimizer(model).step()


def test_backward_twice_through_one_call_is_refused():
    torch._dynamo.reset()
    model = MLPLoss().double()
    x, y = _batch(4, 6)
    loss = _compile(model)(x, y)
    try:
        loss.backward(retain_graph=True)
        loss.backward()
    except RuntimeError as e:  # graphs with donated buffers: torch itself refuses retain_graph
        assert "retain_graph" in str(e)
        return
    with pytest.raises(dpcompile.CoverageError, match="backpropagated more than once"):
        _optimizer(model).step()


def test_two_calls_summed_into_one_backward_are_refused():
    """A sample in both calls (a graph break, a block called twice) would be clipped in pieces; dpcompile cannot
    tell that apart from two disjoint micro-batches, so it refuses and asks for one backward per call."""
    torch._dynamo.reset()
    model = MLPLoss().double()
    x, y = _batch(4, 7)
    dp = _compile(model)
    (dp(x, y) + dp(x, y)).backward()
    with pytest.raises(dpcompile.CoverageError, match="2 calls of flashdp graphs fed it in one backward"):
        _optimizer(model).step()


def test_micro_batches_with_one_backward_each_accumulate_and_match_the_oracle():
    torch._dynamo.reset()
    model = MLPLoss().double()
    dp = _compile(model)
    xs, ys = zip(*(_batch(B, 8 + B) for B in (3, 0, 1, 4)))
    for x, y in zip(xs, ys):
        dp(x, y).backward()
    x, y = torch.cat(xs), torch.cat(ys)
    _check_against_oracle(model, x, y)  # the clipped sum of the whole logical batch
    _optimizer(model).step()


def test_regionally_compiled_blocks_are_refused_by_their_sensitivity():
    """Each block compiled on its own clips its own part to C: one sample's whole gradient may reach sqrt(2) C,
    which the optimizer (noise for C) refuses, naming the bound."""
    torch._dynamo.reset()
    model = MLPLoss().double()
    for i in (0, 2):
        model.net[i] = torch.compile(model.net[i], backend="flashdp_eager", fullgraph=True,
                                     options={"max_grad_norm": C, "clipping": "flat", "loss_reduction": "sum"})
    x, y = _batch(4, 9)
    model(x, y).backward()
    with pytest.raises(dpcompile.DPCompileError, match="by 0.707107"):
        _optimizer(model).step()


def test_state_is_not_global_between_processes_worth_of_models():
    """No reset by hand: a fresh model after many others gets exactly its own verdicts."""
    for seed in range(2):
        model = MLPLoss(seed=seed).double()
        x, y = _batch(2, seed)
        model(x, y).backward()
        with pytest.raises(dpcompile.CoverageError, match="no flashdp graph produced it"):
            _optimizer(model).step()


def test_backward_twice_without_donated_buffers_is_refused_by_the_optimizer():
    torch._dynamo.reset()
    model = MLPLoss().double()
    x, y = _batch(4, 6)
    with torch._functorch.config.patch(donated_buffer=False):
        loss = _compile(model)(x, y)
        loss.backward(retain_graph=True)
        loss.backward()
    with pytest.raises(dpcompile.CoverageError, match="backpropagated more than once"):
        _optimizer(model).step()


def test_identity_map_holds_no_tensor_alive_and_never_confuses_two_tensors():
    """The records' map (clip_provenance._ByIdentity): keyed by identity, not equality or id() alone; an entry
    goes with its tensor, and a later tensor that happens to get the same id() is not a hit."""
    import gc
    import weakref

    from dpcompile.clip_provenance import _ByIdentity

    m = _ByIdentity()
    a, b = torch.zeros(3), torch.zeros(3)  # equal values, two tensors
    m[a] = "a"
    assert m.get(a) == "a" and m.get(b) is None and len(m) == 1
    m[b] = "b"
    assert (m.get(a), m.get(b)) == ("a", "b")
    del m[b]
    assert m.get(b) is None and len(m) == 1
    with pytest.raises(KeyError):
        del m[b]
    ref, key = weakref.ref(a), id(a)
    del a
    gc.collect()
    assert ref() is None and len(m) == 0 and key not in m._entries  # the map kept nothing alive
    # an id() reused by a new tensor before the map heard of the death is still no hit
    c = torch.zeros(3)
    m._entries[id(c)] = (weakref.ref(torch.zeros(1)), "stale")
    assert m.get(c) is None
