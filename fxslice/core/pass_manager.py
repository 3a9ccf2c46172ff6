"""Pass infrastructure, after torch.fx's `passes/infra`: a pass, its result, and a manager.

A pass declares `requires` (preconditions), `ensures` (postconditions) and whether it is
`exact` (must preserve the model's function) or lossy. The manager runs a pipeline and, after
every pass, compares a snapshot of the graph (nodes, arguments and literals, weights and their in-place versions)
with the one before, so that a pass that edits but reports `modified=False` is named rather than leaving the program
running stale code for the next pass to be blamed for; it checks the graph (lint, one `input_ids` input that is still used, every weight
resolvable), optionally checks numerically that an exact pass did not change the logits, records
what the pass changed (see `fxslice.core.diff`), and names the pass when anything fails.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fxslice.core import graph as G
from fxslice.core.diff import GraphSnapshot, PassRecord
from fxslice.core.errors import FxsliceError, PassCheckFailed
from fxslice.core.numerics import TOLERANCE, relative_error
from fxslice.core.program import Program
from fxslice.core.progress import progress_bar

__all__ = ["Pass", "PassResult", "PassManager", "PipelineResult", "as_pass", "check_program", "replay", "TOLERANCE"]



@dataclass(frozen=True)
class PassResult:
    modified: bool
    info: dict[str, Any] = field(default_factory=dict)


class Pass:
    """Base class. Subclasses set `name`/`exact` and implement `call`; `requires`/`ensures` raise on failure."""

    name: str = ""
    exact: bool = True

    def requires(self, program: Program) -> None:  # noqa: B027 - optional hook
        """Raise if the pass cannot run on `program`."""

    def ensures(self, program: Program) -> None:  # noqa: B027 - optional hook
        """Raise if the pass did not leave `program` as promised."""

    def call(self, program: Program) -> PassResult:
        raise NotImplementedError

    def replay(self) -> Pass:
        """This pass with every data-dependent choice fixed, to repeat it on another capture of the
        same model (see `replay`). Deterministic passes return themselves; calibrating ones override."""
        return self

    def __call__(self, program: Program) -> PassResult:
        self.requires(program)
        result = self.call(program)
        if result.modified:
            program.gm.recompile()
            program.mark_changed()
        self.ensures(program)
        return result

    def __repr__(self) -> str:
        return f"<{'exact' if self.exact else 'lossy'} pass {self.name or type(self).__name__}>"


class _FunctionPass(Pass):
    def __init__(self, fn: Callable[[Program], bool | PassResult], name: str, exact: bool):
        self.fn, self.name, self.exact = fn, name, exact

    def call(self, program: Program) -> PassResult:
        out = self.fn(program)
        return out if isinstance(out, PassResult) else PassResult(bool(out))


def as_pass(fn: Callable | None = None, *, name: str | None = None, exact: bool = True) -> Any:
    """Turn `fn(program) -> bool | PassResult` into a Pass; usable bare or with arguments."""

    def wrap(f: Callable) -> Pass:
        return _FunctionPass(f, name or f.__name__, exact)

    return wrap(fn) if fn is not None else wrap


def check_program(program: Program) -> None:
    """Structural checks that every pass must leave true; raises AssertionError with the reason."""
    gm = program.gm
    gm.graph.lint()
    inputs = G.input_names(gm)
    expected = program.input_names
    assert inputs == expected, f"inputs are {inputs}"
    assert next(iter(gm.graph.find_nodes(op="placeholder"))).users, "input_ids is no longer used"
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            try:
                value = G.tensor_of(gm, node)
            except AttributeError:
                raise AssertionError(f"get_attr '{node.target}' names no parameter or buffer") from None
            assert isinstance(value, torch.Tensor), f"get_attr '{node.target}' is not a tensor"


@dataclass
class PipelineResult:
    program: Program
    records: list[PassRecord]
    passes: list[Pass] = field(default_factory=list)

    @property
    def modified(self) -> bool:
        return any(r.modified for r in self.records)

    def text(self) -> str:
        from fxslice.core.diff import render_text

        return render_text(self.records)

    def html(self) -> str:
        from fxslice.core.diff import render_html

        return render_html(self.program, self.records)


class PassManager:
    """Run passes in order, check after each one, and record what each changed."""

    def __init__(
        self,
        passes: Sequence[Pass | Callable],
        *,
        check_numerics: bool = False,
        probe: torch.Tensor | None = None,
        progress: bool = False,
    ):
        self.passes = [p if isinstance(p, Pass) else as_pass(p) for p in passes]
        self.check_numerics = check_numerics
        self.probe = probe
        self.progress = progress

    def run(self, program: Program) -> PipelineResult:
        probe = self.probe if self.probe is not None else program.probe_input()
        reference = self._logits(program, probe) if self.check_numerics else None
        records = []
        for p in progress_bar(self.passes, "passes", enabled=self.progress):
            name = p.name or type(p).__name__
            before = GraphSnapshot.take(program.gm)
            start = time.perf_counter()
            try:
                result = p(program)
            except FxsliceError:
                raise
            except Exception as exc:
                raise PassCheckFailed(f"pass '{name}' raised {type(exc).__name__}: {exc}") from exc
            elapsed = time.perf_counter() - start
            if result.modified:
                G.drop_unused_weights(program.gm)
            after = GraphSnapshot.take(program.gm)
            if not result.modified and not after.same(before):
                program.gm.recompile()  # the program must not keep running the old code
                program.mark_changed()
                raise PassCheckFailed(f"pass '{name}' changed the graph or its weights but reported modified=False; "
                                      "return PassResult(True) (a function pass: return True) when it edits")
            try:
                check_program(program)
            except AssertionError as exc:
                raise PassCheckFailed(f"pass '{name}' left a broken graph: {exc}") from exc
            record = PassRecord.between(name, p.exact, before, after, result, elapsed)
            record.stamp(program.gm)
            records.append(record)
            if reference is not None and result.modified:
                logits = self._logits(program, probe)
                if p.exact:
                    err = relative_error(logits, reference)
                    record.max_relative_error = err
                    tol = TOLERANCE.get(program.dtype, 1e-4)
                    if not err <= tol:
                        raise PassCheckFailed(
                            f"exact pass '{name}' changed the logits: max relative error {err:.3g} > {tol:g} "
                            f"({program.dtype}); the pass is wrong for this graph or should be marked lossy"
                        )
                reference = logits
        return PipelineResult(program, records, self.passes)

    @staticmethod
    def _logits(program: Program, probe: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return program(probe).detach().to(torch.float64)





def replay(passes: Sequence[Pass], target: Program, reference: Program) -> PipelineResult:
    """Repeat `passes`, already run on `reference`, on `target`: another capture of the same model
    (with a KV cache, say). Both must end with the same weights under the same names; `target` then
    shares `reference`'s tensors. Raises PassCheckFailed naming the first weight that differs."""
    result = PassManager([p.replay() for p in passes]).run(target)
    for node in target.graph.find_nodes(op="get_attr"):
        name = str(node.target)
        mine = G.tensor_of(target.gm, node)
        try:
            theirs = G.tensor_of(reference.gm, node)
        except AttributeError:
            raise PassCheckFailed(f"replay: weight '{name}' exists only in the replayed graph; "
                                  "the two captures are not of the same model") from None
        if mine.shape != theirs.shape or not torch.equal(mine, theirs):
            raise PassCheckFailed(f"replay: weight '{name}' differs from the compiled program's "
                                  f"({tuple(mine.shape)} vs {tuple(theirs.shape)}); the captures diverge")
        owner, attr = G.owner_of(target.gm, name)
        (owner._parameters if attr in owner._parameters else owner._buffers if attr in owner._buffers
         else owner.__dict__)[attr] = theirs  # the very same object: a tie stays one tensor
    target.mark_changed()
    return result
