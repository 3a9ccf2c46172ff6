"""Closed-form refit of the linears around a compressed stream, against the uncompressed model.

Slicing leaves every linear at the stream with the weights it had, restricted to the kept directions; but each now
sees other inputs: a reader's norm divides by a smaller sum of squares, the dropped directions were correlated
with the kept ones, and every upstream slice has moved the stream. `RefitLinears` runs the compressed program and
a reference (the same model before compression) side by side over the calibration windows, layer by layer, and
gives each linear W' = argmin ‖U W'ᵀ − U_ref W_refᵀ M‖² + λ‖W' − W‖² (U: its input in the compressed model, U_ref
in the reference; M the kept basis for a writer into the stream, the identity for a reader), a damped least-squares
fit whose statistics are three sums of outer products. Linears are fitted in graph order, so each fit sees the
inputs that the fits before it produce. Where nothing was removed, W is the exact minimiser and the refit changes
nothing; otherwise the calibration reconstruction error can only go down.

Measured on SmolLM2 at 25 % (benchmarks/README.md, "Refit"): every error goes down and the perplexity does not follow (74.85 without;
107.89 readers, 76.41 writers, 87.79 both): a reader's output error is not the loss, and the writers learn the
calibration text. So it is off by default; it stays as a tested building block for objectives that weight errors
by what the loss sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx

from fxslice import BadInput, InvalidOption, Pass, PassResult, Program, UnsupportedStructure
from fxslice.analysis.matchers import LinearUse, match_linear
from fxslice.analysis.roles import TIED_HEAD_PROJECTION
from fxslice.analysis.stream import stream_analysis
from fxslice.analysis.weights import replace_weight, weight_matrix
from fxslice.calibration.runner import StagedRunner
from fxslice.core.graph import role_of, set_tensor, tensor_of
from fxslice.core.health import check_finite, check_tokens
from fxslice.core.progress import progress_bar

__all__ = ["RefitLinears", "LinearFit", "SetWeights", "reconstruction_errors"]


@dataclass(frozen=True)
class LinearFit:
    """One refitted linear: its relative calibration reconstruction error before and after."""

    linear: str
    error_before: float
    error_after: float


class _Queue:
    """The reference's value of a node, batch by batch, until the compressed program asks for it."""

    def __init__(self) -> None:
        self.values: list[torch.Tensor] = []

    def update(self, value: torch.Tensor) -> None:
        self.values.append(value.detach().reshape(-1, value.shape[-1]))


class _Paired:
    """Σ uᵀu, Σ uᵀu_ref and Σ u_refᵀu_ref (float64) over the tokens of every batch, u from the compressed
    program, u_ref from the reference's queue (same batches, same order)."""

    def __init__(self, reference: _Queue) -> None:
        self.reference = reference
        self.batch = 0
        self.uu = self.ur = self.rr = None

    def update(self, value: torch.Tensor) -> None:
        u = value.detach().reshape(-1, value.shape[-1]).to(torch.float64)
        r = self.reference.values[self.batch].to(torch.float64)
        self.reference.values[self.batch] = None  # each reference value is read once
        self.batch += 1
        if u.shape[0] != r.shape[0]:
            raise UnsupportedStructure(f"refit: the compressed program has {u.shape[0]} rows where the reference has "
                                       f"{r.shape[0]}; the two programs do not compute the same tokens")
        sums = (u.T @ u, u.T @ r, r.T @ r)
        if self.uu is None:
            self.uu, self.ur, self.rr = sums
        else:
            self.uu += sums[0]
            self.ur += sums[1]
            self.rr += sums[2]

    def all_reduce(self) -> None:
        import torch.distributed as dist

        for total in (self.uu, self.ur, self.rr):
            dist.all_reduce(total)


class RefitLinears(Pass):
    """Refit the linears around the compressed program's residual stream against `reference`, the same model
    before compression (same node names: capture it, run the exact passes, clone it, then compress).

    `readers`: the linears that read the stream (their outputs keep their meaning). `bases`: the per-segment bases
    the stream was sliced with (`SliceStream.bases`, segments as the reference's stream analysis numbers them);
    given, the linears that *write* into the stream are refitted too, to the reference's output expressed in the
    kept basis, y_ref Q — what the segment's slice can hold of what the dense layer added.
    `damping` λ is relative to the mean of diag(ΣUᵀU) and pulls towards the current weights, not towards zero.
    Linears whose weight is not a plain matrix (mixture-of-experts stacks), or whose output was compressed with no
    basis to say how, are left as they are and reported in `skipped`. Memory: besides both programs, the reference's
    input to one linear over every calibration token at a time (an MLP's down projection: tokens x its width)."""

    name = "refit_linears"
    exact = False

    def __init__(self, reference: Program, windows: torch.Tensor, *, readers: bool = True,
                 bases: Sequence[torch.Tensor] | None = None, damping: float = 0.01, batch_size: int = 1,
                 progress: bool = False):
        if not isinstance(reference, Program):
            raise InvalidOption("refit: the reference must be a Program (the model before compression)")
        if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.numel() == 0:
            raise InvalidOption("calibration windows must be a non-empty [n, length] tensor of token ids")
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping >= 0:
            raise InvalidOption(f"refit: damping must be a number >= 0, got {damping!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidOption(f"refit: batch size must be a positive integer, got {batch_size!r}")
        if not readers and bases is None:
            raise InvalidOption("refit: nothing to refit (readers=False and no bases for the writers)")
        self.reference, self.windows, self.damping = reference, windows, float(damping)
        self.readers, self.bases = readers, None if bases is None else list(bases)
        self.batch_size, self.progress = batch_size, progress
        self.fits: list[LinearFit] = []
        self.skipped: dict[str, str] = {}  # linear -> why it was left as it was
        self.written: dict[str, torch.Tensor] = {}  # weight name -> value, for `replay`

    def requires(self, program: Program) -> None:
        if program.cache is not None:
            raise InvalidOption("refit: refit the plain capture, then `fxslice.replay` onto the KV-cache capture")
        check_finite(program)
        check_tokens(program, self.windows)
        program.analysis(stream_analysis).check()
        if self.bases is not None:
            count = len(self.reference.analysis(stream_analysis).segments)
            if len(self.bases) != count:
                raise InvalidOption(f"refit: {len(self.bases)} bases for the reference's {count} stream segments")

    def replay(self) -> Pass:
        return SetWeights(dict(self.written), self.name)

    def call(self, program: Program) -> PassResult:
        groups = self._groups(program)
        batches = list(self.windows.split(self.batch_size))
        mine, theirs = StagedRunner(program, batches), StagedRunner(self.reference, batches)
        self.fits, self.written = [], {}
        for source, uses in progress_bar(groups, "refitting linears", enabled=self.progress):
            ref_source = uses[0].ref_use.input
            queue = _Queue()
            theirs.run_through(ref_source, {ref_source: queue})
            paired = _Paired(queue)
            mine.run_through(source, {source: paired})
            if paired.uu is None:
                raise BadInput(f"refit: no calibration batch reached {source.name}")
            for fit in uses:
                self._fit(program, fit, paired)
        return PassResult(bool(self.fits), {"refitted": len(self.fits), "skipped": len(self.skipped)})

    def _groups(self, program: Program) -> list[tuple[fx.Node, list[_Fit]]]:
        """What can be refitted, grouped by the value it reads, in graph order; the rest in `skipped`."""
        named = {n.name: n for n in self.reference.graph.nodes}
        out_maps: dict[str, torch.Tensor] = {}  # writer -> the basis its output was changed to
        if self.bases is not None:
            for seg in self.reference.analysis(stream_analysis).segments:
                for writer in seg.writers:
                    if writer.linear is not None:
                        out_maps[writer.linear.node.name] = self.bases[seg.index]
        candidates = [r.linear for r in program.analysis(stream_analysis).readers] if self.readers else []
        mine = {n.name: n for n in program.graph.nodes}
        candidates += [u for name in out_maps if name in mine and (u := match_linear(program.gm, mine[name]))]
        groups: dict[fx.Node, list[_Fit]] = {}
        self.skipped = {}
        for use in {u.node: u for u in candidates}.values():  # a linear both reads and writes: fitted once
            theirs = named.get(use.node.name)
            ref_use = match_linear(self.reference.gm, theirs) if theirs is not None else None
            out_map = out_maps.get(use.node.name)
            why = ""
            if ref_use is None:
                why = "no linear of that name in the reference"
            elif tensor_of(program.gm, use.weight).dim() != 2 or tensor_of(self.reference.gm, ref_use.weight).dim() != 2:
                why = "not a plain matrix (experts)"
            elif role_of(use.node) == TIED_HEAD_PROJECTION:
                why = ("a tied head's projection: its output is in the embedding's basis (fitted through the table to "
                       "the logits, it made SmolLM2 worse: benchmarks/README.md)")
            elif out_map is None and use.output.meta["val"].shape[-1] != ref_use.output.meta["val"].shape[-1]:
                why = "its output was compressed too"
            elif out_map is not None and use.output.meta["val"].shape[-1] != out_map.shape[1]:
                why = f"its output is {use.output.meta['val'].shape[-1]} wide, its segment's basis {out_map.shape[1]}"
            if why:
                self.skipped[use.node.name] = why
            else:
                groups.setdefault(use.input, []).append(_Fit(use, ref_use, out_map))
        order = {n: i for i, n in enumerate(program.graph.nodes)}
        return sorted(groups.items(), key=lambda item: order[item[0]])

    def _fit(self, program: Program, fit: _Fit, stats: _Paired) -> None:
        """Z = Wᵀ (in x out) minimises ‖U Z − U_ref W_refᵀ M‖² + λ‖Z − Z_now‖² (M: the writer's basis, or I):
        (UᵀU + λI) Z = UᵀU_ref W_refᵀ M + λ Z_now."""
        gm, use = program.gm, fit.use
        current = tensor_of(gm, use.weight)
        uu = stats.uu
        z_now = weight_matrix(gm, use).T.to(uu.device)
        w_ref = weight_matrix(self.reference.gm, fit.ref_use).to(uu.device)
        if fit.out_map is not None:
            w_ref = fit.out_map.to(w_ref).T @ w_ref  # the reference's output in the kept basis
        target = stats.ur @ w_ref.T  # Σ uᵀ y_ref
        lam = self.damping * float(uu.diagonal().mean())
        eye = torch.eye(uu.shape[0], dtype=uu.dtype, device=uu.device)
        fitted = torch.linalg.solve(uu + lam * eye, target + lam * z_now)
        if not bool(torch.isfinite(fitted).all()):
            self.skipped[use.node.name] = "the least-squares solve is not finite"
            return
        energy = float((w_ref @ stats.rr @ w_ref.T).trace())

        def error(z: torch.Tensor) -> float:
            quadratic = float((z.T @ uu @ z).trace())
            return max(quadratic - 2 * float((z * target).sum()) + energy, 0.0) / max(energy, 1e-300)

        self.fits.append(LinearFit(use.node.name, error(z_now), error(fitted)))
        value = (fitted.T if use.out_axis % 2 == 0 else fitted).to(current.dtype).to(current.device).contiguous()
        self.written[replace_weight(gm, use, value)] = value


@dataclass(frozen=True)
class _Fit:
    use: LinearUse
    ref_use: LinearUse
    out_map: torch.Tensor | None = None  # a writer's basis: the reference's output is compared through it


class SetWeights(Pass):
    """Weights a calibrating pass computed, written again onto another capture of the same model."""

    exact = False

    def __init__(self, weights: dict[str, torch.Tensor], name: str):
        self.weights, self.name = weights, name

    def call(self, program: Program) -> PassResult:
        for target, value in self.weights.items():
            set_tensor(program.gm, target, value)
        return PassResult(bool(self.weights))


def reconstruction_errors(fits: Sequence[LinearFit]) -> tuple[float, float]:
    """Mean relative reconstruction error over the refitted readers, before and after."""
    if not fits:
        return 0.0, 0.0
    return (sum(f.error_before for f in fits) / len(fits), sum(f.error_after for f in fits) / len(fits))
