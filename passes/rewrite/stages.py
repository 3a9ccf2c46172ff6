"""The method-free rewrites as recipe stages."""

from __future__ import annotations

from dataclasses import dataclass

from fxslice.core import Program
from fxslice.passes.facts import CAPTURED, CLEAN, GQA_FUSED
from fxslice.passes.rewrite.causal_attention import CausalAttention
from fxslice.passes.rewrite.cleanup import CleanupIR
from fxslice.passes.rewrite.fuse_repeat_kv import FuseRepeatKV
from fxslice.passes.rewrite.unstack_weights import UnstackWeights
from fxslice.recipes import Stage, StageContext, StageResult

__all__ = ["Cleanup", "FuseGQA"]


@dataclass(frozen=True, kw_only=True)
class Cleanup(Stage):
    """Tidy the captured graph (CleanupIR), split stacked weights read one slice at a time (UnstackWeights), and give a verified causal mask the attention kernel's own causal
    path (CausalAttention: exact, and it halves attention time during calibration). Every analysis expects it."""

    kind = "cleanup"
    provides = frozenset({CLEAN})

    causal_attention: bool = True

    def run(self, program: Program, context: StageContext) -> StageResult:
        return self.run_passes(program, [CleanupIR(), UnstackWeights(), *([CausalAttention()] if self.causal_attention else [])], context)


@dataclass(frozen=True, kw_only=True)
class FuseGQA(Stage):
    """Grouped-query attention without copying K/V (FuseRepeatKV); last, since it changes attention's shape
    in the graph that stream analyses read."""

    kind = "fuse_gqa"
    needs = frozenset({CAPTURED, CLEAN})
    provides = frozenset({GQA_FUSED})

    def run(self, program: Program, context: StageContext) -> StageResult:
        return self.run_passes(program, [FuseRepeatKV()], context)
