"""Small graph utilities shared by the framework and by passes."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from fxslice.core.disk import DiskTensor

__all__ = [
    "aten",
    "CAST_OPS",
    "tensor_of",
    "set_tensor",
    "add_parameter",
    "add_buffer",
    "module_path",
    "retarget_float_casts",
    "converted",
    "erase_unused",
    "CHECK_OPS",
    "is_param",
    "infer_val",
    "refresh_vals",
    "propagate_fake_values",
    "insert_op",
    "owner_of",
    "input_names",
    "set_role",
    "role_of",
    "mutates",
    "drop_unused_weights",
    "retarget_device",
    "DEVICE_BOUND",
    "device_bound",
    "SCRATCH",
    "kept",
    "readers_of",
]

aten = torch.ops.aten

CAST_OPS = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.type_as.default}

#: `gm.meta` key of the `fxslice.core.disk.Scratch` folder a program whose weights stay on disk writes edits to
SCRATCH = "fxslice_scratch"

#: node meta key of an op whose operands are laid out for one device type (a packed low-bit weight): the graph
#: cannot move to another device or be saved device-free
DEVICE_BOUND = "fxslice_device_bound"


def device_bound(gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes whose operands only their device type can read (see `DEVICE_BOUND`)."""
    return [n for n in gm.graph.nodes if n.meta.get(DEVICE_BOUND)]


def tensor_of(gm: fx.GraphModule, node: Any) -> Any:
    """The tensor behind a `get_attr` node (or a fully qualified name)."""
    target = node.target if isinstance(node, fx.Node) else node
    obj: Any = gm
    for part in str(target).split("."):
        obj = getattr(obj, part)
    return obj


def readers_of(gm: fx.GraphModule, tensor: torch.Tensor) -> list[fx.Node]:
    """Every get_attr node that reads `tensor` itself, under any name: a tied table is read under two, and whatever
    edits or replaces it must see them all."""
    return [n for n in gm.graph.find_nodes(op="get_attr") if tensor_of(gm, n) is tensor]


def is_param(gm: fx.GraphModule, node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr" and isinstance(tensor_of(gm, node), torch.Tensor)


def owner_of(gm: fx.GraphModule, target: str) -> tuple[nn.Module, str]:
    """The module that holds the attribute `target` (a qualified name) and the attribute's own name."""
    owner_path, _, name = str(target).rpartition(".")
    return (gm.get_submodule(owner_path) if owner_path else gm), name


def input_names(gm: fx.GraphModule) -> list[str]:
    """The graph's inputs (placeholders) in order."""
    return [str(n.target) for n in gm.graph.find_nodes(op="placeholder")]


def set_role(node: fx.Node, role: str) -> None:
    """Record what a node is for (`fxslice.analysis.roles`) in its meta, where copies and analyses see it."""
    node.meta["fxslice_role"] = role


def role_of(node: fx.Node) -> str | None:
    return node.meta.get("fxslice_role")


#: node meta key of a `get_attr` whose tensor is a number written in the model's code as a float32 tensor
#: (`torch.tensor(0.95, dtype=torch.float32)`, Gemma-3n's activation sparsity): the shortest decimal that rounds to it
FLOAT_LITERAL = "fxslice_float_literal"


def float32_literal(value: float) -> float:
    """The shortest decimal that rounds to `value` in float32: the number as the code most likely wrote it."""
    return float(np.format_float_positional(np.float32(value), unique=True))


def set_tensor(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    """Replace the parameter or buffer at `target`, keeping its kind (parameter vs buffer) and its device (a pass
    may compute the new value on the device an offloaded program computes on). A program whose weights are kept on
    disk (`SCRATCH` in `gm.meta`) gets the new value written to its scratch folder, not held in memory."""
    owner, name = owner_of(gm, target)
    old = getattr(owner, name, None)
    if isinstance(old, torch.Tensor) and isinstance(value, torch.Tensor) and old.device.type != "meta":
        value = value.to(old.device)
    value = kept(gm, value)
    if name in owner._parameters:
        owner._parameters[name] = nn.Parameter(value.detach(), requires_grad=False)
    elif name in owner._buffers:
        owner._buffers[name] = value.detach()
    else:
        setattr(owner, name, value.detach())


def kept(gm: fx.GraphModule, value: Any) -> Any:
    """`value` as `gm` keeps its weights: written to its scratch folder when it has one (see `set_tensor`), else
    itself."""
    scratch = gm.meta.get(SCRATCH)
    return value if scratch is None else scratch.keep(value)


def add_parameter(gm: fx.GraphModule, stem: str, value: torch.Tensor) -> str:
    """Register a new parameter under `fxslice.<stem>_<n>`, where the other weights are kept, and return its target."""
    home = next((p.device for p in gm.parameters()), None)
    if home is not None:
        value = value.to(home)
    holder, name = _new_slot(gm, stem)
    holder.register_parameter(name, nn.Parameter(kept(gm, value).detach(), requires_grad=False))
    return f"fxslice.{name}"


def add_buffer(gm: fx.GraphModule, stem: str, value: torch.Tensor) -> str:
    """Register `value` as a new buffer under `fxslice.<stem>_<n>`, on its own device (a layout packed for one
    device's kernel), and return its target."""
    holder, name = _new_slot(gm, stem)
    holder.register_buffer(name, value)
    return f"fxslice.{name}"


def _new_slot(gm: fx.GraphModule, stem: str) -> tuple[nn.Module, str]:
    """The module holding what passes add, and the first free `<stem>_<n>` in it."""
    if not hasattr(gm, "fxslice"):
        gm.add_module("fxslice", nn.Module())
    holder = gm.get_submodule("fxslice")
    n = 0
    while hasattr(holder, f"{stem}_{n}"):
        n += 1
    return holder, f"{stem}_{n}"


def module_path(node: fx.Node) -> str:
    """The innermost module path recorded by torch.export ('' at the top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


#: ops whose precision a model protects by computing them in float32 (a norm's variance, the rotary angles, softmax)
_PRECISE_OPS = {aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor, aten.mean.dim, aten.mean.default, aten.var.correction,
                aten.var_mean.correction, aten.rsqrt.default, aten.sqrt.default, aten.cos.default, aten.sin.default,
                aten.exp.default, aten.log.default, aten._softmax.default, aten.softmax.int, aten._log_softmax.default,
                aten.log_softmax.int}


def float32_islands(gm: fx.GraphModule, hops: int = 3) -> set[fx.Node]:
    """The nodes that ask for float32 (a cast, or an op given `dtype=float32`) to protect an op of `_PRECISE_OPS`
    within `hops` users, no other cast between: where a model computes in float32 whatever its own dtype. In a float32
    capture a cast into such an island and the cast back are both no-ops, told apart only by what follows them."""
    def protects(node: fx.Node) -> bool:
        frontier, seen = [node], set()
        for _ in range(hops + 1):
            following = []
            for n in frontier:
                if n in seen or n.op != "call_function":
                    continue
                seen.add(n)
                if n.target in _PRECISE_OPS:
                    return True
                if n is node or n.target not in CAST_OPS:
                    following.extend(n.users)
            frontier = following
        return False

    return {n for n in gm.graph.nodes if n.op == "call_function"
            and (torch.float32 in n.args or n.kwargs.get("dtype") is torch.float32) and protects(n)}


def converted(t: torch.Tensor, dtype: torch.dtype, *, copy: bool = False) -> torch.Tensor:
    """`t` in `dtype` (a copy when `copy`, or when the dtype differs); a parameter stays a frozen parameter."""
    value = t.detach().to(dtype, copy=copy)
    return nn.Parameter(value, requires_grad=False) if isinstance(t, nn.Parameter) else value


def retarget_float_casts(gm: fx.GraphModule, dtype: torch.dtype) -> None:
    """Convert floating weights to `dtype` and make every float cast, float factory and op told to compute in a float
    dtype produce `dtype` — except, below float32, the model's own float32 islands (`float32_islands`), which stay, as
    they do when the model is captured in that dtype."""
    islands = float32_islands(gm) if dtype.itemsize < 4 else set()
    for module in gm.modules():
        for store in (module._parameters, module._buffers):
            for name, t in list(store.items()):
                if t is not None and t.is_floating_point():
                    store[name] = converted(t, dtype)
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node in islands:
            continue
        if node.target == aten._assert_tensor_metadata.default:  # would assert the old dtype
            gm.graph.erase_node(node)
            continue
        if dtype.itemsize < 4:  # a literal beyond the dtype's range (a mask's float32 min)
            node.args = tuple(_within(a, dtype) for a in node.args)
        if node.target == aten.type_as.default and node.args[1] in islands:  # back from an island: to `dtype`
            node.target, node.args = aten.to.dtype, (node.args[0], dtype)
        if node.target in CAST_OPS:
            node.args = tuple(_retargeted(a, dtype) for a in node.args)
        # ops that compute in a dtype they are given (softmax(x, dim, torch.float32), sum(..., dtype=)): float islands
        schema = getattr(node.target, "_schema", None)
        names = [a.name for a in schema.arguments] if schema is not None else []
        node.args = tuple(_retargeted(a, dtype) if i < len(names) and names[i] == "dtype" else a
                          for i, a in enumerate(node.args))
        if isinstance(node.kwargs.get("dtype"), torch.dtype):
            node.kwargs = {**node.kwargs, "dtype": _retargeted(node.kwargs["dtype"], dtype)}
    for node in gm.graph.find_nodes(op="placeholder"):  # float inputs (a KV cache) come in `dtype` too
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.is_floating_point() and getattr(val, "fake_mode", None) is not None:
            with val.fake_mode:
                node.meta["val"] = val.to(dtype)
    for node in gm.graph.nodes:  # a number the model's code wrote as a float32 tensor: the number, not its rounding
        literal = node.meta.get(FLOAT_LITERAL)
        if node.op == "get_attr" and literal is not None and torch.finfo(dtype).bits > 32:
            set_tensor(gm, str(node.target), torch.full_like(tensor_of(gm, node), literal))
    refresh_vals(gm)
    gm.recompile()


def retarget_device(gm: fx.GraphModule, device: torch.device, weights: bool = True) -> None:
    """Move every parameter and buffer to `device` (unless `weights` is False), and make every op that names a
    device (factory ops such as `arange` and `full`, device casts, metadata asserts) name `device` instead of the
    one it was captured on."""
    for module in gm.modules() if weights else ():
        for store in (module._parameters, module._buffers):
            for name, t in list(store.items()):
                if t is not None and t.device != device:
                    moved = t.detach().to(device)
                    store[name] = nn.Parameter(moved, requires_grad=False) if isinstance(t, nn.Parameter) else moved
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        node.args = tuple(device if isinstance(a, torch.device) else a for a in node.args)
        if isinstance(node.kwargs.get("device"), (torch.device, str)):
            node.kwargs = {**node.kwargs, "device": device}
    gm.recompile()


def refresh_vals(gm: fx.GraphModule, only: Iterable[fx.Node] | None = None) -> None:
    """Recompute the fake `val` of every node, or of the nodes in `only` (after weights changed dtype or shape)."""
    subset = None if only is None else set(only)
    _refresh_vals(gm, [n for n in gm.graph.nodes if subset is None or n in subset])


def _refresh_vals(gm: fx.GraphModule, nodes: list[fx.Node]) -> None:
    for node in nodes:
        if node.op == "get_attr":
            value = tensor_of(gm, node)
            old = node.meta.get("val")
            if isinstance(value, torch.Tensor) and isinstance(old, torch.Tensor):
                mode = getattr(old, "fake_mode", None)
                node.meta["val"] = _fake(mode, value, old.device) if mode is not None else value
        elif node.op == "call_function" and (_has_tensor(node.meta.get("val")) or "val" not in node.meta):
            try:
                infer_val(node)
            except Exception:  # noqa: BLE001 - some meta kernels reject symbolic sizes; keep the old value
                pass


def propagate_fake_values(gm: fx.GraphModule, inputs: dict[str, dict[str, Any]]) -> None:
    """Give every node a fake `val`, as capture does, from the inputs' shapes alone: `inputs` maps each placeholder
    to `{"shape": [...], "dtype": name, "hints": [...]}`, a size given by name being symbolic (one name, one size;
    `hints`, optional, the capture's example sizes) — what a graph read from data needs before passes can reason
    about it. Raises ValueError naming a node whose op fails."""
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    mode = FakeTensorMode(shape_env=ShapeEnv())
    hints: dict[str, int] = {}  # one example size per name, distinct, so that duck sizing keeps names apart

    def hint(name: str, stored: int | None) -> int:
        if name not in hints:  # the capture's own example size where known: older torch specialises on it
            used = set(hints.values())
            hints[name] = stored if stored is not None and stored not in used else \
                next(h for h in range(2 + 5 * len(hints), 2**31) if h not in used)
        return hints[name]

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            spec = inputs.get(node.name)
            if spec is None:
                raise ValueError(f"input '{node.name}' has no stored shape")
            stored = spec.get("hints") or [None] * len(spec["shape"])
            sizes = [s if isinstance(s, int) else hint(s, h) for s, h in zip(spec["shape"], stored, strict=True)]
            dynamic = [DimDynamic.STATIC if isinstance(s, int) else DimDynamic.DYNAMIC for s in spec["shape"]]
            real = torch.zeros(sizes, dtype=getattr(torch, spec["dtype"]))
            node.meta["val"] = mode.from_tensor(real, source=ConstantSource(node.name),
                                                symbolic_context=StatelessSymbolicContext(dynamic_sizes=dynamic))
        elif node.op == "get_attr":
            value = tensor_of(gm, node)
            if isinstance(value, torch.Tensor):
                node.meta["val"] = _fake(mode, value, value.device)
        elif node.op == "call_function":
            try:
                infer_val(node)
            except Exception as exc:  # noqa: BLE001 - any failure means the graph does not compute
                raise ValueError(f"node '{node.name}' ({node.target}) fails on its inputs' shapes: "
                                 f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


def _within(value: Any, dtype: torch.dtype) -> Any:
    """A float literal clamped to `dtype`'s finite range (finfo(float32).min overflows bfloat16)."""
    if isinstance(value, float) and math.isfinite(value):
        limit = torch.finfo(dtype).max
        return max(-limit, min(limit, value))
    return value


def _is_float_dtype(value: Any) -> bool:
    return isinstance(value, torch.dtype) and value.is_floating_point


def _retargeted(value: Any, dtype: torch.dtype) -> Any:
    """`dtype` for a float dtype, its complex counterpart for a complex one (Llama-4's and DeepSeek-V2's rotary tables
    are complex: a complex64 cast left in a float64 program is a float32 island), anything else unchanged."""
    if _is_float_dtype(value):
        return dtype
    if isinstance(value, torch.dtype) and value.is_complex:
        return torch.complex128 if dtype == torch.float64 else torch.complex64
    return value


def _has_tensor(val: Any) -> bool:
    if isinstance(val, (list, tuple)):
        return any(isinstance(v, torch.Tensor) for v in val)
    return isinstance(val, torch.Tensor)


def mutates(node: fx.Node) -> bool:
    """Whether `node` writes into one of its inputs (`add_`, `index_copy_`, `copy_` ...)."""
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and any(
        a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)


def drop_unused_weights(gm: fx.GraphModule) -> int:
    """Unregister parameters and buffers no `get_attr` reads any more (a replaced table's old value, say),
    so that a compiled program does not keep dead weights in memory. Returns how many went."""
    used = {str(n.target) for n in gm.graph.find_nodes(op="get_attr")}
    dropped = 0
    for name in [n for n, _ in gm.named_parameters(remove_duplicate=False)] + [n for n, _ in gm.named_buffers(remove_duplicate=False)]:
        if name not in used:
            owner, attr = owner_of(gm, name)
            owner._parameters.pop(attr, None)
            owner._buffers.pop(attr, None)
            dropped += 1
    return dropped


#: ops that only check their inputs (their output is unused by design): dead when what they check is dead
CHECK_OPS = {aten._assert_tensor_metadata.default, aten._assert_scalar.default, aten._assert_async.msg,
             aten.sym_constrain_range_for_size.default}


def _pure(node: fx.Node) -> bool:
    """Whether `node` can go when nothing reads it: it computes a value and writes nothing (a random or
    nondeterministic op such as SDPA counts as pure here: an inference graph does not keep its state)."""
    if node.op == "get_attr":
        return True
    if node.op != "call_function" or mutates(node):
        return False
    target = node.target
    return isinstance(target, torch._ops.OpOverload) or getattr(target, "__module__", "") in ("_operator", "operator") \
        or target in (torch.sym_max, torch.sym_min, torch.sym_not, torch.sym_float, torch.sym_int, torch.sym_sqrt)


def _unread_input_writes(placeholder: fx.Node) -> list[fx.Node]:
    """The in-place writes into `placeholder` (a KV cache's `index_copy_`) when nothing else alive reads it: no one
    uses their results and its other readers only ask for its sizes. Empty otherwise."""
    writes = [u for u in placeholder.users if mutates(u) and u.args and u.args[0] is placeholder]
    others = [u for u in placeholder.users if u not in writes]
    if not writes or any(w.users for w in writes) or any(u.target is not aten.sym_size.int for u in others):
        return []
    return writes


def erase_unused(gm: fx.GraphModule) -> int:
    """Dead-code elimination that knows which ops are pure; returns how many nodes went.

    Unlike torch.fx's, it removes unused nondeterministic ops (SDPA), checks (`_assert_tensor_metadata`) of values
    nothing else reads, and the in-place writes into a graph input (a KV cache) that nothing alive reads any more:
    a dropped layer's attention takes its cache updates with it. Placeholders always stay."""
    graph = gm.graph
    before = len(graph.nodes)
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph.nodes)):
            if node.op in ("placeholder", "output") or node.target in CHECK_OPS:
                continue
            if _pure(node) and all(u.op == "call_function" and u.target in CHECK_OPS for u in node.users):
                for check in list(node.users):
                    graph.erase_node(check)
                graph.erase_node(node)
                changed = True
        for placeholder in graph.find_nodes(op="placeholder"):
            for write in _unread_input_writes(placeholder):
                graph.erase_node(write)
                changed = True
    return before - len(graph.nodes)


def _fake(mode: Any, value: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`value` as a fake tensor of `mode`; a weight of shape only (`Program.skeleton`) stands for one on `device`, and
    one kept on disk is not read for it."""
    if value.device.type != "meta" and not isinstance(value, DiskTensor):
        return mode.from_tensor(value, static_shapes=True)
    with mode:
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=device)


def infer_val(node: fx.Node) -> None:
    """Fill `node.meta["val"]` by running its op on the fake values of its inputs (symbolic shapes kept)."""
    from torch._guards import detect_fake_mode

    vals = [n.meta.get("val") for n in node.all_input_nodes]
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    if mode is None:  # inputs are weights with real values: use the graph's own fake mode
        inputs = [n for n in node.graph.nodes if n.op == "placeholder"]
        mode = detect_fake_mode([n.meta.get("val") for n in inputs if isinstance(n.meta.get("val"), torch.Tensor)])
    if mode is None:
        return

    fakes = [*vals, *(n.meta.get("val") for n in node.graph.find_nodes(op="placeholder"))]
    device = next((v.device for v in fakes if isinstance(v, torch._subclasses.FakeTensor)), torch.device("cpu"))

    def fake(n: fx.Node) -> Any:
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor) and not isinstance(v, torch._subclasses.FakeTensor):
            v = _fake(mode, v, device)
        return v

    args, kwargs = fx.node.map_arg((node.args, node.kwargs), fake)
    with mode, _quiet_fake_tensor_log():
        try:
            node.meta["val"] = node.target(*args, **kwargs)
        except RuntimeError:
            # before torch 2.13, composite ops (aten.linear) reach a C++ kernel that asks a symbolic size for a
            # number; the Python dispatcher runs their symbolic decompositions instead, as torch.export does
            from torch._dispatch.python import enable_python_dispatcher

            with enable_python_dispatcher():
                node.meta["val"] = node.target(*args, **kwargs)


@contextlib.contextmanager
def _quiet_fake_tensor_log() -> Iterator[None]:
    """Failed fake-tensor runs are expected here (callers fall back); keep torch from logging them."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def insert_op(graph: fx.Graph, target: Any, args: tuple, kwargs: dict | None = None, *, like: fx.Node | None = None) -> fx.Node:
    """Create a call_function node (at the current insertion point) with inferred `val` and `like`'s module stack."""
    node = graph.call_function(target, args, kwargs or {})
    if like is not None:
        for key in ("nn_module_stack", "stack_trace"):
            if key in like.meta:
                node.meta[key] = like.meta[key]
    try:
        infer_val(node)
    except Exception:  # noqa: BLE001 - inputs not refreshed yet; refresh_vals fills it in
        pass
    return node
