"""SliceGPT proper: sequential PCA of the stream, segment by segment, and slicing (lossy).

For segment k (segments < k already rotated and sliced, segments >= k still in the original basis):
run the graph up to the segment's last value over the calibration batches, accumulate C = Σ XᵀX in
float64 at the value the segment's norms read, take Q_k from `eigh(C)` (decreasing eigenvalues),
keep its first d_k columns, and change the segment's basis to them: writers, readers, the shortcut
coming in, a new shortcut going out (to the original basis, until the next segment is done), the
cached stream values, and the literal widths in its views. Design.md §1 and §4.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import fx

from fxslice import BadInput, InvalidOption, Pass, PassResult, Program, UnsupportedStructure
from fxslice.analysis.matchers import LinearUse
from fxslice.analysis.roles import SHORTCUT
from fxslice.analysis.stream import Segment, Stream, stream_analysis
from fxslice.analysis.weights import insert_linear, remove_linear, transform_output
from fxslice.calibration.observers import SecondMoment
from fxslice.calibration.runner import StagedRunner
from fxslice.core.graph import aten, kept, refresh_vals
from fxslice.core.health import check_finite, check_tokens
from fxslice.core.progress import progress_bar
from fxslice.passes.slicegpt.basis import change_basis, change_tied_tables

__all__ = ["SliceStream", "SegmentReport", "ConstantWidths", "constant_widths", "per_block", "per_stream",
           "segment_probe"]

_SHAPE_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default}


@dataclass(frozen=True)
class ConstantWidths:
    """Every segment keeps (1 - sparsity) of its width, rounded down to a multiple of `multiple`.

    A value, not a closure, so that a recipe can write it down."""

    sparsity: float
    multiple: int = 8

    def __post_init__(self) -> None:
        s = self.sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s < 1.0:
            raise InvalidOption(f"sparsity must be a number in [0, 1), got {s!r}")
        if isinstance(self.multiple, bool) or not isinstance(self.multiple, int) or self.multiple < 1:
            raise InvalidOption(f"the width multiple must be a positive integer, got {self.multiple!r}")

    def __call__(self, segment: Segment, full: int) -> int:
        kept = int((1.0 - self.sparsity) * full)
        return max(self.multiple, kept - kept % self.multiple) if kept >= self.multiple else max(1, kept)


def constant_widths(sparsity: float, *, multiple: int = 8) -> ConstantWidths:
    """Every segment keeps (1 - sparsity) of its width, rounded down to a multiple of `multiple`."""
    return ConstantWidths(sparsity, multiple)


def per_block(segment: Segment) -> str:
    """`share` key: the module holding the segment's norm (a decoder layer), so that the attention and MLP
    halves of a block use one basis and one shortcut per block is left instead of two."""
    return segment.module.rpartition(".")[0]


def per_stream(segment: Segment) -> str:
    """`share` key: one basis for the whole stream. Every shortcut is then the identity and goes, and every norm
    reads the same narrower stream: a stock decoder with a smaller hidden size (what runtimes load). The basis is
    the PCA of every segment's token *directions* (tokens scaled to unit length): the norms read directions, and
    the stream's scale grows along the layers, so plain ΣXᵀX would serve the last layers' few large tokens
    (measured on SmolLM2 at 25 %, 8 test windows: 105 with ΣXᵀX, 74 with directions)."""
    return ""


@dataclass(frozen=True)
class SegmentReport:
    """What slicing kept of one segment: widths and the fraction of calibration variance."""

    index: int
    module: str
    width: int
    kept: int
    variance_kept: float
    min_eigenvalue: float
    warning: str = ""  # numerical trouble seen in this segment's covariance, if any


def _health(eigenvalues: torch.Tensor, kept: int, windows: int) -> str:
    """Warn where XᵀX is not what a healthy covariance looks like: XᵀX is PSD, so eigenvalues below
    -1e-9·λ_max are numerical trouble; and a basis wider than the signal's rank keeps noise."""
    top = float(eigenvalues[0])
    if float(eigenvalues[-1]) < -1e-9 * top:
        return f"negative eigenvalue {float(eigenvalues[-1]):.3g} (λ_max {top:.3g}): accumulate in float64 / check the activations"
    rank = int((eigenvalues > 1e-12 * top).sum())
    if rank < kept:
        return (f"covariance has rank {rank} < kept width {kept}: more calibration data ({windows} windows now), or "
                "more varied text (repeated or boilerplate text spans few directions)")
    return ""


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
        share: Callable[[Segment], str] | None = None,
        progress: bool = False,
    ):
        if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.numel() == 0:
            raise InvalidOption("calibration windows must be a non-empty [n, length] tensor of token ids")
        if batch_size < 1:
            raise InvalidOption(f"batch size must be positive, got {batch_size}")
        self.windows, self.widths, self.batch_size = windows, widths, batch_size
        self.slice_head, self.progress, self.share = slice_head, progress, share
        self.reports: list[SegmentReport] = []
        self.bases: list[torch.Tensor] = []  # per segment, [full, kept]: what calibration chose
        self.peak_staged_bytes = 0  # offloaded programs: the most weight bytes one stage held on the device
        self._given: list[torch.Tensor] | None = None

    def replay(self) -> SliceStream:
        """The same slicing with the bases already chosen, for another capture of the model (no calibration)."""
        if not self.bases:
            raise InvalidOption("slice_stream: run the pass before replaying it")
        again = copy.copy(self)
        again._given, again.reports, again.progress = list(self.bases), [], False
        return again

    def requires(self, program: Program) -> None:
        if self._given is None:
            if program.cache is not None:
                raise InvalidOption("slice_stream: calibrate on the plain capture, then `fxslice.replay` the passes "
                                    "on the KV-cache capture")
            check_finite(program)
            check_tokens(program, self.windows)
        stream = program.analysis(stream_analysis)
        stream.check()
        if not stream.fused:
            raise UnsupportedStructure("slice_stream: run ProjectNormWriters and FuseNorms first")
        if any(sc.linear is not None for sc in stream.shortcuts):
            raise UnsupportedStructure("slice_stream: the stream is already rotated; slice the fused model instead")
        if not callable(self.widths) and len(self.widths) != len(stream.segments):
            raise InvalidOption(f"got {len(self.widths)} widths for {len(stream.segments)} segments")

    def _shares_previous(self, stream: Stream, k: int) -> bool:
        """Whether segment k takes segment k-1's basis: same `share` key, joined by a shortcut."""
        if self._given is not None:
            return k > 0 and self._given[k] is self._given[k - 1]
        if self.share is None or k == 0:
            return False
        joined = any(sc.src == k - 1 and sc.dst == k for sc in stream.shortcuts)
        return joined and self.share(stream.segments[k]) == self.share(stream.segments[k - 1])

    def _width(self, seg: Segment, full: int, last: bool) -> int:
        if last and not self.slice_head:
            return full
        d = self.widths(seg, full) if callable(self.widths) else int(self.widths[seg.index])
        if not 1 <= d <= full:
            raise InvalidOption(f"width {d} for segment {seg.index} is outside [1, {full}]")
        return d

    def call(self, program: Program) -> PassResult:
        gm = program.gm
        stream = program.analysis(stream_analysis)  # node identities stay valid: slicing only adds shortcuts
        runner = None if self._given else StagedRunner(program, list(self.windows.split(self.batch_size)))
        order = {n: i for i, n in enumerate(program.graph.nodes)}
        incoming: dict[int, tuple[int, LinearUse]] = {}  # segment -> (source segment, the shortcut matmul into it)
        self.reports = []
        if runner is not None:
            self.bases = []
        count = len(stream.segments)
        if self._given is not None and len(self._given) != count:
            raise UnsupportedStructure(f"slice_stream: replaying {len(self._given)} bases on a stream of {count} segments")
        pending: dict[int, torch.Tensor] = {}  # covariances of a group's later members, taken with its first
        for k in progress_bar(range(count), "calibrating segments", enabled=self.progress):
            seg = stream.segments[k]
            probe = segment_probe(stream, seg)
            full = int(probe.meta["val"].shape[-1])
            shared = self._shares_previous(stream, k)
            if runner is None:
                q = self._given[k]
            else:
                if shared:  # the group's basis: the shortcut between them is the identity
                    cov, q = pending.pop(k), self.bases[-1]
                else:
                    after = k + 1
                    while after < count and self._shares_previous(stream, after):  # later members take this basis
                        after += 1
                    whole = after - k == count  # one basis for the stream: every token's direction counts once
                    cov = _covariance(runner, seg, probe, order, k, whole)
                    joint = cov
                    members = stream.segments[k + 1: after]  # the group's calibration happens here: show it
                    for member in progress_bar(members, "covariances for one basis",
                                               enabled=self.progress and len(members) > 1):
                        pending[member.index] = _covariance(runner, member, segment_probe(stream, member), order,
                                                            member.index, whole)
                        joint = joint + pending[member.index]
                    vectors = torch.linalg.eigh(joint)[1].flip(1)
                    q = vectors[:, : self._width(seg, full, last=after == count)].contiguous()
                eigenvalues = torch.linalg.eigvalsh(cov).flip(0)
                kept_variance = float(torch.einsum("ij,ik,kj->", q, cov, q))
                self.bases.append(kept(gm, q))  # for replay: on disk where the weights are (7 B: 6.5 GB of bases)
                total = float(eigenvalues.clamp_min(0).sum())
                share = kept_variance / total if total > 0 else 0.0
                self.reports.append(SegmentReport(k, seg.module, full, int(q.shape[1]), share, float(eigenvalues[-1]),
                                                  _health(eigenvalues, int(q.shape[1]), len(self.windows))))
            change_basis(gm, seg, q, done=change_tied_tables(gm, seg, q))
            if k in incoming:  # from an earlier, already sliced segment
                src, shortcut = incoming.pop(k)
                if shared and src == k - 1:  # Q_k = Q_(k-1): the shortcut is the identity
                    remove_linear(gm, shortcut)
                else:
                    transform_output(gm, shortcut, q)
            for sc in stream.shortcuts:
                if sc.src == k:  # back to the original basis until segment sc.dst is done
                    incoming[sc.dst] = k, insert_linear(gm, sc.source, q, stem="shortcut", users=[sc.add],
                                                     role=SHORTCUT)
            _set_literal_widths(seg.values, int(q.shape[0]), int(q.shape[1]))
            if runner is not None:
                runner.transform(seg.values, lambda v, q=q: (v.to(torch.float64) @ q).to(v.dtype))
        weights = list(gm.graph.find_nodes(op="get_attr"))
        changed = [*weights, *(u for w in weights for u in w.users if len(u.all_input_nodes) == 1),  # weight views
                   *(v for seg in stream.segments for v in seg.values), *gm.graph.find_nodes(op="call_function",
                   target=aten.linear.default)]  # every shape that slicing changed, not the whole graph
        refresh_vals(gm, changed)
        self.peak_staged_bytes = runner.peak_staged_bytes if runner is not None else 0
        return PassResult(True, {"widths": [int(q.shape[1]) for q in (self._given or self.bases)]})


def _covariance(runner: StagedRunner, seg: Segment, probe: fx.Node, order: dict[fx.Node, int], k: int,
                directions: bool = False) -> torch.Tensor:
    """ΣXᵀX (float64) of the stream at `probe` over all calibration batches, running through the segment;
    `directions`: of the tokens scaled to unit length."""
    moment = SecondMoment(directions=directions)
    runner.run_through(max(seg.nodes, key=order.__getitem__), {probe: moment})
    cov = moment.sum
    if cov is None:
        raise BadInput(f"segment {k} ({seg.module}): no calibration batch reached it")
    if not bool(torch.isfinite(cov).all()) or float(cov.trace()) <= 0:
        raise BadInput(f"segment {k} ({seg.module}): the calibration activations are "
                       f"{'not finite' if not bool(torch.isfinite(cov).all()) else 'all zero'}; "
                       "the model or the calibration text is broken there")
    return cov


def segment_probe(stream: Stream, seg: Segment) -> fx.Node:
    """The value whose statistics define the segment's basis: what its norms read, or what leaves it."""
    if seg.norms:
        return seg.norms[0].input
    leaving = [sc.source for sc in stream.shortcuts if sc.src == seg.index]
    return leaving[0] if leaving else seg.nodes[-1]


def _set_literal_widths(nodes: Sequence[fx.Node], old: int, new: int) -> None:
    """Views and zeros with the width written as a number (GPT-2's Conv1D, MoE reshapes, the base JetMoE adds its
    experts' rows into) must follow the slice."""
    for node in nodes:
        at = 1 if node.target in _SHAPE_OPS or node.target == aten.new_zeros.default else (
            0 if node.target == aten.zeros.default else None)
        if at is not None and len(node.args) > at and isinstance(node.args[at], (list, tuple)) and node.args[at]:
            shape = list(node.args[at])
            if isinstance(shape[-1], int) and shape[-1] == old:
                shape[-1] = new
                node.args = (*node.args[:at], shape, *node.args[at + 1:])
