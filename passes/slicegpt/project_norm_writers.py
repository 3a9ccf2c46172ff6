"""Give every norm, and every other op that is not a linear, that writes into the stream an explicit
linear projection (design.md §2).

A post-norm (Gemma-2/3, OLMo-2) or an embedding norm (BLOOM) adds its output to the stream, but an
elementwise scale does not commute with a rotation. Inserting `y -> y @ I` after such a norm makes
the identity matrix the stream's writer: the rotation (and later slicing) acts on it like on any
linear writer, while the norm and its affine part stay exactly as they were. The same holds for any
other value entering the stream that is computed from no sum of two activations, so from no earlier
residual stream (a position code, a constant; the analysis checks every read of the stream itself).
Such a projection costs d x d parameters before slicing; only the stream's own uses read it.

A linear that reads a norm writer's output directly (ModernBERT's first attention block has no norm of its own and
reads the embedding norm's output) keeps reading the norm's output, not the projection: it then reads a value
outside the stream, in the model's own basis, so a LayerNorm model's writers can centre the stream without
taking the mean away from it.
"""

from __future__ import annotations

import torch

from fxslice import Pass, PassResult, Program
from fxslice.analysis.stream import stream_analysis
from fxslice.analysis.weights import insert_linear

__all__ = ["ProjectNormWriters"]


class ProjectNormWriters(Pass):
    name = "project_norm_writers"
    exact = True

    def requires(self, program: Program) -> None:
        program.analysis(stream_analysis).check()

    def call(self, program: Program) -> PassResult:
        gm = program.gm
        stream = program.analysis(stream_analysis)
        writers = [w for w in stream.writers if w.needs_projection]
        members = {n for seg in stream.segments for n in seg.nodes}
        direct = {n for r in stream.readers if r.norm is None for n in (r.linear.node, r.linear.input)}
        for writer in writers:
            if writer.kind == "norm":  # its direct linear readers stay on it, outside the stream
                users = [u for u in writer.norm.output.users if u in members or u not in direct]
                insert_linear(gm, writer.norm.output, torch.eye(stream.width), stem="projection", users=users)
            else:
                users = [u for u in writer.output.users if u in members]
                insert_linear(gm, writer.output, torch.eye(stream.width), stem="projection", users=users)
        return PassResult(bool(writers), {"projections": len(writers)})

    def ensures(self, program: Program) -> None:
        assert not any(w.needs_projection for w in program.analysis(stream_analysis).writers)
