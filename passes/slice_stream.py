"""SliceGPT proper: sequential PCA of the stream, segment by segment, and slicing (lossy).

For segment k (segments < k already rotated and sliced, segments >= k still in the original basis):
run the graph up to the segment's last value over the calibration batches, accumulate C = Σ XᵀX in
float64 at the value the segment's norms read, take Q_k from `eigh(C)` (decreasing eigenvalues),
keep its first d_k columns, and change the segment's basis to them: writers, readers, the shortcut
coming in, a new shortcut going out (to the original basis, until the next segment is done), the
cached stream values, and the literal widths in its views. Design.md §1 and §4.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import fx

from fxslice import InvalidOption, Pass, PassResult, Program, UnsupportedStructure
from fxslice.basis import change_basis
from fxslice.calibrate import StagedRunner
from fxslice.graph import add_parameter, aten, insert_op, refresh_vals, tensor_of
from fxslice.progress import progress_bar
from fxslice.stream import SHORTCUT_ROLE, Segment, Stream, stream_analysis
from fxslice.weights import transform_output
from passes.fuse_norms import is_fused

__all__ = ["SliceStream", "SegmentReport", "constant_widths"]

_SHAPE_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default}
_WEIGHT_VIEWS = {aten.t.default, aten.transpose.int, aten.permute.default, aten.numpy_T.default}


def constant_widths(sparsity: float, *, multiple: int = 8) -> Callable[[Segment, int], int]:
    """Every segment keeps (1 - sparsity) of its width, rounded down to a multiple of `multiple`."""
    if not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise InvalidOption(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if not isinstance(multiple, int) or multiple < 1:
        raise InvalidOption(f"the width multiple must be a positive integer, got {multiple!r}")

    def width(segment: Segment, full: int) -> int:
        kept = int((1.0 - sparsity) * full)
        return max(multiple, kept - kept % multiple) if kept >= multiple else max(1, kept)

    return width


@dataclass(frozen=True)
class SegmentReport:
    """What slicing kept of one segment: widths and the fraction of calibration variance."""

    index: int
    module: str
    width: int
    kept: int
    variance_kept: float
    min_eigenvalue: float


class SliceStream(Pass):
    name = "slice_stream"
    exact = False

    def __init__(
        self,
        windows: torch.Tensor,
        widths: Callable[[Segment, int], int] | Sequence[int],
        *,
        batch_size: int = 8,
        slice_head: bool = True,
        progress: bool = False,
    ):
        if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.numel() == 0:
            raise InvalidOption("calibration windows must be a non-empty [n, length] tensor of token ids")
        if batch_size < 1:
            raise InvalidOption(f"batch size must be positive, got {batch_size}")
        self.windows, self.widths, self.batch_size = windows, widths, batch_size
        self.slice_head, self.progress = slice_head, progress
        self.reports: list[SegmentReport] = []

    def requires(self, program: Program) -> None:
        stream = program.analysis(stream_analysis)
        stream.check()
        if not all(is_fused(n) for n in stream.norms) or any(w.kind == "norm" for w in stream.writers):
            raise UnsupportedStructure("slice_stream: run ProjectNormWriters and FuseNorms first")
        if any(sc.linear is not None for sc in stream.shortcuts):
            raise UnsupportedStructure("slice_stream: the stream is already rotated; slice the fused model instead")
        if not callable(self.widths) and len(self.widths) != len(stream.segments):
            raise InvalidOption(f"got {len(self.widths)} widths for {len(stream.segments)} segments")

    def _width(self, seg: Segment, full: int, last: bool) -> int:
        if last and not self.slice_head:
            return full
        d = self.widths(seg, full) if callable(self.widths) else int(self.widths[seg.index])
        if not 1 <= d <= full:
            raise InvalidOption(f"width {d} for segment {seg.index} is outside [1, {full}]")
        return d

    def call(self, program: Program) -> PassResult:
        runner = StagedRunner(program, list(self.windows.split(self.batch_size)))
        count = len(program.analysis(stream_analysis).segments)
        self.reports = []
        for k in progress_bar(range(count), "calibrating segments", enabled=self.progress):
            stream = stream_analysis(program)
            seg = stream.segments[k]
            probe = _probe(stream, seg)
            order = {n: i for i, n in enumerate(program.graph.nodes)}
            stop = max(seg.nodes, key=order.__getitem__)
            full = int(probe.meta["val"].shape[-1])
            cov = torch.zeros(full, full, dtype=torch.float64)

            def accumulate(env, probe=probe, cov=cov, full=full):
                x = env[probe].reshape(-1, full).to(torch.float64)
                cov.addmm_(x.T, x)

            runner.run_through(stop, accumulate)
            eigenvalues, vectors = torch.linalg.eigh(cov)
            eigenvalues, vectors = eigenvalues.flip(0), vectors.flip(1)
            d = self._width(seg, full, last=k == count - 1)
            q = vectors[:, :d].contiguous()
            self._change_segment(program, stream, seg, q, runner)
            total = float(eigenvalues.clamp_min(0).sum())
            self.reports.append(SegmentReport(k, seg.module, full, d, float(eigenvalues[:d].clamp_min(0).sum()) / total
                                              if total > 0 else 0.0, float(eigenvalues[-1])))
        return PassResult(True, {"widths": [r.kept for r in self.reports]})

    def _change_segment(self, program: Program, stream: Stream, seg: Segment, q: torch.Tensor,
                        runner: StagedRunner) -> None:
        gm, graph = program.gm, program.graph
        change_basis(gm, seg, q)
        for sc in stream.shortcuts:
            if sc.dst == seg.index and sc.linear is not None:  # comes from the previous, already sliced segment
                transform_output(gm, sc.linear, q)
            elif sc.src == seg.index and sc.linear is None:  # back to the original basis for now
                target = add_parameter(gm, "shortcut", q.to(sc.source.meta["val"].dtype))
                with graph.inserting_before(sc.add):
                    weight = graph.get_attr(target)
                    weight.meta["val"] = tensor_of(gm, target)
                    node = insert_op(graph, aten.linear.default, (sc.source, weight), like=sc.add)
                node.meta["fxslice_role"] = SHORTCUT_ROLE
                sc.add.replace_input_with(sc.source, node)
        _set_literal_widths(seg.values, int(q.shape[0]), int(q.shape[1]))
        runner.transform(seg.values, lambda v: (v.to(torch.float64) @ q).to(v.dtype))
        weights = [n for n in graph.nodes if n.op == "get_attr"]
        weight_views = [u for w in weights for u in w.users if u.target in _WEIGHT_VIEWS]
        shortcuts = [n for n in graph.nodes if n.meta.get("fxslice_role") == SHORTCUT_ROLE]
        refresh_vals(gm, [*weights, *weight_views, *seg.values, *shortcuts])
        gm.recompile()
        program.mark_changed()


def _probe(stream: Stream, seg: Segment) -> fx.Node:
    """The value whose statistics define the segment's basis: what its norms read, or what leaves it."""
    if seg.norms:
        return seg.norms[0].input
    leaving = [sc.source for sc in stream.shortcuts if sc.src == seg.index]
    return leaving[0] if leaving else seg.nodes[-1]


def _set_literal_widths(nodes: Sequence[fx.Node], old: int, new: int) -> None:
    """Views with the width written as a number (GPT-2's Conv1D, MoE reshapes) must follow the slice."""
    for node in nodes:
        if node.target in _SHAPE_OPS and isinstance(node.args[1], (list, tuple)) and node.args[1]:
            shape = list(node.args[1])
            if isinstance(shape[-1], int) and shape[-1] == old:
                shape[-1] = new
                node.args = (node.args[0], shape, *node.args[2:])
