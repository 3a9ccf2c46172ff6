"""What the linears fxslice inserts are for, recorded in `node.meta` with `fxslice.core.graph.set_role`.

Analyses read them back: the residual-stream analysis treats a `SHORTCUT` as part of a residual edge,
not as a reader or writer. One module for the names so that no pass imports another's internals.
"""

from __future__ import annotations

__all__ = ["SHORTCUT", "TIED_HEAD_PROJECTION"]

#: a D_a x D_b matrix on a residual edge that maps one segment's basis into the next one's
SHORTCUT = "shortcut"
#: the D x D matrix in front of a head that shares its table with the embedding
TIED_HEAD_PROJECTION = "tied_head_projection"
