"""Which weights of a program are the body's linears, which is the head and which are token tables — found
in the graph, for passes that treat them differently (adapters, quantization)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from fxslice.analysis.matchers import LinearUse, match_embedding, match_linear, value_of
from fxslice.analysis.roles import SHORTCUT
from fxslice.core.graph import role_of
from fxslice.core.program import Program

__all__ = ["WeightKinds", "logits_linear", "weight_kinds"]


@dataclass(frozen=True)
class WeightKinds:
    """`linears`: per 2-D weight of the body, the linears that read it (a weight read twice is listed once);
    `head`: the weight of the linear that makes the logits (None if there is none, or it is a tied table);
    `tables`: what embedding lookups read (a tied head's weight among them); `shortcuts`: the linears among
    `linears` that a slicing inserted to change the stream's basis between segments (role `SHORTCUT`): every
    token's residual passes through all of them in turn, so their errors compound over depth. Batched expert
    weights (3-D) are in none of these."""

    linears: dict[str, list[LinearUse]]
    head: str | None
    head_uses: list[LinearUse]
    tables: frozenset[str]
    shortcuts: frozenset[str] = frozenset()


def logits_linear(program: Program) -> LinearUse | None:
    """The first linear met walking back from the graph's output through single-input ops (casts, views, a
    soft-capping tanh)."""
    output = next(iter(program.graph.find_nodes(op="output")))
    node = output.args[0][0] if isinstance(output.args[0], (tuple, list)) else output.args[0]
    for _ in range(16):
        if not isinstance(node, fx.Node) or node.op != "call_function":
            return None
        use = match_linear(program.gm, node)
        if use is not None:
            return use
        node = node.args[0] if node.args else None
    return None


def weight_kinds(program: Program, *, skip_role: str | None = None) -> WeightKinds:
    """Sort the program's matched weights; linears whose node or input carries the role `skip_role` (nodes a
    pass inserted itself) are left out."""
    gm = program.gm
    tables = frozenset(str(t.target) for n in program.graph.nodes if (t := match_embedding(gm, n)) is not None)
    logits = logits_linear(program)
    head = None if logits is None else str(logits.weight.target)
    linears: dict[str, list[LinearUse]] = {}
    head_uses: list[LinearUse] = []
    shortcuts: set[str] = set()
    for node in program.graph.nodes:
        use = match_linear(gm, node)
        if use is None or (skip_role and any(role_of(n) == skip_role for n in (node, use.input))):
            continue
        weight = value_of(use.weight)
        target = str(use.weight.target)
        if weight is None or weight.dim() != 2 or target in tables:
            continue
        if target == head:
            head_uses.append(use)
        else:
            linears.setdefault(target, []).append(use)
            if role_of(node) == SHORTCUT:
                shortcuts.add(target)
    return WeightKinds(linears, head if head not in tables else None, head_uses, tables, frozenset(shortcuts))
