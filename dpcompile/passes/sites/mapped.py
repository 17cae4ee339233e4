"""mapped: a parameter gradient that is a fixed linear map, applied after the batch was summed, of other
contributions: the backward of slicing the parameter (pos[:T], W[:3], W[i]: slice_scatter / select_scatter of the
slice's gradient into zeros), of a weight_norm parametrization (_weight_norm_interface_backward), and a where with a
batch-free condition over gradient terms (the backward of softplus(p), clamp(p), where(c, p, 0): `where_branches`), and
a cat of gradient pieces (the backward of W.split / chunk / unbind: `cat_pieces`).

The map's other operands are batch-free, so it acts on each sample's gradient on its own: the inner value is a sum of
ordinary contributions (sites and their chains); each is wrapped in one site of this kind (`info["inner"]`), whose
per-sample form is the inner contribution's per-sample form with the map applied per sample. Not matched by any op:
discover.py builds these sites with `site_of` where its walk meets such a map. Materialized."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ...errors import UnsupportedGradientError
from ..chain import replay_per_sample
from ..patterns import Site, contribution_reads
from . import SiteKind, register_site_kind

aten = torch.ops.aten


def _zeros(node) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.target is aten.full.default:
        return node.args[1] == 0
    return node.target in (aten.zeros.default, aten.new_zeros.default, aten.zeros_like.default)


def _scatter(op, node, ps, env):
    """slice_scatter / select_scatter of each sample's slice gradient into zeros of the parameter's shape."""
    base = env[op.args[0]]
    out = ps.new_zeros((ps.shape[0], *base.shape))
    ps = ps.reshape(ps.shape[0], *op.args[1].meta["val"].shape)
    args = fx.node.map_arg(tuple(op.args[2:]), lambda n: env[n])
    dim = args[0] if args else 0
    dim = dim + base.dim() if dim < 0 else dim
    if op.target is aten.select_scatter.default:
        return torch.select_scatter(out, ps, dim + 1, args[1])
    return torch.slice_scatter(out, ps, dim + 1, *args[1:])


def _weight_norm(op, node, ps, env):
    """(grad_v, grad_g) of w = g * v / ||v|| for each sample's grad_w: the op's own formula, per sample. The norm
    is over the dims where `norms` (keepdim) has size 1 (a size-1 dim of v summed or not is the same)."""
    v, g, norms = (env[a] for a in op.args[1:4])
    ps = ps.reshape(ps.shape[0], *v.shape)
    red = [i + 1 for i in range(v.dim()) if norms.shape[i] == 1]
    grad_g = (ps * v).sum(red, keepdim=True) / norms
    if node.args[1] == 1:
        return grad_g.reshape(ps.shape[0], *g.shape)
    return (g / norms) * (ps - v * (grad_g / norms))


def _scatter_ok(op) -> bool:
    return _zeros(op.args[0]) and not op.kwargs


places_into_zeros = _scatter_ok


def _weight_norm_ok(op) -> bool:
    vals = [a.meta.get("val") if isinstance(a, fx.Node) else None for a in op.args[1:4]]
    return all(isinstance(v, torch.Tensor) for v in vals) and vals[0].dim() == vals[2].dim() and not op.kwargs


# op -> (position of the gradient among its args, is this use of the op a map, the per-sample map)
MAPS = {
    aten.slice_scatter.default: (1, _scatter_ok, _scatter),
    aten.select_scatter.default: (1, _scatter_ok, _scatter),
    aten._weight_norm_interface_backward.default: (0, _weight_norm_ok, _weight_norm),
}


def map_of(node: fx.Node):
    """(the op node, the position of the mapped gradient in its args) if `node` is one of the maps (or an output of
    one), else None. The op's other tensor operands must be batch-free: the caller checks."""
    op = node.args[0] if node.target is operator.getitem and isinstance(node.args[0], fx.Node) else node
    entry = MAPS.get(op.target)
    if entry is None or (op is not node and op.target not in (aten._weight_norm_interface_backward.default,)):
        return None
    if op is node and op.target is aten._weight_norm_interface_backward.default:
        return None  # its outputs are reached through getitem
    pos, ok, _ = entry
    return (op, pos) if ok(op) else None


def _is_zero(a) -> bool:
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return a == 0
    if not isinstance(a, fx.Node):
        return False
    if a.target is aten.scalar_tensor.default:
        return a.args[0] == 0
    if a.target in (aten.expand.default, aten.view.default, aten.reshape.default, aten.unsqueeze.default,
                    aten.clone.default):
        return _is_zero(a.args[0])  # zeros broadcast or reshaped (an unused piece of a split parameter)
    return _zeros(a)


def where_branches(node: fx.Node, st) -> list:
    """where(cond, a, b) with a batch-free cond, each branch a gradient term or zero: a fixed linear map of the
    terms (the backward of softplus, of a clamp, of torch.where on a parameter: where(c, g, g * s) = where(c, g, 0)
    + where(c, 0, g * s)), which acts on each sample's gradient on its own. The positions (1, 2) of the branches
    that carry a term; [] when `node` is not such a where (a batch-free branch that is not zero makes it affine)."""
    if node.target is not aten.where.self or len(node.args) != 3 or node.kwargs:
        return []
    cond = node.args[0]
    if isinstance(cond, fx.Node) and st(cond) is not None:
        return []
    return _carrying({pos: node.args[pos] for pos in (1, 2)}, st)


def _where(op, node, ps, env, pos):
    """where(cond, g_i, 0) (pos 1) or where(cond, 0, g_i) (pos 2) for each sample's term g_i: cond and the
    branches broadcast right-aligned, so each sample's term is padded to the output's rank behind its B dim."""
    cond = env[op.args[0]] if isinstance(op.args[0], fx.Node) else op.args[0]
    out = node.meta["val"]
    B, r = ps.shape[0], ps.dim() - 1
    ps = ps.reshape(B, *([1] * (out.dim() - r)), *ps.shape[1:])
    zero = ps.new_zeros(())
    got = torch.where(cond, ps, zero) if pos == 1 else torch.where(cond, zero, ps)
    return got.expand(B, *out.shape)


def cat_pieces(node: fx.Node, st) -> list:
    """cat([g_0, g_1, ...], dim) of gradient terms and zeros: the backward of splitting the parameter
    (`W.split([a, b])`, `W.chunk(k)`, `W.unbind()`), whose pieces are each used on their own. A fixed linear map of
    the pieces (each placed at its offset into zeros), which acts on each sample's gradient on its own. The indices
    of the pieces that carry a term; [] when `node` is not such a cat (a piece that is batch-free but not zero
    makes it affine)."""
    if node.target is not aten.cat.default or node.kwargs or not isinstance(node.args[0], (list, tuple)):
        return []
    return _carrying(dict(enumerate(node.args[0])), st)


def _carrying(operands: dict, st) -> list:
    """The keys of the operands that carry a gradient term; [] if any other operand is not zero (affine)."""
    carrying = []
    for key, a in operands.items():
        if isinstance(a, fx.Node) and st(a) is not None:
            carrying.append(key)
        elif not _is_zero(a):
            return []
    return carrying


def _cat_place(op, node, ps, env, j):
    """Each sample's piece j placed at its offset along the cat's dim, zeros elsewhere."""
    tensors = op.args[0]
    out = node.meta["val"]
    dim = op.args[1] if len(op.args) > 1 else 0
    dim = dim + out.dim() if dim < 0 else dim
    B = ps.shape[0]
    parts = []
    for k, t in enumerate(tensors):
        shape = t.meta["val"].shape
        parts.append(ps.reshape(B, *shape) if k == j else ps.new_zeros((B, *shape)))
    return torch.cat(parts, dim + 1)


def cat_site(node: fx.Node, j: int, inner) -> Site:
    """The site for piece `j` of cat map `node` around one inner contribution."""
    operands = {f"read{i}": n for i, n in enumerate(contribution_reads(inner))}  # the map reads no tensor
    return Site(KIND.name, node, operands, {}, {"inner": inner, "op": node, "cat_piece": j})


def where_site(node: fx.Node, pos: int, inner) -> Site:
    """The site for one branch (`pos`) of where map `node` around one inner contribution."""
    operands = {f"read{i}": n for i, n in enumerate(contribution_reads(inner))}
    if isinstance(node.args[0], fx.Node):  # the condition (batch-free); the other branch is not read
        operands["cond"] = node.args[0]
    return Site(KIND.name, node, operands, {}, {"inner": inner, "op": node, "where_pos": pos})


def site_of(node: fx.Node, op: fx.Node, pos: int, inner) -> Site:
    """The site for map `node` (an output of `op`) around one inner contribution."""
    operands = {}
    for i, n in enumerate(contribution_reads(inner)):
        operands[f"read{i}"] = n
    for i, a in enumerate(op.args):
        if i != pos:
            fx.node.map_arg(a, lambda n: operands.setdefault(f"arg_{n.name}", n))
    return Site(KIND.name, node, operands, {}, {"inner": inner, "op": op})


def inner_of(site: Site):
    """The contribution a mapped site wraps (None for a site of another kind)."""
    return site.info.get("inner") if site.kind == KIND.name else None


def originals(site: Site) -> list:
    """The nodes of the original (non-private) computation a site stands for, its inner sites' included."""
    out = [site.node]
    inner = inner_of(site)
    if inner is not None:
        out += originals(inner.site)
    return out


def classify(node, st, state, name) -> Site:
    raise UnsupportedGradientError(f"`{name}`: a mapped site is only built around another contribution")


def per_sample(site: Site, env: dict, bsz) -> torch.Tensor:
    c = site.info["inner"]
    ps = c.site.per_sample(env, bsz)
    for step in c.chain:
        ps = replay_per_sample(step, ps, env)
    ps = -ps if c.negate else ps
    op = site.info["op"]
    if "where_pos" in site.info:
        return _where(op, site.node, ps, env, site.info["where_pos"])
    if "cat_piece" in site.info:
        return _cat_place(op, site.node, ps, env, site.info["cat_piece"])
    return MAPS[op.target][2](op, site.node, ps, env)


KIND = register_site_kind(SiteKind("mapped", classify, per_sample), replace=True)
