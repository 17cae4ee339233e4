"""Red team of the gradient contract (issue 24 item 7): adversarial models and training loops, each EXACT against a
float64 per-sample oracle or REFUSED with a dpcompile error, never a silent mismatch; and property tests over random
compositions of accepted ops and input layouts: exact-or-refused, and additivity g(D) = g(D0) + g(D \\ D0) of the
clipped sums (an invariant that needs no oracle: samples that mix break it).

An attack is a user's program: how the model is built, how its inputs are laid out, how it is compiled and stepped
(graph breaks, regional compiles, eager terms, replays). Its verdict comes from running that program and then
DPOptimizer.step() (noise 0, lr 0), whose run-time checks are part of the contract. Attacks whose loss is not a sum
of per-sample terms have no oracle: the only acceptable verdict is "refused".

Known holes are xfail(strict=True) with the issue item that owns them: when one is fixed, the strict xfail fails and
the mark must go.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

import dpcompile
from dpcompile import DPOptimizer
from dpcompile.compile import _caused_by
from dpcompile.errors import DPCompileError
from dpcompile.options import CLIP_EPS

pytestmark = pytest.mark.filterwarnings("ignore:flashdp")

D = 4  # feature width of every attack
SMALL_C, LARGE_C = 1e-3, 1e6


def _refusal(exc: BaseException) -> Optional[DPCompileError]:
    """The dpcompile error among exc's causes (Dynamo wraps backend errors), or None."""
    return _caused_by(exc, DPCompileError)


@dataclass
class Attack:
    """build() -> a fresh float64 model; inputs(B, gen) -> the user's call arguments; sample_dims: per argument, the
    dim that indexes samples (None: shared by every sample); run(model, args, C, reduction) -> the user's forward and
    backward (compiling however the attack does); loss(model, *args) -> the eager SUM of per-sample losses of a batch,
    or None when the loss is not such a sum (then only a refusal is right)."""
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, torch.Generator], tuple]
    sample_dims: tuple
    run: Callable
    loss: Optional[Callable] = None
    reduction: str = "sum"
    batches: tuple = (1, 2)  # T = 3 in the sequence attacks: B never equals T by accident
    known_hole: Optional[str] = None  # the issue item that owns it
    sample: Optional[Callable] = None  # (args, i) -> sample i's arguments, when slicing by sample_dims won't do

    def sample_args(self, args, i):
        if self.sample is not None:
            return self.sample(args, i)
        return tuple(a if d is None else a.narrow(d, i, 1) for a, d in zip(args, self.sample_dims))


def dp(model, C, reduction, **kw):
    return dpcompile.compile(model, backend="flashdp_eager", max_grad_norm=C, clipping="flat",
                             loss_reduction=reduction, **kw)


def oracle_grads(attack: Attack, model: nn.Module, args, B: int, C: float) -> dict:
    """sum_i min(1, C / (||g_i|| + eps)) g_i, g_i = the gradient of sample i's loss (a float64 loop)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    total = {n: torch.zeros_like(p) for n, p in named}
    for i in range(B):
        grads = torch.autograd.grad(attack.loss(model, *attack.sample_args(args, i)), [p for _, p in named],
                                    allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for (_, p), g in zip(named, grads)]
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        coef = torch.clamp(C / (norm + CLIP_EPS), max=1.0)
        for (n, _), g in zip(named, grads):
            total[n] += coef * g
    return total


def verdict(attack: Attack, B: int, C: float, seed: int = 0):
    """("exact" | "refused" | "mismatch: ...", the refusal or None)."""
    torch._dynamo.reset()
    torch.manual_seed(seed)
    model = attack.build().double()
    reference = copy.deepcopy(model)
    args = attack.inputs(B, torch.Generator().manual_seed(seed))
    try:
        attack.run(model, args, C, attack.reduction)
        got = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        DPOptimizer(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0),
                    noise_multiplier=0.0, max_grad_norm=C, expected_batch_size=float(max(B, 1)),
                    loss_reduction=attack.reduction).step()
    except Exception as exc:  # noqa: BLE001 - the verdict is which exception
        refusal = _refusal(exc)
        if refusal is None:
            raise
        return "refused", refusal
    if attack.loss is None:
        return "mismatch: accepted a loss that is not a sum of per-sample terms", None
    want = oracle_grads(attack, reference, args, B, C)
    for name, w in want.items():
        g = got[name] if got[name] is not None else torch.zeros_like(w)
        err = (g - w).abs().max().item()
        if err > 1e-9 + 1e-7 * w.abs().max().item():
            return f"mismatch: {name} off by {err:.3g} (scale {w.abs().max().item():.3g})", None
    return "exact", None


# -- the attacks ---------------------------------------------------------------------------------------------

class Lin(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.out = nn.Linear(D, 1)


def _xy(B, g):
    return torch.randn(B, D, generator=g, dtype=torch.float64), torch.randn(B, 1, generator=g, dtype=torch.float64)


def _sq(m, x, y):
    return ((m.out(torch.tanh(m.lin(x))) - y) ** 2).sum()


class LossOf(nn.Module):
    """The model with its loss inside, as users are told to compile it."""

    def __init__(self, m, loss):
        super().__init__()
        self.m, self.loss = m, loss

    def forward(self, *args):
        return self.loss(self.m, *args)


def _plain(m, args, C, red, loss=_sq, **kw):
    """loss: the sum of per-sample losses; under "mean" the compiled module returns it over B, as declared."""
    mean = (lambda mm, *a: loss(mm, *a) / a[0].shape[0]) if red == "mean" else loss
    dp(LossOf(m, mean), C, red, **kw)(*args).backward()


def _twice(m, x, y):  # the same layer applied twice
    return ((m.out(torch.tanh(m.lin(torch.tanh(m.lin(x))))) - y) ** 2).sum()


class TwiceWithBreak(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x, y):
        h = torch.tanh(self.m.lin(x))
        torch._dynamo.graph_break()  # e.g. a print in an iterative block
        h = torch.tanh(self.m.lin(h))
        return ((self.m.out(h) - y) ** 2).sum()


def _graph_break_unfused(m, args, C, red):
    compiled = torch.compile(TwiceWithBreak(m), backend="flashdp_eager", fullgraph=False,
                             options={"max_grad_norm": C, "clipping": "flat", "loss_reduction": red})
    compiled(*args).backward()


def _graph_break_dpcompile(m, args, C, red):
    dp(TwiceWithBreak(m), C, red)(*args).backward()


def _regional(m, args, C, red):
    opts = {"max_grad_norm": C, "clipping": "flat", "loss_reduction": red}
    m.lin = torch.compile(m.lin, backend="flashdp_eager", fullgraph=True, options=opts)
    m.out = torch.compile(m.out, backend="flashdp_eager", fullgraph=True, options=opts)
    _sq(m, *args).backward()


def _eager_regulariser(m, args, C, red):
    (dp(LossOf(m, _sq), C, red)(*args) + 1e-2 * m.lin.weight.square().sum()).backward()


def _two_calls_one_backward(m, args, C, red):
    f = dp(LossOf(m, _sq), C, red)
    (f(*args) + f(*args)).backward()


def _replay(m, args, C, red):
    with torch._functorch.config.patch(donated_buffer=False):
        loss = dp(LossOf(m, _sq), C, red)(*args)
        loss.backward(retain_graph=True)
        loss.backward()


class NonParameterTrainable(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.out = nn.Linear(D, 1)
        self.scale = torch.ones(D, dtype=torch.float64, requires_grad=True)  # a plain tensor attribute


def _shared_first(m, s, x, y):
    return ((m.out(torch.tanh(m.lin(x) + s)) - y) ** 2).sum()


def _shared_second(m, x, s, y):
    return ((m.out(torch.tanh(m.lin(x) + s)) - y) ** 2).sum()


def _seq(B, g, T=3):
    return (torch.randn(B, T, D, generator=g, dtype=torch.float64),
            torch.randn(B, T, generator=g, dtype=torch.float64))


def _tok_loss(m, x, y_flat):  # labels pre-flattened to (B*T,)
    return ((m.out(torch.tanh(m.lin(x))).reshape(-1) - y_flat) ** 2).sum()


def _tok_mean_loss(m, x, y_flat):  # a token mean over the whole batch: samples share the normaliser
    return ((m.out(torch.tanh(m.lin(x))).reshape(-1) - y_flat) ** 2).mean()


def _tok_means(m, x, y_flat):  # the sum over samples of each sample's token mean (T tokens each)
    return ((m.out(torch.tanh(m.lin(x))).reshape(-1) - y_flat) ** 2).reshape(x.shape[0], -1).mean(1).sum()


def _mask_tb(m, x, y, mask_tb):  # a (T, B) mask next to batch-first inputs
    err = (m.out(torch.tanh(m.lin(x))).squeeze(-1) - y) ** 2
    return (err * mask_tb.t()).sum()


def _mask_tb_normalised(m, x, y, mask_tb):
    err = (m.out(torch.tanh(m.lin(x))).squeeze(-1) - y) ** 2
    return (err * mask_tb.t()).sum() / mask_tb.sum()


def _weighted(m, x, y, w):  # per-sample weights (B,)
    return (w * ((m.out(torch.tanh(m.lin(x))) - y) ** 2).sum(1)).sum()


def _weighted_normalised(m, x, y, w):
    return (w * ((m.out(torch.tanh(m.lin(x))) - y) ** 2).sum(1)).sum() / w.sum()


def _tm(B, g, T=3):  # time-major inputs (batch_dim=1) and per-sample weights (B,)
    return (torch.randn(T, B, D, generator=g, dtype=torch.float64), torch.randn(T, B, generator=g, dtype=torch.float64),
            torch.rand(B, generator=g, dtype=torch.float64) + 0.5)


def _tm_err(m, x, y):  # (T, B) squared errors
    return (m.out(torch.tanh(m.lin(x))).squeeze(-1) - y) ** 2


def _tm_weighted(m, x, y, w):
    return (w * _tm_err(m, x, y).sum(0)).sum()


def _tm_weighted_normalised(m, x, y, w):
    return (w * _tm_err(m, x, y).sum(0)).sum() / w.sum()


def _tm_weights_inside(m, x, y, w):  # w only as a batch-wide normaliser of the activations: never lines up
    return ((m.out(torch.tanh(m.lin(x) / w.sum())).squeeze(-1) - y) ** 2).sum()


def _shared_seq(B, g, T=3):  # (B, T, d) inputs, a (1, T, d) shared tensor; run at B == T
    x, y = _seq(B, g, T)
    return x, y, torch.randn(1, T, D, generator=g, dtype=torch.float64)


def _shared_seq_loss(m, x, y, s):
    return ((m.out(torch.tanh(m.lin(x) + s)).squeeze(-1) - y) ** 2).sum()


def _batch_centred(m, x, y):  # mixes samples through the batch mean
    h = m.lin(x)
    return ((m.out(torch.tanh(h - h.mean(0, keepdim=True))) - y) ** 2).sum()


class WithBatchNorm(Lin):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(D)


def _bn_loss(m, x, y):
    return ((m.out(torch.tanh(m.bn(m.lin(x)))) - y) ** 2).sum()


def _sum_declared_mean(m, args, C, red):
    dp(LossOf(m, _sq), C, "mean")(*args).backward()  # the loss is a sum; the user declared "mean"


def _mean_declared_sum(m, args, C, red):
    dp(LossOf(m, lambda mm, x, y: _sq(mm, x, y) / x.shape[0]), C, "sum")(*args).backward()


def _micro_batches(m, args, C, red):
    f = dp(LossOf(m, _sq), C, red)
    x, y = args
    k = x.shape[0] // 2
    f(x[:k], y[:k]).backward()
    f(x[k:], y[k:]).backward()


def _mask_tb_inputs(B, g):
    x, y = _seq(B, g)
    return x, y, (torch.rand(3, B, generator=g) > 0.3).double()


def _weights(B, g):
    x, y = _xy(B, g)
    return x, y, torch.rand(B, generator=g, dtype=torch.float64) + 0.5


def _flat_labels(B, g):
    x, y = _seq(B, g)
    return x, y.reshape(-1)


def _pos_first_inputs(B, g):  # a (T, d) position table first, then (B, T, d) inputs and (B, T) targets
    x, y = _seq(B, g)
    return torch.randn(x.shape[1], D, generator=g, dtype=torch.float64), x, y


def _pos_first(m, pos, x, y):  # position-wise: cut by positions instead of samples, nothing mixes
    return ((m.out(torch.tanh(m.lin(x + pos))).squeeze(-1) - y) ** 2).sum()


def _pos_scale_inputs(B, g):  # (B, T, d) inputs, (B, T) targets, a (T,) per-position scale; B = 2T below
    x, y = _seq(B, g)
    return x, y, torch.rand(x.shape[1], generator=g, dtype=torch.float64) + 0.5


def _pos_scale(m, x, y, scale):  # the scale's size divides B, but it meets the samples along their T dim
    return ((m.out(torch.tanh(m.lin(x * scale[:, None]))).squeeze(-1) - y) ** 2).sum()


def _labels_first_inputs(B, g):
    x, y = _flat_labels(B, g)
    return y, x


def _labels_first_sample(args, i):
    y, x = args
    x_i, y_i = _flat_label_sample((x, y), i)
    return y_i, x_i


def _shared_first_inputs(B, g):
    x, y = _xy(B, g)
    return torch.randn(1, D, generator=g, dtype=torch.float64), x, y


def _shared_second_inputs(B, g):
    x, y = _xy(B, g)
    return x, torch.randn(1, D, generator=g, dtype=torch.float64), y


def _flat_label_sample(args, i):  # labels of sample i are rows i*T .. i*T+T-1
    x, y = args
    T = x.shape[1]
    return x[i:i + 1], y[i * T:(i + 1) * T]


ATTACKS = [
    Attack("plain model, loss inside", Lin, _xy, (0, 0), lambda m, a, C, r: _plain(m, a, C, r), _sq),
    Attack("plain model, mean reduction", Lin, _xy, (0, 0), lambda m, a, C, r: _plain(m, a, C, r), _sq,
           reduction="mean"),
    Attack("micro-batches, one backward each", Lin, _xy, (0, 0), _micro_batches, _sq, batches=(2, 5)),
    Attack("graph break between two uses of a layer (torch.compile, fullgraph=False)", Lin, _xy, (0, 0),
           _graph_break_unfused, _twice),
    Attack("graph break under dpcompile.compile", Lin, _xy, (0, 0), _graph_break_dpcompile, _twice),
    Attack("regional compilation: each layer compiled alone", Lin, _xy, (0, 0), _regional, _sq),
    Attack("eager regulariser on a clipped parameter", Lin, _xy, (0, 0), _eager_regulariser, None),
    Attack("two compiled calls summed into one backward", Lin, _xy, (0, 0), _two_calls_one_backward, None),
    Attack("retain_graph replay", Lin, _xy, (0, 0), _replay, None),
    Attack("trainable tensor that is not a Parameter", NonParameterTrainable, _xy, (0, 0),
           lambda m, a, C, r: _plain(m, a, C, r, loss=lambda mm, x, y: _sq(mm, x * mm.scale, y)), None),
    Attack("batch-shared (1, d) tensor as the first argument", Lin, _shared_first_inputs, (None, 0, 0),
           lambda m, a, C, r: _plain(m, a, C, r, loss=_shared_first, batch_arg=1), _shared_first),
    Attack("batch-shared (1, d) tensor as the first argument, batch_arg not given", Lin, _shared_first_inputs,
           (None, 0, 0), lambda m, a, C, r: _plain(m, a, C, r, loss=_shared_first), _shared_first,
           batches=(1, 2, 5)),  # B = 1: exact (one sample); B >= 2: refused (which input is the batch?)
    Attack("batch-shared (1, d) tensor as the second argument", Lin, _shared_second_inputs, (0, None, 0),
           lambda m, a, C, r: _plain(m, a, C, r, loss=_shared_second), _shared_second),
    Attack("labels pre-flattened to (B*T,), token sum", Lin, _flat_labels, (0, None),
           lambda m, a, C, r: _plain(m, a, C, r, loss=_tok_loss), _tok_loss, sample=_flat_label_sample),
    Attack("labels pre-flattened to (B*T,), token mean over the batch", Lin, _flat_labels, (0, None),
           lambda m, a, C, r: _plain(m, a, C, r, loss=_tok_mean_loss), None),  # a mean declared "sum"
    Attack("labels pre-flattened to (B*T,), token mean over the batch declared 'mean'", Lin, _flat_labels, (0, None),
           lambda m, a, C, r: dp(LossOf(m, _tok_mean_loss), C, "mean")(*a).backward(), _tok_means,
           reduction="mean", sample=_flat_label_sample),
    Attack("(T, B) mask next to batch-first inputs, masked sum", Lin, _mask_tb_inputs, (0, 0, 1),
           lambda m, a, C, r: _plain(m, a, C, r, loss=_mask_tb, batch_arg=0), _mask_tb),
    Attack("(T, B) mask at T == B", Lin, _mask_tb_inputs, (0, 0, 1),
           lambda m, a, C, r: _plain(m, a, C, r, loss=_mask_tb, batch_arg=0), _mask_tb, batches=(3,)),
    Attack("(T, B) mask, static lengths (dynamic_seq=False)", Lin, _mask_tb_inputs, (0, 0, 1),
           lambda m, a, C, r: _plain(m, a, C, r, loss=_mask_tb, batch_arg=0, dynamic_seq=False), _mask_tb,
           batches=(2, 3)),
    # batch_arg not given: the first tensor argument is the batch unless another argument would cut other samples
    Attack("(T, B) mask next to batch-first inputs, batch_arg not given", Lin, _mask_tb_inputs, (0, 0, 1),
           lambda m, a, C, r: _plain(m, a, C, r, loss=_mask_tb), _mask_tb, batches=(2, 3, 5)),
    Attack("a (T, d) position table as the first argument, batch_arg not given", Lin, _pos_first_inputs,
           (None, 0, 0), lambda m, a, C, r: _plain(m, a, C, r, loss=_pos_first), _pos_first, batches=(2, 3, 5)),
    Attack("a (T, d) position table as the first argument, batch_arg=1", Lin, _pos_first_inputs, (None, 0, 0),
           lambda m, a, C, r: _plain(m, a, C, r, loss=_pos_first, batch_arg=1), _pos_first, batches=(1, 2, 3, 5)),
    Attack("labels pre-flattened to (B*T,) as the first argument, batch_arg not given", Lin, _labels_first_inputs,
           (None, 0), lambda m, a, C, r: _plain(m, a, C, r, loss=lambda mm, y, x: _tok_loss(mm, x, y)),
           lambda mm, y, x: _tok_loss(mm, x, y), sample=_labels_first_sample, batches=(2, 5)),
    Attack("a (T,) per-position scale whose size divides B, batch_arg not needed", Lin, _pos_scale_inputs,
           (0, 0, None), lambda m, a, C, r: _plain(m, a, C, r, loss=_pos_scale), _pos_scale, batches=(3, 6)),
    Attack("labels pre-flattened to (B*T,) as the first argument, batch_arg=1", Lin, _labels_first_inputs,
           (None, 0), lambda m, a, C, r: _plain(m, a, C, r, loss=lambda mm, y, x: _tok_loss(mm, x, y), batch_arg=1),
           lambda mm, y, x: _tok_loss(mm, x, y), sample=_labels_first_sample, batches=(1, 2, 5)),
    Attack("labels pre-flattened to (B*T,) at T == B", Lin, _flat_labels, (0, None),
           lambda m, a, C, r: _plain(m, a, C, r, loss=_tok_loss), _tok_loss, sample=_flat_label_sample, batches=(3,)),
    Attack("(T, B) mask, normalised by mask.sum()", Lin, _mask_tb_inputs, (0, 0, 1),
           lambda m, a, C, r: _plain(m, a, C, r, loss=_mask_tb_normalised, batch_arg=0), None),
    Attack("per-sample weights (B,) next to time-major inputs (batch_dim=1), weighted sum", Lin, _tm, (1, 1, 0),
           lambda m, a, C, r: _plain(m, a, C, r, loss=_tm_weighted, batch_dim=1), _tm_weighted, batches=(1, 2, 5)),
    Attack("per-sample weights (B,) next to time-major inputs (batch_dim=1), normalised by w.sum()", Lin, _tm,
           (1, 1, 0), lambda m, a, C, r: _plain(m, a, C, r, loss=_tm_weighted_normalised, batch_dim=1), None),
    Attack("per-sample weights (B,) with batch_dim=1, only as a normaliser of the activations", Lin, _tm, (1, 1, 0),
           lambda m, a, C, r: _plain(m, a, C, r, loss=_tm_weights_inside, batch_dim=1), None),
    Attack("a (1, T, d) shared tensor with T == B", Lin, _shared_seq, (0, 0, None),
           lambda m, a, C, r: _plain(m, a, C, r, loss=_shared_seq_loss), _shared_seq_loss, batches=(3,)),
    Attack("per-sample weights (B,), weighted sum", Lin, _weights, (0, 0, 0),
           lambda m, a, C, r: _plain(m, a, C, r, loss=_weighted), _weighted),
    Attack("per-sample weights (B,), normalised by w.sum()", Lin, _weights, (0, 0, 0),
           lambda m, a, C, r: _plain(m, a, C, r, loss=_weighted_normalised), None),
    Attack("activations centred by the batch mean", Lin, _xy, (0, 0),
           lambda m, a, C, r: _plain(m, a, C, r, loss=_batch_centred), None),
    Attack("BatchNorm in training mode", WithBatchNorm, _xy, (0, 0),
           lambda m, a, C, r: _plain(m, a, C, r, loss=_bn_loss), None),
    Attack("a sum loss declared loss_reduction='mean'", Lin, _xy, (0, 0), _sum_declared_mean, None),
    Attack("a mean loss declared loss_reduction='sum'", Lin, _xy, (0, 0), _mean_declared_sum, None),
]


@pytest.mark.parametrize("attack", [pytest.param(a, id=a.name, marks=pytest.mark.xfail(strict=True,
                                                                                       reason=a.known_hole)
                                                 if a.known_hole else ()) for a in ATTACKS])
def test_attack_is_exact_or_refused(attack):
    # a batch-wide normaliser of one sample is that sample's own: such a loss mixes samples only from B = 2
    for B in attack.batches if attack.loss is not None else [b for b in attack.batches if b >= 2]:
        for C in (SMALL_C, LARGE_C):
            result, refusal = verdict(attack, B, C, seed=B)
            assert result in ("exact", "refused"), f"{attack.name}, B={B}, C={C}: {result}"
            if refusal is not None:
                assert str(refusal).strip(), "a refusal must say why"


def test_the_verdicts_of_the_attacks_that_must_be_refused():
    """The attacks without an oracle, and the graph-edge attacks: the verdict is a refusal, not an accident of
    the oracle's comparison. (Counted here so that the closing note's tally is the tests'.)"""
    must = [a for a in ATTACKS if a.loss is None and not a.known_hole] + [
        a for a in ATTACKS if a.name.startswith(("graph break", "regional")) or a.name.endswith("batch_arg not given")]
    for a in must:
        result, refusal = verdict(a, 2, SMALL_C)
        assert result == "refused", f"{a.name}: {result}"


def test_a_shared_tensor_whose_size_divides_the_batch_is_not_taken_for_the_batch():
    """(T,) per-position values next to B = 2T samples: its size divides B, but taken as the batch it would meet
    the samples along their T dim, so it is no rival of the first argument: exact, no batch_arg needed."""
    attack = next(a for a in ATTACKS if a.name.startswith("a (T,) per-position scale"))
    for B in attack.batches:
        assert verdict(attack, B, SMALL_C, seed=B)[0] == "exact", B


def test_explain_lists_the_inputs_found_to_carry_samples():
    """Data flow, not sizes: at T == B the (T, B) mask carries its samples on dim 1, the (1, T, d) tensor none."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y, mask = _mask_tb_inputs(3, g)
    shared = torch.randn(1, 3, D, generator=g, dtype=torch.float64)
    model = LossOf(Lin().double(), lambda m, x, y, mask, s: _mask_tb(m, x + s, y, mask))
    plan = dpcompile.explain(model, (x, y, mask, shared), max_grad_norm=1.0, loss_reduction="sum", batch_arg=0)
    assert plan.batch_inputs == {"L['args'][0]": 0, "L['args'][1]": 0, "L['args'][2]": 1}, plan.batch_inputs
    # without batch_arg the mask, on its dim 0, could be the batch (positions as samples): which one is asked
    with pytest.raises(Exception, match="batch_arg=") as info:
        dpcompile.explain(model, (x, y, mask, shared), max_grad_norm=1.0, loss_reduction="sum")
    assert "L['args'][2]" in str(info.value) and "carries samples along its dim 1" in str(info.value)


# -- random compositions ---------------------------------------------------------------------------------------

OPS = ("linear", "layernorm", "gelu", "residual", "attention", "scale_shared", "mask_tokens")


class Composed(nn.Module):
    """Layers drawn from OPS over (B, T, D) (or (T, B, D) when seq_first), then a token-sum loss."""

    def __init__(self, ops, seq_first):
        super().__init__()
        self.ops, self.seq_first = list(ops), seq_first
        self.layers = nn.ModuleList(
            nn.Linear(D, D) if op in ("linear", "residual", "attention") else
            nn.LayerNorm(D) if op == "layernorm" else nn.Identity() for op in self.ops)
        self.head = nn.Linear(D, 1)


def _apply(model, x, shared, mask):
    h = x.transpose(0, 1) if model.seq_first else x  # the model works batch-first inside
    mask = mask.t() if model.seq_first else mask
    for op, layer in zip(model.ops, model.layers):
        if op in ("linear", "layernorm"):
            h = layer(h)
        elif op == "gelu":
            h = F.gelu(h)
        elif op == "residual":
            h = h + torch.tanh(layer(h))
        elif op == "attention":
            q = layer(h)
            h = torch.softmax(q @ h.transpose(1, 2) / D ** 0.5, -1) @ h
        elif op == "scale_shared":
            h = h * shared
        elif op == "mask_tokens":
            h = h * mask.unsqueeze(-1)
    return model.head(h).squeeze(-1)


def _composed_loss(model, x, y, shared, mask):
    out = _apply(model, x, shared, mask)
    y = y.t() if model.seq_first else y
    return ((out - y) ** 2).sum()


@st.composite
def compositions(draw):
    ops = draw(st.lists(st.sampled_from(OPS), min_size=1, max_size=4))
    return ops, draw(st.booleans()), draw(st.integers(2, 5)), draw(st.integers(1, 4)), draw(st.integers(0, 99))


def _composed_inputs(seq_first, B, T, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    y = torch.randn(B, T, generator=g, dtype=torch.float64)
    shared = torch.randn(1, 1, D, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) > 0.3).double()
    if seq_first:  # every per-sample input in the same layout (mixed layouts: the attacks above)
        x, y, mask = x.transpose(0, 1).contiguous(), y.t().contiguous(), mask.t().contiguous()
    return x, y, shared, mask


def _compiled_sum(model, args, C, batch_dim):
    model.zero_grad(set_to_none=True)
    f = dpcompile.compile(LossOf(model, _composed_loss), backend="flashdp_eager", max_grad_norm=C,
                          clipping="flat", loss_reduction="sum", batch_dim=batch_dim)
    f(*args).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(compositions())
@example(case=(["linear"], True, 3, 2, 0))  # an unused (T, B) mask, (2, 2) in the split's second half: not refused
def test_random_compositions_are_exact_or_refused_and_additive(case):
    ops, seq_first, B, T, seed = case
    torch._dynamo.reset()
    torch.manual_seed(seed)
    model = Composed(ops, seq_first).double()
    args = _composed_inputs(seq_first, B, T, seed)
    bd = 1 if seq_first else 0
    attack = Attack("composed", lambda: model, None, (bd, bd, None, bd), None, _composed_loss)
    try:
        got = _compiled_sum(model, args, SMALL_C, bd)
    except Exception as exc:  # noqa: BLE001
        assert _refusal(exc) is not None, f"{ops} seq_first={seq_first}: crashed with {exc!r}"
        return
    want = oracle_grads(attack, model, args, B, SMALL_C)
    for n, w in want.items():
        torch.testing.assert_close(got.get(n, torch.zeros_like(w)), w, atol=1e-9, rtol=1e-7,
                                   msg=lambda m: f"{ops} seq_first={seq_first} B={B} T={T} {n}: {m}")
    # additivity at large C: the batch's clipped sum is the sum over a split of it
    k = B // 2
    split = [tuple(a if d is None else a.narrow(d, lo, hi - lo) for a, d in zip(args, (bd, bd, None, bd)))
             for lo, hi in ((0, k), (k, B))]
    whole = _compiled_sum(model, args, LARGE_C, bd)
    parts = [_compiled_sum(model, part, LARGE_C, bd) for part in split]
    for n, w in whole.items():
        torch.testing.assert_close(w, parts[0].get(n, 0 * w) + parts[1].get(n, 0 * w), atol=1e-9, rtol=1e-7)


if __name__ == "__main__":  # the tally for a closing note: python tests/test_red_team.py
    import collections

    tally = collections.Counter()
    for a in ATTACKS:
        for B in a.batches if a.loss is not None else [b for b in a.batches if b >= 2]:
            for C in (SMALL_C, LARGE_C):
                result, refusal = verdict(a, B, C, seed=B)
                tally[result.split(":")[0]] += 1
                print(f"{result.split(':')[0]:9s} B={B} C={C:g}  {a.name}"
                      + (f"  [{type(refusal).__name__}]" if refusal is not None else ""))
    print(f"{len(ATTACKS)} attacks, {sum(tally.values())} runs: " + ", ".join(f"{n} {k}" for k, n in tally.items()))
