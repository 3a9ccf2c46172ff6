"""One checker for every exact pass, fxslice's and yours (after ExecuTorch's pass tests).

`check_exact_pass` runs a pass on each given program, in each dtype, and asserts what an exact pass
owes: the graph lints and keeps its signature (inputs, output shape on two probe shapes, so dynamic
batch and length survive), the logits agree within `TOLERANCE[dtype]`, a second run reports no change
(idempotence), and a program the pass does not apply to comes out untouched (same code, same weights).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from fxslice.core.graph import tensor_of
from fxslice.core.numerics import TOLERANCE, relative_error
from fxslice.core.pass_manager import Pass, PassManager
from fxslice.core.program import Program

__all__ = ["ExactPassReport", "check_exact_pass", "check_pass_leaves_alone"]

PROBES = ((2, 12), (1, 7))  # (batch, length): two shapes, so a pass that bakes a size in fails


@dataclass(frozen=True)
class ExactPassReport:
    program: str
    dtype: torch.dtype
    modified: bool
    max_relative_error: float


def _probe_inputs(program: Program) -> list[torch.Tensor]:
    return [program.probe_input(batch=b, length=t, seed=i) for i, (b, t) in enumerate(PROBES)]


def _outputs(program: Program, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [program(x).detach().to(torch.float64) for x in inputs]


def _weights(program: Program) -> dict[str, torch.Tensor]:
    return {str(n.target): tensor_of(program.gm, n).detach().clone() for n in program.graph.find_nodes(op="get_attr")
            if isinstance(tensor_of(program.gm, n), torch.Tensor)}


def check_exact_pass(
    make_pass: Callable[[], Pass],
    programs: Iterable[tuple[str, Program]],
    *,
    dtypes: Sequence[torch.dtype] = (torch.float64, torch.float32),
    prepare: Callable[[], Sequence[Pass]] = lambda: (),
    must_modify: bool = True,
) -> list[ExactPassReport]:
    """Run `make_pass()` after `prepare()` on every (name, program) in every dtype; raise AssertionError
    naming program and dtype on the first broken promise. `must_modify`: the pass must change each program
    (a test that checks a pass which did nothing proves nothing)."""
    reports = []
    pass_name = make_pass().name or type(make_pass()).__name__
    for name, original in programs:
        for dtype in dtypes:
            where = f"{pass_name} on {name} ({dtype})"
            program = original.to(dtype)
            PassManager(list(prepare()), check_numerics=False).run(program)
            inputs = _probe_inputs(program)
            names_before = program.input_names
            before = _outputs(program, inputs)
            result = PassManager([make_pass()], check_numerics=False).run(program)  # lints, checks the inputs
            record = result.records[0]
            assert record.modified or not must_modify, f"{where}: the pass changed nothing"
            program.gm.graph.lint()
            assert program.input_names == names_before, f"{where}: inputs changed to {program.input_names}"
            after = _outputs(program, inputs)
            errors = []
            for x, b, a in zip(inputs, before, after, strict=True):
                assert a.shape == b.shape, f"{where}: output shape {tuple(a.shape)} != {tuple(b.shape)} for input {tuple(x.shape)}"
                errors.append(relative_error(a, b))
            tol = TOLERANCE[dtype]
            assert max(errors) <= tol, f"{where}: max relative error {max(errors):.3g} > {tol:g}"
            again = PassManager([make_pass()], check_numerics=False).run(program)
            assert not again.records[0].modified, f"{where}: a second run changed the graph again (not idempotent)"
            reports.append(ExactPassReport(name, dtype, record.modified, max(errors)))
    return reports


def check_pass_leaves_alone(make_pass: Callable[[], Pass], programs: Iterable[tuple[str, Program]], *,
                            prepare: Callable[[], Sequence[Pass]] = lambda: ()) -> None:
    """The pass reports no change on programs it does not apply to, and indeed changes nothing."""
    for name, original in programs:
        program = original.clone()
        PassManager(list(prepare()), check_numerics=False).run(program)
        code, weights = program.gm.code, _weights(program)
        check = make_pass()
        result = PassManager([check], check_numerics=False).run(program)
        where = f"{check.name or type(check).__name__} on {name}"
        assert not result.records[0].modified, f"{where}: reported a change on a graph it does not apply to"
        assert program.gm.code == code, f"{where}: the graph's code changed"
        after = _weights(program)
        assert after.keys() == weights.keys() and all(torch.equal(after[k], weights[k]) for k in after), \
            f"{where}: weights changed"
