"""NUQ's search space for a language model: bits per linear from a few numbers, not one number per linear.

Every linear of the body sits at a depth `t` in [0, 1] (its position in the graph's execution order among the
body's linears: no layer names needed) and has a role — attention (its rows or columns belong to head groups) or
MLP (everything else). A point `x` in [0, 1]^4 gives two straight lines over depth, one per role (start, end),
and a linear's level `f(t)` picks its width from `choices` (NUQ's `BezierLinear`, once per role; all of `BITS`,
or a few widths around the one a budget affords: `around`). A fifth number, when asked for, gives the token
tables (a tied head with them) one width from `table_choices`: the table is a fifth of a small model's weights,
and the bytes it saves at 6 bits buy a wider width for many linears. The model's size in bytes is known exactly
for every `x` without quantizing anything, so a byte budget is a constraint on `x`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fxslice import Program, UnsupportedStructure
from fxslice.analysis.groups import group_analysis
from fxslice.analysis.linears import weight_kinds
from fxslice.core.graph import tensor_of
from fxslice.core.quantized import BITS, packed_nbytes

__all__ = ["BitAllocation", "width_counts"]


@dataclass(frozen=True)
class BitAllocation:
    names: tuple[str, ...]
    depth: tuple[float, ...]
    roles: tuple[str, ...]  # "attention" or "mlp"
    shapes: tuple[tuple[int, int], ...]  # each matrix's [out, in]
    fixed_bytes: int  # what the allocation does not decide (head, shortcuts, unsearched tables at their widths; norms)
    group_size: int
    choices: tuple[int, ...] = BITS
    tables: tuple[str, ...] = ()  # token tables whose one width the allocation decides
    table_shapes: tuple[tuple[int, int], ...] = ()
    table_choices: tuple[int, ...] = ()  # their widths, narrowest first; the widest is the uniform point's
    grid: str = "zero_point"  # how each group is anchored: its bytes differ (`fxslice.core.quantized.GRIDS`)

    @property
    def dim(self) -> int:
        """(attention start, attention end, MLP start, MLP end[, tables])."""
        return 4 + (len(self.table_choices) > 1)

    @classmethod
    def of(cls, program: Program, *, group_size: int, embeddings: int | None, head: int | None,
           shortcuts: int | None = 8, search_tables: bool = False, grid: str = "zero_point") -> BitAllocation:
        """The body's linears, in execution order; an untied head and a slicing's shortcut matrices keep the
        widths given here (`QuantizeWeights`' own options), in `fixed_bytes`. Token tables keep `embeddings`
        bits, or with `search_tables` take any width up to it."""
        kinds = program.analysis(weight_kinds)
        order = {n: i for i, n in enumerate(program.graph.nodes)}
        names = sorted((w for w in kinds.linears if w not in kinds.shortcuts),
                       key=lambda w: order[kinds.linears[w][0].node])
        try:
            attention = {u.weight for g in program.analysis(group_analysis).by_kind("heads") for u in g.units}
        except UnsupportedStructure:
            attention = set()
        shapes = []
        for name in names:
            use = kinds.linears[name][0]
            w = tensor_of(program.gm, name)
            shapes.append((w.shape[use.out_axis], w.shape[use.in_axis]))
        fixed, seen, tables = 0, set(names), []
        for node in program.graph.find_nodes(op="get_attr"):
            target = str(node.target)
            if not node.users or target in seen:
                continue
            seen.add(target)
            w = tensor_of(program.gm, target)
            if search_tables and embeddings and target in kinds.tables and w.dim() == 2:
                tables.append((target, tuple(w.shape)))
                continue
            width = (embeddings if target in kinds.tables else head if target == kinds.head
                     else shortcuts if target in kinds.shortcuts else None)
            fixed += packed_nbytes(tuple(w.shape), width, group_size, grid) if width and w.dim() == 2 else w.numel() * w.element_size()
        depth = [i / max(1, len(names) - 1) for i in range(len(names))]
        return cls(tuple(names), tuple(depth), tuple("attention" if n in attention else "mlp" for n in names),
                   tuple(shapes), fixed, group_size, tables=tuple(t for t, _ in tables),
                   table_shapes=tuple(s for _, s in tables),
                   table_choices=tuple(b for b in BITS if b <= embeddings) if tables and embeddings else (), grid=grid)

    def around(self, bits: int, spread: int) -> BitAllocation:
        """The same space with each linear choosing among `bits` and `spread` widths either side of it, and the
        tables among the widths from `bits` up (a table narrower than the linears costs more than it saves)."""
        at = self.choices.index(bits)
        return replace(self, choices=self.choices[max(0, at - spread): at + spread + 1],
                       table_choices=tuple(b for b in self.table_choices if b >= bits) or self.table_choices[-1:])

    def widths(self, x: list[float]) -> dict[str, int]:
        """Bits per linear (and per searched table) at the point `x`."""
        out = {}
        for name, t, role in zip(self.names, self.depth, self.roles, strict=True):
            start, end = (x[0], x[1]) if role == "attention" else (x[2], x[3])
            out[name] = _pick(self.choices, start + (end - start) * t)
        if self.tables:
            width = _pick(self.table_choices, x[4]) if self.dim > 4 else self.table_choices[0]
            out.update(dict.fromkeys(self.tables, width))
        return out

    def nbytes(self, x: list[float]) -> int:
        """The model's bytes at `x`: what `Program.num_bytes()` will say after quantizing with these widths."""
        widths = self.widths(x)
        return self.fixed_bytes + sum(packed_nbytes(shape, widths[name], self.group_size, self.grid) for name, shape in
                                      zip(self.names + self.tables, self.shapes + self.table_shapes, strict=True))

    def uniform(self, bits: int) -> list[float]:
        """A point that gives every linear `bits` and the tables their widest width."""
        level = (self.choices.index(bits) + 0.5) / len(self.choices)
        return [level] * 4 + [1.0] * (self.dim - 4)


def _pick(choices: tuple[int, ...], level: float) -> int:
    """The width at `level` in [0, 1] (clamped), each of `choices` owning an equal share of the interval."""
    level = min(max(level, 0.0), 1.0)
    return choices[min(int(level * len(choices)), len(choices) - 1)]


def width_counts(widths: dict[str, int]) -> dict[str, int]:
    """How many weights have each width (`{"3": 40, "4": 170}`): an allocation at a glance, for reports."""
    counts: dict[str, int] = {}
    for bits in widths.values():
        counts[str(bits)] = counts.get(str(bits), 0) + 1
    return dict(sorted(counts.items()))
