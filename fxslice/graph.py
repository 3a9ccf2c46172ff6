"""Small graph utilities shared by the framework and by passes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn

__all__ = [
    "aten",
    "tensor_of",
    "set_tensor",
    "add_parameter",
    "module_path",
    "float_dtype_of",
    "retarget_float_casts",
    "erase_unused",
    "users_of",
    "is_param",
]

aten = torch.ops.aten

_CAST_OPS = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.type_as.default}


def tensor_of(gm: fx.GraphModule, node: Any) -> Any:
    """The tensor behind a `get_attr` node (or a fully qualified name)."""
    target = node.target if isinstance(node, fx.Node) else node
    obj: Any = gm
    for part in str(target).split("."):
        obj = getattr(obj, part)
    return obj


def is_param(gm: fx.GraphModule, node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr" and isinstance(tensor_of(gm, node), torch.Tensor)


def set_tensor(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    """Replace the parameter or buffer at `target`, keeping its kind (parameter vs buffer)."""
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    if name in owner._parameters:
        owner._parameters[name] = nn.Parameter(value.detach(), requires_grad=False)
    elif name in owner._buffers:
        owner._buffers[name] = value.detach()
    else:
        setattr(owner, name, value.detach())


def add_parameter(gm: fx.GraphModule, stem: str, value: torch.Tensor) -> str:
    """Register a new parameter under `fxslice.<stem>_<n>` and return its target."""
    if not hasattr(gm, "fxslice"):
        gm.add_module("fxslice", nn.Module())
    holder = gm.get_submodule("fxslice")
    n = 0
    while hasattr(holder, f"{stem}_{n}"):
        n += 1
    holder.register_parameter(f"{stem}_{n}", nn.Parameter(value.detach(), requires_grad=False))
    return f"fxslice.{stem}_{n}"


def module_path(node: fx.Node) -> str:
    """The innermost module path recorded by torch.export ('' at the top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


def float_dtype_of(node: fx.Node) -> torch.dtype | None:
    val = node.meta.get("val")
    return val.dtype if isinstance(val, torch.Tensor) and val.is_floating_point() else None


def retarget_float_casts(gm: fx.GraphModule, dtype: torch.dtype) -> None:
    """Convert floating weights to `dtype` and make every float cast or float factory produce `dtype`."""
    for module in gm.modules():
        for store in (module._parameters, module._buffers):
            for name, t in list(store.items()):
                if t is not None and t.is_floating_point():
                    converted = t.detach().to(dtype)
                    store[name] = nn.Parameter(converted, requires_grad=False) if isinstance(t, nn.Parameter) else converted
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _CAST_OPS:
            node.args = tuple(dtype if _is_float_dtype(a) else a for a in node.args)
        if _is_float_dtype(node.kwargs.get("dtype")):
            node.kwargs = {**node.kwargs, "dtype": dtype}
    gm.recompile()


def _is_float_dtype(value: Any) -> bool:
    return isinstance(value, torch.dtype) and value.is_floating_point


def users_of(nodes: Iterable[fx.Node]) -> list[fx.Node]:
    return [u for n in nodes for u in n.users]


def erase_unused(gm: fx.GraphModule) -> int:
    """Dead-code elimination (placeholders and in-place ops stay); returns how many nodes went."""
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    return before - len(gm.graph.nodes)
