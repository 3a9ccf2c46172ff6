"""Recovery fine-tuning as one lossy pass: insert adapters, train them, merge them — so the program that comes
out has the structure and size it came in with, and only its weights moved."""

from __future__ import annotations

from typing import Any

import torch

from fxslice import InvalidOption, Pass, PassManager, PassResult, Program
from fxslice.core.graph import tensor_of
from fxslice.core.health import check_finite, check_tokens
from fxslice.passes.recovery.adapters import (
    InsertAdapters,
    MergeAdapters,
    adaptable_linears,
    add_low_rank,
    low_rank_updates,
)
from fxslice.passes.recovery.refit import SetWeights
from fxslice.passes.recovery.train import TrainReport, train_adapters, train_parameters

__all__ = ["RecoverFull", "RecoverLoRA", "ReplayLowRank"]


class _Recovery(Pass):
    """What both recovery methods share: the training windows and options, checked once, and their report."""

    exact = False

    def __init__(self, windows: torch.Tensor, *, steps: int, lr: float, batch_size: int,
                 held_out: torch.Tensor | None, progress: bool, teacher: Program | None, temperature: float):
        if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.numel() == 0:
            raise InvalidOption("recovery: training windows must be a non-empty [n, length] tensor of token ids")
        self.windows, self.held_out = windows, held_out
        self.steps, self.lr, self.batch_size, self.progress = steps, lr, batch_size, progress
        self.teacher, self.temperature = teacher, temperature
        self.report: TrainReport | None = None

    def requires(self, program: Program) -> None:
        check_finite(program)
        check_tokens(program, self.windows)

    def training(self) -> dict[str, Any]:
        """The options of `train_parameters` (and `train_adapters`) but the parameters themselves."""
        return dict(steps=self.steps, lr=self.lr, batch_size=self.batch_size, held_out=self.held_out,
                    progress=self.progress, teacher=self.teacher, temperature=self.temperature)

    def result(self, **counts: int) -> PassResult:
        assert self.report is not None
        return PassResult(True, {**counts, "steps": self.steps, "objective": self.report.objective,
                                 "held_out_before": self.report.held_out_before,
                                 "held_out_after": self.report.held_out_after})


class RecoverLoRA(_Recovery):
    """Low-rank recovery fine-tuning on `windows` (never the evaluation text); `report` holds the losses. With a
    `teacher` (the program before compression) the adapters learn its output distributions at `temperature`
    rather than the text's next tokens: the student cannot learn the domain beyond what its teacher knows.
    A KV-cache program (a saved model, `fxslice.load`) trains as the plain capture does: each window runs from an
    empty cache, whose writes are part of the graph autograd follows."""

    name = "recover_lora"

    def __init__(self, windows: torch.Tensor, *, rank: int = 8, alpha: float = 16.0, steps: int = 100,
                 lr: float = 5e-4, batch_size: int = 1, held_out: torch.Tensor | None = None, head: bool = False,
                 seed: int = 0, progress: bool = False, teacher: Program | None = None, temperature: float = 1.0):
        super().__init__(windows, steps=steps, lr=lr, batch_size=batch_size, held_out=held_out, progress=progress,
                         teacher=teacher, temperature=temperature)
        self.insert = InsertAdapters(rank, alpha, head=head, seed=seed)
        self.updates: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # weight -> (L, R): training added L @ R

    def call(self, program: Program) -> PassResult:
        PassManager([self.insert], check_numerics=False).run(program)
        self.report = train_adapters(program, self.windows, **self.training())
        self.updates = low_rank_updates(program)
        PassManager([MergeAdapters()], check_numerics=False).run(program)
        return self.result(adapters=len(self.updates))

    def replay(self) -> Pass:
        return ReplayLowRank(self.updates, self.name)


class ReplayLowRank(Pass):
    """What training learned, fixed (one low-rank product per weight), added to another capture of the same
    model: the KV-cache capture, say."""

    exact = False

    def __init__(self, updates: dict[str, tuple[torch.Tensor, torch.Tensor]], name: str):
        self.updates, self.name = updates, name

    def call(self, program: Program) -> PassResult:
        for target, (left, right) in self.updates.items():
            add_low_rank(program, target, left, right)
        return PassResult(bool(self.updates))


class RecoverFull(_Recovery):
    """Full fine-tuning: the weights `RecoverLoRA` would adapt (every 2-D linear weight; the head only with `head`;
    never a table an embedding also reads) train in place, every other parameter frozen. The capacity of the weights
    themselves where adapters have a rank, at the memory of a gradient and the optimizer's two moments per weight.
    The model keeps its structure; only those weights move. Options and `teacher` as `RecoverLoRA`'s."""

    name = "recover_full"

    def __init__(self, windows: torch.Tensor, *, steps: int = 100, lr: float = 5e-5, batch_size: int = 1,
                 held_out: torch.Tensor | None = None, head: bool = False, progress: bool = False,
                 teacher: Program | None = None, temperature: float = 1.0):
        super().__init__(windows, steps=steps, lr=lr, batch_size=batch_size, held_out=held_out, progress=progress,
                         teacher=teacher, temperature=temperature)
        self.head = head
        self.trained: dict[str, torch.Tensor] = {}  # weight -> its value after training

    def requires(self, program: Program) -> None:
        super().requires(program)
        if not adaptable_linears(program, head=self.head):
            raise InvalidOption("no linear with a 2-D weight to train was found in the graph (tied tables and the "
                                "head are left out unless head=True)")

    def call(self, program: Program) -> PassResult:
        targets = list(adaptable_linears(program, head=self.head))
        self.report = train_parameters(program, targets, self.windows, **self.training())
        self.trained = {target: tensor_of(program.gm, target).detach().clone() for target in targets}
        return self.result(weights=len(targets))

    def replay(self) -> Pass:
        return SetWeights(self.trained, self.name)
