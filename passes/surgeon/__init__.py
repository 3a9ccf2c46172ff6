"""The LLM Surgeon (van der Ouderaa et al., ICLR 2024): curvature-based pruning with weight updates — on
dimension groups found in the graph, so that the pruned model is a smaller dense model, or zero-masked on the
paper's own structures (rows and columns, single weights, 2:4)."""

from fxslice.passes.surgeon.curvature import CURVATURES
from fxslice.passes.surgeon.masked import MASKED_STRUCTURES, MaskReport, SurgeonMask
from fxslice.passes.surgeon.surgeon import ShotReport, SurgeonPrune

__all__ = ["CURVATURES", "MASKED_STRUCTURES", "MaskReport", "ShotReport", "SurgeonMask", "SurgeonPrune"]
