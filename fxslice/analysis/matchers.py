"""Matchers: small functions that recognise linear-like ops, embeddings and norms in an ATen graph.

Each returns a frozen dataclass describing what it found, or None. Matching never edits the graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from fxslice.core.graph import CAST_OPS, aten, is_param

__all__ = [
    "LinearUse",
    "NormMatch",
    "match_linear",
    "match_embedding",
    "match_norm",
    "match_norms",
    "CAST_OPS",
    "value_of",
    "WEIGHT_VIEWS",
]

#: how a linear may read its weight on the way: a transposed view of the parameter
WEIGHT_VIEWS = {aten.t.default, aten.transpose.int, aten.permute.default, aten.numpy_T.default}
_MATMULS = {aten.mm.default, aten.matmul.default, aten.bmm.default}


def _grouped_mm_ops() -> set[Any]:
    """transformers' MoE kernels (x @ W[e] per expert group), when transformers registered them."""
    ns = getattr(torch.ops, "transformers", None)
    ops = set()
    for name in ("grouped_mm_fallback",):
        try:
            ops.add(getattr(ns, name).default)
        except (AttributeError, RuntimeError):
            pass
    return ops


def value_of(node: Any) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


@dataclass(frozen=True)
class LinearUse:
    """`output = input @ A (+ bias)` where A is the weight parameter seen along (in_axis, out_axis).

    `weight` is the get_attr node; the axes index the *parameter* (for nn.Linear, out x in: in_axis=-1,
    out_axis=-2; for Conv1D/addmm, in x out). Other axes (MoE experts) are batch axes.
    """

    node: fx.Node
    input: fx.Node
    weight: fx.Node
    in_axis: int
    out_axis: int
    bias: fx.Node | None
    output: fx.Node  # the node carrying the result: `node`, or a following `add` of a bias parameter

    @property
    def has_bias_slot(self) -> bool:
        return self.bias is not None or self.node.target == aten.linear.default


def _weight_axes(gm: fx.GraphModule, view: Any) -> tuple[fx.Node, int, int] | None:
    """Follow transposes from the operand `view` back to a parameter; map operand axes (-2, -1) to its axes."""
    axes: list[int] | None = None
    node = view
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in WEIGHT_VIEWS:
        ndim = value_of(node.args[0]).dim()
        if node.target == aten.permute.default:
            perm = [d % ndim for d in node.args[1]]
        else:
            perm = list(range(ndim))
            if node.target == aten.transpose.int:
                a, b = node.args[1] % ndim, node.args[2] % ndim
            else:
                a, b = ndim - 2, ndim - 1
            perm[a], perm[b] = perm[b], perm[a]
        axes = [perm[d] for d in axes] if axes is not None else perm
        node = node.args[0]
    if not is_param(gm, node):
        return None
    ndim = value_of(node).dim() if value_of(node) is not None else 2
    axes = axes if axes is not None else list(range(ndim))
    return node, axes[-2] - ndim, axes[-1] - ndim


def _bias_add(gm: fx.GraphModule, node: fx.Node, out_features: int) -> fx.Node | None:
    """An `add(node, b)` right after a bias-less matmul, with `b` a parameter of shape [out]."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if user.target != aten.add.Tensor or len(user.args) != 2:
        return None
    other = user.args[1] if user.args[0] is node else user.args[0]
    val = value_of(other)
    if is_param(gm, other) and val is not None and tuple(val.shape) == (out_features,):
        return user
    return None


def match_linear(gm: fx.GraphModule, node: fx.Node) -> LinearUse | None:
    """aten.linear, addmm/mm/matmul with a parameter operand, and transformers' grouped expert matmul."""
    if node.op != "call_function":
        return None
    if node.target == aten.linear.default and is_param(gm, node.args[1]):
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        bias_add = _bias_add(gm, node, value_of(node.args[1]).shape[0]) if bias is None else None
        if bias_add is not None:  # a bias kept as its own parameter and added after (GPT-NeoX-Japanese)
            other = bias_add.args[1] if bias_add.args[0] is node else bias_add.args[0]
            return LinearUse(node, node.args[0], node.args[1], -1, -2, other, bias_add)
        return LinearUse(node, node.args[0], node.args[1], -1, -2, bias, node)
    if node.target == aten.addmm.default:
        found = _weight_axes(gm, node.args[2])
        if found and is_param(gm, node.args[0]):
            return LinearUse(node, node.args[1], found[0], found[1], found[2], node.args[0], node)
        return None
    if node.target in _MATMULS or node.target in _grouped_mm_ops():
        found = _weight_axes(gm, node.args[1])
        if not found or not isinstance(node.args[0], fx.Node):
            return None
        weight, in_axis, out_axis = found
        out_features = value_of(weight).shape[out_axis]
        bias_add = _bias_add(gm, node, out_features)
        if bias_add is not None:
            bias = bias_add.args[1] if bias_add.args[0] is node else bias_add.args[0]
            return LinearUse(node, node.args[0], weight, in_axis, out_axis, bias, bias_add)
        return LinearUse(node, node.args[0], weight, in_axis, out_axis, None, node)
    return None


def match_embedding(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The table's get_attr node if `node` is an embedding lookup into a parameter."""
    if node.op == "call_function" and node.target == aten.embedding.default and is_param(gm, node.args[0]):
        return node.args[0]
    return None


@dataclass(frozen=True)
class NormMatch:
    """A normalisation over the last dimension, with its affine part.

    `normalized` is the value before the affine part (what remains after fusion); `output` is the
    value after it. `weight_offset` is 1.0 for Gemma's `x * (1 + w)`. `width` is the number the sum
    of squares is divided by (the original width, also after slicing).
    """

    kind: str  # "layer_norm" (centres), "rms_norm" (aten op), "rms" (decomposed)
    input: fx.Node
    normalized: fx.Node
    output: fx.Node
    eps: float
    width: int
    weight: fx.Node | None
    weight_offset: float
    bias: fx.Node | None
    centres: bool
    nodes: frozenset[fx.Node]

    @property
    def has_affine(self) -> bool:
        """A scale or a shift after normalising; casts between `normalized` and `output` (a half-precision
        model's norm computes in float32 and casts back) are not one."""
        return self.weight is not None or self.bias is not None

    @property
    def is_plain_rms(self) -> bool:
        """A weightless, non-centring RMSNorm in decomposed form that divides by an explicit width: what
        fusion leaves behind, and what a change of basis (even to fewer dimensions) keeps exact."""
        return (self.kind == "rms" and not self.centres and not self.has_affine
                and not any(n.target == aten.mean.dim for n in self.nodes))


def _skip_casts_back(node: Any) -> Any:
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in CAST_OPS:
        node = node.args[0]
    return node


def _single_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _match_affine(gm: fx.GraphModule, normalized: fx.Node, width: int) -> tuple[fx.Node, fx.Node | None, float, fx.Node | None, set]:
    """Follow `normalized` through casts, `* w` (or `* (1 + w)`) and `+ b`; returns (output, w, offset, b, nodes)."""
    nodes: set[fx.Node] = set()
    out = normalized
    while (u := _single_user(out)) is not None and u.target in CAST_OPS:
        nodes.add(u)
        out = u
    weight, offset, bias = None, 0.0, None
    u = _single_user(out)
    if u is not None and u.target == aten.mul.Tensor and len(u.args) == 2:
        other = u.args[1] if u.args[0] is out else u.args[0]
        scale_nodes = set()
        base = other
        if isinstance(base, fx.Node) and base.target == aten.add.Tensor and isinstance(base.args[1], (int, float)):
            offset, scale_nodes = float(base.args[1]), {base}
            base = base.args[0]
        while isinstance(base, fx.Node) and base.target in CAST_OPS:
            scale_nodes.add(base)
            base = base.args[0]
        val = value_of(base)
        if is_param(gm, base) and val is not None and tuple(val.shape) == (width,):
            weight, out = base, u
            nodes |= scale_nodes | {u}
        else:
            offset = 0.0
    u = _single_user(out)
    while u is not None and u.target in CAST_OPS:
        nodes.add(u)
        out = u
        u = _single_user(out)
    if u is not None and u.target == aten.add.Tensor and len(u.args) == 2:
        other = u.args[1] if u.args[0] is out else u.args[0]
        val = value_of(other)
        if is_param(gm, other) and val is not None and tuple(val.shape) == (width,):
            bias, out = other, u
            nodes.add(u)
    return out, weight, offset, bias, nodes


def _same_value(a: object, b: object) -> bool:
    """The same node, or two nodes computing the same op on the same inputs (code that repeats `x - mean`)."""
    if a is b:
        return True
    return (isinstance(a, fx.Node) and isinstance(b, fx.Node) and a.op == b.op == "call_function"
            and a.target == b.target and a.args == b.args and a.kwargs == b.kwargs)


def _centred(node: fx.Node) -> bool:
    """`x0 - mean(x0, -1, keepdim=True)`."""
    if node.op != "call_function" or node.target != aten.sub.Tensor or len(node.args) != 2:
        return False
    x0, mean = node.args
    return (isinstance(mean, fx.Node) and mean.target == aten.mean.dim and mean.args[0] is x0
            and list(mean.args[1]) in ([-1], [value_of(x0).dim() - 1])
            and bool(mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)))


#: inverse roots, applied by multiplying: rsqrt(v), v ** -0.5
_INVERSE_ROOTS = (aten.rsqrt.default,)
#: roots, applied by dividing: sqrt(v), v ** 0.5
_ROOTS = (aten.sqrt.default,)


def _root_kind(node: fx.Node) -> Any:
    """aten.mul.Tensor for an inverse root (x * rsqrt(v)), aten.div.Tensor for a root (x / sqrt(v)), else None."""
    if node.target in _INVERSE_ROOTS or (node.target == aten.pow.Tensor_Scalar and node.args[1] == -0.5):
        return aten.mul.Tensor
    if node.target in _ROOTS or (node.target == aten.pow.Tensor_Scalar and node.args[1] == 0.5):
        return aten.div.Tensor
    return None


def _match_decomposed_rms(gm: fx.GraphModule, rsqrt: fx.Node) -> NormMatch | None:
    """x * rsqrt(mean(x^2, -1, keepdim) + eps) or x / sqrt(...), or sum(x^2)/D; squares by pow, square or x*x;
    casts allowed; the roots may be spelled pow(., ±0.5) (Gemma-4). The table of spellings: docs, "Norms"."""
    apply = _root_kind(rsqrt)
    add = rsqrt.args[0]
    if not (isinstance(add, fx.Node) and add.target == aten.add.Tensor and isinstance(add.args[1], (int, float))):
        return None
    eps, reduce = float(add.args[1]), add.args[0]
    inner = []
    if isinstance(reduce, fx.Node) and reduce.target in (aten.div.Tensor, aten.mul.Tensor) and isinstance(reduce.args[1], (int, float)):
        scale = reduce.args[1]
        inner.append(reduce)
        reduce = reduce.args[0]
        if reduce.target != aten.sum.dim_IntList:
            return None
        divisor = scale if inner[0].target == aten.div.Tensor else 1.0 / scale
        width = int(round(divisor))
    elif isinstance(reduce, fx.Node) and reduce.target == aten.mean.dim:
        width = None
    else:
        return None
    dims, keepdim = reduce.args[1], (reduce.args[2] if len(reduce.args) > 2 else reduce.kwargs.get("keepdim", False))
    square = reduce.args[0]
    if list(dims) not in ([-1], [value_of(square).dim() - 1]) or not keepdim:
        return None
    if square.target == aten.pow.Tensor_Scalar and square.args[1] == 2:
        x = square.args[0]
    elif square.target == aten.square.default:
        x = square.args[0]
    elif square.target == aten.mul.Tensor and _same_value(square.args[0], square.args[1]):
        x = square.args[0]
    else:
        return None
    # `x * rsqrt(...)` or `x / sqrt(...)`, where a hand-written LayerNorm may compute `x` (= x0 - mean(x0)) again
    if apply == aten.mul.Tensor:
        scaled = [u for u in rsqrt.users if u.target == apply and any(_same_value(a, x) for a in u.args)]
    else:
        scaled = [u for u in rsqrt.users if u.target == apply and _same_value(u.args[0], x) and u.args[1] is rsqrt]
    if len(rsqrt.users) != 1 or len(scaled) != 1:
        return None
    normalized = scaled[0]
    width = width or value_of(x).shape[-1]
    twins = {a for a in normalized.args if isinstance(a, fx.Node) and a is not x and _same_value(a, x)}
    internal = {square, reduce, *inner, add, rsqrt, normalized, *twins}
    source, centres = x, False
    if _centred(source):  # x0 - mean(x0): a LayerNorm without bias written by hand (Cohere)
        if any(not set(t.users) <= internal for t in {source, *twins}):
            return None
        internal |= {source, *twins, source.args[1]}
        source, centres = source.args[0], True
    while source.op == "call_function" and source.target in CAST_OPS and set(source.users) <= internal:
        internal.add(source)
        source = source.args[0]
    output, weight, offset, bias, affine = _match_affine(gm, normalized, value_of(x).shape[-1])
    return NormMatch("rms", source, normalized, output, eps, width, weight, offset, bias, centres,
                     frozenset(internal | affine))


def _parameter_argument(gm: fx.GraphModule, arg: object) -> tuple[fx.Node | None, float] | None:
    """A norm's scale or shift argument as (parameter, offset): the parameter itself, or `parameter + c` (Nemotron's
    LayerNorm1P passes `weight + 1`), casts allowed; (None, 0) for no argument; None when it is computed from
    anything else (then the node is not a norm fxslice can fuse, and the analysis says so)."""
    if arg is None:
        return None, 0.0
    base, offset = arg, 0.0
    while isinstance(base, fx.Node) and base.target in CAST_OPS:
        base = base.args[0]
    if isinstance(base, fx.Node) and base.target == aten.add.Tensor and isinstance(base.args[1], (int, float)):
        base, offset = base.args[0], float(base.args[1])
        while isinstance(base, fx.Node) and base.target in CAST_OPS:
            base = base.args[0]
    return (base, offset) if isinstance(base, fx.Node) and is_param(gm, base) else None


def match_norm(gm: fx.GraphModule, node: fx.Node) -> NormMatch | None:
    """A norm anchored at `node`: aten.layer_norm, aten.rms_norm, or the inverse root of a decomposed RMSNorm."""
    if node.op != "call_function":
        return None
    if node.target == aten.layer_norm.default:
        x, shape = node.args[0], node.args[1]
        scale = _parameter_argument(gm, node.args[2] if len(node.args) > 2 else None)
        shift = _parameter_argument(gm, node.args[3] if len(node.args) > 3 else None)
        eps = node.args[4] if len(node.args) > 4 else 1e-5
        if len(shape) != 1 or scale is None or shift is None or shift[1] != 0.0:
            return None
        (w, w_off), b = scale, shift[0]
        output, w2, off, b2, affine = _match_affine(gm, node, shape[0])
        if (w is not None and w2 is not None) or (b is not None and b2 is not None):
            output, w2, off, b2, affine = node, None, 0.0, None, set()
        return NormMatch("layer_norm", x, node, output, float(eps), shape[0], w if w is not None else w2,
                         off if w is None else w_off, b if b is not None else b2, True, frozenset({node, *affine}))
    if node.target == aten.rms_norm.default:
        x, shape = node.args[0], node.args[1]
        scale = _parameter_argument(gm, node.args[2] if len(node.args) > 2 else None)
        eps = node.args[3] if len(node.args) > 3 and node.args[3] is not None else torch.finfo(value_of(x).dtype).eps
        if len(shape) != 1 or scale is None:
            return None
        w, w_off = scale
        output, w2, off, b2, affine = _match_affine(gm, node, shape[0])
        return NormMatch("rms_norm", x, node, output, float(eps), shape[0], w if w is not None else w2,
                         w_off if w is not None else off, b2, False, frozenset({node, *affine}))
    if _root_kind(node) is not None:
        return _match_decomposed_rms(gm, node)
    return None


def match_norms(gm: fx.GraphModule) -> list[NormMatch]:
    return [m for n in gm.graph.nodes if (m := match_norm(gm, n)) is not None]
