"""Dynamo backends "flashdp" (Inductor) and "flashdp_eager" (AOTAutograd, no code generation).

Both: read the options, name the trainable parameters and their clipping groups, find the batch input(s), then
compile with `DPJointPass` on the joint forward+backward graph and a decomposition table that keeps `aten.mm`
and `aten.embedding_dense_backward` whole (their decompositions depend on shape, device and version).
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import operator
import re
import warnings
from typing import Any, Optional

import torch
import torch.nn as nn

from .codegen.randomized_ops import draw_probe_seed, exact_norms_enabled
from .clip_provenance import GraphClipping, tap, threshold_input
from .errors import CoverageError, DPCompileError, OptionsError
from .options import DPOptions, infer_batch_input
from .passes import DPJointPass, ParamInfo, PassContext, run_dp_pass
from .sdpa_policy import attention_for

log = logging.getLogger("dpcompile")

aten = torch.ops.aten

#: lists that want every PassContext built while they are registered (explain collects its plan this way)
_CONTEXT_LISTENERS: list = []
#: explain() compiles only to read the plan: its graphs must not vouch for any parameter's gradients
_EXPLAINING = [False]


class _DecompositionTable(dict):
    """Inductor's decomposition table as the pass needs it. Inductor puts the table it is given into its FX graph
    cache key by pickling it, and torch's own entries do not pickle (a pybind11 function among them), so every DP
    graph bypassed that cache (and AOTAutograd's, which needs it). This table pickles as a call of the function
    that builds it: a stable key, whose contents are covered by torch's version and by passes.source_hash (which
    hashes dp_decomposition_table's source)."""

    def __reduce__(self):
        return (dp_decomposition_table, ())


def dp_decomposition_table() -> dict:
    from torch._inductor.decomposition import select_decomp_table

    table = _DecompositionTable(select_decomp_table())
    for op in (aten.mm.default, aten.embedding_dense_backward.default):
        table.pop(op, None)
    return table


# ----------------------------------------------------------------------------------------------------------
# graph inputs: parameters, their names and groups, batch inputs

_SOURCE_ROOT = re.compile(r"^[LG]\['([^']+)'\]")
_ARGUMENT_SOURCE = re.compile(r"^L\['[^']+'\](\[\d+\]|\['[^']+'\])?$")


def _source_name(node) -> Optional[str]:
    ga = node.meta.get("grapharg")
    src = getattr(ga, "source", None)
    if src is None:
        return None
    name = src.name
    return name() if callable(name) else name


def _frame_objects() -> dict:
    """Locals and globals of the frame Dynamo is compiling (to find the module and the forward signature)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
    except Exception:
        tx = None
    if tx is None:
        return {}
    out = dict(getattr(tx, "f_globals", {}) or {})
    out.update(getattr(tx, "f_locals", {}) or {})
    return out


def _root_module(sources: list, frame: dict) -> Optional[nn.Module]:
    for s in sources:
        if s and "._parameters[" in s:
            m = _SOURCE_ROOT.match(s)
            if m and isinstance(frame.get(m.group(1)), nn.Module):
                return frame[m.group(1)]
    return None


def _name_from_source(source: str) -> str:
    parts = re.findall(r"_(?:modules|parameters)\['([^']+)'\]", source)
    return ".".join(parts) if parts else source


def _user_input_order(source: str, signature: list) -> tuple:
    m = re.match(r"^L\['args'\]\[(\d+)\]$", source)
    if m:
        return (0, int(m.group(1)))
    m = re.match(r"^L\['kwargs'\]\['([^']+)'\]$", source) or re.match(r"^L\['([^']+)'\]$", source)
    if m:
        name = m.group(1)
        return (1, signature.index(name) if name in signature else len(signature))
    return (2, 0)


def _matches_batch_arg(source: str, batch_arg, signature: list) -> bool:
    if isinstance(batch_arg, int):
        if source == f"L['args'][{batch_arg}]":
            return True
        return batch_arg < len(signature) and source in (f"L['{signature[batch_arg]}']",
                                                         f"L['kwargs']['{signature[batch_arg]}']")
    if source in (f"L['{batch_arg}']", f"L['kwargs']['{batch_arg}']"):
        return True
    return batch_arg in signature and source == f"L['args'][{signature.index(batch_arg)}]"


def _groups_of(names: list, module_names: dict, options: DPOptions) -> dict:
    """Trainable parameter name -> clipping group name."""
    clipping = options.clipping
    if clipping == "flat":
        return {n: "flat" for n in names}
    if clipping == "per_param":
        return {n: n for n in names}
    if clipping == "per_layer":
        return {n: n.rsplit(".", 1)[0] if "." in n else "" for n in names}
    out = {}
    trainable = set(names)
    for i, group in enumerate(clipping):
        for n in group:
            if n not in trainable and n not in module_names:
                raise OptionsError(f"option clipping: group {i} names `{n}`, which is not a parameter of the model")
            if n in trainable:
                out[n] = f"group{i}"
    missing = [n for n in names if n not in out]
    if missing:
        raise OptionsError(f"option clipping: trainable parameters {missing} are in no group; every trainable "
                           "parameter must be in exactly one group")
    return out


def _attribute_path(source: str) -> str:
    """`L['self'].blocks._modules['0'].scale` -> `blocks.0.scale` (the name a user would write)."""
    path = re.sub(r"\._(?:modules|parameters|buffers)\['([^']+)'\]", r".\1", source)
    path = re.sub(r"^[LG]\['self'\]\.?", "", path)
    return path or source


def _tracing_fullgraph() -> bool:
    """Dynamo is tracing the frame this graph comes from with fullgraph=True (dpcompile.compile's default,
    CausalLMLoss, DPTrainer, export): the frame is this one graph, a graph break would have raised."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
    except Exception:  # noqa: BLE001 (not inside Dynamo's tracer, or its internals moved)
        return False
    return bool(getattr(tx, "one_graph", False))


def _refuse_missing_unless_fullgraph(missing: list) -> None:
    """Trainable parameters of the compiled model that this graph does not read. Under fullgraph the whole
    forward is this graph, so the forward never uses them: eager PyTorch leaves their .grad None, and so does the
    pass. A gradient that reaches them later from eager code or another backend is one no flashdp graph produced,
    which DPOptimizer refuses at step (clip_provenance.grad_problem); another flashdp graph that clips them is
    counted in the optimizer's sensitivity (clipped_sensitivity). Without fullgraph they may be the other side of
    a graph break, where a sample's gradient would be clipped in pieces: refused."""
    if _tracing_fullgraph():
        return
    raise CoverageError(
        f"flashdp: trainable parameters {missing[:8]}{' ...' if len(missing) > 8 else ''} of the model are "
        "not in this compiled graph, so their gradients would not be clipped here. Either the model has a "
        "graph break (compile with fullgraph=True, e.g. through dpcompile.compile; under fullgraph, parameters the "
        "forward never uses are accepted and keep a None gradient) or those parameters are unused (set "
        "requires_grad=False on them)"
    )


def _refuse_trainable_non_parameter(source: str, t: torch.Tensor) -> None:
    """A tensor the model reads that requires grad but is no nn.Parameter (a `requires_grad=True` attribute, buffer
    or global, or one computed from parameters outside the compiled call): the pass clips parameter gradients
    only, so its gradient, or the parameters' gradients through it, would not be clipped."""
    raise CoverageError(
        f"flashdp: the tensor `{_attribute_path(source)}` (Dynamo source {source}, shape {_shape_text(t)}) requires grad "
        "but is not an nn.Parameter of the model, so its gradient would not be clipped. Register it as a parameter "
        "(`self.w = nn.Parameter(...)`), compute it inside the compiled forward from the parameters, or set "
        "requires_grad=False on it")


def _refuse_torch_ddp() -> None:
    """Dynamo is compiling inside torch DDP's forward: DDP would all-reduce (average) every backward's clipped
    sums, and its DDPOptimizer splits the graph at bucket boundaries, across clipping groups."""
    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:  # pragma: no cover (builds without torch.distributed)
        return
    active = getattr(DistributedDataParallel, "_get_active_ddp_module", None)
    if active is not None and active() is not None:
        raise DPCompileError(
            "flashdp: the model runs inside torch.nn.parallel.DistributedDataParallel. dpcompile sums the ranks' "
            "clipped gradients itself, once per logical step: pass the bare module to dpcompile and use "
            "dpcompile.DistributedDPOptimizer (dpcompile.make_private picks it under torchrun); see "
            "docs/distributed.md. DDP would average the clipped sums at every backward, and Dynamo's DDPOptimizer "
            "splits the compiled graph at DDP's bucket boundaries, across clipping groups")


def _shape_text(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(d) if isinstance(d, int) else "*" for d in t.shape) + ")"


def _warn_if_loss_is_outside(gm: torch.fx.GraphModule, root: Optional[nn.Module]) -> None:
    """A compiled call that returns no scalar: the loss is computed outside the graph. The pass clips each
    sample's gradient through the outputs' gradients, which is right when that loss is a sum (or mean) of
    per-sample terms, but it cannot see the loss to check that (a batch-wide normaliser there mixes samples)."""
    outs = gm.graph.output_node().args[0]
    vals = [n.meta.get("example_value") for n in (outs if isinstance(outs, (list, tuple)) else [outs])
            if isinstance(n, torch.fx.Node)]
    tensors = [v for v in vals if isinstance(v, torch.Tensor) and v.requires_grad]
    if tensors and all(v.dim() > 0 for v in tensors):
        where = type(root).__name__ if root is not None else "the compiled function"
        warnings.warn(
            f"flashdp: {where} returns tensors of shapes {', '.join(_shape_text(v) for v in tensors[:3])}, not a scalar loss, "
            "so the loss is computed outside the compiled call, where dpcompile cannot check that it is a sum or "
            "mean of per-sample terms (a batch-wide normaliser such as a token mean over the whole batch would mix "
            "samples), nor that it is the declared loss_reduction. Move the loss inside: compile a module whose "
            "forward returns the loss (for transformers models, dpcompile.hf.CausalLMLoss)", stacklevel=2)


def inline_compile_regions(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Replace every call of a torch.compiler.nested_compile_region (Dynamo's invoke_subgraph) by the region's body.

    AOTAutograd compiles a region's body as a graph of its own, where the pass cannot see the rest of a sample's
    gradient: its parameters' norms and sums would be wrong or refused. Inlined, the pass sees one graph and clips
    exactly; what the region would have saved (compiling a repeated block once) is lost. Nested regions are
    inlined first. Works on the graph Dynamo hands the backend, before anything reads it."""
    invoke = getattr(torch.ops.higher_order, "invoke_subgraph", None)
    calls = [] if invoke is None else list(gm.graph.find_nodes(op="call_function", target=invoke))
    for call in calls:
        attr, operands = call.args[0], call.args[2:]
        body = inline_compile_regions(getattr(gm, attr.target))
        params = body.graph.find_nodes(op="placeholder")
        if len(params) != len(operands):  # another invoke_subgraph signature than (body, identifier, *operands)
            raise DPCompileError(f"flashdp: a nested_compile_region call `{call.name}` passes {len(operands)} "
                                 f"operands to a body of {len(params)} inputs; this torch's invoke_subgraph is not "
                                 "one dpcompile knows: compile the model without nested_compile_region")
        env = dict(zip(params, operands))
        with gm.graph.inserting_before(call):
            for node in body.graph.nodes:
                if node.op in ("placeholder", "output"):
                    continue
                env[node] = gm.graph.node_copy(node, lambda n: env[n])
                if node.op == "get_attr":  # a constant or nested module of the body: moved onto gm, renamed
                    target = f"{attr.target}_{node.target}".replace(".", "_")
                    setattr(gm, target, getattr(body, node.target))
                    env[node].target = target
        results = body.graph.output_node().args[0]
        for user in list(call.users):
            if user.op != "call_function" or user.target is not operator.getitem:
                raise DPCompileError(f"flashdp: a nested_compile_region's result is used by `{user.name}` other "
                                     "than by indexing; compile the model without nested_compile_region")
            user.replace_all_uses_with(env[results[user.args[1]]])
            gm.graph.erase_node(user)
        gm.graph.erase_node(call)
        if not attr.users:
            gm.graph.erase_node(attr)
    if calls:
        gm.graph.lint()
        gm.recompile()
    return gm


def build_context(gm: torch.fx.GraphModule, example_inputs: list, options: Any) -> PassContext:
    opts = options if isinstance(options, DPOptions) else DPOptions.parse(options)
    _refuse_torch_ddp()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    sources = [_source_name(n) for n in placeholders]
    frame = _frame_objects()
    root = _root_module(sources, frame)
    _warn_if_loss_is_outside(gm, root)
    names_by_id, all_names = {}, {}
    if root is not None:
        for name, p in root.named_parameters():
            names_by_id[id(p)] = name
            all_names[name] = p

    trainable, user_inputs = {}, []
    for i, (src, ex) in enumerate(zip(sources, example_inputs)):
        if isinstance(ex, nn.Parameter) or (src and "._parameters[" in src):
            if isinstance(ex, torch.Tensor) and ex.requires_grad:
                trainable[i] = names_by_id.get(id(ex)) or _name_from_source(src or f"input{i}")
        elif isinstance(ex, torch.Tensor) and src and _ARGUMENT_SOURCE.match(src):
            user_inputs.append(i)  # an argument of the compiled call (not a global, buffer or attribute)
        elif isinstance(ex, torch.Tensor) and ex.requires_grad:
            _refuse_trainable_non_parameter(src or f"graph input {i}", ex)
    if not trainable:
        raise CoverageError("flashdp: the compiled graph has no trainable parameters; nothing to privatize")

    fwd = getattr(root, "forward", None)
    try:
        signature = [p for p in inspect.signature(fwd).parameters] if fwd is not None else []
    except (TypeError, ValueError):
        signature = []
    user_inputs.sort(key=lambda i: _user_input_order(sources[i] or "", signature))
    if opts.batch_arg is None:
        candidates = user_inputs
    else:
        candidates = [i for i in user_inputs if _matches_batch_arg(sources[i] or "", opts.batch_arg, signature)]
    candidates = [i for i in candidates if example_inputs[i].dim() > opts.batch_dim]
    if not candidates:
        raise OptionsError(
            f"flashdp: no tensor input matches batch_arg={opts.batch_arg!r} with a dim {opts.batch_dim}; "
            f"graph inputs: {[s for s in sources]}"
        )
    main = candidates[0] if opts.batch_arg is not None else candidates[
        infer_batch_input([example_inputs[i].shape[opts.batch_dim] for i in candidates], opts.batch_dim)]
    batch_inputs = {main: opts.batch_dim}
    # which of the other tensor arguments carry samples (targets, masks, weights, in whatever layout) the pass
    # decides by data flow (passes/sample_inputs.py; docs/gradient-contract.md, "Which inputs carry samples")
    candidates = {i: sources[i] or f"input{i}" for i in user_inputs
                  if i != main and isinstance(example_inputs[i], torch.Tensor) and example_inputs[i].dim() > 0}

    names = list(trainable.values())
    groups = _groups_of(names, all_names, opts)
    n_groups = len(set(groups.values()))
    if root is not None:
        model_trainable = [n for n, p in root.named_parameters() if p.requires_grad]
        missing = sorted(set(model_trainable) - set(names))
        if missing:
            _refuse_missing_unless_fullgraph(missing)
            # the forward never uses them: their .grad stays None (as in eager PyTorch) and DPOptimizer noises
            # them as a zero clipped sum. C_g is counted over every group of the model, as if they were here
            n_groups = len(set(_groups_of(model_trainable, all_names, opts).values()))
    if opts.adaptive:  # run-time thresholds: an input the backend appends (_with_threshold_input)
        thresholds = {}
    else:
        thresholds = {g: opts.threshold_for(g, n_groups) for g in sorted(set(groups.values()))}
    params = {i: ParamInfo(name, groups[name]) for i, name in trainable.items()}
    ctx = PassContext(opts, params, batch_inputs, thresholds, dp_decomposition_table(),
                      input_sources={sources[i] or f"input{i}": d for i, d in batch_inputs.items()},
                      sample_candidates=candidates)
    if opts.adaptive:
        ctx.threshold_input = len(example_inputs)
        ctx.threshold_groups = tuple(sorted(set(groups.values())))
    if opts.uses_randomized():
        ctx.exact_norms = exact_norms_enabled()
        ctx.seed_input = len(example_inputs) + int(ctx.runtime_thresholds)
    for listener in _CONTEXT_LISTENERS:
        listener.append(ctx)
    return ctx


def _with_runtime_inputs(gm: torch.fx.GraphModule, example_inputs: list, ctx: PassContext):
    """(a copy of gm with the inputs the backend appends, and the example inputs with a fake value for each), in
    index order; Dynamo's own graph is left as it is, and its call's wrapper (_recording_clipping) passes them:
    - max_grad_norm="adaptive": the (G,) float64 thresholds. The forward does not read it; the pass reads C_g from
      it in the backward and makes its gradient the groups' quantile counts, so it requires grad.
    - randomized norms: the int64 (1,) probe seed on the batch's device, read by the backward's estimates."""
    appended = []
    if ctx.runtime_thresholds:
        appended.append(("dpcompile_thresholds", lambda: torch.ones(
            len(ctx.threshold_groups), dtype=torch.float64, requires_grad=True)))
    if ctx.seed_input is not None:
        device = _batch_device(example_inputs, ctx)
        appended.append(("dpcompile_probe_seed", lambda: torch.zeros(1, dtype=torch.int64, device=device)))
    if not appended:
        return gm, example_inputs
    from torch._guards import detect_fake_mode

    graph = torch.fx.Graph()
    copies: dict = {}
    out = graph.graph_copy(gm.graph, copies)
    for old, new in copies.items():
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    fake_mode = detect_fake_mode(example_inputs)
    examples = []
    for name, make in appended:
        with graph.inserting_after(last):
            last = graph.placeholder(name)
        last._dynamo_source = None  # no user source: AOTAutograd takes it as a plain input
        with fake_mode if fake_mode is not None else contextlib.nullcontext():
            examples.append(make())
        last.meta["example_value"] = last.meta["val"] = examples[-1]
    graph.output(out)
    new_gm = torch.fx.GraphModule(gm, graph)
    new_gm.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        new_gm._param_name_to_source = gm._param_name_to_source
    return new_gm, list(example_inputs) + examples


def _batch_device(inputs: list, ctx: PassContext) -> torch.device:
    return inputs[next(iter(ctx.batch_inputs))].device


def _recording_clipping(compiled, ctx: PassContext):
    """The compiled graph, wrapped so that every call that can backpropagate records, for the parameters it is
    given at run time, that their gradients come out of this clipping graph and with which thresholds
    (clip_provenance.py). Run time, not compile time: Dynamo hands this graph to every instance of the model, and
    the record must follow the tensors that are passed. explain()'s graphs vouch for nothing."""
    record = GraphClipping.from_context(ctx)
    positions = list(ctx.params)
    explaining = _EXPLAINING[0]

    def appended(args, params, backprop) -> tuple:
        """The inputs _with_runtime_inputs added, for this call; explain()'s graphs get placeholders."""
        extra = ()
        if ctx.runtime_thresholds:  # C_g of this call, from the optimizer bound to its parameters
            extra = (torch.ones(len(ctx.threshold_groups), dtype=torch.float64, device=params[0].device)
                     if explaining else threshold_input(record, params, params[0].device, backprop),)
        if ctx.seed_input is not None:  # this call's own secret seed (none needed where no backward can follow)
            device = _batch_device(args, ctx)
            extra += (draw_probe_seed(device) if torch.is_grad_enabled() and not explaining else
                      torch.zeros(1, dtype=torch.int64, device=device),)
        return extra

    if explaining:
        if not ctx.runtime_thresholds and ctx.seed_input is None:
            return compiled
        return lambda *args: compiled(*args, *appended(args, [args[i] for i in positions], False))

    def call(*args):  # Dynamo calls its backend's result with the graph inputs unboxed
        params = [args[i] for i in positions]
        backprop = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        extra = appended(args, params, backprop)
        if backprop:
            args = list(args)
            for i, t in zip(positions, tap(record, params)):
                args[i] = t
        return compiled(*args, *extra)

    return call


# ----------------------------------------------------------------------------------------------------------
# the backends


def _options_from(kwargs: dict) -> tuple:
    """(the DP options, Inductor's config patches of the compile mode). The mode comes from
    `torch.compile(backend="flashdp", mode=...)` or, since torch.compile takes mode or options but not both, from
    options["mode"] (dpcompile.compile(mode=...) passes it there)."""
    options = kwargs.pop("options", None)
    mode = kwargs.pop("mode", None)
    if kwargs:
        raise OptionsError(f"flashdp: unexpected backend arguments {sorted(kwargs)}")
    if options is not None and "mode" in options:
        options = dict(options)
        mode = options.pop("mode")
    return options, mode_config_patches(mode)


def mode_config_patches(mode: Optional[str]) -> dict:
    """Inductor's config patches for a torch.compile mode ("reduce-overhead": CUDA graphs), as torch's own
    Inductor backend applies them."""
    if mode is None:
        return {}
    from torch._inductor import list_mode_options

    try:
        return dict(list_mode_options(mode))
    except (RuntimeError, KeyError):
        raise OptionsError(f"option mode: {mode!r} is not a torch.compile mode; use 'default', "
                           "'reduce-overhead' (CUDA graphs), 'max-autotune' or 'max-autotune-no-cudagraphs'") from None


def _uses_cudagraphs(patches: dict) -> bool:
    from torch._inductor import config as inductor_config

    return bool(patches.get("triton.cudagraphs", getattr(inductor_config.triton, "cudagraphs", False)))


def flashdp(gm: torch.fx.GraphModule, example_inputs: list, **kwargs):
    """The product backend: the DP pass on the joint graph, then Inductor code generation."""
    from torch._inductor.compile_fx import compile_fx

    from . import ttir_cache

    ttir_cache.install()  # one Triton front-end run per distinct launch of our kernels, not one per launch
    options, patches = _options_from(kwargs)
    gm = inline_compile_regions(gm)
    ctx = build_context(gm, example_inputs, options)
    ctx.inline_ops = True
    gm, example_inputs = _with_runtime_inputs(gm, example_inputs, ctx)
    # traced here: symbolic lengths prefer attention kernels without per-shape plans, unless CUDA graphs replay them
    inputs = [n.meta.get("example_value") for n in gm.graph.find_nodes(op="placeholder")]
    batch_sizes = [inputs[i].shape[d] for i, d in ctx.batch_inputs.items() if isinstance(inputs[i], torch.Tensor)]
    with attention_for(gm, cuda_graphs=_uses_cudagraphs(patches), batch_sizes=batch_sizes):
        compiled = compile_fx(gm, example_inputs,
                              config_patches={**patches, "joint_custom_pre_pass": DPJointPass(ctx)},
                              decompositions=ctx.decompositions)
    log.info("flashdp: Triton's front end ran for %(misses)d distinct launches, reused for %(hits)d (this process)",
             ttir_cache.stats())
    return _recording_clipping(compiled, ctx)


def flashdp_eager(gm: torch.fx.GraphModule, example_inputs: list, **kwargs):
    """Same pass, no code generation: the rewritten graphs run op by op (tests, debugging)."""
    import torch._inductor.lowering  # noqa: F401 - Inductor's max_pool decomposition reads it without importing it
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    options, patches = _options_from(kwargs)
    if patches:
        raise OptionsError("option mode: flashdp_eager runs the rewritten graphs op by op, without code generation; "
                           "a torch.compile mode (CUDA graphs, autotuning) needs backend='flashdp'")
    gm = inline_compile_regions(gm)
    ctx = build_context(gm, example_inputs, options)

    def partition(joint, joint_inputs, **kw):
        run_dp_pass(joint.graph, ctx)
        joint.recompile()
        return min_cut_rematerialization_partition(joint, joint_inputs, **kw)

    def boxed(g, _inputs):
        return make_boxed_func(g.forward)

    gm, example_inputs = _with_runtime_inputs(gm, example_inputs, ctx)
    with attention_for(gm):
        compiled = aot_autograd(fw_compiler=boxed, bw_compiler=boxed, partition_fn=partition,
                                decompositions=ctx.decompositions)(gm, example_inputs)
    return _recording_clipping(compiled, ctx)


def register_backends() -> None:
    """Idempotent: the entry points may already have registered these names."""
    from torch._dynamo.backends.registry import _BACKENDS, register_backend

    for name, fn in (("flashdp", flashdp), ("flashdp_eager", flashdp_eager)):
        if name not in _BACKENDS:
            register_backend(name=name)(fn)
