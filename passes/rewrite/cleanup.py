"""IR clean-up: remove what only gets in the way of analysis, without changing the function.

Removed: `_assert_tensor_metadata` checks; dtype/device casts whose input already has the target dtype
(`x.to(float32)` on a float32 `x`); `alias`/`lift_fresh_copy`/`contiguous` identities; `x + 0` and `x - 0` with a
literal zero (CTRL adds an absent token-type embedding so, which would read as a value entering the stream);
`expand_as(b, x)` feeding only sums that broadcast `b` anyway (GPT-NeoX-Japanese adds its attention bias so: the sum
then reads as the linear's bias); `dropout` with `train=False`; whole-dimension slices (`x[:, :]`, start 0, open end,
step 1: every KV-cache read has a few, ~240 nodes a decoding step runs for nothing on a 30-layer model); then dead
code. A copy that is written in place (or whose source is) is kept: removing it would let the write reach the
original. Casts that change the dtype stay: they matter in half precision.
"""

from __future__ import annotations

import torch
from torch import fx

from fxslice import Pass, PassResult, Program
from fxslice.core.graph import CAST_OPS, aten, erase_unused, mutates

__all__ = ["CleanupIR"]

_ASSERTS = {aten._assert_tensor_metadata.default}
_IDENTITIES = {aten.alias.default, aten.lift_fresh_copy.default, aten.contiguous.default, aten.clone.default}
_LAYOUT_COPIES = {aten.contiguous.default, aten.clone.default}
_STRIDE_READERS = {aten.view.default, aten._unsafe_view.default, aten.as_strided.default}
_OPEN_END = 2**62  # torch.export writes `x[a:]` as slice(x, dim, a, 2**63 - 1)


def _whole_slice(node: fx.Node) -> bool:
    """`slice(x, dim, 0, <open end>, 1)`: a view of all of `x` whatever its width (slicing may change widths
    later, so only the open-ended spelling counts, not an end equal to today's size)."""
    if node.target != aten.slice.Tensor:
        return False
    given = {**dict(zip(("dim", "start", "end", "step"), node.args[1:], strict=False)), **node.kwargs}
    start, end, step = given.get("start"), given.get("end"), given.get("step", 1)
    return start in (0, None) and (end is None or (isinstance(end, int) and end >= _OPEN_END)) and step == 1


_SUMS = {aten.add.Tensor, aten.sub.Tensor}


def _adds_zero(node: fx.Node) -> bool:
    """`x + 0` or `x - 0` (alpha anything): the second operand a literal zero, not a tensor."""
    other = node.args[1] if len(node.args) > 1 else None
    return isinstance(other, (int, float)) and not isinstance(other, bool) and other == 0


def _broadcast_anyway(node: fx.Node) -> bool:
    """Every user of `expand_as(b, x)` is a sum whose result has the shape it would have with `b` itself."""
    small = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    if not isinstance(small, torch.Tensor) or not node.users:
        return False
    for user in node.users:
        out = user.meta.get("val")
        if user.target not in _SUMS or not isinstance(out, torch.Tensor) or len(user.args) != 2:
            return False
        shapes = [small.shape if a is node else a.meta["val"].shape if isinstance(a, fx.Node) else ()
                  for a in user.args]
        try:
            if torch.broadcast_shapes(*shapes) != out.shape:
                return False
        except RuntimeError:
            return False
    return True


def _identity_input(node: fx.Node) -> fx.Node | None:
    """The input `node` merely passes on (same dtype, shape and device), or None."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    src = node.args[0]
    if any(mutates(u) for u in (*node.users, *src.users)):
        return None  # a copy that is written to, or whose source is, is not an identity
    if node.target in _LAYOUT_COPIES and any(u.target in _STRIDE_READERS for u in node.users):
        return None  # `x.permute(...).contiguous().view(...)`: the copy is what makes the view legal
    if node.target in _IDENTITIES or _whole_slice(node):
        return src
    if node.target == aten.dropout.default and (len(node.args) < 3 or node.args[2] is False):
        return src
    if node.target == aten.expand_as.default and _broadcast_anyway(node):
        return src
    if node.target in _SUMS and _adds_zero(node):
        a, b = src.meta.get("val"), node.meta.get("val")
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and (a.dtype, a.shape) == (b.dtype, b.shape)
        return src if same else None
    if node.target in CAST_OPS:
        a, b = src.meta.get("val"), node.meta.get("val")
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.device == b.device
        return src if same and not node.kwargs.get("memory_format") else None
    return None


class CleanupIR(Pass):
    name = "cleanup_ir"
    exact = True

    def call(self, program: Program) -> PassResult:
        graph = program.graph
        removed = 0
        for node in list(graph.nodes):
            if node.op == "call_function" and node.target in _ASSERTS:
                graph.erase_node(node)
                removed += 1
                continue
            src = _identity_input(node)
            if src is not None:
                node.replace_all_uses_with(src)
                graph.erase_node(node)
                removed += 1
        removed += erase_unused(program.gm)
        return PassResult(removed > 0, {"removed": removed})
