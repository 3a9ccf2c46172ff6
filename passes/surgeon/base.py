"""What every Surgeon pass shares: its calibration windows, shots and curvature, checked once; the plain
capture it needs; the weights it wrote, replayed onto another capture; and its state between shots, handed to
`after_shot` (a job's checkpoint) and taken back as `resume` to continue an interrupted run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fxslice import InvalidOption, Pass, PassManager, PassResult, Program
from fxslice.core.graph import set_tensor
from fxslice.core.health import check_finite, check_tokens
from fxslice.passes.rewrite.remove_dead_groups import RemoveDeadGroups
from fxslice.passes.surgeon.curvature import CURVATURES

__all__ = ["SurgeonPass", "ReplaySurgeon"]


class SurgeonPass(Pass):
    exact = False

    target: float

    def __init__(self, windows: torch.Tensor, *, shots: int, curvature: str, batch_size: int, labels: str,
                 progress: bool, after_shot: Callable[[dict[str, Any], list[Pass]], None] | None = None,
                 resume: dict[str, Any] | None = None):
        if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.numel() == 0:
            raise InvalidOption("calibration windows must be a non-empty [n, length] tensor of token ids")
        if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
            raise InvalidOption(f"surgeon: shots must be a positive integer, got {shots!r}")
        if curvature not in CURVATURES:
            raise InvalidOption(f"surgeon: curvature must be one of {CURVATURES}, got {curvature!r}")
        self.windows, self.shots, self.curvature = windows, shots, curvature
        self.batch_size, self.labels, self.progress = batch_size, labels, progress
        self.updated: list[dict[str, torch.Tensor]] = []  # per shot, the weights and biases it wrote
        self.after_shot, self.resume = after_shot, resume

    def shot_done(self, shot: int, **state: Any) -> None:
        """Hand `after_shot` what the next shot needs besides the program (JSON-able `state`) and the replay of the
        shots run in this call; nothing after the last shot (the stage's end takes over)."""
        if self.after_shot is not None and shot < self.shots:
            self.after_shot({"pass": self.name, "shots": self.shots, "target": self.target, **state}, [self.replay()])

    def resumed(self) -> dict[str, Any] | None:
        """The state an interrupted run's `shot_done` handed over, refused when it was another pass's or target's."""
        state = self.resume
        if state is not None and (state.get("pass"), state.get("shots"), state.get("target")) != (
                self.name, self.shots, self.target):
            raise InvalidOption(f"surgeon: the interrupted run's state is not this pass's ({state.get('pass')}, "
                                f"{state.get('shots')} shots to {state.get('target')}); start the run over")
        return state

    def requires(self, program: Program) -> None:
        if program.cache is not None:
            raise InvalidOption("surgeon: prune the plain capture, then `fxslice.replay` onto the KV-cache capture")
        check_finite(program)
        check_tokens(program, self.windows)

    def replay(self) -> Pass:
        return ReplaySurgeon(self.updated, self.name)


class ReplaySurgeon(Pass):
    """The Surgeon's weights, fixed: what calibration chose, applied to another capture of the same model."""

    exact = False

    def __init__(self, updated: list[dict[str, torch.Tensor]], name: str):
        self.updated, self.name = updated, name

    def call(self, program: Program) -> PassResult:
        for weights in self.updated:
            for name, value in weights.items():
                set_tensor(program.gm, name, value)
            program.mark_changed()
            PassManager([RemoveDeadGroups()], check_numerics=False).run(program)
        return PassResult(bool(self.updated))
