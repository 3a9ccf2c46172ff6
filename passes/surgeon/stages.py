"""The Surgeon as a recipe stage."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from fxslice.core import InvalidOption, Program
from fxslice.passes.facts import CAPTURED, CLEAN, GQA_FUSED, PRUNED, QUANTIZED
from fxslice.passes.surgeon.surgeon import CURVATURES, SurgeonPrune
from fxslice.recipes import Stage, StageContext, StageResult

__all__ = ["Surgeon"]


@dataclass(frozen=True, kw_only=True)
class Surgeon(Stage):
    """Remove `target` of the parameters (counted on the graph, the model as it is when the stage starts) in
    `shots` shots of dimension groups (MLP channels, key/value head groups), chosen across all layers by
    curvature cost. Alone or after `slicegpt` (which owns the residual stream's dimensions)."""

    kind = "surgeon"
    needs = frozenset({CAPTURED, CLEAN})
    refuses = frozenset({GQA_FUSED, QUANTIZED})
    provides = frozenset({PRUNED})
    calibrates = True

    target: float = 0.2
    shots: int = 4
    curvature: str = "kfac"
    structures: str = "groups"
    damp_a: float = 0.01  # A's damping, a fraction of its mean diagonal (G is not inverted for groups)
    labels: str = "data"
    batch_size: int = 1

    def __post_init__(self) -> None:
        if self.structures != "groups":
            raise InvalidOption(f"surgeon: structures={self.structures!r} is not available; 'groups' (what shrinks "
                                "the model) is")
        if self.curvature not in CURVATURES:
            raise InvalidOption(f"surgeon: curvature must be one of {CURVATURES}, got {self.curvature!r}")
        if self.labels not in ("data", "sampled"):
            raise InvalidOption(f"surgeon: labels must be 'data' or 'sampled', got {self.labels!r}")
        if isinstance(self.target, bool) or not isinstance(self.target, (int, float)) or not 0 < self.target < 1:
            raise InvalidOption(f"surgeon: target must be in (0, 1), got {self.target!r}")
        if isinstance(self.shots, bool) or not isinstance(self.shots, int) or self.shots < 1:
            raise InvalidOption(f"surgeon: shots must be a positive integer, got {self.shots!r}")

    def run(self, program: Program, context: StageContext) -> StageResult:
        surgeon = SurgeonPrune(context.windows(self.kind), target=self.target, shots=self.shots,
                               curvature=self.curvature, damp_a=self.damp_a,
                               batch_size=self.batch_size, labels=self.labels, progress=context.progress)
        result = self.run_passes(program, [surgeon], context)
        result.report = {"shots": [asdict(r) for r in surgeon.reports]}
        return result
