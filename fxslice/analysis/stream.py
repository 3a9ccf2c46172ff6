"""Residual-stream analysis: writers, readers, norms, segments and shortcuts, derived from the graph.

Values are grouped by *feature space*: an op that keeps the meaning of the last dimension (views,
casts, indexing over tokens, sums of two values, scaling by a scalar or a per-token factor) joins
its input's group; linears, embeddings and norms start a new one. The residual stream is the group
holding the most sums of two values. Cutting it where a value that is also read elsewhere enters a
sum gives the *segments*, each of which may carry its own basis; the cut edges are the *shortcuts*.
Anything else touching the stream is a `Violation`, reported with the node and the source line.
See design.md §1-§2.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from fxslice.analysis.matchers import (
    CAST_OPS,
    LinearUse,
    NormMatch,
    match_embedding,
    match_linear,
    match_norm,
    value_of,
)
from fxslice.analysis.roles import SHORTCUT
from fxslice.core.errors import UnsupportedStructure, node_location
from fxslice.core.graph import aten, is_param, module_path, role_of
from fxslice.core.program import Program

__all__ = ["Stream", "Segment", "Writer", "Reader", "Shortcut", "Violation", "stream_analysis", "added_vector"]


_IDENTITY = CAST_OPS | {aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
                        aten.lift_fresh_copy.default, aten.dropout.default, aten.neg.default}
_SHAPE = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
          aten.squeeze.dim, aten.squeeze.default, aten.squeeze.dims, aten.expand.default, aten.flatten.using_ints}
_ON_DIM = {aten.slice.Tensor: 1, aten.select.int: 1, aten.narrow.default: 1}
_REDUCE = {aten.sum.dim_IntList, aten.mean.dim}
_SCALE = {aten.mul.Tensor, aten.mul_.Tensor, aten.div.Tensor}
_SUM = {aten.add.Tensor, aten.add_.Tensor, aten.sub.Tensor}
_SPLITS = {aten.split_with_sizes.default: 2, aten.split.Tensor: 2}  # the position of `dim`
_ZEROS = {aten.zeros.default, aten.new_zeros.default}
_ROW_MASKS = {aten.masked_fill.Scalar, aten.masked_fill_.Scalar}


@dataclass(frozen=True)
class Writer:
    # "linear", "embedding", "bias", "norm" or "other": the last two (a norm's output, or any other value
    # computed from no earlier residual stream, such as a position code) need an explicit projection
    # (ProjectNormWriters) before the stream's basis can change; a "bias" is a parameter vector added to the
    # stream (`output` is the sum, `vector` the parameter), changed in place like a linear's bias
    kind: str
    output: fx.Node
    linear: LinearUse | None = None
    table: fx.Node | None = None
    norm: NormMatch | None = None
    vector: fx.Node | None = None


    @property
    def needs_projection(self) -> bool:
        return self.kind in ("norm", "other")


@dataclass(frozen=True)
class Reader:
    linear: LinearUse
    norm: NormMatch | None  # the norm it reads through; None for a linear reading the stream directly


@dataclass(frozen=True)
class Shortcut:
    source: fx.Node  # the value leaving segment `src`
    add: fx.Node  # where it enters segment `dst`: the sum, or the shortcut matmul once one was inserted
    src: int
    dst: int
    linear: LinearUse | None = None  # the shortcut matrix, once one has been inserted


@dataclass(frozen=True)
class Segment:
    index: int
    nodes: tuple[fx.Node, ...]
    writers: tuple[Writer, ...]
    norms: tuple[NormMatch, ...]
    readers: tuple[Reader, ...]
    normed: tuple[fx.Node, ...] = ()  # values in this segment's basis downstream of its norms
    # sums `v + s` of a normed value and a parameter vector `s` (a LayerNorm's shift kept in front of expert
    # weights that have no bias to absorb it): `s` is in this segment's basis and changes with it
    shifts: tuple[fx.Node, ...] = ()

    @property
    def values(self) -> tuple[fx.Node, ...]:
        """Every value whose last dimension is in this segment's basis."""
        return self.nodes + self.normed

    @property
    def width(self) -> int:
        """The dimension of this segment's basis (segments differ once a slicing gave them their own widths)."""
        return int(_last_dim(self.nodes[0]))

    @property
    def module(self) -> str:
        first = self.norms[0].input if self.norms else self.nodes[0]
        return module_path(self.norms[0].normalized) if self.norms else module_path(first)


@dataclass(frozen=True)
class Violation:
    node: fx.Node
    reason: str

    def message(self) -> str:
        return f"{self.reason}\n  at {node_location(self.node)}"


@dataclass(frozen=True)
class Stream:
    width: int
    segments: tuple[Segment, ...]
    shortcuts: tuple[Shortcut, ...]
    violations: tuple[Violation, ...]

    def check(self) -> None:
        """Raise UnsupportedStructure listing every violation (node, op, module, source line)."""
        if self.violations:
            body = "\n".join(f"- {v.message()}" for v in self.violations)
            raise UnsupportedStructure(
                f"the residual stream holds {len(self.violations)} operation(s) that would break invariance:\n{body}\n"
                "  what to do: this architecture is not supported as is; rewrite the op as a linear map on the "
                "stream, or file an issue with this message"
            )

    @property
    def fused(self) -> bool:
        """Every norm a plain RMSNorm and every writer a linear or an embedding: a stream whose basis can change
        (ProjectNormWriters and FuseNorms get a model there)."""
        return all(n.is_plain_rms for n in self.norms) and not any(w.needs_projection for w in self.writers)

    @property
    def writers(self) -> list[Writer]:
        return [w for s in self.segments for w in s.writers]

    @property
    def readers(self) -> list[Reader]:
        return [r for s in self.segments for r in s.readers]

    @property
    def norms(self) -> list[NormMatch]:
        return [n for s in self.segments for n in s.norms]

    def describe(self) -> str:
        """Per segment: module, norms, readers, writers; then shortcuts and violations."""
        lines = [f"residual stream: width {self.width}, {len(self.segments)} segments, {len(self.shortcuts)} shortcuts"]
        for seg in self.segments:
            lines.append(f"segment {seg.index}  [{seg.module or '<top level>'}]")
            for n in seg.norms:
                lines.append(f"  norm    {n.kind:<10} {module_path(n.normalized)}  eps={n.eps:g}"
                             f"{'  centres' if n.centres else ''}{'  affine' if n.has_affine else ''}")
            for r in seg.readers:
                lines.append(f"  reader  {_short(r.linear.node.target):<10} {module_path(r.linear.node)}"
                             f"{'' if r.norm else '  (reads the stream directly)'}")
            for w in seg.writers:
                lines.append(f"  writer  {w.kind:<10} {module_path(w.output)}")
        for sc in self.shortcuts:
            kind = "matrix" if sc.linear else "identity"
            lines.append(f"shortcut {sc.src} -> {sc.dst} ({kind}) into {sc.add.name} [{module_path(sc.add)}]")
        lines += [f"VIOLATION {v.message()}" for v in self.violations]
        return "\n".join(lines)


def _short(target: Any) -> str:
    return getattr(target, "__name__", str(target)).split(".")[0]


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[fx.Node, fx.Node] = {}

    def find(self, x: fx.Node) -> fx.Node:
        self.parent.setdefault(x, x)
        while self.parent[x] is not x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: fx.Node, b: fx.Node) -> None:
        self.parent[self.find(a)] = self.find(b)


def _last_dim(node: Any) -> int | None:
    val = value_of(node)
    return val.shape[-1] if val is not None and val.dim() > 0 else None


def _is_last(dim: int, ndim: int) -> bool:
    return dim % ndim == ndim - 1


def preserving_inputs(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node] | None:
    """The inputs whose feature space `node`'s output shares, or None if `node` changes or mixes features."""
    out = value_of(node)
    if node.op != "call_function" or out is None or not out.is_floating_point() or out.dim() == 0:
        return None
    target, args = node.target, node.args
    first = args[0] if args and isinstance(args[0], fx.Node) else None
    fin = value_of(first)
    if target in _IDENTITY:
        return [first] if fin is not None else None
    if target is operator.getitem and isinstance(first, fx.Node) and first.target in _SPLITS:
        source, at = first.args[0], _SPLITS[first.target]  # a part of a split along rows (tokens by expert)
        dim = first.args[at] if len(first.args) > at else first.kwargs.get("dim", 0)
        whole = value_of(source)
        return [source] if whole is not None and not _is_last(dim, whole.dim()) else None
    if target == aten.index_add.default and len(args) >= 4:  # rows added at indices: linear in base and source
        base, dim, _, source = args[:4]
        return [base, source] if not _is_last(dim, out.dim()) and _last_dim(source) == out.shape[-1] else None
    if fin is None:
        if target == aten.cat.default:
            parts = [a for a in args[0] if isinstance(a, fx.Node)]
            dim = args[1] if len(args) > 1 else 0
            return parts if parts and not _is_last(dim, out.dim()) else None
        return None
    same_last = fin.dim() > 0 and fin.shape[-1] == out.shape[-1]
    if target in _SHAPE:
        return [first] if same_last and out.shape[-1] != 1 else None
    if target in _ON_DIM:
        dim = args[_ON_DIM[target]] if len(args) > _ON_DIM[target] else 0
        return [first] if not _is_last(dim, fin.dim()) else None
    if target in _ROW_MASKS:  # whole rows set to 0 (tokens no expert took, transformers 5.15): 0 in every basis
        mask = value_of(args[1])
        return [first] if args[2] == 0 and mask is not None and mask.dim() > 0 and mask.shape[-1] == 1 else None
    if target == aten.repeat.default:  # copies of whole rows (Llama-4 repeats tokens once per expert)
        return [first] if same_last and list(args[1])[-1] == 1 else None
    if target == aten.transpose.int:
        return [first] if not (_is_last(args[1], fin.dim()) or _is_last(args[2], fin.dim())) else None
    if target == aten.permute.default:
        return [first] if _is_last(args[1][-1], fin.dim()) else None
    if target == aten.index.Tensor:
        indices = list(args[1])
        return [first] if len(indices) < fin.dim() or indices[-1] is None else None
    if target in _REDUCE:
        dims = args[1] if len(args) > 1 else None
        return [first] if dims and not any(_is_last(d, fin.dim()) for d in dims) else None
    if target in _SUM and len(args) == 2:
        a, b = args
        if all(isinstance(x, fx.Node) and _last_dim(x) == out.shape[-1] and not is_param(gm, x) for x in (a, b)):
            return [a, b]
        vector = added_vector(gm, node)
        return [a if vector is b else b] if vector is not None and target != aten.add_.Tensor else None
    if target in _SCALE and len(args) == 2:
        a, b = args
        if target == aten.mul.Tensor and not _scalar_like(b) and _scalar_like(a):
            a, b = b, a
        if isinstance(a, fx.Node) and _last_dim(a) == out.shape[-1] and _scalar_like(b):
            return [a]
    return None


def added_vector(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The parameter in `x + b` or `x - b` when `b` is a parameter vector over `x`'s features (JetMoE adds
    one after its experts): the sum is then `x` plus a constant that a change of basis can change in place."""
    if node.target not in _SUM or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
        return None
    out = value_of(node)
    params = [x for x in node.args if is_param(gm, x)]
    others = [x for x in node.args if isinstance(x, fx.Node) and not is_param(gm, x)]
    if out is None or out.dim() == 0 or len(params) != 1 or len(others) != 1 or node.args[1] is not params[0]:
        return None
    vector = value_of(params[0])
    width = out.shape[-1]
    if vector is None or vector.numel() != width or vector.shape[-1] != width or _last_dim(others[0]) != width:
        return None
    return params[0]


def _is_zeros(node: fx.Node) -> bool:
    """A tensor of zeros made from nothing (the base JetMoE adds its experts' rows into): zero in every basis."""
    return node.target in _ZEROS


def _split_into(node: fx.Node, members: set[fx.Node]) -> bool:
    """A split whose parts are all taken (`getitem`) into `members`: the split itself holds no value to check."""
    return node.target in _SPLITS and bool(node.users) and all(
        u.target is operator.getitem and u in members for u in node.users)


def _scalar_like(x: Any) -> bool:
    """A number, a one-element tensor, or a per-token factor (last dimension 1)."""
    if isinstance(x, (int, float)):
        return True
    val = value_of(x)
    return val is not None and (val.numel() == 1 or (val.dim() > 0 and val.shape[-1] == 1))


def stream_analysis(program: Program) -> Stream:
    """Find the residual stream of `program` (cache it with `program.analysis(stream_analysis)`)."""
    gm = program.gm
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    norms = {m.normalized: m for n in nodes if (m := match_norm(gm, n)) is not None}
    norm_internal = {x for m in norms.values() for x in m.nodes}
    linears = {u.output: u for n in nodes if (u := match_linear(gm, n)) is not None}
    linear_nodes = {u.node for u in linears.values()}
    tables = {n: t for n in nodes if (t := match_embedding(gm, n)) is not None}

    links: dict[fx.Node, list[fx.Node]] = {}  # node -> the inputs whose feature space it shares
    for node in nodes:
        if node in norm_internal or node in linear_nodes or node in linears or node in tables:
            continue
        # a value computed from a parameter alone (a position table indexed by position) is a source, not part of
        # the parameter's group: members are call_function values only, so such a link would hide a writer
        inputs = [x for x in preserving_inputs(gm, node) or () if x.op == "call_function"]
        if inputs:
            links[node] = inputs
    for m in norms.values():  # the affine tail belongs to the norm's output group
        for x in m.nodes:
            if order[x] > order[m.normalized]:
                links[x] = [m.normalized]
    joined = set(links)  # everything else in a group is a source
    groups = _UnionFind()
    for node, inputs in links.items():
        for x in inputs:
            groups.union(node, x)
    for out, use in linears.items():
        if role_of(use.node) == SHORTCUT:
            groups.union(out, use.input)

    members: dict[fx.Node, list[fx.Node]] = defaultdict(list)
    for node in nodes:
        if value_of(node) is not None and node.op == "call_function":
            members[groups.find(node)].append(node)
    sums = {root: sum(1 for n in group if n.target in _SUM and n in joined and len(n.args) == 2
                      and all(isinstance(a, fx.Node) and not is_param(gm, a) for a in n.args))
            for root, group in members.items()
            if isinstance(_last_dim(group[0]), int)}  # a feature width is static; attention scores' is the length
    output = next(n for n in nodes if n.op == "output")
    if not sums or max(sums.values()) == 0:
        return Stream(0, (), (), (Violation(output, "no residual stream found (no sum of two activations)"),))
    if max(sums.values()) == 1 and sum(v == 1 for v in sums.values()) > 1:  # no group outlives one layer's sum
        return Stream(0, (), (), (Violation(output, "no residual stream found: several groups of values are summed "
                                            "once each, so something cuts the stream after every sum (a post-norm, "
                                            "or an op that is not linear such as a feature-wise scale)"),))
    root = max(sums, key=lambda r: (sums[r], len(members[r])))
    stream = [n for n in members[root]]
    in_stream = set(stream)
    width = int(_last_dim(stream[0]))
    violations: list[Violation] = []

    # segments: the stream's own edges, minus shortcut edges and inserted shortcut matmuls
    segs = _UnionFind()
    shortcut_outputs = {out for out, use in linears.items() if role_of(use.node) == SHORTCUT}
    shortcut_edges: list[tuple[fx.Node, fx.Node, LinearUse | None]] = []
    for node in stream:
        if node in shortcut_outputs:  # an inserted shortcut matmul lives in the segment it writes into
            shortcut_edges.append((linears[node].input, node, linears[node]))
            segs.find(node)
            continue
        if node not in joined:
            segs.find(node)
            continue
        for x in links[node]:
            if x not in in_stream:
                continue
            if node.target in _SUM and x not in shortcut_outputs and _branches(x, in_stream):
                shortcut_edges.append((x, node, None))
            else:
                segs.union(node, x)
    seg_members: dict[fx.Node, list[fx.Node]] = defaultdict(list)
    for node in stream:
        seg_members[segs.find(node)].append(node)
    ordered = sorted(seg_members.values(), key=lambda g: order[g[0]])
    seg_index = {n: i for i, g in enumerate(ordered) for n in g}

    writers: dict[int, list[Writer]] = defaultdict(list)
    seg_norms: dict[int, list[NormMatch]] = defaultdict(list)
    readers: dict[int, list[Reader]] = defaultdict(list)
    normed: dict[int, list[fx.Node]] = defaultdict(list)
    shifts: dict[int, list[fx.Node]] = defaultdict(list)
    for node in stream:
        i = seg_index[node]
        if node in joined and (vector := added_vector(gm, node)) is not None:
            writers[i].append(Writer("bias", node, vector=vector))
        if node not in joined:  # a source: where values enter the stream
            if node in linears and role_of(linears[node].node) != SHORTCUT:
                writers[i].append(Writer("linear", node, linear=linears[node]))
            elif node in tables:
                writers[i].append(Writer("embedding", node, table=tables[node]))
            elif node in norms:
                writers[i].append(Writer("norm", node, norm=norms[node]))
            elif _is_zeros(node):
                pass  # adds nothing, in any basis; slicing narrows its size
            elif node not in linears and _last_dim(node) == width and not _downstream_of_a_sum(node, gm):
                writers[i].append(Writer("other", node))  # embeddings, position codes: it gets a projection
            elif node not in linears:
                violations.append(Violation(node, "a value enters the residual stream from an op that is not linear"))
        for user in node.users:
            if user in in_stream:
                continue
            use = match_linear(gm, user)
            if use is not None and use.input is node:
                readers[i].append(Reader(use, None))
            elif user in norm_internal:
                norm = next((m for m in norms.values() if m.input is node and user in m.nodes), None)
                if norm is None:
                    violations.append(Violation(user, "the stream feeds the inside of a norm it is not the input of"))
                elif norm not in seg_norms[i]:
                    seg_norms[i].append(norm)
            elif _split_into(user, in_stream):
                pass
            elif user.op == "output":
                violations.append(Violation(node, "the residual stream is an output of the model"))
            elif _looks_like_a_norm(node, norm_internal):
                violations.append(Violation(user, NORM_LIKE))
            else:
                violations.append(Violation(user, "an operation on the residual stream that is not linear"))

    activations = joined | set(linears)  # what a residual sum adds: a stream value or a layer's output
    for i, norm_list in seg_norms.items():
        for norm in norm_list:
            if groups.find(norm.normalized) == root:
                violations.append(Violation(norm.normalized, "a norm reads the stream and writes it back (post-norm)"))
                continue
            group = members[groups.find(norm.normalized)]
            residual = next((n for n in group if n.target in _SUM and n in joined and n not in norm.nodes
                             and sum(isinstance(a, fx.Node) and a in activations for a in n.args) == 2), None)
            if residual is not None:  # the normalised value is itself summed with a layer's output: post-norm
                violations.append(Violation(residual, f"the output of norm '{module_path(norm.normalized)}' is a "
                                            "residual stream of its own: a post-norm architecture"))
                continue
            readers[i] += _norm_readers(gm, norm, group, norm_internal, violations)
            normed[i] += [n for n in group if n not in norm.nodes or n is norm.output]
            shifts[i] += [n for n in group if n not in norm.nodes and added_vector(gm, n) is not None]

    segments = tuple(
        Segment(i, tuple(g), tuple(writers[i]), tuple(seg_norms[i]), tuple(readers[i]), tuple(normed[i]),
                tuple(shifts[i]))
        for i, g in enumerate(ordered)
    )
    shortcuts = tuple(
        Shortcut(src, add, seg_index[src], seg_index[add], use)
        for src, add, use in sorted(shortcut_edges, key=lambda e: order[e[1]])
    )
    return Stream(width, segments, shortcuts, tuple(violations))


NORM_LIKE = ("this looks like a norm (a mean of squares under a root) spelled in a way fxslice does not recognise; "
             "recognised: x * rsqrt(mean(x²) + eps) * w and x / sqrt(mean(x²) + eps) * w (the weight on either side, "
             "squares as x**2, x.square() or x * x, sum(x²) / d for the mean), F.rms_norm, F.layer_norm; write it as "
             "one of those (scale after normalising, not before)")


def _looks_like_a_norm(x: fx.Node, recognised: set[fx.Node], hops: int = 4) -> bool:
    """Whether a square of `x` (not inside a `recognised` norm) is reduced and taken a root of within a few ops: a
    norm the matchers did not fit."""
    squares = [u for u in x.users if u not in recognised and u.target in (aten.square.default, aten.mul.Tensor, aten.pow.Tensor_Scalar)
               and (u.target != aten.pow.Tensor_Scalar or u.args[1] == 2)
               and (u.target != aten.mul.Tensor or (len(u.args) == 2 and u.args[0] is u.args[1]))]
    frontier, reduced = squares, False
    for _ in range(hops):
        frontier = [u for n in frontier for u in n.users]
        reduced |= any(n.target in (aten.mean.dim, aten.sum.dim_IntList) for n in frontier)
        if reduced and any(n.target in (aten.rsqrt.default, aten.sqrt.default)
                           or (n.target == aten.pow.Tensor_Scalar and abs(n.args[1]) == 0.5) for n in frontier):
            return True
    return False


def _downstream_of_a_sum(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether some value `node` is computed from is a sum of two activations. A value that is not (an embedding
    plus a position code, a constant) can enter the stream through a projection; one that is reads an earlier
    residual stream through ops that break it (a tanh between two layers) and stays a violation, so that no part
    of the model is silently left out of the stream."""
    seen, todo = set(), list(node.all_input_nodes)
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.target in _SUM and len(current.args) == 2 and all(
                isinstance(a, fx.Node) and value_of(a) is not None and not is_param(gm, a) for a in current.args):
            return True
        todo += [a for a in current.all_input_nodes if isinstance(value_of(a), torch.Tensor)]
    return False


def _branches(x: fx.Node, in_stream: set[fx.Node]) -> bool:
    """Whether the value reaching a sum through `x` is also read elsewhere (then the edge is a shortcut)."""
    node = x
    while True:
        if len(node.users) > 1:
            return True
        ins = [a for a in node.all_input_nodes if a in in_stream]
        if node.target in _SUM or len(ins) != 1:
            return False
        node = ins[0]


def _norm_readers(gm: fx.GraphModule, norm: NormMatch, group: list[fx.Node], norm_internal: set[fx.Node],
                  violations: list[Violation]) -> list[Reader]:
    """The linears reading a norm's output group; anything else reading it is a violation."""
    found = []
    members = set(group) | {norm.output}
    for node in members:
        if node in norm.nodes and node is not norm.output:
            continue
        for user in node.users:
            if user in members:
                continue
            use = match_linear(gm, user)
            if use is not None and use.input is node:
                found.append(Reader(use, norm))
            elif _split_into(user, members):
                continue
            elif user in norm_internal:
                violations.append(Violation(user, f"the output of norm '{module_path(norm.normalized)}' feeds another "
                                                  "norm: a post-norm architecture, where the stream itself is normalised"))
            else:
                violations.append(Violation(user, f"the output of norm '{module_path(norm.normalized)}' is read "
                                                  "by an op that is not a linear"))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(found, key=lambda r: order[r.linear.node])

