"""SliceGPT as recipe stages: `slicegpt` (fuse the norms, calibrate, slice) and `rotate` (exact, random)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fxslice.analysis.stream import Segment
from fxslice.core import InvalidOption, Pass, Program
from fxslice.passes.facts import CAPTURED, CLEAN, GQA_FUSED, KV_CACHE, QUANTIZED, ROTATED, SLICED
from fxslice.passes.recovery.refit import RefitLinears, reconstruction_errors
from fxslice.passes.slicegpt.fuse_norms import FuseNorms
from fxslice.passes.slicegpt.project_norm_writers import ProjectNormWriters
from fxslice.passes.slicegpt.rotate_heads import RotateHeads, head_hadamard
from fxslice.passes.slicegpt.rotate_stream import RotateStream
from fxslice.passes.slicegpt.rotations import RotationSource, random_orthogonal, randomized_hadamard
from fxslice.passes.slicegpt.slice_stream import ConstantWidths, SliceStream, per_block, per_stream
from fxslice.passes.slicegpt.tied_head import CorrectTiedHead
from fxslice.passes.slicegpt.widths import SlicedSize, loss_aware_widths, stream_sensitivity
from fxslice.recipes import Stage, StageContext, StageResult

__all__ = ["SliceGPT", "Rotate", "REFITS", "fused_rotation"]

REFITS = ("off", "readers", "writers", "both")
SHARES = {"none": None, "block": per_block, "stream": per_stream}  # shared_basis -> SliceStream's `share`


@dataclass(frozen=True, kw_only=True)
class SliceGPT(Stage):
    """Sequential PCA slicing of the residual stream (design.md §1, §4).

    `sparsity` (every segment keeps 1 - sparsity of its width, rounded down to a multiple of `multiple`)
    or `widths` (one per segment); `keep_ties=False` unties a tied head (better perplexity, V x d more
    parameters); `shared_basis` gives both halves of a block one basis (True or "block": half the shortcuts), or
    the whole stream one ("stream": no shortcuts, so a stock decoder with a smaller hidden size that other runtimes
    load; its basis is the PCA of the token directions at every norm's input, on SmolLM2 better than per-segment
    bases: benchmarks/README.md).
    `allocation="loss_aware"` keeps the parameter count of `sparsity`'s constant widths but gives each segment
    its width from the loss's curvature along the directions slicing removes (`widths.py`), measured by a
    forward and backward pass over the first `sensitivity_windows` calibration windows. `refit` then fits
    the linears at the sliced stream in closed form to the unsliced model's outputs (`RefitLinears`): "readers",
    "writers" or "both" ("off" by default: benchmarks/README.md, measured on SmolLM2). `head_rank` r > 0 gives a tied head, kept
    tied, a rank-r correction of what the sliced table lost (`CorrectTiedHead`: r (d + V) parameters)."""

    kind = "slicegpt"
    needs = frozenset({CAPTURED, CLEAN})
    refuses = frozenset({SLICED, ROTATED, GQA_FUSED, QUANTIZED, KV_CACHE})
    provides = frozenset({SLICED})
    calibrates = True

    sparsity: float | None = None
    widths: tuple[int, ...] | Callable[[Segment, int], int] | None = None
    multiple: int = 8
    keep_ties: bool = True
    shared_basis: str = "none"  # or "block", "stream"; False and True (older recipes) read as "none" and "block"
    slice_head: bool = True
    batch_size: int = 1
    allocation: str = "constant"  # or "loss_aware"
    sensitivity_windows: int = 4
    refit: str = "off"  # or "readers", "writers", "both"
    refit_damping: float = 0.01
    head_rank: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.shared_basis, bool):  # one spelling, so that equal recipes compare equal
            object.__setattr__(self, "shared_basis", "block" if self.shared_basis else "none")
        if not isinstance(self.shared_basis, str) or self.shared_basis not in SHARES:
            raise InvalidOption(f"slicegpt: shared_basis must be 'none', 'block' or 'stream', got {self.shared_basis!r}")
        if self.allocation not in ("constant", "loss_aware"):
            raise InvalidOption(f"slicegpt: allocation must be 'constant' or 'loss_aware', got {self.allocation!r}")
        if self.allocation == "loss_aware" and (self.sparsity is None or self.shared_basis != "none"):
            raise InvalidOption("slicegpt: allocation='loss_aware' takes a sparsity (its parameter budget is that of "
                                "constant widths) and no shared basis")
        self.require_positive_ints("sensitivity_windows")
        if self.shared_basis == "stream" and not self.slice_head:
            raise InvalidOption("slicegpt: shared_basis='stream' slices the head's segment with the rest (one basis); "
                                "slice_head=False would keep the whole stream at full width")
        if self.shared_basis == "stream" and self.widths is not None and not callable(self.widths) and \
                len(set(self.widths)) > 1:
            raise InvalidOption(f"slicegpt: one basis for the stream has one width, got widths {sorted(set(self.widths))}")
        if (self.sparsity is None) == (self.widths is None):
            raise InvalidOption(f"slicegpt: give either sparsity or widths, not "
                                f"{'both' if self.sparsity is not None else 'neither'}")
        if self.sparsity is not None:
            ConstantWidths(self.sparsity, self.multiple)  # validates both
            if self.sparsity == 0:
                raise InvalidOption("slicegpt: sparsity 0 slices nothing (the rotated model is larger by its shortcut "
                                    "matrices); give a sparsity in (0, 1)")
        elif not callable(self.widths) and not all(isinstance(w, int) and w > 0 for w in self.widths):
            raise InvalidOption(f"slicegpt: widths must be positive integers, got {list(self.widths)}")
        self.require_positive_ints("batch_size")
        if self.refit not in REFITS:
            raise InvalidOption(f"slicegpt: refit must be one of {', '.join(REFITS)}, got {self.refit!r}")
        d = self.refit_damping
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not d >= 0:
            raise InvalidOption(f"slicegpt: refit_damping must be a number >= 0, got {d!r}")
        r = self.head_rank
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise InvalidOption(f"slicegpt: head_rank must be an integer >= 0, got {r!r}")
        if r and not self.keep_ties:
            raise InvalidOption("slicegpt: head_rank corrects a head kept tied to the embedding; with keep_ties=False "
                                "the head is untied and sliced on its own, so leave head_rank at 0")

    def run(self, program: Program, context: StageContext) -> StageResult:
        rule = ConstantWidths(self.sparsity, self.multiple) if self.sparsity is not None else self.widths
        windows = context.windows(self.kind)
        dense_bytes = program.num_bytes()
        fused = self.run_passes(program, [ProjectNormWriters(), FuseNorms(keep_ties=self.keep_ties)], context)
        if self.allocation == "loss_aware":
            rule = self._loss_aware_widths(program, windows, rule, context)
        # the fused model, nothing removed yet
        reference = program.clone() if self.refit != "off" or self.head_rank else None
        slicer = SliceStream(windows, rule, batch_size=self.batch_size, slice_head=self.slice_head,
                             share=SHARES[self.shared_basis], progress=context.progress)
        parts = [fused, self.run_passes(program, [slicer], context)]
        if self.refit != "off":
            refit = RefitLinears(reference, windows, readers=self.refit in ("readers", "both"),
                                 bases=slicer.bases if self.refit in ("writers", "both") else None,
                                 damping=self.refit_damping, batch_size=self.batch_size, progress=context.progress)
            parts.append(self.run_passes(program, [refit], context))
        if self.head_rank:
            head = CorrectTiedHead(reference, slicer.bases, windows, rank=self.head_rank, batch_size=self.batch_size)
            parts.append(self.run_passes(program, [head], context))
        result = StageResult([p for r in parts for p in r.passes], [x for r in parts for x in r.records],
                             seconds=sum(r.seconds for r in parts))
        result.report = {
            "widths": [r.kept for r in slicer.reports],
            "variance_kept": [round(r.variance_kept, 5) for r in slicer.reports],
            "warnings": {str(r.index): r.warning for r in slicer.reports if r.warning},
            "stream_width": slicer.reports[0].width if slicer.reports else None,
        }
        if self.refit != "off":
            before, after = reconstruction_errors(refit.fits)
            result.report["refit"] = {"mode": self.refit, "linears": len(refit.fits), "skipped": refit.skipped,
                                      "reconstruction_error_before": round(before, 6),
                                      "reconstruction_error_after": round(after, 6)}
        if program.execution_device is not None:  # what the device held at most: one stage's weights, not the model's
            result.report["offload"] = {"device": str(program.execution_device), "weight_bytes": dense_bytes,
                                        "peak_stage_weight_bytes": slicer.peak_staged_bytes}
        if self.head_rank:
            c = head.report
            result.report["head_correction"] = {"rank": c.rank, "parameters": c.parameters,
                                                "restored": round(c.restored, 6), "centred": c.centred}
        return result

    def summary(self, result: StageResult) -> list[str]:
        report = result.report
        lines = [f"widths       {sorted(set(report['widths']))} of {report['stream_width']}"] if report["widths"] else []
        return lines + [f"warning      segment {k}: {w}" for k, w in report["warnings"].items()]

    def _loss_aware_widths(self, program: Program, windows, rule: ConstantWidths, context: StageContext) -> list[int]:
        """The constant widths' parameter count, spent where the loss needs it (on the fused program)."""
        size = SlicedSize(program)
        last = len(size.full) - 1
        constant = [w if (k == last and not self.slice_head) else rule(None, w) for k, w in enumerate(size.full)]
        costs = stream_sensitivity(program, windows[: self.sensitivity_windows], progress=context.progress)
        return loss_aware_widths(size, costs, size.parameters(constant), multiple=self.multiple,
                                 fixed=() if self.slice_head else (last,))


@dataclass(frozen=True, kw_only=True)
class Rotate(Stage):
    """Fuse the norms and rotate the stream: exact, checked numerically. `rotation="random"` takes a random
    orthogonal matrix per segment; `"hadamard"` one randomized Hadamard for the whole stream, QuaRot-style, so
    that quantization after it meets no outlier channel and the model gains no parameter. The Hadamard also runs
    after slicing, and should before quantizing a sliced model: SliceGPT's principal bases pile the stream's
    energy into its first coordinates, which group-wise rounding handles badly (SmolLM2 sliced by 25 %, 4-bit
    GPTQ: 128.5 without it, 77.3 with it, 71.0 in float; 8 test windows). `heads=True` (with the Hadamard) also
    rotates each attention value head and the columns that read it by a Hadamard of the head's width (`RotateHeads`,
    where the graph exposes the pairs)."""

    kind = "rotate"
    needs = frozenset({CAPTURED, CLEAN})
    provides = frozenset({ROTATED})

    seed: int = 0
    # "random": a Haar-random matrix per segment (a shortcut matmul on every residual edge);
    # "hadamard": one randomized Hadamard for the whole stream (no shortcut), what quantization wants
    rotation: str = "random"
    heads: bool = False

    def __post_init__(self) -> None:
        if self.rotation not in ("random", "hadamard"):
            raise InvalidOption(f"rotate: rotation must be 'random' or 'hadamard', got {self.rotation!r}")
        if self.heads and self.rotation != "hadamard":
            raise InvalidOption("rotate: heads=True rotates the value heads by Hadamards, for quantization; it goes "
                                "with rotation='hadamard'")

    @property
    def refuses(self) -> frozenset[str]:  # type: ignore[override]
        """A random rotation after slicing would only add shortcut matrices; the Hadamard adds none."""
        common = frozenset({ROTATED, GQA_FUSED, QUANTIZED})
        return common if self.rotation == "hadamard" else common | {SLICED}

    def run(self, program: Program, context: StageContext) -> StageResult:
        source = random_orthogonal(self.seed) if self.rotation == "random" else randomized_hadamard(self.seed)
        heads = [RotateHeads(head_hadamard(self.seed))] if self.heads else []
        return self.run_passes(program, [*fused_rotation(source), *heads], context)


def fused_rotation(source: RotationSource) -> list[Pass]:
    """The exact passes that rotate a stream by `source`: norm writers projected, norms fused, then the rotation."""
    return [ProjectNormWriters(), FuseNorms(), RotateStream(source)]
