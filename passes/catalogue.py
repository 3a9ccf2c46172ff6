"""The built-in passes and stages by name (what the CLI and recipe files accept), and a stage that runs
any list of passes, built-in or a user's own."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.fx.passes.infra.pass_base import PassBase

from fxslice.core import InvalidOption, Pass, Program, checked_pass
from fxslice.core.imports import import_object
from fxslice.passes.facts import CAPTURED, FACTS
from fxslice.passes.quantize import Int4Kernels
from fxslice.passes.quantize.stages import Quantize
from fxslice.passes.recovery import MergeAdapters
from fxslice.passes.recovery.stages import Recover
from fxslice.passes.rewrite import CausalAttention, CleanupIR, FuseRepeatKV, RemoveDeadGroups, UnstackWeights, UntieHead
from fxslice.passes.rewrite.stages import Cleanup, FuseGQA
from fxslice.passes.slicegpt import (
    FuseNorms,
    ProjectNormWriters,
    RotateHeads,
    RotateStream,
    head_hadamard,
    random_orthogonal,
)
from fxslice.passes.slicegpt.stages import Rotate, SliceGPT
from fxslice.passes.surgeon.stages import Surgeon
from fxslice.recipes import Recipe, Stage, StageContext, StageResult

__all__ = ["PASSES", "STAGES", "RunPasses", "load_pass", "load_recipe"]

#: built-in passes by the name they report (`Pass.name`; `rotate_random` is rotate_stream with a random basis,
#: `rotate_heads` rotates the value heads by Hadamards),
#: each a factory with default options
PASSES: dict[str, Callable[[], Pass]] = {
    "cleanup_ir": CleanupIR,
    "unstack_weights": UnstackWeights,
    "causal_attention": CausalAttention,
    "project_norm_writers": ProjectNormWriters,
    "fuse_norms": FuseNorms,
    "fuse_repeat_kv": FuseRepeatKV,
    "remove_dead_groups": RemoveDeadGroups,
    "untie_head": UntieHead,
    "merge_adapters": MergeAdapters,
    "rotate_random": lambda: RotateStream(random_orthogonal(0)),
    "rotate_heads": lambda: RotateHeads(head_hadamard(0)),
    "int4_kernels": Int4Kernels,
}
#: names recipes written earlier use
ALIASES = {"cleanup": "cleanup_ir"}


PassSpec = str | Mapping[str, Any]


def load_pass(spec: PassSpec) -> Pass:
    """A built-in pass name, or `module.path:Name` / `file.py:Name` naming a Pass class, instance or function; or a
    mapping `{pass: NAME, **arguments}` whose arguments go to the pass class's constructor."""
    arguments: dict[str, Any] = {}
    if isinstance(spec, Mapping):
        arguments = {str(k): v for k, v in spec.items() if k != "pass"}
        spec = spec.get("pass", "")
        if not isinstance(spec, str) or not spec:
            raise InvalidOption(f"a pass with arguments is {{pass: NAME, argument: value, ...}}; got no pass name in {arguments}")
    spec = ALIASES.get(spec, spec)
    if spec in PASSES:
        return _construct(PASSES[spec], spec, arguments)
    if ":" not in spec:
        raise InvalidOption(f"unknown pass '{spec}'; built-in: {', '.join(PASSES)}; or give module:Name / file.py:Name")
    obj = import_object(spec, "pass")
    if isinstance(obj, type) and issubclass(obj, (Pass, PassBase)):
        obj = _construct(obj, spec, arguments)
    elif arguments:
        raise InvalidOption(f"'{spec}' is not a class, so it takes no arguments (got {', '.join(arguments)}); "
                            "name a Pass class whose constructor takes them")
    if not isinstance(obj, Pass | PassBase) and not callable(obj):
        raise InvalidOption(f"'{spec}' is neither a Pass nor a function")
    return checked_pass(obj)  # a pass that does not say whether it is exact is refused with the recipe


def _construct(make: Callable[..., Any], spec: str, arguments: dict[str, Any]) -> Any:
    """`make(**arguments)`, or InvalidOption saying which arguments the pass takes."""
    try:
        inspect.signature(make).bind(**arguments)
    except TypeError as exc:
        try:
            takes = ", ".join(inspect.signature(make).parameters) or "none"
        except (TypeError, ValueError):
            takes = "unknown"
        raise InvalidOption(f"pass '{spec}': {exc} (its arguments: {takes})") from None
    return make(**arguments)


@dataclass(frozen=True, kw_only=True)
class RunPasses(Stage):
    """Run the named passes: built-in names or `module:Name` / `file.py:Name`, each optionally with arguments
    (`{pass: file.py:DropLastLayers, n: 2}`). Exact passes are proved in float64 and lossy ones measured unless
    `check_numerics` is off; an exact pass that changes the logits stops the recipe, naming the pass."""

    kind = "passes"
    code_fields = ("passes",)

    passes: tuple[PassSpec, ...] = ()
    check_numerics: bool = True
    # facts (`fxslice.passes.facts`) the passes need before them and leave behind, so that a recipe orders them
    # among the built-in stages: `needs_facts: [clean]`, `provides_facts: [pruned]`
    needs_facts: tuple[str, ...] = ()
    provides_facts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.passes or not all(isinstance(p, str | Mapping) for p in self.passes):
            raise InvalidOption(f"passes: give a non-empty list of pass names (or {{pass: NAME, argument: value}}), "
                                f"got {self.passes!r}")
        for name in ("needs_facts", "provides_facts"):
            unknown = sorted(set(getattr(self, name)) - set(FACTS))
            if unknown:
                raise InvalidOption(f"passes: {name} {unknown} are not facts; known: {', '.join(FACTS)}")
        for spec in self.passes:  # every name imported and checked now, before a model is loaded
            load_pass(spec)

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({CAPTURED, *self.needs_facts})

    @property
    def provides(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset(self.provides_facts)

    def run(self, program: Program, context: StageContext) -> StageResult:
        return self.run_passes(program, [load_pass(p) for p in self.passes], context, check_numerics=self.check_numerics)


#: built-in stages by the name a recipe file gives them
STAGES: dict[str, type[Stage]] = {s.kind: s for s in (Cleanup, SliceGPT, Rotate, Surgeon, Recover, Quantize, FuseGQA, RunPasses)}


def load_recipe(path: str | Path, *, trust_code: bool = False) -> Recipe:
    """A recipe file (YAML or JSON) whose stages are built-in names, or with `trust_code` also `module:Class` /
    `file.py:Class` (found from the recipe's folder), whose code then runs."""
    return Recipe.load(path, STAGES, trust_code=trust_code)
