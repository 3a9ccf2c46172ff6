"""NUQ's search space for a language model: bits per linear from a few numbers, not one number per linear.

Every linear of the body sits at a depth `t` in [0, 1] (its position in the graph's execution order among the
body's linears: no layer names needed) and has a role — attention (its rows or columns belong to head groups) or
MLP (everything else). A point `x` in [0, 1]^4 gives two straight lines over depth, one per role (start, end),
and a linear's level `f(t)` picks its width from `choices` (NUQ's `BezierLinear`, once per role; all of `BITS`,
or a few widths around the one a budget affords: `around`). The model's size
in bytes is known exactly for every `x` without quantizing anything, so a byte budget is a constraint on `x`.
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
    fixed_bytes: int  # everything the allocation does not decide (tables, head, shortcuts at their widths; norms)
    group_size: int
    choices: tuple[int, ...] = BITS

    dim = 4  # (attention start, attention end, MLP start, MLP end)

    @classmethod
    def of(cls, program: Program, *, group_size: int, embeddings: int | None, head: int | None,
           shortcuts: int | None = 8) -> BitAllocation:
        """The body's linears, in execution order; tables, an untied head and a slicing's shortcut matrices
        keep the widths given here (`QuantizeWeights`' own options), in `fixed_bytes`."""
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
        fixed, seen = 0, set(names)
        for node in program.graph.find_nodes(op="get_attr"):
            target = str(node.target)
            if not node.users or target in seen:
                continue
            seen.add(target)
            w = tensor_of(program.gm, target)
            width = (embeddings if target in kinds.tables else head if target == kinds.head
                     else shortcuts if target in kinds.shortcuts else None)
            fixed += packed_nbytes(tuple(w.shape), width, group_size) if width and w.dim() == 2 else w.numel() * w.element_size()
        depth = [i / max(1, len(names) - 1) for i in range(len(names))]
        return cls(tuple(names), tuple(depth), tuple("attention" if n in attention else "mlp" for n in names),
                   tuple(shapes), fixed, group_size)

    def around(self, bits: int, spread: int) -> BitAllocation:
        """The same space with each linear choosing among `bits` and `spread` widths either side of it."""
        at = self.choices.index(bits)
        return replace(self, choices=self.choices[max(0, at - spread): at + spread + 1])

    def widths(self, x: list[float]) -> dict[str, int]:
        """Bits per linear at the point `x`."""
        out = {}
        for name, t, role in zip(self.names, self.depth, self.roles, strict=True):
            start, end = (x[0], x[1]) if role == "attention" else (x[2], x[3])
            level = min(max(start + (end - start) * t, 0.0), 1.0)
            out[name] = self.choices[min(int(level * len(self.choices)), len(self.choices) - 1)]
        return out

    def nbytes(self, x: list[float]) -> int:
        """The model's bytes at `x`: what `Program.num_bytes()` will say after quantizing with these widths."""
        widths = self.widths(x)
        return self.fixed_bytes + sum(packed_nbytes(shape, widths[name], self.group_size)
                                      for name, shape in zip(self.names, self.shapes, strict=True))

    def uniform(self, bits: int) -> list[float]:
        """A point that gives every linear `bits`."""
        level = (self.choices.index(bits) + 0.5) / len(self.choices)
        return [level] * self.dim


def width_counts(widths: dict[str, int]) -> dict[str, int]:
    """How many weights have each width (`{"3": 40, "4": 170}`): an allocation at a glance, for reports."""
    counts: dict[str, int] = {}
    for bits in widths.values():
        counts[str(bits)] = counts.get(str(bits), 0) + 1
    return dict(sorted(counts.items()))
