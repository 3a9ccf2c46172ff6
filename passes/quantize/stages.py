"""Quantization as a recipe stage: the last compression step (slice → prune → quantize)."""

from __future__ import annotations

from dataclasses import dataclass

from fxslice import InvalidOption, Program
from fxslice.core.quantized import check_format
from fxslice.passes.facts import CAPTURED, QUANTIZED
from fxslice.passes.quantize.quantize import QUANTIZERS, QuantizeWeights
from fxslice.recipes import Stage, StageContext, StageResult

__all__ = ["Quantize"]


@dataclass(frozen=True, kw_only=True)
class Quantize(Stage):
    """Every linear of the body to `bits` (group-wise, `group_size` columns per scale) by `method`; token tables
    (a tied head with them) to `embeddings` bits and an untied head to `head` bits (None: left in float). The
    saved model stores packed integers; its record gives the bytes, scales included."""

    kind = "quantize"
    needs = frozenset({CAPTURED})
    refuses = frozenset({QUANTIZED})
    provides = frozenset({QUANTIZED})
    calibrates = True

    bits: int = 4
    group_size: int = 64
    method: str = "gptq"
    embeddings: int | None = 8
    head: int | None = 8
    damp: float = 0.01
    batch_size: int = 1

    def __post_init__(self) -> None:
        if self.method not in QUANTIZERS:
            raise InvalidOption(f"quantize: method must be one of {QUANTIZERS}, got {self.method!r}")
        for width in (self.bits, *(b for b in (self.embeddings, self.head) if b is not None)):
            check_format(width, self.group_size)

    def run(self, program: Program, context: StageContext) -> StageResult:
        windows = context.windows(self.kind) if self.method == "gptq" else None
        quantize = QuantizeWeights(self.bits, group_size=self.group_size, method=self.method, windows=windows,
                                   embeddings=self.embeddings, head=self.head, damp=self.damp,
                                   batch_size=self.batch_size, progress=context.progress)
        result = self.run_passes(program, [quantize], context)
        params = program.num_parameters()
        result.report = {"bytes": program.num_bytes(), "parameters": params,
                         "bits_per_parameter": round(8 * program.num_bytes() / params, 4),
                         "weights": {name: q.bits for name, q in program.quantized.items()}}
        return result
