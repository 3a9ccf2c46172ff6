"""Let grouped-query attention read its shared K/V heads in place instead of copying them per query head.

HF's `repeat_kv` spells GQA as `reshape(expand(unsqueeze(k, 2), [b, h, n, s, d]), [b, h*n, s, d])`: a
full copy of the cache for every layer and decoding step (on SmolLM2, 60 copies of the cache per token).
`scaled_dot_product_attention(..., enable_gqa=True)` computes the same attention from the h heads
directly. Exact: the same products, in the same order per query head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from fxslice import Pass, PassResult, Program
from fxslice.core.graph import aten, erase_unused, insert_op

__all__ = ["FuseRepeatKV", "RepeatedHeads", "match_repeated_heads"]

_SDPA = aten.scaled_dot_product_attention.default
_RESHAPES = {aten.reshape.default, aten.view.default, aten._unsafe_view.default}
_VIEW_THROUGH = {aten.slice.Tensor, aten.alias.default}  # a whole-tensor slice may sit between unsqueeze and expand


@dataclass(frozen=True)
class RepeatedHeads:
    source: fx.Node  # the [b, h, s, d] tensor before repetition
    repeats: int  # n: query heads per K/V head


def _shape(node: fx.Node) -> tuple | None:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def match_repeated_heads(node: fx.Node) -> RepeatedHeads | None:
    """`node` = reshape(expand(unsqueeze(x, 2), [b, h, n, s, d]), [b, h*n, s, d]), or None."""
    if node.op != "call_function" or node.target not in _RESHAPES:
        return None
    expand = node.args[0]
    if not isinstance(expand, fx.Node) or expand.target != aten.expand.default:
        return None
    inner = expand.args[0]
    while isinstance(inner, fx.Node) and inner.target in _VIEW_THROUGH and _shape(inner) == _shape(inner.args[0]):
        inner = inner.args[0]
    if not isinstance(inner, fx.Node) or inner.target != aten.unsqueeze.default or inner.args[1] != 2:
        return None
    source, out, wide = inner.args[0], _shape(node), _shape(expand)
    base = _shape(source) if isinstance(source, fx.Node) else None
    if base is None or out is None or wide is None or len(base) != 4 or len(wide) != 5:
        return None
    b, h, s, d = base
    if wide[:2] != (b, h) or wide[3:] != (s, d) or out != (b, h * wide[2], s, d):
        return None
    return RepeatedHeads(source, int(wide[2]))


class FuseRepeatKV(Pass):
    """Rewrite attention over repeated K/V heads into `enable_gqa=True` attention over the originals."""

    name = "fuse_repeat_kv"
    exact = True

    def call(self, program: Program) -> PassResult:
        graph, fused = program.graph, 0
        for node in list(graph.find_nodes(op="call_function", target=_SDPA)):
            if node.kwargs.get("enable_gqa") or len(node.args) < 3:
                continue
            key, value = (match_repeated_heads(a) if isinstance(a, fx.Node) else None for a in node.args[1:3])
            if key is None or value is None or key.repeats != value.repeats:
                continue
            with graph.inserting_before(node):
                new = insert_op(graph, _SDPA, (node.args[0], key.source, value.source, *node.args[3:]),
                                {**node.kwargs, "enable_gqa": True}, like=node)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            fused += 1
        removed = erase_unused(program.gm) if fused else 0
        return PassResult(fused > 0, {"fused": fused, "removed": removed})
