"""Ready-made recipes: what `fxslice slice` and the benchmarks run."""

from __future__ import annotations

from fxslice.passes.rewrite.stages import Cleanup, FuseGQA
from fxslice.passes.slicegpt.stages import SliceGPT
from fxslice.recipes import Calibration, Recipe

__all__ = ["slicegpt_recipe"]


def slicegpt_recipe(*, calibration: Calibration | None = None, **options) -> Recipe:
    """SliceGPT as the project measures it: clean up (with causal attention), slice, fuse GQA.

    `options` are the `SliceGPT` stage's (sparsity or widths, multiple, keep_ties, shared_basis, ...)."""
    return Recipe((Cleanup(), SliceGPT(**options), FuseGQA()), calibration, name="slicegpt")
