"""fxslice's built-in passes, installed as `fxslice.passes` and written only against fxslice's public API.

`rewrite/` holds method-free rewrites (clean-up, causal attention, grouped-query attention);
each compression method has its own sub-package (`slicegpt/`). `catalogue` names the built-in passes and
stages for the CLI and recipe files; `presets` holds ready-made recipes.
"""

from fxslice.passes.catalogue import PASSES, STAGES, RunPasses, load_pass, load_recipe
from fxslice.passes.presets import prune_recipe, slicegpt_recipe
from fxslice.passes.rewrite import CausalAttention, CleanupIR, FuseRepeatKV, UnstackWeights
from fxslice.passes.slicegpt import FuseNorms, ProjectNormWriters, RotateHeads, RotateStream, exact_pipeline

__all__ = ["PASSES", "STAGES", "CausalAttention", "CleanupIR", "FuseNorms", "FuseRepeatKV", "ProjectNormWriters",
           "RotateHeads", "RotateStream", "RunPasses", "UnstackWeights", "exact_pipeline", "load_pass", "load_recipe", "prune_recipe", "slicegpt_recipe"]
