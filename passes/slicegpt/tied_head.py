"""A low-rank correction of a tied head after slicing: what the sliced table no longer gives the logits.

With the tie kept, the head reads the embedding table sliced to the embedding segment's basis Q₀, through a
projection P from the last segment's basis Q_L (`FuseNorms(keep_ties=True)`): for the head's input h,
logits = h Q_Lᵀ P_refᵀ Q₀Q₀ᵀ Eᵀ, where the unsliced head gives h Q_Lᵀ P_refᵀ Eᵀ. What is lost,
D = Q_Lᵀ P_refᵀ (I − Q₀Q₀ᵀ) Eᵀ (width x vocabulary), has rank at most the number of dimensions sliced from the
embedding segment. `CorrectTiedHead` adds its best rank-r part to the logits, h A B, in the norm the logits have on
calibration text: with Σ = E[hhᵀ] there, D projected onto the top r right singular vectors of Σ^½ D. A shift common to all of a token's
logits does not change its softmax, so where the logits reach the output unchanged D is first centred over the
vocabulary. It costs r (d_L + V) parameters, where untying costs V x d₀ (21 M on SmolLM2 at 25 %).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx

from fxslice import BadInput, InvalidOption, Pass, PassResult, Program, UnsupportedStructure
from fxslice.analysis.matchers import LinearUse, match_linear
from fxslice.analysis.roles import TIED_HEAD_PROJECTION
from fxslice.analysis.stream import stream_analysis
from fxslice.analysis.weights import insert_low_rank, weight_matrix
from fxslice.calibration.observers import SecondMoment
from fxslice.calibration.runner import StagedRunner
from fxslice.core.graph import add_parameter, aten, role_of, tensor_of
from fxslice.core.health import check_tokens

__all__ = ["CorrectTiedHead", "HeadCorrection", "TIED_HEAD_CORRECTION"]

TIED_HEAD_CORRECTION = "tied_head_correction"

# ops that carry logits to the output without changing a per-token shift's meaning
_PASSING = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.slice.Tensor,
            aten.select.int, aten.clone.default, aten.contiguous.default, aten.alias.default,
            aten._to_copy.default, aten.to.dtype}


@dataclass(frozen=True)
class HeadCorrection:
    """What the correction holds: its rank, its parameters and the share of the lost logit energy (Σ-weighted,
    on the calibration text) that it restores."""

    rank: int
    parameters: int
    restored: float
    centred: bool


class CorrectTiedHead(Pass):
    """Add the best rank-`rank` part of what slicing took from a tied head's logits (module docstring).

    `reference`: the fused program before slicing (same node names); `bases`: the per-segment bases it was sliced
    with (`SliceStream.bases`); `windows`: calibration token ids for the head input's second moment. A program whose
    embedding segment kept its whole width has nothing to correct and is left as it is."""

    name = "correct_tied_head"
    exact = False

    def __init__(self, reference: Program, bases: Sequence[torch.Tensor], windows: torch.Tensor, *, rank: int,
                 batch_size: int = 1):
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise InvalidOption(f"tied head correction: rank must be a positive integer, got {rank!r}")
        if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.numel() == 0:
            raise InvalidOption("calibration windows must be a non-empty [n, length] tensor of token ids")
        self.reference, self.bases, self.windows = reference, list(bases), windows
        self.rank, self.batch_size = rank, batch_size
        self.report: HeadCorrection | None = None
        self._factors: tuple[torch.Tensor, torch.Tensor] | None = None  # (A, B), fixed once computed

    def replay(self) -> CorrectTiedHead:
        if self.report is None:
            raise InvalidOption("correct_tied_head: run the pass before replaying it")
        return copy.copy(self)

    def requires(self, program: Program) -> None:
        _projection(program)
        if self._factors is None:
            check_tokens(program, self.windows)

    def call(self, program: Program) -> PassResult:
        projection = _projection(program)
        head = _head_of(program, projection)
        if self._factors is None:
            self._factors, self.report = self._solve(program, projection, head)
        a, b = self._factors
        if a.shape[1] == 0:
            return PassResult(False, {"rank": 0})
        _insert(program.gm, projection.input, head.output, a, b)
        return PassResult(True, {"rank": a.shape[1], "restored": round(self.report.restored, 6)})

    def _solve(self, program: Program, projection: LinearUse, head: LinearUse
               ) -> tuple[tuple[torch.Tensor, torch.Tensor], HeadCorrection]:
        ref = self.reference
        ref_projection = _projection(ref)
        ref_head = _head_of(ref, ref_projection)
        stream = ref.analysis(stream_analysis)
        if len(self.bases) != len(stream.segments):
            raise InvalidOption(f"tied head correction: {len(self.bases)} bases for the reference's "
                                f"{len(stream.segments)} stream segments")
        table = tensor_of(ref.gm, ref_head.weight)
        last = next((s.index for s in stream.segments for r in s.readers if r.linear.node is ref_projection.node), None)
        first = next((s.index for s in stream.segments for w in s.writers
                      if w.kind == "embedding" and tensor_of(ref.gm, w.table) is table), None)
        if last is None or first is None:
            raise UnsupportedStructure("tied head correction: the reference's head projection or embedding is not on "
                                       "its residual stream")
        q_last, q_first = (self.bases[i].to(torch.float64) for i in (last, first))
        width = int(projection.input.meta["val"].shape[-1])
        if q_last.shape[1] != width:
            raise UnsupportedStructure(f"tied head correction: the head reads {width} dimensions, the basis of segment "
                                       f"{last} keeps {q_last.shape[1]}; the bases are not the ones this program was "
                                       "sliced with")
        device = table.device
        empty = torch.zeros(width, 0, dtype=torch.float64), torch.zeros(0, table.shape[0], dtype=torch.float64)
        if q_first.shape[1] == q_first.shape[0]:
            return empty, HeadCorrection(0, 0, 1.0, False)
        e = weight_matrix(ref.gm, ref_head).to(torch.float64)  # V x d (out x in)
        into = q_last.to(device).T @ weight_matrix(ref.gm, ref_projection).to(torch.float64).T  # d_L x d
        q0 = q_first.to(device)
        lost = into @ e.T - (into @ q0) @ (q0.T @ e.T)  # D, d_L x V
        centred = _reaches_output_unchanged(head.output)
        if centred:
            lost -= lost.mean(dim=1, keepdim=True)
        sigma = self._head_input_moment(program, projection).to(device)
        values, vectors = torch.linalg.eigh(sigma)
        weighted = ((vectors * values.clamp_min(0).sqrt()) @ vectors.T) @ lost  # N = Σ^½ D
        energy, left = torch.linalg.eigh(weighted @ weighted.T)  # N Nᵀ = U S² Uᵀ
        energy, left = energy.flip(0).clamp_min(0), left.flip(1)
        rank = min(self.rank, q_first.shape[0] - q_first.shape[1], width,
                   int((energy > 1e-24 * float(energy[0])).sum()))
        # the best rank-r part of D in that norm is D W Wᵀ, W = Nᵀ U_r / S_r: N's top right singular vectors
        right = (weighted.T @ left[:, :rank]) / energy[:rank].sqrt()
        a, b = lost @ right, right.T
        total = float(energy.sum())
        restored = float(energy[:rank].sum()) / total if total > 0 else 1.0
        return (a.cpu(), b.cpu()), HeadCorrection(rank, rank * (width + table.shape[0]), restored, centred)

    def _head_input_moment(self, program: Program, projection: LinearUse) -> torch.Tensor:
        moment = SecondMoment()
        runner = StagedRunner(program, list(self.windows.split(self.batch_size)))
        runner.run_through(projection.input, {projection.input: moment})
        if moment.sum is None:
            raise BadInput("tied head correction: no calibration batch reached the head")
        return moment.mean()


def _projection(program: Program) -> LinearUse:
    found = [u for n in program.graph.nodes if role_of(n) == TIED_HEAD_PROJECTION
             and (u := match_linear(program.gm, n)) is not None]
    if len(found) != 1:
        raise UnsupportedStructure(
            f"tied head correction: the program has {len(found)} tied head projections, not one; it needs a model "
            "that ties its head to its embedding, fused with the tie kept (FuseNorms(keep_ties=True))")
    return found[0]


def _head_of(program: Program, projection: LinearUse) -> LinearUse:
    heads = [u for n in projection.output.users if (u := match_linear(program.gm, n)) is not None]
    if len(heads) != 1 or heads[0].input is not projection.output:
        raise UnsupportedStructure(f"tied head correction: '{projection.node.name}' does not feed exactly one head")
    return heads[0]


def _reaches_output_unchanged(logits: fx.Node) -> bool:
    """Whether every path from the logits to the output passes only views, casts and slices."""
    todo, seen = [logits], set()
    while todo:
        node = todo.pop()
        for user in node.users:
            if user.op == "output" or user in seen:
                continue
            if user.op != "call_function" or user.target not in _PASSING:
                return False
            seen.add(user)
            todo.append(user)
    return True


def _insert(gm: fx.GraphModule, source: fx.Node, logits: fx.Node, a: torch.Tensor, b: torch.Tensor) -> None:
    """logits + (source @ A) @ B, as two new linears (weights Aᵀ: r x d_L and Bᵀ: V x r) and an add."""
    dtype, device = logits.meta["val"].dtype, logits.meta["val"].device
    names = [add_parameter(gm, TIED_HEAD_CORRECTION, m.T.to(dtype).to(device).contiguous()) for m in (a, b)]
    insert_low_rank(gm, source, logits, *names, role=TIED_HEAD_CORRECTION)
