"""Ready-made recipes: what `fxslice slice` and the benchmarks run."""

from __future__ import annotations

from fxslice.passes.rewrite.stages import Cleanup, FuseGQA
from fxslice.passes.slicegpt.stages import SliceGPT
from fxslice.passes.surgeon.options import METHODS
from fxslice.passes.surgeon.stages import Surgeon
from fxslice.recipes import Calibration, Recipe

__all__ = ["slicegpt_recipe", "prune_recipe", "PRUNING_METHODS"]

#: `fxslice prune --method`, the Surgeon stage's `method`
PRUNING_METHODS = tuple(METHODS)


def slicegpt_recipe(*, calibration: Calibration | None = None, **options) -> Recipe:
    """SliceGPT as the project measures it: clean up (with causal attention), slice, fuse GQA.

    `options` are the `SliceGPT` stage's (sparsity or widths, multiple, keep_ties, shared_basis, ...)."""
    return Recipe((Cleanup(), SliceGPT(**options), FuseGQA()), calibration, name="slicegpt")


def prune_recipe(*, method: str = "surgeon", calibration: Calibration | None = None, **options) -> Recipe:
    """Structured pruning of dimension groups: clean up, prune (`options` are the `Surgeon` stage's), fuse GQA."""
    return Recipe((Cleanup(), Surgeon(method=method, **options), FuseGQA()), calibration,
                  name=f"prune-{method}")
