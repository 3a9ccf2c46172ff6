"""Rotate the residual stream, one orthogonal matrix per segment (design.md §1). Exact.

Every writer's output and every reader's input is rotated by its segment's Q; a residual edge from
segment a into segment b gets a shortcut matmul by Q_aᵀ Q_b, and no node at all where Q_a == Q_b.
Matrices come from any source (`fxslice.passes.slicegpt.rotations`: random, identity; PCA in calibration).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fxslice import InvalidOption, Pass, PassResult, Program, UnsupportedStructure
from fxslice.analysis.roles import SHORTCUT
from fxslice.analysis.stream import Segment, stream_analysis
from fxslice.analysis.weights import insert_linear, transform_input, transform_output
from fxslice.passes.slicegpt.basis import change_basis, change_tied_tables
from fxslice.passes.slicegpt.rotations import orthogonality_error

__all__ = ["RotateStream"]


class RotateStream(Pass):
    name = "rotate_stream"
    exact = True

    def __init__(self, rotations: Callable[[Segment, int], torch.Tensor] | Sequence[torch.Tensor], *, tol: float = 1e-8):
        if not callable(rotations) and not isinstance(rotations, Sequence):
            raise InvalidOption("rotations must be a callable (segment, width) -> Q or a sequence of matrices")
        self.rotations, self.tol = rotations, tol
        self.matrices: list[torch.Tensor] = []  # what the last run used, per segment

    def replay(self) -> RotateStream:
        """The matrices of the last run, fixed (a rotation source may be random or data-dependent)."""
        return RotateStream(list(self.matrices), tol=self.tol) if self.matrices else self

    def requires(self, program: Program) -> None:
        stream = program.analysis(stream_analysis)
        stream.check()
        if not stream.fused:
            raise UnsupportedStructure("rotate_stream: the stream still has affine or centring norms; run FuseNorms first")

    def _matrices(self, program: Program) -> list[torch.Tensor]:
        stream = program.analysis(stream_analysis)
        qs = []
        for seg in stream.segments:
            q = self.rotations(seg, seg.width) if callable(self.rotations) else self.rotations[seg.index]
            q = torch.as_tensor(q, dtype=torch.float64)
            if q.shape != (seg.width, seg.width) or orthogonality_error(q) > self.tol:
                raise InvalidOption(f"rotation for segment {seg.index} is not an orthogonal "
                                    f"{seg.width}x{seg.width} matrix (shape {tuple(q.shape)})")
            qs.append(q)
        if not callable(self.rotations) and len(self.rotations) != len(qs):
            raise InvalidOption(f"got {len(self.rotations)} rotations for {len(qs)} segments")
        return qs

    def call(self, program: Program) -> PassResult:
        gm = program.gm
        stream = program.analysis(stream_analysis)
        qs = self.matrices = self._matrices(program)
        moved = [not torch.equal(q, torch.eye(len(q), dtype=q.dtype)) for q in qs]  # an identity changes nothing
        for seg, q, m in zip(stream.segments, qs, moved, strict=True):
            if m:  # a table tied to a head behind a projection is changed once, for both: the tie survives
                change_basis(gm, seg, q, done=change_tied_tables(gm, seg, q))
        inserted = 0
        for sc in stream.shortcuts:
            qa, qb = qs[sc.src], qs[sc.dst]
            if sc.linear is not None:  # an existing shortcut matrix: it reads segment a and writes segment b
                if moved[sc.src]:
                    transform_input(gm, sc.linear, qa)
                if moved[sc.dst]:
                    transform_output(gm, sc.linear, qb)
            elif not torch.equal(qa, qb):  # a linear computes x Wᵀ: W = Qbᵀ Qa gives x Qaᵀ Qb
                insert_linear(gm, sc.source, qb.T @ qa, stem="shortcut", users=[sc.add], role=SHORTCUT)
                inserted += 1
        return PassResult(any(moved), {"segments": len(qs), "rotated": sum(moved), "shortcuts": inserted})
