"""Per-linear curvature statistics from one calibration sweep: the input second moment `A` = Σ xxᵀ of
every linear (what GPTQ's Hessian and the LLM Surgeon's first Kronecker factor are) and, in gradient
mode, the output-gradient second moment `G` = Σ ggᵀ of the causal-LM loss (the Surgeon's second factor;
empirical Fisher with the data's labels). Linears that read the same value (q, k and v) share one `A`.

Cheaper curvatures come from the same call: `gradients=False` gives `A` alone (G = I, "L-OBD"), and
magnitude pruning needs neither.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import fx

from fxslice.analysis.matchers import LinearUse, match_linear
from fxslice.calibration.gradients import run_with_gradients
from fxslice.calibration.observers import SecondMoment
from fxslice.calibration.runner import StagedRunner
from fxslice.core.errors import InvalidOption
from fxslice.core.graph import tensor_of
from fxslice.core.program import Program

__all__ = ["LinearStatistics", "linear_statistics", "dense_linears", "streamed_input_moments"]


@dataclass
class LinearStatistics:
    """Per linear (keyed by its weight's name): the matched use, `A` and (gradient mode) `G`."""

    linears: dict[str, LinearUse]
    inputs: dict[str, SecondMoment]
    output_gradients: dict[str, SecondMoment]
    loss: float | None = None  # mean next-token loss over the sweep, in gradient mode

    def A(self, weight: str) -> torch.Tensor:  # noqa: N802 - the paper's name
        return self.inputs[weight].sum

    def G(self, weight: str) -> torch.Tensor:  # noqa: N802 - the paper's name
        if weight not in self.output_gradients:
            raise InvalidOption(f"no output-gradient statistics for '{weight}': collect with gradients=True")
        return self.output_gradients[weight].sum


def dense_linears(program: Program) -> dict[str, LinearUse]:
    """Every linear with a 2-D weight, by weight name (one entry for a weight used twice: its first use).
    Grouped expert matmuls (3-D weights) are left out: their per-expert inputs are not one value."""
    found: dict[str, LinearUse] = {}
    for node in program.graph.nodes:
        use = match_linear(program.gm, node)
        if use is None or use.weight.op != "get_attr":
            continue
        if tensor_of(program.gm, use.weight).dim() != 2:
            continue
        found.setdefault(str(use.weight.target), use)
    return found


def _observed(program: Program, linears: Sequence[str] | None) -> dict[str, LinearUse]:
    found = dense_linears(program)
    if linears is not None:
        missing = [w for w in linears if w not in found]
        if missing:
            raise InvalidOption(f"no linear reads the weight(s) {', '.join(missing)}")
        found = {w: found[w] for w in linears}
    return found


def linear_statistics(
    program: Program,
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    gradients: bool = False,
    labels: str = "data",
    linears: Sequence[str] | None = None,
    progress: bool = False,
) -> LinearStatistics:
    """One sweep over `windows` ([n, length] token ids). `linears`: weight names to observe (all by default)."""
    found = _observed(program, linears)
    if not found:
        raise InvalidOption("the program has no linear with a 2-D weight to observe")
    by_input: dict[fx.Node, SecondMoment] = {}
    inputs = {w: by_input.setdefault(use.input, SecondMoment()) for w, use in found.items()}
    batches = list(windows.split(batch_size))
    output_gradients: dict[str, SecondMoment] = {}
    loss = None
    if gradients:
        output_gradients = {w: SecondMoment() for w in found}
        loss = run_with_gradients(program, batches, values=by_input,
                                  gradients={found[w].output: g for w, g in output_gradients.items()},
                                  labels=labels, progress=progress)
    else:
        runner = StagedRunner(program, batches)
        order = {n: i for i, n in enumerate(program.graph.nodes)}
        last = max(by_input, key=order.__getitem__)
        runner.run_through(last, by_input)
    return LinearStatistics(found, inputs, output_gradients, loss)


def streamed_input_moments(program: Program, windows: torch.Tensor, linears: Sequence[str], *,
                           batch_size: int = 1) -> Iterator[tuple[str, torch.Tensor]]:
    """`(weight, A)` for each of `linears`, in graph order, as soon as the sweep over `windows` has seen its input
    and before any node that reads the weight runs: the caller may replace the weight then, and the sweep goes on
    with the replaced value. So each linear is calibrated on the output of the ones before it as the caller left
    them — GPTQ's sequential order, layer after quantized layer — and a run stopped after the k-th weight continues
    from the program alone: a sweep over it yields the remaining ones the statistics the whole run would have.
    Without a replacement, the same sums as `linear_statistics`, bit for bit; one input's at a time."""
    found = _observed(program, linears)
    by_input: dict[fx.Node, list[str]] = {}
    for weight, use in found.items():
        by_input.setdefault(use.input, []).append(weight)
    order = {n: i for i, n in enumerate(program.graph.nodes)}
    runner = StagedRunner(program, list(windows.split(batch_size)))
    for node in sorted(by_input, key=order.__getitem__):
        moment = SecondMoment()
        runner.run_through(node, {node: moment})
        for weight in by_input[node]:
            yield weight, moment.sum
