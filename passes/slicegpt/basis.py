"""Change the basis of one stream segment: the building block of rotation and slicing.

`change_basis(gm, segment, m)` with m of shape D_old x D_new (orthogonal columns) makes every writer
of the segment produce `y @ m` and every reader consume it; with D_new < D_old that slices the
segment (design.md §1). Shortcut edges are the caller's business: their matrices depend on two
segments.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import fx

from fxslice.analysis.matchers import match_linear
from fxslice.analysis.roles import TIED_HEAD_PROJECTION
from fxslice.analysis.stream import Segment
from fxslice.analysis.weights import contract, transform_input, transform_output, transform_table, transform_vector
from fxslice.core.graph import role_of, set_tensor, tensor_of

__all__ = ["change_basis", "change_tied_tables"]


def change_basis(gm: fx.GraphModule, segment: Segment, m: torch.Tensor, *, done: Collection[fx.Node] = ()) -> None:
    """`done`: outputs of writers the caller already changed (a table shared with a tied head)."""
    for writer in segment.writers:
        if writer.output in done:
            continue
        if writer.kind == "embedding":
            transform_table(gm, writer.output, m)
        elif writer.kind == "bias":
            transform_vector(gm, writer.output, m)
        else:
            transform_output(gm, writer.linear, m)
    for reader in segment.readers:
        transform_input(gm, reader.linear, m)
    for shift in segment.shifts:
        transform_vector(gm, shift, m)


def change_tied_tables(gm: fx.GraphModule, seg: Segment, q: torch.Tensor) -> list[fx.Node]:
    """A table shared by an embedding of `seg` and a head behind a projection (FuseNorms(keep_ties=True)):
    change the table once, for both, and the projection's output with it, so the tie survives slicing.
    Returns the embedding outputs handled here."""
    done = []
    for writer in seg.writers:
        if writer.kind != "embedding":
            continue
        table = tensor_of(gm, writer.table)
        heads = [u for n in gm.graph.nodes if (u := match_linear(gm, n)) is not None and u.node.op == "call_function"
                 and tensor_of(gm, u.weight) is table]
        projections = [match_linear(gm, h.input) for h in heads]
        if not heads or any(p is None or role_of(p.node) != TIED_HEAD_PROJECTION for p in projections):
            continue
        set_tensor(gm, str(writer.table.target), contract(table, -1, q))
        for projection in projections:
            transform_output(gm, projection, q)
        done.append(writer.output)
    return done
