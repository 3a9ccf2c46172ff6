"""An ATen graph as plain JSON data, and back: reading it can only build calls of PyTorch operators.

fxslice keeps a model's computation as data so that a shared model can be read without trusting its author:
no pickle, no `eval`, no import. What a graph may hold is closed:

- nodes: `placeholder`, `get_attr` (a dotted weight name), `call_function`, `output`;
- targets: operators registered in `torch.ops` (`aten::mm`, `aten::add.Tensor`, ...; a namespace that is not
  registered in this process is refused by name, never imported), the few Python functions torch.export leaves on
  sizes (`operator.mul`, `torch.sym_max`, ...), nothing else;
- arguments: None, booleans, integers, floats (inf and nan spelled out), strings, lists, tuples, other nodes,
  dtypes, devices, layouts and memory formats, each tagged with its type;
- per node, `nn_module_stack`, `stack_trace` and keys beginning with `fxslice_`, when their values are such data.

Every check happens while reading; anything else raises `GraphDataError` naming the node and the field. This file
imports only torch, so that a model exported for stock transformers can ship it beside its modeling file.
"""

from __future__ import annotations

import math
import operator
import re
from typing import Any

import torch
from torch import fx

__all__ = ["FORMAT", "GraphDataError", "graph_to_data", "graph_from_data", "target_name", "resolve_target"]

FORMAT = "fxslice-graph/1"

#: Python functions torch.export leaves in an ATen graph to compute sizes, by the name they are stored under
SIZE_FUNCTIONS: dict[str, Any] = {
    **{f"operator.{n}": getattr(operator, n) for n in (
        "getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pos", "pow", "eq", "ne", "lt", "le",
        "gt", "ge", "and_", "or_", "not_", "abs")},
    **{f"torch.{n}": getattr(torch, n) for n in (
        "sym_max", "sym_min", "sym_not", "sym_float", "sym_int", "sym_ite", "sym_sum", "sym_sqrt")
       if hasattr(torch, n)},
    **{f"math.{n}": getattr(math, n) for n in ("ceil", "floor", "trunc", "sqrt")},
}
_SIZE_NAMES = {id(v): k for k, v in SIZE_FUNCTIONS.items()}
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_WEIGHT_PART = re.compile(r"[A-Za-z0-9_]+\Z")
_OP = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)::([A-Za-z_][A-Za-z0-9_]*)(?:\.([A-Za-z_][A-Za-z0-9_]*))?\Z")
_KINDS = {"placeholder", "get_attr", "call_function", "output"}
_META = ("nn_module_stack", "stack_trace")
_ENUMS = {"dtype": torch.dtype, "layout": torch.layout, "memory_format": torch.memory_format}


class GraphDataError(ValueError):
    """The data does not describe a graph this reader builds (or a graph cannot be written as data)."""


# ---------------------------------------------------------------------------------------------------------- writing

def target_name(target: Any) -> str:
    """The stored name of a call target: `ns::op.overload` for a `torch.ops` operator, else the size function's name."""
    if isinstance(target, torch._ops.OpOverload):
        schema = target._schema
        return schema.name + (f".{schema.overload_name}" if schema.overload_name else "")
    name = _SIZE_NAMES.get(id(target))
    if name is None:
        raise GraphDataError(f"{getattr(target, '__module__', '')}.{getattr(target, '__name__', target)} is not a "
                             "PyTorch operator: a saved graph calls operators of torch.ops (aten.gelu.default, not "
                             "torch.nn.functional.gelu) and the size functions torch.export leaves")
    return name


def _value(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if isinstance(value, tuple):
        return {"tuple": [_value(v, where) for v in value]}
    if isinstance(value, list):
        return [_value(v, where) for v in value]
    if isinstance(value, torch.device):
        return {"device": str(value)}
    for kind, cls in _ENUMS.items():
        if isinstance(value, cls):
            return {kind: str(value).removeprefix("torch.")}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": {k: _value(v, where) for k, v in value.items()}}
    raise GraphDataError(f"{where}: a {type(value).__name__} ({value!r:.60}) cannot be stored as data")


def _meta(node: fx.Node) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.meta.items():
        if key in _META or key.startswith("fxslice_"):
            try:
                out[key] = _value(value, key)
            except GraphDataError:
                continue  # bookkeeping that is not data (a module type, a tensor) is not kept
    return out


def _shape(node: fx.Node) -> dict[str, Any] | None:
    """A placeholder's shape (sizes or the names of symbolic sizes) and dtype, to rebuild its fake value."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return node.meta.get("value")  # as read, before fake values were given
    stored = node.meta.get("value")  # as read from a file: its example sizes stay those of the first capture
    hints = stored["hints"] if isinstance(stored, dict) and len(stored.get("hints") or ()) == val.dim() else \
        [getattr(getattr(s, "node", None), "hint", None) for s in val.shape]
    return {"shape": [int(s) if isinstance(s, int) else str(s) for s in val.shape],
            "dtype": str(val.dtype).removeprefix("torch."),
            "hints": [h if isinstance(h, int) and not isinstance(s, int) else None for h, s in zip(hints, val.shape,
                                                                                                   strict=True)]}


def graph_to_data(graph: fx.Graph) -> dict[str, Any]:
    """`graph` as JSON-ready data; a node that cannot be stored raises `GraphDataError` naming it."""
    nodes = []
    for node in graph.nodes:
        where = f"node '{node.name}'"
        if node.op not in _KINDS:
            raise GraphDataError(f"{where} is a {node.op}; a saved graph holds placeholders, get_attr, call_function "
                                 "and output nodes only")
        entry: dict[str, Any] = {"name": node.name, "op": node.op}
        if node.op == "call_function":
            try:
                entry["target"] = target_name(node.target)
            except GraphDataError as exc:
                raise GraphDataError(f"{where}: {exc}") from None
        elif node.op != "output":
            entry["target"] = str(node.target)
        if node.args:
            entry["args"] = [_value(a, where) for a in node.args]
        if node.kwargs:
            entry["kwargs"] = {k: _value(v, where) for k, v in node.kwargs.items()}
        meta = _meta(node)
        if meta:
            entry["meta"] = meta
        if node.op == "placeholder" and _shape(node) is not None:
            entry["value"] = _shape(node)
        nodes.append(entry)
    _number_symbols(nodes)
    return {"format": FORMAT, "nodes": nodes}


def _number_symbols(nodes: list[dict[str, Any]]) -> None:
    """Name the inputs' symbolic sizes s0, s1, ... in order of appearance: the tracer's own numbering depends on
    what it traced before, and the same graph should be written as the same bytes."""
    names: dict[str, str] = {}

    def rename(match: re.Match[str]) -> str:
        return names.setdefault(match.group(0), f"s{len(names)}")

    for entry in nodes:
        value = entry.get("value")
        if isinstance(value, dict) and isinstance(value.get("shape"), list):
            shape = [re.sub(r"\b[su]\d+\b", rename, s) if isinstance(s, str) else s for s in value["shape"]]
            entry["value"] = {**value, "shape": shape}


# ---------------------------------------------------------------------------------------------------------- reading

def resolve_target(name: Any, where: str) -> Any:
    """The callable a stored target names: a registered `torch.ops` operator overload or a size function."""
    if not isinstance(name, str):
        raise GraphDataError(f"{where}: the target must be a string, got {type(name).__name__}")
    if name in SIZE_FUNCTIONS:
        return SIZE_FUNCTIONS[name]
    match = _OP.match(name)
    if match is None:
        raise GraphDataError(f"{where}: '{name:.80}' is neither a PyTorch operator (namespace::name.overload) nor a "
                             "size function; only those can be read")
    namespace, op, overload = match.groups()
    try:
        packet = torch._C._jit_get_operation(f"{namespace}::{op}")[0]
    except RuntimeError:
        packet = None
    if packet is None:
        raise GraphDataError(f"{where}: the operator {namespace}::{op} is not registered in this process; if it is a "
                             "custom operator, import the library that defines it before loading")
    try:
        found = getattr(getattr(getattr(torch.ops, namespace), op), overload or "default")
    except (AttributeError, RuntimeError):
        raise GraphDataError(f"{where}: {namespace}::{op} has no overload '{overload}'") from None
    if not isinstance(found, torch._ops.OpOverload):
        raise GraphDataError(f"{where}: '{name}' does not name an operator overload")
    return found


def _read(value: Any, nodes: dict[str, fx.Node], where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_read(v, nodes, where) for v in value]
    if not (isinstance(value, dict) and len(value) == 1):
        raise GraphDataError(f"{where}: an argument is a value, a list or a one-key tagged mapping, got {value!r:.80}")
    (kind, inner), = value.items()
    if kind == "node":
        if inner not in nodes:
            raise GraphDataError(f"{where}: refers to '{inner!s:.60}', which is not an earlier node")
        return nodes[inner]
    if kind == "tuple" and isinstance(inner, list):
        return tuple(_read(v, nodes, where) for v in inner)
    if kind == "dict" and isinstance(inner, dict):
        return {str(k): _read(v, nodes, where) for k, v in inner.items()}
    if kind == "float" and inner in ("inf", "-inf", "nan"):
        return float(inner)
    if kind == "device" and isinstance(inner, str):
        try:
            return torch.device(inner)
        except RuntimeError:
            raise GraphDataError(f"{where}: '{inner:.40}' is not a device") from None
    if kind in _ENUMS and isinstance(inner, str) and _IDENTIFIER.match(inner):
        found = getattr(torch, inner, None)
        if isinstance(found, _ENUMS[kind]):
            return found
    raise GraphDataError(f"{where}: cannot read the argument {value!r:.80}")


def _check_shape(value: Any, where: str) -> dict[str, Any]:
    hints = value.get("hints") if isinstance(value, dict) else None
    ok = (isinstance(value, dict) and isinstance(value.get("shape"), list) and isinstance(value.get("dtype"), str)
          and all((isinstance(s, int) and not isinstance(s, bool) and s >= 0) or (isinstance(s, str) and len(s) < 64)
                  for s in value["shape"])
          and (hints is None or (isinstance(hints, list) and len(hints) == len(value["shape"]) and all(
              h is None or (isinstance(h, int) and not isinstance(h, bool) and 2 <= h < 2**31) for h in hints))))
    if not ok or not isinstance(getattr(torch, value["dtype"], None) if _IDENTIFIER.match(value["dtype"]) else None,
                                torch.dtype):
        raise GraphDataError(f"{where}: 'value' must be {{shape: [sizes or names], dtype: name}}, got {value!r:.80}")
    return value


def graph_from_data(data: Any) -> fx.Graph:
    """The graph `data` describes. Each node's stored placeholder value, if any, is left in `node.meta["value"]`."""
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("nodes"), list):
        raise GraphDataError(f"not a graph in the {FORMAT} format (a mapping with 'format' and a list 'nodes')")
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    outputs = 0
    for i, entry in enumerate(data["nodes"]):
        if not isinstance(entry, dict):
            raise GraphDataError(f"node {i}: a mapping is expected")
        name, op = entry.get("name"), entry.get("op")
        where = f"node {i} ('{name!s:.60}')"
        if not (isinstance(name, str) and _IDENTIFIER.match(name)) or name in nodes:
            raise GraphDataError(f"{where}: the name must be a new Python identifier")
        if op not in _KINDS:
            raise GraphDataError(f"{where}: op '{op!s:.40}' is not one of {', '.join(sorted(_KINDS))}")
        unknown = set(entry) - {"name", "op", "target", "args", "kwargs", "meta", "value"}
        if unknown:
            raise GraphDataError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        args = entry.get("args", [])
        kwargs = entry.get("kwargs", {})
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise GraphDataError(f"{where}: 'args' must be a list and 'kwargs' a mapping")
        args = tuple(_read(a, nodes, where) for a in args)
        kwargs = {str(k): _read(v, nodes, where) for k, v in kwargs.items()}
        target = entry.get("target")
        if op == "call_function":
            target = resolve_target(target, where)
        elif op == "get_attr":
            if not (isinstance(target, str) and all(_WEIGHT_PART.match(p) for p in target.split("."))):
                raise GraphDataError(f"{where}: a weight name is dotted letters, digits and underscores, got "
                                     f"{target!r:.80}")
        elif op == "placeholder":
            if not (isinstance(target, str) and _IDENTIFIER.match(target)) or args or kwargs:
                raise GraphDataError(f"{where}: an input is named by a Python identifier and takes no arguments")
        else:
            outputs += 1
            target = "output"
            if len(args) != 1 or kwargs:
                raise GraphDataError(f"{where}: the output takes one argument")
        node = graph.create_node(op, target, args, kwargs, name=name)
        meta = entry.get("meta", {})
        if not isinstance(meta, dict):
            raise GraphDataError(f"{where}: 'meta' must be a mapping")
        for key, value in meta.items():
            if key in _META or (isinstance(key, str) and key.startswith("fxslice_")):
                node.meta[key] = _read(value, {}, f"{where} meta '{key}'")
        if "nn_module_stack" in node.meta:
            stack = node.meta["nn_module_stack"]
            if not (isinstance(stack, dict) and all(isinstance(v, tuple) and len(v) == 2 for v in stack.values())):
                raise GraphDataError(f"{where}: meta 'nn_module_stack' maps names to (path, type) pairs")
        if "value" in entry:
            node.meta["value"] = _check_shape(entry["value"], where)
        nodes[name] = node
    if outputs != 1 or data["nodes"][-1].get("op") != "output":
        raise GraphDataError("a graph ends with exactly one output node")
    graph.lint()
    return graph
