"""Quantization as a recipe stage: the last compression step (slice → prune → quantize)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fxslice import InvalidOption, Pass, Program
from fxslice.core.quantized import check_format
from fxslice.passes.facts import CAPTURED, CLEAN, GQA_FUSED, QUANTIZED, ROTATED
from fxslice.passes.quantize.gptq import check_damp
from fxslice.passes.quantize.learned_rotation import LearnRotation
from fxslice.passes.quantize.mixed import SEARCHES, search_allocation
from fxslice.passes.quantize.quantize import QUANTIZERS, QuantizeWeights
from fxslice.passes.rewrite import UntieHead
from fxslice.passes.slicegpt.rotate_heads import RotateHeads, head_hadamard
from fxslice.passes.slicegpt.rotations import randomized_hadamard
from fxslice.passes.slicegpt.stages import fused_rotation
from fxslice.recipes import Stage, StageContext, StageResult

__all__ = ["Quantize", "ROTATIONS"]

#: what `Quantize.rotation` may be
ROTATIONS = ("none", "learned")


@dataclass(frozen=True, kw_only=True)
class Quantize(Stage):
    """Every linear of the body to `bits` (group-wise, `group_size` columns per scale) by `method`; token tables
    (a tied head with them) to `embeddings` bits, an untied head to `head` bits and a slicing's shortcut
    matrices to `shortcuts` bits (None: left in float). The saved model stores packed integers; its record gives
    the bytes, scales included. With `search`, the widths come from a search under `budget_bits` (NUQ's
    multi-task GP, or a baseline) — the token tables' width too, unless `search_tables=False` — see
    `passes/quantize/mixed.py`. With `rotation="learned"` the stream is first rotated exactly, by the randomized
    Hadamard and then by a rotation learned against this stage's rounding (`learned_rotation.py`, SpinQuant):
    `rotation_steps` Adam steps at `rotation_lr` on the calibration windows; with `rotate_heads` each attention
    value head too (its value rows and the columns that read them: SpinQuant's R2), from a per-head Hadamard, where
    the graph exposes the pairs (`RotateHeads`). `untie_head` gives a tied head its own
    copy of the table first (exact), so the lookup takes `embeddings` bits and the head `head` bits."""

    kind = "quantize"

    bits: int = 4
    group_size: int = 64
    method: str = "gptq"
    embeddings: int | None = 8
    head: int | None = 8
    shortcuts: int | None = 8  # a slicing's basis changes between segments: errors there compound over depth
    damp: float = 0.01
    act_order: bool = True  # GPTQ in order of input energy: 3-bit SmolLM2 is worse than RTN without it
    grid: str = "zero_point"  # or "offset" (llama.cpp's Q4_1 / Q5_1), "symmetric" (Q4_0 / Q8_0): see GRIDS
    batch_size: int = 1
    # mixed precision: search="mtgp" (or the baselines "gp", "random") chooses per-linear widths instead of `bits`
    search: str = "none"
    budget_bits: float | None = None  # average bits per parameter of the whole model, tables and scales included
    evaluations: int = 6  # expensive (GPTQ) evaluations
    expensive_every: int = 4  # one expensive evaluation after every expensive_every - 1 cheap ones (mtgp)
    cheap_windows: int = 4  # calibration windows the cheap (RTN) task is scored on
    spread: int = 1  # linears choose among the widest uniform width within the budget and `spread` widths either side
    search_tables: bool = True  # the token tables' width (up to `embeddings`) is searched too
    seed: int = 0
    log: str = ""  # JSON-lines file of every evaluation; an existing one is resumed (mtgp)
    rotation: str = "none"  # "learned": the Hadamard, then a rotation learned against the rounding (see ROTATIONS)
    rotation_steps: int = 40  # SmolLM2 4-bit: 40 and 100 steps gave the same perplexity (benchmarks/README.md)
    rotation_lr: float = 2e-3
    rotate_heads: bool = False  # with rotation="learned": each value head as well as the stream
    untie_head: bool = False  # a second V x d table: the head at `head` bits, the lookup at `embeddings`

    def __post_init__(self) -> None:
        if self.rotation not in ROTATIONS:
            raise InvalidOption(f"quantize: rotation must be one of {ROTATIONS}, got {self.rotation!r} (the Hadamard "
                                "alone is the rotate stage: rotation='hadamard')")
        if self.rotate_heads and self.rotation == "none":
            raise InvalidOption("quantize: rotate_heads learns a rotation per value head with the stream's; it needs "
                                "rotation='learned' (the per-head Hadamard alone is Rotate(rotation='hadamard', "
                                "heads=True))")
        if self.rotation != "none":
            self.require_positive_ints("rotation_steps")
            if not self.rotation_lr > 0:
                raise InvalidOption(f"quantize: rotation_lr must be positive, got {self.rotation_lr!r}")
        if self.method not in QUANTIZERS:
            raise InvalidOption(f"quantize: method must be one of {QUANTIZERS}, got {self.method!r}")
        for width in (self.bits, *(b for b in (self.embeddings, self.head, self.shortcuts) if b is not None)):
            check_format(width, self.group_size, self.grid)
        if self.search not in ("none", *SEARCHES):
            raise InvalidOption(f"quantize: search must be 'none' or one of {SEARCHES}, got {self.search!r}")
        if self.search != "none" and (self.budget_bits is None or not 0 < self.budget_bits < 32):
            raise InvalidOption(f"quantize: a search needs budget_bits (average bits per parameter, e.g. 4.0), got "
                                f"{self.budget_bits!r}")
        self.require_positive_ints("batch_size", *(("evaluations", "expensive_every", "cheap_windows", "spread")
                                                   if self.search != "none" else ()))
        check_damp(self.damp)
        if self.search == "none" and self.log:
            raise InvalidOption("quantize: log records a search's evaluations; it needs search and budget_bits")
        if self.search == "none" and self.budget_bits is not None:
            raise InvalidOption(f"quantize: budget_bits={self.budget_bits} does nothing without a search; give "
                                f"search='mtgp' (or one of {SEARCHES}) to choose widths under it, or leave it out")

    def check(self, program: Program) -> None:
        widest = max((max(p.shape) for p in program.gm.parameters() if p.dim() == 2), default=0)
        if self.group_size > widest:
            raise InvalidOption(f"quantize: group_size {self.group_size} is wider than any matrix of this model "
                                f"(the widest has {widest} columns); choose at most {widest}")

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({CAPTURED, CLEAN}) if self.rotation != "none" else frozenset({CAPTURED})

    @property
    def refuses(self) -> frozenset[str]:  # type: ignore[override]
        """A learned rotation starts from the Hadamard it applies itself: not after another rotation."""
        return frozenset({QUANTIZED, ROTATED, GQA_FUSED}) if self.rotation != "none" else frozenset({QUANTIZED})

    @property
    def provides(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({QUANTIZED, ROTATED}) if self.rotation != "none" else frozenset({QUANTIZED})

    @property
    def calibrates(self) -> bool:  # type: ignore[override]
        return self.method == "gptq" or self.search != "none" or self.rotation != "none"

    def summary(self, result: StageResult) -> list[str]:
        report = result.report
        lines = [f"bytes        {report['bytes']:,} ({report['bits_per_parameter']:.2f} bits per parameter, "
                 "scales and float tensors included)"]
        if "rotation" in report:
            first, last = report["rotation"]["kl_first_last_10"]
            lines.append(f"rotation     learned in {report['rotation']['steps']} steps: KL from float {first:.4f} -> "
                         f"{last:.4f} (round to nearest, first and last 10 steps)")
        return lines

    def run(self, program: Program, context: StageContext) -> StageResult:
        """The exact passes (untie, rotations), the width search, then the quantization. A job checkpoints between
        GPTQ's weights: the state holds the widths and what came before, so that a run continued from it skips
        straight to the weights left (the program it continues holds the rest)."""
        windows = context.windows(self.kind) if self.calibrates else None
        state = self._resumed(context.resume)
        if state is None:
            prepared, bits, report = self._prepare(program, windows, context)
            entries = prepared.pass_entries()
            state = {"pass": QuantizeWeights.name, "bits": bits, "report": report, "entries": entries}
        else:
            prepared, bits, report, entries = StageResult(), state["bits"], state["report"], state["entries"]

        def weight_done(passes: list[Pass]) -> None:
            context.step_done(state, prepared.passes + passes)  # type: ignore[misc]

        quantize = QuantizeWeights(bits, group_size=self.group_size, method=self.method, windows=windows,
                                   embeddings=self.embeddings, head=self.head, shortcuts=self.shortcuts,
                                   damp=self.damp, act_order=self.act_order, grid=self.grid,
                                   batch_size=self.batch_size, progress=context.progress,
                                   after_weight=weight_done if context.step_done is not None else None)
        quantized = self.run_passes(program, [quantize], context)
        result = StageResult(prepared.passes + quantized.passes, prepared.records + quantized.records,
                             seconds=prepared.seconds + quantized.seconds,
                             entries=entries + quantized.pass_entries() if context.resume is not None else None)
        params = program.num_parameters()
        result.report = {"bytes": program.num_bytes(), "parameters": params,
                         "bits_per_parameter": round(8 * program.num_bytes() / params, 4),
                         "weights": {name: q.bits for name, q in program.quantized.items()}, **report}
        return result

    def _resumed(self, state: dict | None) -> dict | None:
        """The state an interrupted run of this stage left between two weights, refused when it is another pass's."""
        if state is not None and (state.get("pass") != QuantizeWeights.name
                                  or not {"bits", "report", "entries"} <= set(state)):
            raise InvalidOption(f"quantize: the interrupted run's state is not a quantization's ({state.get('pass')}); "
                                "start the run over")
        return state

    def _prepare(self, program: Program, windows: torch.Tensor | None,
                 context: StageContext) -> tuple[StageResult, int | dict[str, int], dict]:
        """Untie and rotate (exact), then search the widths: (those passes' result, the widths, their report)."""
        exact = [UntieHead()] if self.untie_head else []
        exact += self._rotation(windows, context)
        prepared = self.run_passes(program, exact, context) if exact else StageResult()
        report: dict = {}
        learned = next((p for p in prepared.passes if isinstance(p, LearnRotation)), None)
        if learned is not None:
            report["rotation"] = {"steps": self.rotation_steps, "lr": self.rotation_lr,
                                  "kl_first_last_10": learned.loss_summary()}
        if self.search == "none":
            return prepared, self.bits, report
        bits, search, allocation = search_allocation(
            program, windows, budget_bits=self.budget_bits, group_size=self.group_size,
            embeddings=self.embeddings, head=self.head, shortcuts=self.shortcuts, search=self.search,
            evaluations=self.evaluations, expensive_every=self.expensive_every, cheap_windows=self.cheap_windows,
            seed=self.seed, spread=self.spread, search_tables=self.search_tables, grid=self.grid,
            log=self.log or None, progress=context.progress)
        report["search"] = {**search.to_dict(), "budget_bits": self.budget_bits, "widths": list(allocation.choices),
                            "table_widths": list(allocation.table_choices),
                            "depth_roles": list(zip(allocation.depth, allocation.roles, strict=True))}
        return prepared, bits, report

    def _rotation(self, windows: torch.Tensor | None, context: StageContext) -> list[Pass]:
        """The exact passes before rounding: none, or the Hadamard and the rotation learned against `self`'s rounding
        (round to nearest at `bits`; the integers themselves come after, by `method`)."""
        if self.rotation == "none":
            return []
        rounding = QuantizeWeights(self.bits, group_size=self.group_size, embeddings=self.embeddings, head=self.head,
                                   shortcuts=self.shortcuts, grid=self.grid).rounding
        heads = [RotateHeads(head_hadamard(self.seed))] if self.rotate_heads else []
        return [*fused_rotation(randomized_hadamard(self.seed)), *heads,
                LearnRotation(rounding, windows, steps=self.rotation_steps, lr=self.rotation_lr,
                              batch_size=self.batch_size, seed=self.seed, heads=self.rotate_heads,
                              progress=context.progress)]
