"""Loss-aware segment widths for SliceGPT: where the stream can lose dimensions at least cost to the loss.

Slicing segment k keeps the top eigenvectors of the stream's covariance C_k there, so removing its m
weakest directions v_i moves the stream by -(v_i·x) v_i. To second order, with the Fisher E[g gᵀ] of the
loss gradient g at that value as the curvature, that costs about ½ E[(v_i·x)² (v_i·g)²], taken here as
½ (λ_i / N)(v_iᵀ G_k v_i / N) (λ_i the eigenvalue, G_k = Σ g gᵀ): variance alone (SliceGPT's spectrum)
ignores how much the loss cares about a direction, which differs greatly between the first and the last
layers. One forward and backward pass gives every C_k and G_k; a greedy allocation then removes, `multiple`
dimensions at a time, the segment whose next directions cost least loss per parameter saved, until the
sliced model's exact parameter count (`SlicedSize`) meets the budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fxslice import InvalidOption, Program, UnsupportedStructure
from fxslice.analysis.roles import TIED_HEAD_PROJECTION
from fxslice.analysis.stream import Stream, stream_analysis
from fxslice.calibration.gradients import run_with_gradients
from fxslice.calibration.observers import SecondMoment
from fxslice.core.graph import role_of, tensor_of
from fxslice.passes.slicegpt.slice_stream import segment_probe

__all__ = ["SlicedSize", "stream_sensitivity", "loss_aware_widths"]


@dataclass(frozen=True)
class _Tensor:
    numel: int
    axes: tuple[int, ...]  # the segments whose basis one of its axes is in (one entry per such axis)


class SlicedSize:
    """The exact parameter count of a fused program once each segment k is sliced to `widths[k]`.

    Every weight reading the stream loses the removed columns, every writer (linear, bias, embedding table)
    the removed rows, a tied head's projection both (it maps the last segment's basis into the first one's);
    and each residual edge between segments gains a `widths[src] x widths[dst]` shortcut matrix. Counted per
    tensor, once, as `Program.num_parameters` counts them."""

    def __init__(self, program: Program, stream: Stream | None = None) -> None:
        stream = stream or program.analysis(stream_analysis)
        if not stream.fused:
            raise UnsupportedStructure("SlicedSize counts a fused program: run ProjectNormWriters and FuseNorms first")
        gm = program.gm
        self.full = [int(segment_probe(stream, seg).meta["val"].shape[-1]) for seg in stream.segments]
        axes: dict[int, list[int]] = {}
        tensors: dict[int, torch.Tensor] = {}

        def assign(node, segment: int) -> None:
            tensor = tensor_of(gm, node)
            tensors[id(tensor)] = tensor
            axes.setdefault(id(tensor), []).append(segment)

        embedding_segments = [seg.index for seg in stream.segments for w in seg.writers if w.kind == "embedding"]
        for seg in stream.segments:
            for reader in seg.readers:
                assign(reader.linear.weight, seg.index)
                if role_of(reader.linear.node) == TIED_HEAD_PROJECTION and embedding_segments:
                    assign(reader.linear.weight, embedding_segments[0])  # its output is the table's basis
            for writer in seg.writers:
                if writer.kind == "linear":
                    assign(writer.linear.weight, seg.index)
                    if writer.linear.bias is not None:
                        assign(writer.linear.bias, seg.index)
                elif writer.kind == "embedding":
                    assign(writer.table, seg.index)
                elif writer.kind == "bias":
                    assign(writer.vector, seg.index)
            for shift in seg.shifts:
                assign(shift.args[1], seg.index)
        self.fixed = program.num_parameters() - sum(t.numel() for t in tensors.values())
        self.tensors = [_Tensor(tensors[key].numel(), tuple(segments)) for key, segments in axes.items()]
        self.shortcuts = [(sc.src, sc.dst) for sc in stream.shortcuts]

    def parameters(self, widths: Sequence[int]) -> int:
        if len(widths) != len(self.full):
            raise InvalidOption(f"got {len(widths)} widths for {len(self.full)} segments")
        total = self.fixed + sum(a * b for a, b in ((widths[s], widths[d]) for s, d in self.shortcuts))
        for tensor in self.tensors:
            size = tensor.numel
            for segment in tensor.axes:
                size = size * widths[segment] // self.full[segment]
            total += size
        return total


def stream_sensitivity(program: Program, windows: torch.Tensor, *, batch_size: int = 1,
                       progress: bool = False) -> list[torch.Tensor]:
    """Per segment, the loss cost of removing each direction, in the order slicing removes them (weakest
    variance first): ½ (λ_i / N)(v_iᵀ G v_i / N) over the eigenpairs of the stream covariance there. A tied
    head's projection writes into the embedding segment's basis, so slicing that segment also projects the
    head's input: its cost along the same directions is added there."""
    stream = program.analysis(stream_analysis)
    probes = [segment_probe(stream, seg) for seg in stream.segments]  # where slicing takes its basis
    embedding = next((seg.index for seg in stream.segments for w in seg.writers if w.kind == "embedding"), None)
    tied = [r.linear.output for seg in stream.segments for r in seg.readers
            if role_of(r.linear.node) == TIED_HEAD_PROJECTION] if embedding is not None else []
    watched = list(dict.fromkeys(probes + tied))
    values = {p: SecondMoment() for p in watched}
    gradients = {p: SecondMoment() for p in watched}
    run_with_gradients(program, list(windows.split(batch_size)), values=values, gradients=gradients,
                       progress=progress)

    def along(vectors: torch.Tensor, node) -> torch.Tensor:
        n = values[node].rows
        variance = torch.einsum("ji,jk,ki->i", vectors, values[node].sum, vectors)
        curvature = torch.einsum("ji,jk,ki->i", vectors, gradients[node].sum, vectors)
        return 0.5 * variance.clamp_min(0) * curvature.clamp_min(0) / (n * n)

    costs = []
    for k, probe in enumerate(probes):
        vectors = torch.linalg.eigh(values[probe].sum)[1]  # increasing eigenvalues: the order slicing drops them in
        cost = along(vectors, probe)
        for head in tied if k == embedding else []:
            cost = cost + along(vectors, head)
        costs.append(cost)
    return costs


def loss_aware_widths(size: SlicedSize, costs: Sequence[torch.Tensor], budget: int, *, multiple: int = 8,
                      fixed: Sequence[int] = ()) -> list[int]:
    """Widths (multiples of `multiple`, at least `multiple`) whose sliced parameter count is at most `budget`:
    greedily remove the `multiple` directions of the segment that cost least loss per parameter saved.
    Segments in `fixed` keep their full width."""
    widths = list(size.full)
    if size.parameters([multiple if k not in fixed else w for k, w in enumerate(widths)]) > budget:
        raise InvalidOption(f"a budget of {budget:,} parameters is below what the narrowest slicing keeps")
    prefix = [torch.cat([torch.zeros(1, dtype=torch.float64), c.to(torch.float64).cumsum(0)]) for c in costs]
    now = size.parameters(widths)
    while now > budget:
        best, choice = math.inf, None
        for k, width in enumerate(widths):
            step = width % multiple or multiple
            if k in fixed or width - step < multiple:
                continue
            removed = size.full[k] - width
            loss = float(prefix[k][removed + step] - prefix[k][removed])
            trial = widths.copy()
            trial[k] = width - step
            saved = now - size.parameters(trial)
            if saved > 0 and loss / saved < best:
                best, choice = loss / saved, (k, width - step, now - saved)
        if choice is None:
            raise InvalidOption(f"cannot reach a budget of {budget:,} parameters")
        k, widths[k], now = choice
    return widths
