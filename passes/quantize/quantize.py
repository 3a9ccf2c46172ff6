"""Weight quantization as one lossy pass: every chosen weight replaced by its group-wise integer form
(`fxslice.core.quantized`), kept in `Program.quantized` for saving and dequantized once into the graph's own
parameter, so the graph is unchanged and every later analysis still reads a float weight."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch

from fxslice import InvalidOption, Pass, PassResult, Program
from fxslice.analysis.linears import weight_kinds
from fxslice.analysis.matchers import LinearUse
from fxslice.calibration.moments import LinearStatistics, streamed_input_moments
from fxslice.core.graph import kept, owner_of, readers_of, set_tensor, tensor_of
from fxslice.core.memory import release_freed
from fxslice.core.progress import StepProgress
from fxslice.core.quantized import QuantizedWeight, check_format, round_trip
from fxslice.passes.quantize.gptq import check_damp, gptq

__all__ = ["QuantizeWeights", "ReplayQuantized", "QUANTIZERS"]

QUANTIZERS = ("rtn", "gptq")


class QuantizeWeights(Pass):
    """`bits` for the body's linears (one width, or a width per weight name), `head` for an untied head,
    `embeddings` for token tables (a tied head with them) and `shortcuts` for the basis changes a slicing
    inserted between segments (a name given in `bits` wins); None leaves that kind in float. Shortcuts get their
    own width because every token's residual passes through all of them in turn: at 4 bits their errors
    compound over depth (SmolLM2 sliced by 25 %: perplexity 123 in float, 1,485 with only its 60 shortcuts at 4
    bits; the rest at 4 bits: 163 with the shortcuts in float, 168 with them at 8). `method`: "rtn" (round to
    nearest) or "gptq" (needs calibration `windows`; each linear calibrated on what the weights quantized before it
    compute, in the graph's order, as GPTQ does layer by layer; tables are always rounded, first: no Hessian covers
    both their uses).
    `grid`: an integer zero point per group (GPTQ checkpoints), a float16 offset (llama.cpp's Q4_1 / Q5_1: exported
    to those blocks exactly, and a tighter fit for groups whose weights all have one sign), or symmetric (no anchor:
    Q4_0 / Q5_0 / Q8_0, and compressed-tensors integers in a stock transformers export).
    Weights already quantized are left as they are."""

    name = "quantize_weights"
    exact = False

    def __init__(self, bits: int | Mapping[str, int] = 4, *, group_size: int = 64, method: str = "rtn",
                 windows: torch.Tensor | None = None, embeddings: int | None = 8, head: int | None = 8,
                 shortcuts: int | None = 8, damp: float = 0.01, act_order: bool = True, batch_size: int = 1,
                 statistics: LinearStatistics | None = None, grid: str = "zero_point", progress: bool = False,
                 after_weight: Callable[[list[Pass]], None] | None = None):
        if method not in QUANTIZERS:
            raise InvalidOption(f"quantize: method must be one of {QUANTIZERS}, got {method!r}")
        if method == "gptq" and statistics is None and (windows is None or windows.dim() != 2 or windows.numel() == 0):
            raise InvalidOption("quantize: GPTQ needs calibration windows (an [n, length] tensor of token ids)")
        for width in ([*bits.values()] if isinstance(bits, Mapping) else [bits]) + [b for b in (embeddings, head, shortcuts) if b]:
            check_format(width, group_size, grid)
        self.grid = grid
        self.bits, self.group_size, self.method, self.windows = bits, group_size, method, windows
        self.embeddings, self.head, self.shortcuts = embeddings, head, shortcuts
        check_damp(damp)
        self.damp, self.act_order = damp, act_order
        self.batch_size, self.progress, self.statistics = batch_size, progress, statistics
        self.done: dict[str, QuantizedWeight] = {}  # what this pass quantized, for replay
        #: called after each weight GPTQ quantizes with the replay of what this pass did so far (a job's checkpoint:
        #: a run stopped there continues from the program alone, `streamed_input_moments`)
        self.after_weight = after_weight

    def plan(self, program: Program) -> dict[str, tuple[int, bool]]:
        """Weight name -> (bits, whether GPTQ may be used), for what this pass will quantize."""
        kinds = program.analysis(weight_kinds)
        body = (dict(self.bits) if isinstance(self.bits, Mapping)
                else {name: self.bits for name in kinds.linears if name not in kinds.shortcuts})
        unknown = sorted(set(body) - set(kinds.linears) - {kinds.head} - set(kinds.tables))
        if unknown:
            raise InvalidOption(f"quantize: no linear reads {', '.join(unknown[:4])}; the body's linears are e.g. "
                                f"{', '.join(list(kinds.linears)[:3])}")
        plan = {name: (width, True) for name, width in body.items()}
        if self.shortcuts:
            plan.update({name: (self.shortcuts, True) for name in kinds.shortcuts if name not in plan})
        if self.head and kinds.head is not None and kinds.head not in plan:
            plan[kinds.head] = (self.head, True)
        if self.embeddings:
            plan.update({t: (plan.get(t, (self.embeddings,))[0], False) for t in kinds.tables
                         if tensor_of(program.gm, t).dim() == 2})
        return {name: spec for name, spec in plan.items() if name not in program.quantized}

    def call(self, program: Program) -> PassResult:
        plan = self.plan(program)
        if not plan:
            return PassResult(False)
        uses = _first_uses(program)
        self.done = {}
        calibrated = self._calibrated(plan, uses)
        with StepProgress(len(plan), f"quantizing ({self.method})", enabled=self.progress) as bar:
            for name in [n for n in plan if n not in calibrated]:  # rounded to nearest, before the sweep sees them
                self._quantize(program, name, plan[name][0], uses, None)
                bar.advance(name)
            for i, (name, hessian) in enumerate(self._hessians(program, calibrated), start=1):
                self._quantize(program, name, plan[name][0], uses, hessian)
                bar.advance(name)
                if self.after_weight is not None and i < len(calibrated):
                    self.after_weight([self.replay()])
        return PassResult(True, {"weights": len(plan), "bytes": program.num_bytes()})

    def _calibrated(self, plan: dict[str, tuple[int, bool]], uses: dict[str, LinearUse]) -> list[str]:
        """The weights GPTQ quantizes against their inputs' statistics; the rest are rounded to nearest."""
        if self.method != "gptq":
            return []
        targets = [name for name, (_, hessian) in plan.items() if hessian and name in uses]
        if self.statistics is not None:
            return [n for n in targets if n in self.statistics.inputs]
        return targets

    def _hessians(self, program: Program, targets: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(weight, Σxxᵀ of its input) for `targets`: the given statistics', or streamed from one calibration sweep
        that reaches each input through the weights quantized before it (GPTQ's sequential order; one input's
        statistics held at a time)."""
        if self.statistics is not None:
            yield from ((n, self.statistics.A(n)) for n in targets)
        elif targets:
            yield from streamed_input_moments(program, self.windows, targets, batch_size=self.batch_size)

    def _quantize(self, program: Program, name: str, width: int, uses: dict[str, LinearUse],
                  hessian: torch.Tensor | None) -> None:
        """One weight quantized (GPTQ against `hessian`, else to nearest) and put in place of its float value."""
        weight = tensor_of(program.gm, name)
        transposed = name in uses and uses[name].out_axis % 2 != 0
        m = weight.T if transposed else weight
        if hessian is not None:
            q = gptq(m, hessian, width, self.group_size, damp=self.damp, act_order=self.act_order,
                     transposed=transposed, dtype=weight.dtype, grid=self.grid)
        else:
            q = QuantizedWeight.from_matrix(m, width, self.group_size, transposed=transposed, dtype=weight.dtype,
                                            grid=self.grid)
        _store(program, name, q)
        self.done[name] = q
        release_freed()  # the replaced weight and GPTQ's work: returned now, not after the last weight

    def rounding(self, program: Program) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """Weight name -> the function that gives a value of that weight as round-to-nearest would store it
        (dequantized, same layout), for what this pass will quantize: for a pass that must see the rounding before it
        happens (a rotation learned against it)."""
        uses = _first_uses(program)

        def rounder(width: int, transposed: bool) -> Callable[[torch.Tensor], torch.Tensor]:
            def rounded(weight: torch.Tensor) -> torch.Tensor:
                if transposed:
                    return round_trip(weight.T, width, self.group_size, self.grid).T
                return round_trip(weight, width, self.group_size, self.grid)
            return rounded

        return {name: rounder(width, name in uses and uses[name].out_axis % 2 != 0)
                for name, (width, _) in self.plan(program).items()}

    def replay(self) -> Pass:
        return ReplayQuantized(self.done)


def _first_uses(program: Program) -> dict[str, LinearUse]:
    """Each quantizable linear weight (and the head's) by name -> its first use, which tells its layout."""
    kinds = program.analysis(weight_kinds)
    return {**{n: u[0] for n, u in kinds.linears.items()}, **({kinds.head: kinds.head_uses[0]} if kinds.head_uses else {})}


class ReplayQuantized(Pass):
    """The integer weights a quantization chose, put into another capture of the same model (the KV-cache one)."""

    name = "quantize_weights"
    exact = False

    def __init__(self, weights: Mapping[str, QuantizedWeight]):
        self.weights = dict(weights)

    def call(self, program: Program) -> PassResult:
        for name, q in self.weights.items():
            _store(program, name, q)
        return PassResult(bool(self.weights))


def _store(program: Program, name: str, q: QuantizedWeight) -> None:
    """`q` dequantized into the parameter `name` (and every name that reads the same tensor: a tie stays one
    tensor), and `q` itself into `program.quantized` (its integers on disk too where the program keeps its weights
    there: a byte per weight, 7 GB at 7 B)."""
    q.q = kept(program.gm, q.q)
    aliases = sorted({str(n.target) for n in readers_of(program.gm, tensor_of(program.gm, name))})
    set_tensor(program.gm, name, q.dequantize())
    shared = tensor_of(program.gm, name)
    for alias in aliases:
        owner, attr = owner_of(program.gm, alias)
        owner._parameters[attr] = shared
    program.quantized[name] = q
