"""Capture through ``torch.export``, for models ``torch.fx`` cannot trace (Python control flow
on shapes, ``int(x.shape[1] ** 0.5)``, asserts on sizes: timm's mobilevit, convit, tiny_vit,
efficientvit).

``torch.export`` runs the model on an example input and records the ATen ops it calls (the
"training" IR: ``aten.conv2d``, ``aten.linear``, ``aten.layer_norm``, ``aten.batch_norm``,
``aten.relu_``, ``aten.view``, ...). The graph built here is an ordinary ``fx.GraphModule``:
one input, one output, parameters as ``get_attr`` nodes read from the model itself (training
after capture is reflected, as with torch.fx). ``CapturedGraph`` then gives each ATen node
the rule that claims it (rules list the ATen ops they cover next to their Python
namesakes) or raises ``UnsupportedOpError`` naming the ATen op and its place, so the engine,
the reference and the windowed pass run on it unchanged.

The batch dimension is exported as dynamic (CD runs the graph with batch 1 for the total
and M masks for the relevant part); every other size is fixed at the example's, so a graph
serves one input shape (``Decomposer`` captures again for another).
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from .nodes import UnsupportedOpError, fetch_attr

# assertion nodes export adds (shape guards, metadata checks): no value, nothing to decompose
_ASSERTS = ("aten._assert", "aten.sym_constrain_range", "aten._assert_tensor_metadata")


def export_module(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """The model's ATen graph for inputs shaped like ``example`` (any batch size), as a
    GraphModule over the model's own parameters. ``UnsupportedOpError`` if export fails."""
    ep = _export(model, example)
    src = ep.module()
    graph = src.graph
    _inline_wrappers(graph, src)
    for node in list(graph.nodes):
        if node.op == "call_module" and not node.users:  # export's guard function
            graph.erase_node(node)
        elif node.op == "call_function" and not node.users and str(node.target).startswith(_ASSERTS):
            graph.erase_node(node)
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise UnsupportedOpError(f"torch.export gave {len(inputs)} inputs for {type(model).__name__}; "
                                 "fastacd decomposes a model of one tensor input")
    out = next(n for n in graph.nodes if n.op == "output")
    result = fx.node.map_aggregate(out.args[0], lambda a: a)
    while isinstance(result, (tuple, list)) and len(result) == 1:  # export's (logits,) pytree
        result = result[0]
    out.args = (result,)
    graph._codegen = fx.graph.CodeGen()  # plain f(x) -> tensor, not the pytree calling convention
    # parameters and buffers by their qualified names on the model itself; constants export
    # lifted out of forward() (a torch.tensor(...) literal) and subgraphs from the exported module
    root = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            try:
                root[node.target] = fetch_attr(model, node.target)
            except AttributeError:
                root[node.target] = fetch_attr(src, node.target)
    gm = fx.GraphModule(root, graph, class_name=f"{type(model).__name__}Export")
    gm.meta["capture"] = "export"
    return gm


def _wrapper_body(node: fx.Node):
    """(index of the first operand, whether to inline) for a higher-order op that only wraps a
    subgraph in a context torch.export records: ``torch.no_grad()`` (values unchanged) and a
    disabled autocast (EfficientViT's attention in float32; CD does not run under autocast).
    An enabled autocast changes the ops' dtypes: left in place, so it is named as unsupported."""
    name = getattr(node.target, "__name__", "")
    if name == "wrap_with_set_grad_enabled":
        return 2, True
    if name == "wrap_with_autocast":
        return 5, node.args[2] is False
    return 0, False


def _inline_wrappers(graph: fx.Graph, src: fx.GraphModule) -> None:
    """Replace each wrapper higher-order op by the ops of its subgraph (see ``_wrapper_body``)."""
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        first, inline = _wrapper_body(node)
        if not inline:
            continue
        body_node = node.args[first - 1]
        body = fetch_attr(src, body_node.target)
        inputs = [n for n in body.graph.nodes if n.op == "placeholder"]
        if any(n.op in ("get_attr", "call_module") for n in body.graph.nodes):
            continue  # a nested module: left for the rules to name
        with graph.inserting_before(node):
            out = graph.graph_copy(body.graph, dict(zip(inputs, node.args[first:])))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for user in list(node.users):  # the wrapper's results are read through getitem
            user.replace_all_uses_with(outs[user.args[1]])
            graph.erase_node(user)
        graph.erase_node(node)
        if not body_node.users:
            graph.erase_node(body_node)


def _export(model: nn.Module, example: torch.Tensor):
    """torch.export with a dynamic batch (an example of 2 samples: export fixes sizes of 1);
    a graph fixed at the example's batch where the model does not allow a dynamic one."""
    example = example.detach()
    two = example[:1].expand(2, *example.shape[1:]).clone()
    errors = []
    for args, dynamic in (((two,), ({0: torch.export.Dim("batch")},)), ((example[:1],), None)):
        try:
            return torch.export.export(model, args, dynamic_shapes=dynamic, strict=False)
        except Exception as exc:  # noqa: BLE001 - export raises many types: collect, then say
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    raise UnsupportedOpError(
        f"fastacd could not capture {type(model).__name__} with torch.export either "
        f"({'; '.join(errors)}).\nfastacd needs a forward pass without control flow on the "
        "input's values; control flow on shapes is fine for torch.export.")
