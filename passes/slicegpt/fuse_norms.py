"""LayerNorm -> RMSNorm fusion (design.md §1): fold every stream norm's scale and shift into the
linears that read it, make the stream mean-free where the norms centre, and leave weightless
RMSNorms that divide by the original width. Exact.
"""

from __future__ import annotations

import torch
from torch import fx

from fxslice import Pass, PassResult, Program, UnsupportedStructure
from fxslice.analysis.matchers import LinearUse, NormMatch
from fxslice.analysis.roles import TIED_HEAD_PROJECTION
from fxslice.analysis.stream import Stream, stream_analysis
from fxslice.analysis.weights import (
    add_input_shift,
    insert_linear,
    transform_input,
    transform_output,
    transform_table,
    transform_vector,
)
from fxslice.core.errors import node_location
from fxslice.core.graph import aten, insert_op, tensor_of

__all__ = ["FuseNorms"]


class FuseNorms(Pass):
    """With `keep_ties` (default), a head that shares its table with the embedding gets a small D x D
    projection in front of it that takes the final norm's scale, instead of an untied copy of the
    table (V x D): design.md §1, "keep the tie". Centring models untie regardless (M changes the table).
    """

    name = "fuse_norms"
    exact = True

    def __init__(self, *, keep_ties: bool = True):
        self.keep_ties = keep_ties

    def requires(self, program: Program) -> None:
        stream = program.analysis(stream_analysis)
        stream.check()
        if any(w.needs_projection for w in stream.writers):
            raise UnsupportedStructure("fuse_norms: a norm writes into the stream; run ProjectNormWriters first")
        centring = {n.centres for n in stream.norms}
        if len(centring) > 1:
            mixed = next(n for n in stream.norms if not n.centres)
            raise UnsupportedStructure(
                "fuse_norms: the stream is read by both centring (LayerNorm) and non-centring (RMSNorm) norms\n"
                f"  at {node_location(mixed.normalized)}\n  what to do: such a model cannot be made mean-free exactly"
            )
        if True in centring:
            direct = [r for r in stream.readers if r.norm is None]
            if direct:
                raise UnsupportedStructure(
                    "fuse_norms: a linear reads the stream directly, but the LayerNorms need a mean-free stream\n"
                    f"  at {node_location(direct[0].linear.node)}"
                )

    def call(self, program: Program) -> PassResult:
        gm, graph = program.gm, program.graph
        stream = program.analysis(stream_analysis)
        todo = [n for n in stream.norms if not n.is_plain_rms]
        centre = any(n.centres for n in todo)
        if centre:
            _centre_writers(gm, stream)
        tables = {id(tensor_of(gm, w.table)) for w in stream.writers if w.kind == "embedding"}
        for seg in stream.segments:
            for norm in seg.norms:
                if norm.is_plain_rms:
                    continue
                scale = _scale(gm, norm, stream.width)
                shift = tensor_of(gm, norm.bias).to(torch.float64) if norm.bias is not None else None
                for reader in (r for r in seg.readers if r.norm is norm):
                    use = reader.linear
                    if self.keep_ties and not centre and id(tensor_of(gm, use.weight)) in tables:
                        use = _project_in_front(gm, use, stream.width)
                    batched = tensor_of(gm, use.weight).dim() > 2
                    if shift is not None and not batched:
                        add_input_shift(gm, use, shift)
                    if scale is not None:
                        transform_input(gm, use, torch.diag(scale))
                    if shift is not None and batched:  # the shift stays in front of the scaled weights
                        add_input_shift(gm, use, _divided(shift, scale, use))
                _strip(graph, norm)
        graph.eliminate_dead_code()
        return PassResult(bool(todo), {"fused": len(todo), "centred": centre})

    def ensures(self, program: Program) -> None:
        stream = program.analysis(stream_analysis)
        stream.check()
        assert all(n.is_plain_rms for n in stream.norms), "a stream norm is still affine or centring"


def _divided(shift: torch.Tensor, scale: torch.Tensor | None, use: LinearUse) -> torch.Tensor:
    """The shift as seen in front of weights that were scaled by `scale`: `shift / scale`."""
    if scale is None:
        return shift
    if bool((scale == 0).any()):
        raise UnsupportedStructure(
            "fuse_norms: a LayerNorm with a zero scale and a shift feeds expert weights without a bias\n"
            f"  at {node_location(use.node)}\n  what to do: give the zero scales a tiny value, or file an issue")
    return shift / scale


def _project_in_front(gm: fx.GraphModule, use: LinearUse, width: int) -> LinearUse:
    """Insert `x -> x @ I` in front of `use` (a tied head) and return the new linear, now the reader."""
    return insert_linear(gm, use.input, torch.eye(width), stem="tied_head_projection", users=[use.node], role=TIED_HEAD_PROJECTION)


def _scale(gm: torch.fx.GraphModule, norm: NormMatch, width: int) -> torch.Tensor | None:
    if norm.weight is None:
        return None
    return tensor_of(gm, norm.weight).to(torch.float64) + norm.weight_offset


def _centre_writers(gm: torch.fx.GraphModule, stream: Stream) -> None:
    """Apply M = I - 11ᵀ/D on the output side of every writer: the stream becomes mean-free."""
    d = stream.width
    m = torch.eye(d, dtype=torch.float64) - torch.full((d, d), 1.0 / d, dtype=torch.float64)
    for writer in stream.writers:
        if writer.kind == "embedding":
            transform_table(gm, writer.output, m)
        elif writer.kind == "bias":
            transform_vector(gm, writer.output, m)
        else:
            transform_output(gm, writer.linear, m)


def _strip(graph: fx.Graph, norm: NormMatch) -> None:
    """Drop the affine part and replace a LayerNorm / aten.rms_norm with a weightless decomposed RMSNorm; a
    LayerNorm written out by hand loses its `x - mean(x)` (the writers now centre the stream)."""
    if norm.kind == "rms" and norm.centres:
        for node in norm.nodes:
            if node.target == aten.sub.Tensor and isinstance(node.args[1], fx.Node) and node.args[1] in norm.nodes \
                    and node.args[1].target == aten.mean.dim:
                node.replace_all_uses_with(node.args[0])
    for node in norm.nodes:  # the affine ops: `* w` (or `* (1 + w)`) and `+ b` on the normalised value
        if node.target in (aten.mul.Tensor, aten.add.Tensor) and _is_affine_op(node, norm):
            keep = next(a for a in node.args if isinstance(a, fx.Node) and a not in (norm.weight, norm.bias)
                        and not _is_scale_expr(a, norm))
            node.replace_all_uses_with(keep)
    for node in norm.nodes:  # mean over the last dim -> sum / original width: slicing must not change it
        if node.target == aten.mean.dim:
            with graph.inserting_before(node):
                total = insert_op(graph, aten.sum.dim_IntList, (node.args[0], [-1], True), like=node)
                mean = insert_op(graph, aten.div.Tensor, (total, float(norm.width)), like=node)
            node.replace_all_uses_with(mean)
    if norm.kind in ("layer_norm", "rms_norm"):
        with graph.inserting_before(norm.normalized.next):
            bare = _emit_rms_norm(graph, norm.input, norm.eps, norm.width, like=norm.normalized)
        norm.normalized.replace_all_uses_with(bare)


def _is_scale_expr(node: fx.Node, norm: NormMatch) -> bool:
    """The weight as the norm multiplies by it: the parameter, possibly cast or with Gemma's `1 +`."""
    while node is not norm.weight and node in norm.nodes and node.all_input_nodes:
        node = node.all_input_nodes[0]
    return node is norm.weight


def _is_affine_op(node: fx.Node, norm: NormMatch) -> bool:
    operands = [a for a in node.args if isinstance(a, fx.Node)]
    if node.target == aten.add.Tensor:
        return norm.bias is not None and norm.bias in operands
    return norm.weight is not None and any(_is_scale_expr(a, norm) for a in operands)


def _emit_rms_norm(graph: fx.Graph, x: fx.Node, eps: float, width: int, *, like: fx.Node | None = None) -> fx.Node:
    """A weightless RMSNorm dividing by the original `width` (not the current one): x * rsqrt(sum(x²)/width + eps).

    Half-precision inputs are normalised in float32 and cast back, as HF norms do.
    """
    val = x.meta.get("val")
    dtype = val.dtype if isinstance(val, torch.Tensor) else torch.float32
    src = insert_op(graph, aten._to_copy.default, (x,), {"dtype": torch.float32}, like=like) if dtype in (torch.float16, torch.bfloat16) else x
    square = insert_op(graph, aten.mul.Tensor, (src, src), like=like)
    total = insert_op(graph, aten.sum.dim_IntList, (square, [-1], True), like=like)
    mean = insert_op(graph, aten.div.Tensor, (total, float(width)), like=like)
    shifted = insert_op(graph, aten.add.Tensor, (mean, float(eps)), like=like)
    scale = insert_op(graph, aten.rsqrt.default, (shifted,), like=like)
    out = insert_op(graph, aten.mul.Tensor, (src, scale), like=like)
    if src is not x:
        out = insert_op(graph, aten._to_copy.default, (out,), {"dtype": dtype}, like=like)
    return out
