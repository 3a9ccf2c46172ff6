"""The built-in passes and stages by name (what the CLI and recipe files accept), and a stage that runs
any list of passes, built-in or a user's own."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fxslice.core import InvalidOption, Pass, Program, as_pass
from fxslice.core.imports import import_object
from fxslice.passes.quantize import Int4Kernels
from fxslice.passes.quantize.stages import Quantize
from fxslice.passes.recovery import MergeAdapters
from fxslice.passes.recovery.stages import Recover
from fxslice.passes.rewrite import CausalAttention, CleanupIR, FuseRepeatKV, RemoveDeadGroups, UnstackWeights
from fxslice.passes.rewrite.stages import Cleanup, FuseGQA
from fxslice.passes.slicegpt import FuseNorms, ProjectNormWriters, RotateStream, random_orthogonal
from fxslice.passes.slicegpt.stages import Rotate, SliceGPT
from fxslice.passes.surgeon.stages import Surgeon
from fxslice.recipes import Recipe, Stage, StageContext, StageResult

__all__ = ["PASSES", "STAGES", "RunPasses", "load_pass", "load_recipe"]

#: built-in passes by name, each a factory with default options
PASSES: dict[str, Callable[[], Pass]] = {
    "cleanup": CleanupIR,
    "unstack_weights": UnstackWeights,
    "causal_attention": CausalAttention,
    "project_norm_writers": ProjectNormWriters,
    "fuse_norms": FuseNorms,
    "fuse_repeat_kv": FuseRepeatKV,
    "remove_dead_groups": RemoveDeadGroups,
    "merge_adapters": MergeAdapters,
    "rotate_random": lambda: RotateStream(random_orthogonal(0)),
    "int4_kernels": Int4Kernels,
}


def load_pass(spec: str) -> Pass:
    """A built-in pass name, or `module.path:Name` / `file.py:Name` naming a Pass class, instance or function."""
    if spec in PASSES:
        return PASSES[spec]()
    if ":" not in spec:
        raise InvalidOption(f"unknown pass '{spec}'; built-in: {', '.join(PASSES)}; or give module:Name / file.py:Name")
    obj = import_object(spec, "pass")
    if isinstance(obj, type) and issubclass(obj, Pass):
        return obj()
    if isinstance(obj, Pass):
        return obj
    if callable(obj):
        return as_pass(obj)
    raise InvalidOption(f"'{spec}' is neither a Pass nor a function")


@dataclass(frozen=True, kw_only=True)
class RunPasses(Stage):
    """Run the named passes (built-in names or `module:Name` / `file.py:Name`); with `check_numerics`, an
    exact pass that changes the logits stops the recipe, naming the pass."""

    kind = "passes"
    code_fields = ("passes",)

    passes: tuple[str, ...] = ()
    check_numerics: bool = True

    def __post_init__(self) -> None:
        if not self.passes or not all(isinstance(p, str) for p in self.passes):
            raise InvalidOption(f"passes: give a non-empty list of pass names, got {self.passes!r}")
        for spec in self.passes:  # every name imported and checked now, before a model is loaded
            load_pass(spec)

    def run(self, program: Program, context: StageContext) -> StageResult:
        return self.run_passes(program, [load_pass(p) for p in self.passes], context, check_numerics=self.check_numerics)


#: built-in stages by the name a recipe file gives them
STAGES: dict[str, type[Stage]] = {s.kind: s for s in (Cleanup, SliceGPT, Rotate, Surgeon, Recover, Quantize, FuseGQA, RunPasses)}


def load_recipe(path: str | Path, *, trust_code: bool = False) -> Recipe:
    """A recipe file (YAML or JSON) whose stages are built-in names, or with `trust_code` also `module:Class` /
    `file.py:Class` (found from the recipe's folder), whose code then runs."""
    return Recipe.load(path, STAGES, trust_code=trust_code)
