"""Give every norm that writes into the stream an explicit linear projection (design.md §2).

A post-norm (Gemma-2/3, OLMo-2) or an embedding norm (BLOOM) adds its output to the stream, but an
elementwise scale does not commute with a rotation. Inserting `y -> y @ I` after such a norm makes
the identity matrix the stream's writer: the rotation (and later slicing) acts on it like on any
linear writer, while the norm and its affine part stay exactly as they were.
"""

from __future__ import annotations

import torch

from fxslice import Pass, PassResult, Program
from fxslice.graph import add_parameter, aten, insert_op, tensor_of
from fxslice.stream import stream_analysis

__all__ = ["ProjectNormWriters"]


class ProjectNormWriters(Pass):
    name = "project_norm_writers"
    exact = True

    def requires(self, program: Program) -> None:
        program.analysis(stream_analysis).check()

    def call(self, program: Program) -> PassResult:
        gm, graph = program.gm, program.graph
        stream = program.analysis(stream_analysis)
        writers = [w for w in stream.writers if w.kind == "norm"]
        for writer in writers:
            out = writer.norm.output
            dtype = out.meta["val"].dtype
            target = add_parameter(gm, "projection", torch.eye(stream.width, dtype=dtype))
            with graph.inserting_after(out):
                weight = graph.get_attr(target)
                weight.meta["val"] = tensor_of(gm, target)
            with graph.inserting_after(weight):
                projected = insert_op(graph, aten.linear.default, (out, weight), like=out)
            for user in [u for u in out.users if u is not projected]:
                user.replace_input_with(out, projected)
        return PassResult(bool(writers), {"projections": len(writers)})

    def ensures(self, program: Program) -> None:
        assert not any(w.kind == "norm" for w in program.analysis(stream_analysis).writers)
