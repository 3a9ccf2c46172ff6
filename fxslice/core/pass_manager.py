"""Pass infrastructure, after torch.fx's `passes/infra`: a pass, its result, and a manager.

A pass declares `requires` (preconditions), `ensures` (postconditions) and whether it is `exact` (keeps the
model's function) or lossy; it must say which. After every pass the manager

- compares a snapshot of the graph (nodes, arguments and literals, weights and their in-place versions) with the one
  before, so that a pass that edits but reports `modified=False` is named, not the next pass that recompiles;
- checks the graph (lint, the program's inputs, `input_ids` still used, every weight resolvable);
- with `check_numerics` (the default) proves an exact pass on a float64 copy of the program, on two probe shapes,
  where float32's tolerance cannot hide a small change (GELU -> its tanh approximation moves a tiny GPT-NeoX's
  logits by 5e-5), checks the logits again in the program's own dtype, and measures what a lossy pass moved;
- records what the pass changed and how it was checked (see `fxslice.core.diff`), and names the pass on failure.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx.passes.infra.pass_base import PassBase

from fxslice.core import graph as G
from fxslice.core.diff import GraphSnapshot, PassRecord
from fxslice.core.errors import FxsliceError, InvalidOption, PassCheckFailed
from fxslice.core.health import check_finite
from fxslice.core.memory import release_freed
from fxslice.core.numerics import TOLERANCE, relative_error
from fxslice.core.program import Program
from fxslice.core.progress import progress_bar

__all__ = ["Pass", "PassResult", "PassManager", "PipelineResult", "as_pass", "checked_pass", "check_program", "replay", "TOLERANCE",
           "PROBE_SHAPES", "FLOAT64_PROOF_BYTES", "float64_proofs"]

#: (batch, length) of the probes an exact pass is proved on: two shapes, so a pass that bakes a size in fails
PROBE_SHAPES = ((2, 12), (1, 7))
#: the largest float64 copy (bytes of weights) the manager makes to prove exact passes; above it, the program's own
#: dtype is the only check, and the record says so
FLOAT64_PROOF_BYTES = 4 * 2**30
_FLOAT64_PROOFS: ContextVar[bool] = ContextVar("fxslice_float64_proofs", default=True)


@contextmanager
def float64_proofs(enabled: bool) -> Iterator[None]:
    """Within, exact passes are proved on a float64 copy (True, the default, up to `FLOAT64_PROOF_BYTES`) or checked
    in the program's own dtype only (False). The copy and a pass replayed on it take about three times the weights'
    float64 size while exact passes run: most of a float32 job's peak memory (slicing SmolLM2: 4.3 GB with them,
    1.6 GB without)."""
    token = _FLOAT64_PROOFS.set(bool(enabled))
    try:
        yield
    finally:
        _FLOAT64_PROOFS.reset(token)


@dataclass(frozen=True)
class PassResult:
    modified: bool
    info: dict[str, Any] = field(default_factory=dict)


def _result(out: Any, name: str) -> PassResult:
    """What a pass returned, as a PassResult: a bool is accepted, anything else is refused by name."""
    if isinstance(out, PassResult):
        return out
    if isinstance(out, bool):
        return PassResult(out)
    raise InvalidOption(f"pass '{name}' returned {type(out).__name__}: return True when it edited the graph or its "
                        "weights, False when it did not, or a PassResult(modified, info)")


class Pass:
    """Base class. Subclasses set `name` and `exact` and implement `call`; `requires`/`ensures` raise on failure.

    `exact` has no default: a pass says whether it keeps the model's function (`True`: the manager proves it on a
    float64 copy) or not (`False`: the manager measures and records how far it moved the logits)."""

    name: str = ""
    exact: bool | None = None

    def requires(self, program: Program) -> None:  # noqa: B027 - optional hook
        """Raise if the pass cannot run on `program`."""

    def ensures(self, program: Program) -> None:  # noqa: B027 - optional hook
        """Raise if the pass did not leave `program` as promised."""

    def call(self, program: Program) -> PassResult | bool:
        raise NotImplementedError

    def replay(self) -> Pass:
        """This pass with every data-dependent choice fixed, to repeat it on another capture of the
        same model (see `replay`), or on the manager's float64 copy. Deterministic passes return themselves;
        calibrating ones override."""
        return self

    def __call__(self, program: Program) -> PassResult:
        self.requires(program)
        result = _result(self.call(program), self.name or type(self).__name__)
        if result.modified:
            program.gm.recompile()
            program.mark_changed()
        self.ensures(program)
        return result

    def __repr__(self) -> str:
        kind = {True: "exact", False: "lossy"}.get(self.exact, "undeclared")  # type: ignore[arg-type]
        return f"<{kind} pass {self.name or type(self).__name__}>"


class _FunctionPass(Pass):
    def __init__(self, fn: Callable[[Program], bool | PassResult], name: str, exact: bool | None):
        self.fn, self.name, self.exact = fn, name, exact

    def call(self, program: Program) -> PassResult:
        return _result(self.fn(program), self.name)


class _TorchFxPass(Pass):
    """A torch.fx `PassBase` (it edits a GraphModule): the program takes the module it returns."""

    def __init__(self, base: PassBase, name: str, exact: bool | None):
        self.base, self.name, self.exact = base, name, exact

    def call(self, program: Program) -> PassResult:
        out = self.base(program.gm)
        if out is None:
            return PassResult(True)  # PassBase may edit in place and return nothing; the manager checks anyway
        if out.graph_module is not program.gm:
            program.gm = out.graph_module
        return PassResult(bool(out.modified))


def as_pass(fn: Callable | PassBase | None = None, *, name: str | None = None, exact: bool | None = None) -> Any:
    """Turn `fn(program) -> bool | PassResult`, or a torch.fx `PassBase`, into a Pass; usable bare or with
    arguments. Say `exact=True` or `exact=False`: a manager refuses a pass that does not say."""

    def wrap(f: Callable | PassBase) -> Pass:
        if isinstance(f, PassBase):
            return _TorchFxPass(f, name or type(f).__name__, exact)
        return _FunctionPass(f, name or f.__name__, exact)

    return wrap(fn) if fn is not None else wrap


def checked_pass(p: Any) -> Pass:
    """What a manager accepts: a Pass or a function, each saying whether it is exact."""
    if isinstance(p, PassBase):
        raise InvalidOption(f"'{type(p).__name__}' is a torch.fx PassBase; wrap it as fxslice.as_pass({type(p).__name__}"
                            "(...), exact=True) or exact=False, so that the manager knows what to check")
    if not isinstance(p, Pass):
        if not callable(p):
            raise InvalidOption(f"{p!r} is not a pass: give a fxslice.Pass or a function of the program")
        p = as_pass(p)
    if not isinstance(p.exact, bool):
        raise InvalidOption(f"pass '{p.name or type(p).__name__}' does not say whether it is exact: set exact = True "
                            "(it keeps the model's function; the manager proves it in float64) or exact = False "
                            "(lossy; the manager measures its change to the logits) — as_pass(fn, exact=...) for a function")
    return p


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


class _Float64Copy:
    """A float64 copy of the program that the exact passes are replayed on, with its logits on the probes.

    One copy serves a run of exact passes (each replayed on it in turn); a lossy pass ends it, and the next exact
    pass starts a fresh one."""

    def __init__(self, program: Program):
        self.program = program.to(torch.float64)
        self.probes = [program.probe_input(batch=b, length=t, seed=i) for i, (b, t) in enumerate(PROBE_SHAPES)]
        self.logits = self._logits()

    def _logits(self) -> list[torch.Tensor]:
        with torch.no_grad():
            return [self.program(x).detach() for x in self.probes]

    def prove(self, p: Pass) -> float:
        """Replay `p` on the copy; the largest relative change of its logits."""
        result = p.replay()(self.program)
        if result.modified:
            G.drop_unused_weights(self.program.gm)
        before, self.logits = self.logits, self._logits()
        return max(relative_error(a, b) for a, b in zip(self.logits, before, strict=True))


def _float64_copy(program: Program) -> tuple[_Float64Copy | None, str]:
    """A float64 copy to prove exact passes on, or None and why there is none."""
    if program.dtype == torch.float64:
        return None, ""  # the program itself is the float64 check
    if not _FLOAT64_PROOFS.get():
        return None, "float64 proofs were turned off for this run (float64_proofs(False); CLI --proofs dtype)"
    size = 8 * sum(t.numel() for t in program.gm.parameters()) + 8 * sum(t.numel() for t in program.gm.buffers())
    if size > FLOAT64_PROOF_BYTES:
        return None, f"a float64 copy would take {size / 2**30:.1f} GiB (more than FLOAT64_PROOF_BYTES)"
    try:
        return _Float64Copy(program), ""
    except Exception as exc:  # a program that cannot run in float64 (packed kernels, say) keeps its dtype's check
        return None, f"no float64 copy: {type(exc).__name__}: {exc}"


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
    """Run passes in order, check after each one, and record what each changed and how it was checked.

    `check_numerics` (default on) proves exact passes in float64 and measures lossy ones on small probes: it costs a
    float64 copy of the weights while exact passes run (none above `FLOAT64_PROOF_BYTES`) and a few short forward
    passes. Turn it off only for a pipeline checked elsewhere (a pass that runs passes of its own, say)."""

    def __init__(
        self,
        passes: Sequence[Pass | Callable],
        *,
        check_numerics: bool = True,
        probe: torch.Tensor | None = None,
        progress: bool = False,
    ):
        self.passes = [checked_pass(p) for p in passes]
        self.check_numerics = check_numerics
        self.probe = probe
        self.progress = progress

    def run(self, program: Program) -> PipelineResult:
        probe = self.probe if self.probe is not None else program.probe_input()
        reference = self._logits(program, probe) if self.check_numerics else None
        if reference is not None and not bool(torch.isfinite(reference).all()):
            check_finite(program)  # a broken weight is refused by name; logits that overflow go unchecked
            reference = None
        copy64: _Float64Copy | None = None
        records = []
        for p in progress_bar(self.passes, "passes", enabled=self.progress):
            name = p.name or type(p).__name__
            no_proof = ""
            if reference is not None and p.exact and copy64 is None:
                copy64, no_proof = _float64_copy(program)
            elif not p.exact and copy64 is not None:
                copy64 = None  # the copy cannot follow a lossy pass: free it before the pass needs the memory
                release_freed()
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
            release_freed()
            if reference is None or not result.modified:
                continue
            if p.exact:
                copy64 = self._prove(p, name, program, copy64, record, no_proof)
            logits = self._logits(program, probe)
            err = relative_error(logits, reference)
            record.max_relative_error = err
            tol = TOLERANCE.get(program.dtype, 1e-4)
            if p.exact and not err <= tol:
                raise PassCheckFailed(
                    f"exact pass '{name}' changed the logits: max relative error {err:.3g} > {tol:g} "
                    f"({program.dtype}); the pass is wrong for this graph or should be marked lossy"
                )
            reference = logits
        return PipelineResult(program, records, self.passes)

    @staticmethod
    def _prove(p: Pass, name: str, program: Program, copy64: _Float64Copy | None, record: PassRecord,
               no_proof: str) -> _Float64Copy | None:
        """Replay the exact pass `p` on the float64 copy and refuse it if the logits moved there."""
        if copy64 is None:
            record.checked = "float64" if program.dtype == torch.float64 else str(program.dtype).replace("torch.", "")
            record.unproved = no_proof
            return None
        try:
            err = copy64.prove(p)
        except Exception as exc:  # the pass ran on the program but not on its float64 copy: say so, keep the dtype check
            record.checked = str(program.dtype).replace("torch.", "")
            record.unproved = f"its replay on a float64 copy failed: {type(exc).__name__}: {exc}"
            return None
        record.checked, record.float64_error = "float64", err
        tol = TOLERANCE[torch.float64]
        if not err <= tol:
            raise PassCheckFailed(
                f"exact pass '{name}' changed the logits of a float64 copy of the program by {err:.3g} (relative; "
                f"allowed {tol:g}, on inputs of shapes {', '.join(map(str, PROBE_SHAPES))}): it is not exact; "
                "declare it exact = False, or fix it")
        return copy64

    @staticmethod
    def _logits(program: Program, probe: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return program(probe).detach().to(torch.float64)


def replay(passes: Sequence[Pass], target: Program, reference: Program) -> PipelineResult:
    """Repeat `passes`, already run on `reference`, on `target`: another capture of the same model
    (with a KV cache, say). Both must end with the same weights under the same names; `target` then
    shares `reference`'s tensors. Raises PassCheckFailed naming the first weight that differs.

    A `target` that is a `Program.skeleton()` (weights of shape only) follows without computing any weight:
    the weights must come out of the same shapes, and once `target` holds `reference`'s, both must compute the
    same logits on a probe."""
    skeleton = target.is_skeleton
    result = PassManager([p.replay() for p in passes], check_numerics=False).run(target)  # checked on `reference`
    names = ", ".join(dict.fromkeys(p.name or type(p).__name__ for p in passes))
    for node in target.graph.find_nodes(op="get_attr"):
        name = str(node.target)
        mine = G.tensor_of(target.gm, node)
        try:
            theirs = G.tensor_of(reference.gm, node)
        except AttributeError:
            raise PassCheckFailed(f"replay: weight '{name}' is still read by the replayed graph but not by the "
                                  f"program it follows: one of the passes ({names}) removed it there and not here "
                                  "(a pass that finds what it removes from the graph follows both)") from None
        if mine.shape != theirs.shape or not (skeleton or torch.equal(mine, theirs)):
            raise PassCheckFailed(f"replay: weight '{name}' came out {'different' if mine.shape == theirs.shape else 'of another shape'} "
                                  f"({tuple(mine.shape)} vs {tuple(theirs.shape)}) after {names}: a pass chose "
                                  "differently on the two graphs; its replay() must fix every data-dependent choice")
        owner, attr = G.owner_of(target.gm, name)
        (owner._parameters if attr in owner._parameters else owner._buffers if attr in owner._buffers
         else owner.__dict__)[attr] = theirs  # the very same object: a tie stays one tensor
    target.mark_changed()
    if skeleton:
        _check_same_logits(target, reference, names)
    return result


def _check_same_logits(target: Program, reference: Program, names: str) -> None:
    """What a replay onto a skeleton cannot check weight by weight: that the graphs now compute the same."""
    probe = reference.probe_input(batch=1, length=7)
    with torch.no_grad():
        err = relative_error(target(probe).to(torch.float64), reference(probe).to(torch.float64))
    tol = TOLERANCE.get(reference.dtype, 1e-4)
    if not err <= tol:
        raise PassCheckFailed(f"replay: with the same weights the replayed graph's logits differ from the program it "
                              f"follows by {err:.3g} (relative; allowed {tol:g}) after {names}: a pass chose "
                              "differently on the two graphs; its replay() must fix every data-dependent choice")
