"""The LLM Surgeon (van der Ouderaa et al., ICLR 2024): curvature-based structured pruning with weight updates,
on dimension groups found in the graph, so that the pruned model is a smaller dense model."""

from fxslice.passes.surgeon.surgeon import CURVATURES, ShotReport, SurgeonPrune

__all__ = ["CURVATURES", "ShotReport", "SurgeonPrune"]
