"""Dimension groups: the rows and columns of weight matrices that must be removed together for the
matrices to shrink physically, found by following every internal channel through the graph.

Each linear that does not write into the residual stream (q, k, v, gate, up, fc1, ...) *produces*
channels: its output rows. The analysis runs the graph once on a few real tokens and, beside the real
values, propagates *tags* — for every element of a value, which producer row it came from. Data
movement (views, transposes, slices, concatenation, expand) moves tags with the data; an elementwise
op joins the tags it combines (RoPE pairs row d with row d + Dh/2; SwiGLU pairs gate row j with up
row j); a reduction joins everything it reduces over (a q/k norm joins a whole head); attention joins
each query head with the key/value heads it reads (grouped-query sharing included) and tags its output
by head; a linear that reads tagged channels joins each channel with its own input column. What is
joined is one *group* (union-find). A group that reaches anything else (the logits, an op the analysis
does not know, a weight along the channel) is *blocked*: it cannot be removed without changing the model.

Residual-stream dimensions are not groups here: they are the stream's (`fxslice.analysis.stream`).

Followed position by position, the same tags also tell which value channel each column of the linear after
attention reads (`ValueHead`): attention mixes tokens, never the head dimension, so a rotation of one key/value
head's value rows undone on those columns leaves the model unchanged (`fxslice.passes.RotateHeads`).
"""

from __future__ import annotations

import operator
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from fxslice.analysis.matchers import LinearUse, match_linear
from fxslice.analysis.stream import stream_analysis
from fxslice.core.graph import aten, module_path, readers_of, role_of, tensor_of
from fxslice.core.program import Program

__all__ = ["Unit", "DimensionGroup", "Groups", "ValueHead", "group_analysis", "MOVES", "SIZED"]

#: ops that only move data: applied to the tag tensor as they are to the value
MOVES = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int, aten.permute.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.expand.default,
    aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default, aten.slice.Tensor,
    aten.select.int, aten.narrow.default, aten.cat.default, aten.split.Tensor, aten.split_with_sizes.default,
    aten.chunk.default, aten.unbind.int, aten.flatten.using_ints, aten.unflatten.int, aten.t.default,
    aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.type_as.default,
    aten.dropout.default, aten.lift_fresh_copy.default,
}
_CASTS = {aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.type_as.default}
#: data movement whose arguments may hold channel sizes (rewritten when groups are removed)
SIZED = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
         aten.slice.Tensor, aten.narrow.default, aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default,
         aten.unflatten.int}
_SIZED_ON_INPUT = {aten.slice.Tensor, aten.narrow.default, aten.split.Tensor, aten.split_with_sizes.default,
                   aten.chunk.default}
_REDUCTIONS = {aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default, aten.var.correction,
               aten.linalg_vector_norm.default}
#: in-place writes into a graph input: a KV cache (`cache.index_copy_(dim, positions, new)`)
_CACHE_WRITES = {aten.index_copy_.default, aten.index_copy.default}
_SDPA = {aten.scaled_dot_product_attention.default, aten._scaled_dot_product_flash_attention_for_cpu.default}


@dataclass(frozen=True, order=True)
class Unit:
    """One row (`axis="row"`: an output channel) or column (`axis="col"`: an input channel) of a weight."""

    weight: str
    axis: str
    index: int


@dataclass(frozen=True)
class DimensionGroup:
    """Rows and columns that go together; `kind` is "mlp_channel" (no attention on the path) or "heads"
    (a key/value head with the query heads that read it)."""

    kind: str
    rows: tuple[Unit, ...]
    cols: tuple[Unit, ...]
    module: str  # where it lives (the module of its first producer)

    @property
    def units(self) -> tuple[Unit, ...]:
        return self.rows + self.cols

    @property
    def weights(self) -> tuple[str, ...]:
        return tuple(sorted({u.weight for u in self.units}))


@dataclass(frozen=True)
class ValueHead:
    """One key/value head's value channels, in head-dimension order (`rows` of the weight `value`), and for every
    query head that attends with it the columns of the weight `output` that read its result, in the same order.
    Only where nothing but data movement (and a KV cache) lies between the two linears and attention."""

    attention: str  # the attention node
    value: str
    rows: tuple[int, ...]
    output: str
    cols: tuple[tuple[int, ...], ...]


@dataclass
class Groups:
    groups: list[DimensionGroup]
    blocked: dict[str, str] = field(default_factory=dict)  # producer weight -> why its channels cannot go
    linears: dict[str, LinearUse] = field(default_factory=dict)  # weight name -> use, every producer and consumer
    #: shape ops on channel paths that may carry sizes as literals: node -> group index of every element of its
    #: input (slices and splits) or output (views, reshapes, expands); -1 where no group. KV-cache inputs the
    #: graph writes channels into are sites too (placeholders: their shape shrinks with the groups)
    sites: dict[fx.Node, torch.Tensor] = field(default_factory=dict)
    #: values the channels are combined with elementwise that the analysis does not track (a residual, RoPE's
    #: cos and sin): (their shape, aligned to the combined value's; group index of every element of that value).
    #: Removing groups must not shrink a dimension along which such a value has more than one element.
    operands: list[tuple[tuple[int, ...], torch.Tensor]] = field(default_factory=list)
    value_heads: list[ValueHead] = field(default_factory=list)

    def by_kind(self, kind: str) -> list[DimensionGroup]:
        return [g for g in self.groups if g.kind == kind]

    def describe(self) -> str:
        """Per module and kind: how many groups, of how many rows and columns; then what is blocked and why."""
        summary: dict[tuple[str, str], list[DimensionGroup]] = defaultdict(list)
        for g in self.groups:
            summary[(g.module.rpartition(".")[0] or g.module, g.kind)].append(g)
        lines = [f"dimension groups: {len(self.groups)} ({len(self.by_kind('mlp_channel'))} MLP channels, "
                 f"{len(self.by_kind('heads'))} attention head groups)"]
        for (module, kind), gs in summary.items():
            sizes = sorted({(len(g.rows), len(g.cols)) for g in gs})
            shape = ", ".join(f"{r} rows + {c} cols" for r, c in sizes)
            lines.append(f"  {module or '<top>'}: {len(gs)} x {kind} ({shape}) in {', '.join(gs[0].weights)}")
        for weight, why in self.blocked.items():
            lines.append(f"  blocked: {weight}: {why}")
        return "\n".join(lines)


class _UnionFind:
    """Tags joined into groups; a root may be *blocked* (with the first reason found), and stays so when joined."""

    def __init__(self) -> None:
        self.parent: list[int] = [0]  # tag 0 is never used: -1 and 0 stay free as markers
        self.blocked: dict[int, str] = {}

    def new(self, n: int) -> torch.Tensor:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return torch.arange(start, start + n)

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
            if rb in self.blocked:
                self.blocked.setdefault(ra, self.blocked.pop(rb))

    def block(self, tag: int, why: str) -> None:
        self.blocked.setdefault(self.find(tag), why)

    def union_tensors(self, a: torch.Tensor, b: torch.Tensor) -> None:
        pairs = torch.stack([a.reshape(-1), b.reshape(-1)], 1).unique(dim=0)
        for x, y in pairs.tolist():
            if x != y:
                self.union(x, y)


def _tensors(value: Any) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


class _Tagger:
    """Runs the graph on real tokens and propagates tags through the channels of the producers."""

    def __init__(self, program: Program):
        self.program, self.gm = program, program.gm
        self.uf = _UnionFind()
        self.units: dict[int, Unit] = {}  # first tag of each unit -> unit
        self.heads: set[int] = set()  # tags that went through attention
        #: attention node -> (value tags [batch, kv heads, tokens, dim], its output's tags per query head and position)
        self.attention_values: dict[fx.Node, tuple[torch.Tensor, torch.Tensor]] = {}
        self.reads: dict[fx.Node, torch.Tensor] = {}  # linear -> the tag of each input column (the first row's)
        self.linears: dict[str, LinearUse] = {}
        #: (weight, where, element index, tags) of weights combined elementwise with channels: an element only
        #: one group uses blocks it
        self.weights_on_channels: list[tuple[str, fx.Node, torch.Tensor, torch.Tensor]] = []
        #: (shape, tags) of other values combined elementwise with channels (cos/sin tables, a residual): a
        #: group may go only if that shape need not shrink (`Groups.operands`)
        self.operand_sites: list[tuple[tuple[int, ...], torch.Tensor]] = []
        self.constant: set[fx.Node] = set()
        self.sites: dict[fx.Node, torch.Tensor] = {}
        self.env: dict[fx.Node, Any] = {}
        self.shared: set[str] = set()  # weights also read by another op (a tied table)

    def _new_units(self, weight: str, axis: str, n: int) -> torch.Tensor:
        tags = self.uf.new(n)
        for i, t in enumerate(tags.tolist()):
            self.units[t] = Unit(weight, axis, i)
        return tags

    def _block(self, tags: torch.Tensor, node: fx.Node, why: str) -> None:
        for t in tags.reshape(-1).unique().tolist():
            self.uf.block(t, f"{why} at {node.name} ({node.target})")

    def _block_inputs(self, inputs: Iterable[fx.Node], tags: dict, node: fx.Node, why: str) -> None:
        """Block every channel that the tagged `inputs` of `node` carry."""
        for n in inputs:
            for t in _tensors(tags[n]):
                self._block(t, node, why)

    def run(self) -> None:
        program, gm = self.program, self.gm
        stream = program.analysis(stream_analysis)
        stream_values = {v for s in stream.segments for v in s.values}
        producers: dict[fx.Node, LinearUse] = {}
        consumers: dict[fx.Node, LinearUse] = {}
        for node in program.graph.nodes:
            use = match_linear(gm, node)
            if use is None or use.weight.op != "get_attr" or tensor_of(gm, use.weight).dim() != 2:
                continue
            if sum(len(n.users) for n in readers_of(gm, tensor_of(gm, use.weight))) > 1:  # a tied table
                self.shared.add(str(use.weight.target))
            consumers[use.node] = use
            if use.output not in stream_values and role_of(use.node) is None and use.output.users:
                producers[use.output] = use
        ids = program.probe_input(batch=1, length=6, seed=0)
        inputs: dict[str, Any] = {"input_ids": ids}
        if program.cache is not None:  # a KV-cache graph: an empty cache, as at the first step
            inputs["past_length"] = torch.tensor(0)
            for i, kv in enumerate(program.cache.allocate(1, ids.shape[1], program.dtype)):
                inputs[f"kv_{i}"] = kv
        env: dict[fx.Node, Any] = self.env
        tags: dict[fx.Node, Any] = {}
        constant = self.constant  # values computed from weights alone (Gemma's 1 + w, say)
        for node in program.graph.nodes:
            if node.op == "placeholder":
                env[node] = inputs[str(node.target)]
                continue
            if node.op == "get_attr":
                env[node] = _runnable(tensor_of(gm, node))
                constant.add(node)
                continue
            if node.op == "output":
                for arg in node.all_input_nodes:
                    for t in _tensors(tags.get(arg)):
                        self._block(t, node, "reaches the graph's output")
                continue
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: env[n])
            env[node] = node.target(*args, **kwargs)
            if node.all_input_nodes and all(n in constant for n in node.all_input_nodes):
                constant.add(node)
            tagged_inputs = [n for n in node.all_input_nodes if tags.get(n) is not None]
            if node in consumers and consumers[node].input in tags:
                self._consume(consumers[node], tags[consumers[node].input], node)
                tagged_inputs = [n for n in tagged_inputs if n is not consumers[node].input]
            if tagged_inputs and node in stream_values:
                self._block_inputs(tagged_inputs, tags, node, "reaches the residual stream")
            elif tagged_inputs:
                out = self._propagate(node, tags, env, env[node])
                if out is not None:
                    tags[node] = out
            if node in producers:
                use = producers[node]
                weight = str(use.weight.target)
                self.linears[weight] = use
                rows = self._new_units(weight, "row", tensor_of(gm, use.weight).shape[use.out_axis])
                tags[node] = rows.expand(env[node].shape).contiguous()
                if weight in self.shared:
                    self._block(rows, node, f"the weight '{weight}' is also read elsewhere (tied)")

    def _consume(self, use: LinearUse, tag: torch.Tensor, node: fx.Node) -> None:
        weight = str(use.weight.target)
        self.linears[weight] = use
        width = tensor_of(self.gm, use.weight).shape[use.in_axis]
        if tag.shape[-1] != width:
            self._block(tag, node, "a linear reads it along another dimension")
            return
        cols = self._new_units(weight, "col", width)
        if tag.numel():
            self.reads[node] = tag.reshape(-1, width)[0]
        self.uf.union_tensors(tag, cols.expand(tag.shape))
        if weight in self.shared:
            self._block(cols, node, f"the weight '{weight}' is also read elsewhere (tied)")

    def _propagate(self, node: fx.Node, tags: dict, env: dict, value: Any) -> Any:
        target = node.target
        tagged = [n for n in node.all_input_nodes if tags.get(n) is not None]
        if target is operator.getitem:
            source = tags.get(node.args[0])
            return source[node.args[1]] if isinstance(source, (list, tuple)) else None
        if target in _CACHE_WRITES:
            return self._cache_write(node, tags, value)
        if target in MOVES:
            if target in _CASTS:
                return tags[node.args[0]] if node.args[0] in tags else None
            untagged = [n for n in node.all_input_nodes if tags.get(n) is None and isinstance(env[n], torch.Tensor)]
            if untagged:
                self._block_inputs(tagged, tags, node, "moved together with an untracked value")
                return None
            try:
                moved = fx.node.map_arg((node.args, node.kwargs), lambda n: tags[n] if n in tags else env[n])
                out = target(*moved[0], **moved[1])
                if target in SIZED and isinstance(tags.get(node.args[0]), torch.Tensor):
                    self.sites[node] = tags[node.args[0]] if target in _SIZED_ON_INPUT else out
            except Exception as exc:  # noqa: BLE001 - any op we cannot replay on tags blocks its channels
                self._block_inputs(tagged, tags, node, f"cannot follow channels through it ({type(exc).__name__})")
                return None
            return [t.contiguous() for t in out] if isinstance(out, (list, tuple)) else out.contiguous()
        if target in _SDPA:
            return self._attention(node, tags, value)
        if isinstance(value, torch.Tensor) and torch.Tag.pointwise in getattr(target, "tags", ()):
            return self._pointwise(node, tags, value)
        if target in _REDUCTIONS and isinstance(value, torch.Tensor):
            return self._reduce(node, tags, value)
        self._block_inputs(tagged, tags, node, "an op the analysis does not follow")
        return None

    def _pointwise(self, node: fx.Node, tags: dict, value: torch.Tensor) -> torch.Tensor | None:
        operands = [n for n in node.all_input_nodes if tags.get(n) is not None]
        out = None
        for n in operands:
            t = tags[n]
            if not isinstance(t, torch.Tensor):
                self._block(torch.cat([x.reshape(-1) for x in _tensors(t)]), node, "a tuple in an elementwise op")
                return None
            try:
                t = t.expand(value.shape)
            except RuntimeError:
                self._block(t, node, "broadcast along a channel")
                return None
            if out is None:
                out = t
            else:
                self.uf.union_tensors(out, t)
        for n in node.all_input_nodes:
            other = self.env.get(n) if tags.get(n) is None else None
            if not (isinstance(other, torch.Tensor) and other.numel() > 1 and out is not None):
                continue
            if n in self.constant:
                index = torch.arange(other.numel()).reshape(other.shape).expand(value.shape)
                self.weights_on_channels.append((f"the weight '{n.target}'", node, index.contiguous(), out))
            else:
                self.operand_sites.append(((1,) * (value.dim() - other.dim()) + tuple(other.shape), out))
        return out

    def _reduce(self, node: fx.Node, tags: dict, value: torch.Tensor) -> torch.Tensor | None:
        source = node.args[0]
        t = tags.get(source)
        if not isinstance(t, torch.Tensor):
            return None
        dims = node.args[1] if len(node.args) > 1 else None
        dims = list(range(t.dim())) if dims is None else [dims] if isinstance(dims, int) else list(dims)
        dims = [d % t.dim() for d in dims]
        keep = [d for d in range(t.dim()) if d not in dims]
        flat = t.permute(*keep, *dims).reshape(*[t.shape[d] for d in keep], -1)
        first = flat[..., :1].expand(flat.shape)
        self.uf.union_tensors(first, flat)
        reduced = flat[..., 0]
        return reduced.reshape(value.shape) if reduced.numel() == value.numel() else None

    def _cache_write(self, node: fx.Node, tags: dict, value: Any) -> torch.Tensor | None:
        """New keys or values written into a cache input: the cache carries their channels at every position,
        and is a site whose shape shrinks with them (`Program.cache`)."""
        cache, dim, source = node.args[0], node.args[1], node.args[3]
        t = tags.get(source)
        ok = (isinstance(cache, fx.Node) and cache.op == "placeholder" and tags.get(cache) is None
              and isinstance(t, torch.Tensor) and isinstance(value, torch.Tensor) and t.dim() == value.dim())
        if ok:
            first = t.narrow(dim % t.dim(), 0, 1)
            ok = torch.equal(t, first.expand_as(t))
        if not ok:
            self._block_inputs([n for n in node.all_input_nodes if tags.get(n) is not None], tags, node,
                               "written into a tensor the analysis cannot follow")
            return None
        out = first.expand(value.shape).contiguous()
        self.sites[cache] = out
        return out

    def _attention(self, node: fx.Node, tags: dict, value: torch.Tensor) -> torch.Tensor | None:
        q, k, v = node.args[:3]
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        if isinstance(mask, fx.Node) and tags.get(mask) is not None:
            self._block(tags[mask], node, "an attention mask computed from channels")
            return None
        tq, tk, tv = (tags.get(x) for x in (q, k, v))
        hq = value.shape[1]
        present = [t for t in (tq, tk, tv) if t is not None]
        if len(present) < 3:  # keys or values from elsewhere (a KV cache): which heads pair up is unknown
            for t in present:
                self._block(t, node, "attention over keys or values the analysis cannot follow (a cache?)")
            return None
        if any(t.dim() != 4 for t in present):
            for t in present:
                self._block(t, node, "attention over other than [batch, heads, tokens, dim]")
            return None
        hk = tk.shape[1]
        if hq % hk or tv.shape[1] != hk:
            for t in present:
                self._block(t, node, "query heads not a multiple of key/value heads")
            return None
        out = torch.empty(value.shape, dtype=torch.long)
        positions = self.uf.new(hq * value.shape[-1]).reshape(hq, value.shape[-1])  # each (head, dim) its own tag
        for h in range(hq):
            members = [tq[:, h], tk[:, h // (hq // hk)], tv[:, h // (hq // hk)], positions[h]]
            flat = torch.cat([m.reshape(-1) for m in members])
            first = int(flat[0])
            self.uf.union_tensors(torch.full_like(flat, first), flat)
            self.heads.add(first)
            out[:, h] = positions[h]
        self.attention_values[node] = (tv, positions)
        return out


def _runnable(value: Any) -> Any:
    """A weight to run the probe with: a weight of shape only (`Program.skeleton`) as zeros that take no memory
    (channels are tracked through shapes and indices, not through the weights' values)."""
    if isinstance(value, torch.Tensor) and value.device.type == "meta":
        return torch.zeros((), dtype=value.dtype).expand(value.shape)
    return value


def group_analysis(program: Program) -> Groups:
    """The dimension groups of `program` (an analysis: `program.analysis(group_analysis)`)."""
    tagger = _Tagger(program)
    tagger.run()
    uf = tagger.uf
    for what, node, index, tag in tagger.weights_on_channels:
        # an element used by one group alone would have to shrink with it: not supported, so block that group
        owners: dict[int, set[int]] = defaultdict(set)
        for i, t in torch.stack([index.reshape(-1), tag.reshape(-1)], 1).unique(dim=0).tolist():
            owners[i].add(uf.find(t))
        for roots in owners.values():
            if len(roots) == 1:
                uf.block(next(iter(roots)), f"combined with {what} along its channels at {node.name}")
    members: dict[int, list[Unit]] = defaultdict(list)
    for tag, unit in tagger.units.items():
        members[uf.find(tag)].append(unit)
    heads = {uf.find(t) for t in tagger.heads}
    groups, blocked, roots = [], {}, []
    for root, units in members.items():
        rows = tuple(sorted(u for u in units if u.axis == "row"))
        cols = tuple(sorted(u for u in units if u.axis == "col"))
        why = uf.blocked.get(root) or ("its channels reach no linear" if not cols else "no producer" if not rows else "")
        if why:
            for u in rows or cols:
                blocked.setdefault(u.weight, why)
            continue
        module = module_path(tagger.linears[rows[0].weight].node)
        groups.append(DimensionGroup("heads" if root in heads else "mlp_channel", rows, cols, module))
        roots.append(root)
    order = sorted(range(len(groups)), key=lambda i: (groups[i].rows[0].weight, groups[i].rows[0].index))
    groups = [groups[i] for i in order]
    index_of_root = {roots[i]: rank for rank, i in enumerate(order)}
    lookup = torch.full((len(uf.parent),), -1, dtype=torch.long)
    for tag in range(1, len(uf.parent)):
        lookup[tag] = index_of_root.get(uf.find(tag), -1)
    sites = {node: lookup[t] for node, t in tagger.sites.items()}
    operands = [(shape, lookup[t]) for shape, t in tagger.operand_sites]
    return Groups(groups, blocked, tagger.linears, sites, operands, _value_heads(tagger))


def _value_heads(tagger: _Tagger) -> list[ValueHead]:
    """Where the values come straight from one linear and the attention output goes straight into another, which
    value row each of that linear's columns reads (`ValueHead`)."""
    found = []
    writing = {use.output: use for use in tagger.linears.values()}  # a linear by the node that carries its result
    reading = {use.input: use for use in tagger.linears.values()}  # and by the node it reads
    for node, (tv, positions) in tagger.attention_values.items():
        value, output = _value_source(tagger, node, writing), _output_reader(node, reading)
        per_head = tv[:1, :, :1, :]  # a value channel is the same at every batch row and token
        if value is None or output is None or output.node not in tagger.reads or not torch.equal(
                tv, per_head.expand_as(tv)):
            continue
        units = [[tagger.units.get(t) for t in head] for head in per_head[0, :, 0].tolist()]
        weight = str(value.weight.target)
        if any(u is None or u.weight != weight or u.axis != "row" for head in units for u in head):
            continue
        where = {t: (h, d) for h, head in enumerate(positions.tolist()) for d, t in enumerate(head)}
        cols: list[list[int | None]] = [[None] * positions.shape[1] for _ in range(positions.shape[0])]
        for c, t in enumerate(tagger.reads[output.node].tolist()):
            if t in where:
                h, d = where[t]
                cols[h][d] = c
        if any(c is None for head in cols for c in head):
            continue  # part of the output is read elsewhere
        per_kv = positions.shape[0] // len(units)
        found += [ValueHead(node.name, weight, tuple(u.index for u in head), str(output.weight.target),
                            tuple(tuple(cols[h]) for h in range(g * per_kv, (g + 1) * per_kv)))  # type: ignore[misc]
                  for g, head in enumerate(units)]
    return _merged(found)


def _merged(heads: list[ValueHead]) -> list[ValueHead]:
    """One entry per value head: a head expanded before attention (multi-query) appears once per copy, its
    readers joined; rows claimed in two orders, or with two output weights, cannot take one rotation and go."""
    by_rows: dict[tuple[str, frozenset[int]], list[ValueHead]] = defaultdict(list)
    for head in heads:
        by_rows[(head.value, frozenset(head.rows))].append(head)
    merged = []
    for same in by_rows.values():
        if len({(h.rows, h.output, h.attention) for h in same}) == 1:
            merged.append(ValueHead(same[0].attention, same[0].value, same[0].rows, same[0].output,
                                    tuple(c for h in same for c in h.cols)))
    claimed = defaultdict(int)
    for head in merged:
        for r in head.rows:
            claimed[(head.value, r)] += 1
    return [h for h in merged if all(claimed[(h.value, r)] == 1 for r in h.rows)]


def _value_source(tagger: _Tagger, attention: fx.Node, outputs: dict[fx.Node, LinearUse]) -> LinearUse | None:
    """The linear (of `outputs`, by its result) whose output reaches `attention`'s values through data movement and
    cache writes alone."""
    node = attention.args[2]
    while isinstance(node, fx.Node) and node not in outputs:
        if node.target in _CACHE_WRITES:
            node = node.args[3]
        elif node.target is operator.getitem:  # a part of a split
            node = node.args[0]
        elif node.target in MOVES and not any(isinstance(tagger.env.get(n), torch.Tensor)
                                              for n in node.all_input_nodes if n is not node.args[0]):
            node = node.args[0]
        else:
            return None
    return outputs.get(node) if isinstance(node, fx.Node) else None


def _output_reader(attention: fx.Node, readers: dict[fx.Node, LinearUse]) -> LinearUse | None:
    """The linear (of `readers`, by its input) that alone reads `attention`'s output, through data movement alone."""
    node = attention
    while node not in readers:
        users = list(node.users)
        if len(users) != 1 or not (users[0].target in MOVES or users[0].target is operator.getitem):
            return None
        node = users[0]
    return readers[node] if len(node.users) == 1 else None
