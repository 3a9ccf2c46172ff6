"""A compression method as a stage of a recipe: a small frozen, versioned config whose `run` drives passes.

A stage declares the *facts* about the program it needs, refuses and provides (`clean`, `sliced`,
`quantized`, ...), so that a recipe can refuse a wrong order before any calibration starts. Its fields
are its whole configuration: `to_dict` writes them, `from_dict` reads them back (keyword-only,
validated in `__post_init__` with a message that names the bad combination).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from fxslice.core.diff import PassRecord
from fxslice.core.errors import InvalidOption
from fxslice.core.pass_manager import Pass, PassManager
from fxslice.core.program import Program

__all__ = ["Stage", "StageContext", "StageResult", "CAPTURED", "KV_CACHE"]

#: the one fact every program starts with
CAPTURED = "captured"
#: the program computes with a KV cache and has no plain capture beside it (a model loaded from `fxslice.save`'s
#: directory): it calibrates and trains on whole sequences from an empty cache, but a stage whose passes calibrate
#: on the plain capture refuses it
KV_CACHE = "kv_cache"


@dataclass
class StageContext:
    """What a stage may use besides the program: calibration windows (token ids [n, length]), whether to
    show progress, a seed, and the teacher (the program as it was before compression, for a stage that learns
    from it). Calibration is built once per recipe run and shared by every stage.

    A stage that works in long steps (the Surgeon's shots) may call `step_done(state, passes)` after each: `state`
    is a JSON-able dict from which the stage can continue, `passes` repeat the steps since the stage (re)started on
    another capture. A job keeps a checkpoint there; run again, the stage finds that state in `resume`."""

    calibration: torch.Tensor | None = None
    progress: bool = False
    seed: int = 0
    teacher: Program | None = None
    step_done: Callable[[dict[str, Any], list[Pass]], None] | None = None
    resume: dict[str, Any] | None = None

    def windows(self, stage: str) -> torch.Tensor:
        if self.calibration is None:
            raise InvalidOption(f"stage '{stage}' calibrates: give the recipe a calibration section "
                                "(or pass calibration windows to Recipe.run)")
        return self.calibration

    def teacher_for(self, stage: str) -> Program:
        if self.teacher is None:
            raise InvalidOption(f"stage '{stage}' learns from the program before compression: run it in a recipe "
                                "(which keeps that program) or give the context a teacher")
        return self.teacher


@dataclass
class StageResult:
    """What a stage did: the passes it ran (to `fxslice.replay` on another capture), each pass's diff
    record, and a JSON-able report of the method's own figures."""

    passes: list[Pass] = field(default_factory=list)
    records: list[PassRecord] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    #: the pass entries of a stage that ran in an earlier process (a resumed job), whose passes are gone
    entries: list[dict[str, Any]] | None = None

    def pass_entries(self) -> list[dict[str, Any]]:
        """Each pass's record as it goes into `fxslice.json`: name, exactness, time, what it changed."""
        if self.entries is not None:
            return self.entries
        return [{
            "name": r.name, "exact": r.exact, "modified": r.modified, "seconds": round(r.seconds, 3),
            "nodes_added": len(r.added), "nodes_removed": len(r.removed), "nodes_rewired": len(r.rewired),
            "parameters_changed": len(r.params), "summary": r.summary(),
            **({"logits_moved": r.max_relative_error} if r.max_relative_error is not None else {}),
            **({"checked": r.checked} if r.checked else {}),
            **({"float64_error": r.float64_error} if r.float64_error is not None else {}),
        } for r in self.records]


@dataclass(frozen=True, kw_only=True)
class Stage:
    """Subclasses set `kind` (the name in a recipe file) and `version`, declare facts, and implement `run`."""

    kind: ClassVar[str] = ""
    version: ClassVar[int] = 1
    needs: ClassVar[frozenset[str]] = frozenset({CAPTURED})
    refuses: ClassVar[frozenset[str]] = frozenset()
    provides: ClassVar[frozenset[str]] = frozenset()
    calibrates: ClassVar[bool] = False
    #: whether `run` reads `context.teacher`: the recipe then keeps a copy of the program it was given
    learns_from_teacher: ClassVar[bool] = False
    #: fields that name user code (`module:Name`, `file.py:Name`), which a recipe file may name only with trust_code
    code_fields: ClassVar[tuple[str, ...]] = ()

    def run(self, program: Program, context: StageContext) -> StageResult:
        raise NotImplementedError

    def summary(self, result: StageResult) -> list[str]:
        """Lines a person reads after the run (`fxslice.Report` prints them): what this stage did, in its own words.
        By default the report's warning, if any; stages override it to say more."""
        warning = result.report.get("warning")
        return [f"warning      {warning}"] if warning else []

    def check(self, program: Program) -> None:
        """Refuse options that do not fit `program` (InvalidOption naming the option) before any work starts: a
        recipe checks every stage on the captured program before it calibrates."""

    def require_positive_ints(self, *names: str) -> None:
        """For `__post_init__`: each named field must be an int ≥ 1 (a bool is not), or the stage is refused."""
        for name in names:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidOption(f"{self.kind}: {name} must be a positive integer, got {value!r}")

    def run_passes(self, program: Program, passes: Sequence[Pass], context: StageContext, *,
                   check_numerics: bool = True) -> StageResult:
        """Run `passes` through one PassManager and keep their records (exact passes proved in float64, the
        lossy ones' change to the logits measured): the common body of `run`."""
        start = time.perf_counter()
        pipeline = PassManager(passes, check_numerics=check_numerics).run(program)
        return StageResult(list(pipeline.passes), pipeline.records, seconds=time.perf_counter() - start)

    # serialisation --------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"stage": self.kind, "version": self.version}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if callable(value):
                raise InvalidOption(f"stage '{self.kind}': field '{f.name}' holds a function, which a recipe file "
                                    "cannot store; give the stage plain values")
            data[f.name] = list(value) if isinstance(value, tuple) else value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Stage:
        data = dict(data)
        data.pop("stage", None)
        version = data.pop("version", cls.version)
        if version != cls.version:
            raise InvalidOption(f"stage '{cls.kind}' is version {cls.version}; the recipe was written for "
                                f"version {version}")
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise InvalidOption(f"stage '{cls.kind}' has no option {', '.join(map(repr, unknown))}; "
                                f"its options: {', '.join(names) or '(none)'}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
