"""SliceGPT as recipe stages: `slicegpt` (fuse the norms, calibrate, slice) and `rotate` (exact, random)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fxslice.analysis.stream import Segment
from fxslice.core import InvalidOption, Program
from fxslice.passes.facts import CAPTURED, CLEAN, GQA_FUSED, QUANTIZED, ROTATED, SLICED
from fxslice.passes.slicegpt.fuse_norms import FuseNorms
from fxslice.passes.slicegpt.project_norm_writers import ProjectNormWriters
from fxslice.passes.slicegpt.rotate_stream import RotateStream
from fxslice.passes.slicegpt.rotations import random_orthogonal, randomized_hadamard
from fxslice.passes.slicegpt.slice_stream import ConstantWidths, SliceStream, per_block
from fxslice.recipes import Stage, StageContext, StageResult

__all__ = ["SliceGPT", "Rotate"]


@dataclass(frozen=True, kw_only=True)
class SliceGPT(Stage):
    """Sequential PCA slicing of the residual stream (design.md §1, §4).

    `sparsity` (every segment keeps 1 - sparsity of its width, rounded down to a multiple of `multiple`)
    or `widths` (one per segment); `keep_ties=False` unties a tied head (better perplexity, V x d more
    parameters); `shared_basis` gives both halves of a block one basis (half the shortcuts)."""

    kind = "slicegpt"
    needs = frozenset({CAPTURED, CLEAN})
    refuses = frozenset({SLICED, ROTATED, GQA_FUSED, QUANTIZED})
    provides = frozenset({SLICED})
    calibrates = True

    sparsity: float | None = None
    widths: tuple[int, ...] | Callable[[Segment, int], int] | None = None
    multiple: int = 8
    keep_ties: bool = True
    shared_basis: bool = False
    slice_head: bool = True
    batch_size: int = 1

    def __post_init__(self) -> None:
        if (self.sparsity is None) == (self.widths is None):
            raise InvalidOption(f"slicegpt: give either sparsity or widths, not "
                                f"{'both' if self.sparsity is not None else 'neither'}")
        if self.sparsity is not None:
            ConstantWidths(self.sparsity, self.multiple)  # validates both
        elif not callable(self.widths) and not all(isinstance(w, int) and w > 0 for w in self.widths):
            raise InvalidOption(f"slicegpt: widths must be positive integers, got {list(self.widths)}")
        self.require_positive_ints("batch_size")

    def run(self, program: Program, context: StageContext) -> StageResult:
        rule = ConstantWidths(self.sparsity, self.multiple) if self.sparsity is not None else self.widths
        slicer = SliceStream(context.windows(self.kind), rule, batch_size=self.batch_size, slice_head=self.slice_head,
                             share=per_block if self.shared_basis else None, progress=context.progress)
        result = self.run_passes(program, [ProjectNormWriters(), FuseNorms(keep_ties=self.keep_ties), slicer], context)
        result.report = {
            "widths": [r.kept for r in slicer.reports],
            "variance_kept": [round(r.variance_kept, 5) for r in slicer.reports],
            "warnings": {str(r.index): r.warning for r in slicer.reports if r.warning},
        }
        return result


@dataclass(frozen=True, kw_only=True)
class Rotate(Stage):
    """Fuse the norms and rotate the stream: exact, checked numerically. `rotation="random"` takes a random
    orthogonal matrix per segment; `"hadamard"` one randomized Hadamard for the whole stream, QuaRot-style, so
    that quantization after it meets no outlier channel and the model gains no parameter."""

    kind = "rotate"
    needs = frozenset({CAPTURED, CLEAN})
    refuses = frozenset({SLICED, ROTATED, GQA_FUSED, QUANTIZED})
    provides = frozenset({ROTATED})

    seed: int = 0
    # "random": a Haar-random matrix per segment (a shortcut matmul on every residual edge);
    # "hadamard": one randomized Hadamard for the whole stream (no shortcut), what quantization wants
    rotation: str = "random"

    def __post_init__(self) -> None:
        if self.rotation not in ("random", "hadamard"):
            raise InvalidOption(f"rotate: rotation must be 'random' or 'hadamard', got {self.rotation!r}")

    def run(self, program: Program, context: StageContext) -> StageResult:
        source = random_orthogonal(self.seed) if self.rotation == "random" else randomized_hadamard(self.seed)
        passes = [ProjectNormWriters(), FuseNorms(), RotateStream(source)]
        return self.run_passes(program, passes, context, check_numerics=True)
