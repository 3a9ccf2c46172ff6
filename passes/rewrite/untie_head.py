"""Untie a tied head: the linear that makes the logits gets its own copy of the token table. Exact.

Why: a tied table serves two readers that tolerate rounding differently — the lookup adds one row to the stream,
the head scores every row against it — so quantization must give both the width the head needs. Untied, each
takes its own width (`Quantize(untie_head=True, embeddings=..., head=...)`), at the cost of a second V x d table.
"""

from __future__ import annotations

from torch import fx

from fxslice import Pass, PassResult, Program
from fxslice.analysis.linears import logits_linear, weight_kinds
from fxslice.analysis.weights import own_weight
from fxslice.core.graph import tensor_of

__all__ = ["UntieHead"]


class UntieHead(Pass):
    """Give the head a private copy of the table it shares with an embedding lookup; a model whose head is
    untied already (or that has none) is left as it is."""

    name = "untie_head"
    exact = True

    def call(self, program: Program) -> PassResult:
        use = logits_linear(program)
        if use is None or not _reads_a_table(program, use.weight):
            return PassResult(False)
        name = own_weight(program.gm, use)
        return PassResult(True, {"head": name, "parameters": tensor_of(program.gm, name).numel()})

    def ensures(self, program: Program) -> None:
        use = logits_linear(program)
        assert use is None or not _reads_a_table(program, use.weight), "the head still reads a token table"


def _reads_a_table(program: Program, weight: fx.Node) -> bool:
    """Whether `weight` is a token table's tensor, under the table's name or another (a tie may have two)."""
    tensor = tensor_of(program.gm, weight)
    return any(tensor_of(program.gm, t) is tensor for t in program.analysis(weight_kinds).tables)
