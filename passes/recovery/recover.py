"""Recovery fine-tuning as one lossy pass: insert adapters, train them, merge them — so the program that comes
out has the structure and size it came in with, and only its weights moved."""

from __future__ import annotations

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


class RecoverLoRA(Pass):
    """Low-rank recovery fine-tuning on `windows` (never the evaluation text); `report` holds the losses. With a
    `teacher` (the program before compression) the adapters learn its output distributions at `temperature`
    rather than the text's next tokens: the student cannot learn the domain beyond what its teacher knows.
    A KV-cache program (a saved model, `fxslice.load`) trains as the plain capture does: each window runs from an
    empty cache, whose writes are part of the graph autograd follows."""

    name = "recover_lora"
    exact = False

    def __init__(self, windows: torch.Tensor, *, rank: int = 8, alpha: float = 16.0, steps: int = 100,
                 lr: float = 5e-4, batch_size: int = 1, held_out: torch.Tensor | None = None, head: bool = False,
                 seed: int = 0, progress: bool = False, teacher: Program | None = None, temperature: float = 1.0):
        if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.numel() == 0:
            raise InvalidOption("recovery: training windows must be a non-empty [n, length] tensor of token ids")
        self.windows, self.held_out = windows, held_out
        self.insert = InsertAdapters(rank, alpha, head=head, seed=seed)
        self.steps, self.lr, self.batch_size, self.progress = steps, lr, batch_size, progress
        self.teacher, self.temperature = teacher, temperature
        self.report: TrainReport | None = None
        self.updates: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # weight -> (L, R): training added L @ R

    def requires(self, program: Program) -> None:
        check_finite(program)
        check_tokens(program, self.windows)

    def call(self, program: Program) -> PassResult:
        PassManager([self.insert], check_numerics=False).run(program)
        self.report = train_adapters(program, self.windows, steps=self.steps, lr=self.lr,
                                     batch_size=self.batch_size, held_out=self.held_out, progress=self.progress,
                                     teacher=self.teacher, temperature=self.temperature)
        self.updates = low_rank_updates(program)
        PassManager([MergeAdapters()], check_numerics=False).run(program)
        return PassResult(True, {"adapters": len(self.updates), "steps": self.steps, "objective": self.report.objective,
                                 "held_out_before": self.report.held_out_before,
                                 "held_out_after": self.report.held_out_after})

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


class RecoverFull(Pass):
    """Full fine-tuning: the weights `RecoverLoRA` would adapt (every 2-D linear weight; the head only with `head`;
    never a table an embedding also reads) train in place, every other parameter frozen. The capacity of the weights
    themselves where adapters have a rank, at the memory of a gradient and the optimizer's two moments per weight.
    The model keeps its structure; only those weights move. Options and `teacher` as `RecoverLoRA`'s."""

    name = "recover_full"
    exact = False

    def __init__(self, windows: torch.Tensor, *, steps: int = 100, lr: float = 5e-5, batch_size: int = 1,
                 held_out: torch.Tensor | None = None, head: bool = False, progress: bool = False,
                 teacher: Program | None = None, temperature: float = 1.0):
        if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.numel() == 0:
            raise InvalidOption("recovery: training windows must be a non-empty [n, length] tensor of token ids")
        self.windows, self.held_out, self.head = windows, held_out, head
        self.steps, self.lr, self.batch_size, self.progress = steps, lr, batch_size, progress
        self.teacher, self.temperature = teacher, temperature
        self.report: TrainReport | None = None
        self.trained: dict[str, torch.Tensor] = {}  # weight -> its value after training

    def requires(self, program: Program) -> None:
        check_finite(program)
        check_tokens(program, self.windows)
        if not adaptable_linears(program, head=self.head):
            raise InvalidOption("no linear with a 2-D weight to train was found in the graph (tied tables and the "
                                "head are left out unless head=True)")

    def call(self, program: Program) -> PassResult:
        targets = list(adaptable_linears(program, head=self.head))
        self.report = train_parameters(program, targets, self.windows, steps=self.steps, lr=self.lr,
                                       batch_size=self.batch_size, held_out=self.held_out, progress=self.progress,
                                       teacher=self.teacher, temperature=self.temperature)
        self.trained = {target: tensor_of(program.gm, target).detach().clone() for target in targets}
        return PassResult(True, {"weights": len(targets), "steps": self.steps, "objective": self.report.objective,
                                 "held_out_before": self.report.held_out_before,
                                 "held_out_after": self.report.held_out_after})

    def replay(self) -> Pass:
        return SetWeights(self.trained, self.name)
