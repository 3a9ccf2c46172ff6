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

from fxslice.analysis.stream import Segment
from fxslice.analysis.weights import transform_input, transform_output, transform_table

__all__ = ["change_basis"]


def change_basis(gm: fx.GraphModule, segment: Segment, m: torch.Tensor, *, done: Collection[fx.Node] = ()) -> None:
    """`done`: outputs of writers the caller already changed (a table shared with a tied head)."""
    for writer in segment.writers:
        if writer.output in done:
            continue
        if writer.kind == "embedding":
            transform_table(gm, writer.output, m)
        else:
            transform_output(gm, writer.linear, m)
    for reader in segment.readers:
        transform_input(gm, reader.linear, m)
