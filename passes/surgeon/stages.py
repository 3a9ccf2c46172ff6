"""The Surgeon as a recipe stage."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any

from fxslice.core import InvalidOption, Program
from fxslice.passes.facts import CAPTURED, CLEAN, GQA_FUSED, KV_CACHE, PRUNED, QUANTIZED
from fxslice.passes.surgeon.masked import SurgeonMask
from fxslice.passes.surgeon.options import METHODS, check_target, curvature_of
from fxslice.passes.surgeon.surgeon import SurgeonPrune
from fxslice.recipes import Stage, StageContext, StageResult

#: how far below `target` (a fraction of the parameters) the removed share may fall before it counts as unmet
UNMET = 0.005

__all__ = ["Surgeon"]


@dataclass(frozen=True, kw_only=True)
class Surgeon(Stage):
    """Prune in `shots` shots, chosen across all layers by curvature cost. `structures="groups"` removes
    dimension groups (MLP channels, key/value head groups) for real and `target` is the fraction of the
    model's parameters removed; the paper's zero-masked structures ("rows_columns", "unstructured", "2:4")
    zero `target` of the decoder linears' weights, and only whole groups that die shrink the model. Alone or
    after `slicegpt` (which owns the residual stream's dimensions)."""

    kind = "surgeon"
    needs = frozenset({CAPTURED, CLEAN})
    refuses = frozenset({GQA_FUSED, QUANTIZED, KV_CACHE})
    provides = frozenset({PRUNED})
    calibrates = True

    target: float = 0.2
    strict: bool = False  # an unmet target (groups) is an error instead of a warning in the report
    shots: int = 4
    method: str = "surgeon"  # or kobd, lobd, magnitude (the paper's baselines): `options.METHODS`
    structures: str = "groups"
    damp_a: float = 0.01  # A's damping, a fraction of its mean diagonal
    damp_g: float = 0.01  # G's (inverted for rows only: the masked structures)
    labels: str = "data"
    batch_size: int = 1
    multiple: int = 1  # groups: every MLP keeps a multiple of this many channels (32: GGUF blocks; 64: GPU tiles)
    factor_bytes: int | None = None  # groups: most bytes of Kronecker factors per sweep (None: a quarter of free memory)

    def __post_init__(self) -> None:
        curvature_of(self.method)
        check_target(self.target, self.structures)
        if self.labels not in ("data", "sampled"):
            raise InvalidOption(f"surgeon: labels must be 'data' or 'sampled', got {self.labels!r}")
        self.require_positive_ints("shots", "multiple")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Stage:
        if "curvature" in data:  # recipes written before the stage took the CLI's word for the same choice
            data = dict(data)
            curvature = data.pop("curvature")
            names = {v: k for k, v in METHODS.items()}
            if curvature not in names:
                raise InvalidOption(f"surgeon: curvature {curvature!r} is not one of {', '.join(names)}; "
                                    f"write method: one of {', '.join(METHODS)}")
            warnings.warn(f"surgeon: 'curvature: {curvature}' is now 'method: {names[curvature]}'; "
                          "update the recipe", stacklevel=2)
            data.setdefault("method", names[curvature])
        return super().from_dict(data)

    def run(self, program: Program, context: StageContext) -> StageResult:
        surgeon: SurgeonPrune | SurgeonMask
        if self.structures == "groups":
            surgeon = SurgeonPrune(context.windows(self.kind), target=self.target, shots=self.shots,
                                   curvature=curvature_of(self.method), damp_a=self.damp_a, batch_size=self.batch_size,
                                   labels=self.labels, multiple=self.multiple, factor_bytes=self.factor_bytes,
                                   progress=context.progress, after_shot=context.step_done, resume=context.resume)
        else:
            surgeon = SurgeonMask(context.windows(self.kind), target=self.target, shots=self.shots,
                                  structures=self.structures, curvature=curvature_of(self.method), damp_a=self.damp_a,
                                  damp_g=self.damp_g, batch_size=self.batch_size, labels=self.labels,
                                  progress=context.progress, after_shot=context.step_done, resume=context.resume)
        result = self.run_passes(program, [surgeon], context)
        result.report = {"shots": [asdict(r) for r in surgeon.reports]}
        if isinstance(surgeon, SurgeonPrune):
            achieved = 1 - program.num_parameters() / surgeon.dense
            result.report["achieved"] = round(achieved, 5)
            if achieved < self.target - UNMET:
                message = (f"surgeon: removed {achieved:.1%} of the parameters, short of the target {self.target:.1%}: "
                           "only groups (MLP channels, key/value head groups) go, and the model kept what attention, "
                           "norms and the token table need")
                if self.strict:
                    raise InvalidOption(message + " (strict)")
                result.report["warning"] = message
        return result
