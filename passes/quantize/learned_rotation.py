"""A rotation of the residual stream learned against the quantizer that follows it (SpinQuant, arXiv 2405.16406),
on any graph `RotateStream` takes.

Rotating the stream is exact in float (design.md §1), but it changes what round-to-nearest does to every weight
that reads or writes the stream. `LearnRotation` starts from the rotation the program already has (the Hadamard,
in `Quantize(rotation="learned")`) and learns one more orthogonal matrix per *rotation group* — segments joined by
a plain residual edge must share one, or the rotation would add a shortcut matmul; segments joined by a shortcut
matrix may differ — to minimise the KL divergence of the round-to-nearest model's next-token distributions from
the float model's, on calibration windows. The gradient reaches the rotation through the rounding by the
straight-through estimator; the matrix is the Cayley transform of a skew-symmetric one, so it stays orthogonal
whatever the optimizer does. The pass then applies the learned matrices with `RotateStream`, so the result is as
exact as any rotation (the manager proves it in float64), and its replay is the fixed matrices.

How each parameter depends on a group's matrix is not written down per architecture: it is read off
`RotateStream` itself, by rotating a copy with a random matrix on one group and finding, for every parameter that
changed, the axes whose contraction with that matrix reproduces the change.

With `heads=True` it also learns one rotation per attention value head (SpinQuant's R2): the value rows of the head
and the columns that read its output (`RotateHeads`, pairs found by `group_analysis`), from where the program's
heads are (the per-head Hadamard, in `Quantize(rotation="learned", rotate_heads=True)`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch.func import functional_call

from fxslice import InvalidOption, Pass, PassResult, Program, UnsupportedStructure
from fxslice.analysis.groups import ValueHead, group_analysis
from fxslice.analysis.stream import Stream, stream_analysis
from fxslice.core.progress import StepProgress
from fxslice.passes.slicegpt.rotate_heads import HeadKey, RotateHeads, head_key, head_matrices, head_widths
from fxslice.passes.slicegpt.rotate_stream import RotateStream
from fxslice.passes.slicegpt.rotations import random_orthogonal

__all__ = ["LearnRotation", "FixedRotations", "rotation_groups", "rotation_axes", "rotated_weights", "head_sites", "cayley"]

#: parameter name -> the (axis, group) pairs along which the parameter is contracted with the group's rotation
Axes = dict[str, list[tuple[int, int]]]


def rotation_groups(stream: Stream) -> list[list[int]]:
    """Segments that must share a rotation: those joined by a residual edge without a shortcut matrix."""
    parent = list(range(len(stream.segments)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for shortcut in stream.shortcuts:
        if shortcut.linear is None:
            parent[root(shortcut.src)] = root(shortcut.dst)
    groups: dict[int, list[int]] = {}
    for seg in stream.segments:
        groups.setdefault(root(seg.index), []).append(seg.index)
    return list(groups.values())


def _state(program: Program) -> dict[str, torch.Tensor]:
    return {**dict(program.gm.named_parameters()), **dict(program.gm.named_buffers())}


def _contract(t: torch.Tensor, axis: int, m: torch.Tensor) -> torch.Tensor:
    """Differentiable `fxslice.analysis.weights.contract`: index i along `axis` becomes sum_i t[.., i, ..] m[i, j]."""
    return (t.movedim(axis, -1) @ m).movedim(-1, axis)


def rotated_weights(state: Mapping[str, torch.Tensor], axes: Axes,
                    rotations: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The parameters `axes` names as the rotations (one per group) make them, differentiably in the rotations."""
    weights = {}
    for name, pairs in axes.items():
        value = state[name]
        for axis, group in pairs:
            value = _contract(value, axis, rotations[group].to(value.dtype))
        weights[name] = value
    return weights


def rotation_axes(program: Program, groups: Sequence[Sequence[int]], *, seed: int = 0) -> Axes:
    """For every parameter the rotation of some group changes, the axes it is contracted along and with which
    group's matrix, found by rotating a float64 copy with a random matrix one group at a time."""
    stream = program.analysis(stream_analysis)
    source = random_orthogonal(seed + 7)
    original = {name: t.detach().to(torch.float64) for name, t in _state(program).items()}
    axes: Axes = {}
    for g, members in enumerate(groups):
        width = stream.segments[members[0]].width
        probe = source(stream.segments[members[0]], width)
        copy = program.clone(torch.float64)
        RotateStream([probe if seg.index in members else torch.eye(seg.width, dtype=torch.float64)
                      for seg in stream.segments])(copy)
        rotated = _state(copy)
        if rotated.keys() != original.keys():
            added = sorted(set(rotated) - set(original))[:3]
            raise UnsupportedStructure(f"learned rotation: rotating segments {members} adds parameters ({added}); "
                                       "rotate the stream once (Rotate or the Hadamard) before learning a rotation")
        for name, before in original.items():
            after = rotated[name].detach()
            if torch.equal(after, before):
                continue
            axes[name] = axes.get(name, []) + [(axis, g) for axis in _axes_of(name, before, after, probe)]
    return axes


def _axes_of(name: str, before: torch.Tensor, after: torch.Tensor, probe: torch.Tensor) -> tuple[int, ...]:
    """The set of axes along which contracting `before` with `probe` gives `after`."""
    fitting = [axis for axis in range(before.dim()) if before.shape[axis] == len(probe)]
    scale = float(before.abs().max()) or 1.0
    for count in range(1, len(fitting) + 1):
        for subset in itertools.combinations(fitting, count):
            value = before
            for axis in subset:
                value = _contract(value, axis, probe)
            if torch.allclose(value, after, rtol=1e-9, atol=1e-9 * scale):
                return subset
    raise UnsupportedStructure(f"learned rotation: the stream rotation changes {name} (shape {tuple(before.shape)}) "
                               "in a way that is not a contraction of its axes with the rotation; this parameter cannot "
                               "take a learned rotation")


def cayley(b: torch.Tensor) -> torch.Tensor:
    """The orthogonal matrix (I − A)⁻¹(I + A) of the skew-symmetric A = B − Bᵀ (B = 0 gives I)."""
    a = b - b.T
    eye = torch.eye(len(b), dtype=b.dtype, device=b.device)
    return torch.linalg.solve(eye - a, eye + a)


class LearnRotation(Pass):
    """Learn a rotation of the stream against `rounding` (weight name -> what rounding does to a value of it, e.g.
    `QuantizeWeights.rounding(program)`, given as a function of the program it will see) on `windows` [n, length],
    `steps` Adam steps of `batch_size` windows at `lr`; then apply it. Exact."""

    name = "learn_rotation"
    exact = True

    def __init__(self, rounding: Callable[[Program], Mapping[str, Callable[[torch.Tensor], torch.Tensor]]],
                 windows: torch.Tensor, *, steps: int = 40, lr: float = 2e-3, batch_size: int = 1, seed: int = 0,
                 heads: bool = False, progress: bool = False):
        if windows.dim() != 2 or len(windows) == 0:
            raise InvalidOption("learned rotation: calibration windows must be a non-empty [n, length] tensor of ids")
        if steps < 1 or batch_size < 1 or not lr > 0:
            raise InvalidOption(f"learned rotation: steps and batch_size must be positive and lr > 0 (got {steps}, "
                                f"{batch_size}, {lr})")
        self.rounding, self.windows = rounding, windows
        self.steps, self.lr, self.batch_size, self.seed, self.progress = steps, lr, batch_size, seed, progress
        self.heads = heads
        self.rotate: RotateStream | None = None
        self.rotate_heads: RotateHeads | None = None
        self.losses: list[float] = []

    def requires(self, program: Program) -> None:
        RotateStream([]).requires(program)

    def replay(self) -> Pass:
        if self.rotate is None:
            return self
        if self.rotate_heads is None:
            return self.rotate.replay()
        return FixedRotations([self.rotate.replay(), self.rotate_heads.replay()])

    def call(self, program: Program) -> PassResult:
        stream = program.analysis(stream_analysis)
        if not stream.segments:
            return PassResult(False)
        groups = rotation_groups(stream)
        axes = rotation_axes(program, groups, seed=self.seed)
        heads = program.analysis(group_analysis).value_heads if self.heads else []
        matrices, head_rotations = self._learn(program, groups, axes, heads)
        member = {s: g for g, members in enumerate(groups) for s in members}
        self.rotate = RotateStream([matrices[member[seg.index]] for seg in stream.segments])
        result = self.rotate.call(program)
        if heads:
            program.mark_changed()  # the heads are found again on the rotated graph, under the same keys
            self.rotate_heads = RotateHeads(head_rotations)
            self.rotate_heads.call(program)
        return PassResult(result.modified, {"groups": len(groups), "heads": len(heads), "steps": self.steps,
                                            "kl_first_last_10": self.loss_summary()})

    def loss_summary(self) -> list[float]:
        """The training KL averaged over the first and the last ten steps (one step is one noisy batch)."""
        return [round(sum(part) / len(part), 5) for part in (self.losses[:10], self.losses[-10:])]

    def _learn(self, program: Program, groups: list[list[int]], axes: Axes,
               heads: list[ValueHead]) -> tuple[list[torch.Tensor], dict[HeadKey, torch.Tensor]]:
        stream = program.analysis(stream_analysis)
        state = {name: t.detach() for name, t in _state(program).items()}
        aliases = _canonical_names(program)
        rounding = {aliases[name]: fn for name, fn in self.rounding(program).items() if name in aliases}
        device = program.weights_device
        skews = [torch.zeros(stream.segments[m[0]].width, stream.segments[m[0]].width, dtype=torch.float32,
                             device=device, requires_grad=True) for m in groups]
        head_skews = {head_key(h): torch.zeros(len(h.rows), len(h.rows), dtype=torch.float32, device=device,
                                               requires_grad=True) for h in heads}
        sites, sizes = head_sites(program, heads)
        optimizer = torch.optim.Adam([*skews, *head_skews.values()], lr=self.lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / self.steps)))
        self.losses = []
        with torch.enable_grad(), StepProgress(self.steps, "learning a rotation", enabled=self.progress) as bar:
            for step in range(self.steps):
                rows = torch.arange(step * self.batch_size, (step + 1) * self.batch_size) % len(self.windows)
                ids = self.windows[rows].to(program.device)
                with torch.no_grad():
                    target = F.log_softmax(program(ids).float(), dim=-1)
                weights = rotated_weights(state, axes, [cayley(b) for b in skews])
                if heads:
                    full = head_matrices(heads, {k: cayley(b) for k, b in head_skews.items()}, sizes)
                    for name, axis, key in sites:
                        value = weights.get(name, state[name])
                        weights[name] = _contract(value, axis, full[key].to(value.dtype))
                # straight through: the rounded value forward, the identity back (weights R leaves alone keep their
                # float value here: their rounding error does not depend on R)
                for name, fn in rounding.items():
                    if name in weights:
                        weights[name] = weights[name] + (fn(weights[name].detach()) - weights[name]).detach()
                logits = functional_call(program.gm, weights, program.whole_sequence_inputs(ids), tie_weights=True,
                                         strict=False)
                log_probs = F.log_softmax(logits.float(), dim=-1)
                loss = F.kl_div(log_probs.flatten(0, -2), target.flatten(0, -2), log_target=True, reduction="batchmean")
                if not torch.isfinite(loss.detach()):
                    raise FloatingPointError(f"learned rotation: the loss is {float(loss)} at step {step}; lower lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                self.losses.append(round(float(loss.detach()), 5))
                bar.advance(f"KL {self.losses[-1]:.4f}")
        return ([cayley(b.detach().to(torch.float64)).cpu() for b in skews],
                {k: cayley(b.detach().to(torch.float64)).cpu() for k, b in head_skews.items()})


def head_sites(program: Program,
               heads: list[ValueHead]) -> tuple[list[tuple[str, int, tuple[str, str]]], dict[tuple[str, str], int]]:
    """Where the value heads' rotations act: (parameter as `named_parameters` lists it, axis, `head_matrices` key) for
    every value weight and bias and every output weight, and the widths `head_matrices` needs (`head_widths`)."""
    aliases = _canonical_names(program)
    uses = program.analysis(group_analysis).linears
    sites = []
    for weight in dict.fromkeys(h.value for h in heads):
        use = uses[weight]
        sites.append((aliases[weight], use.out_axis, (weight, "value")))
        if use.bias is not None:
            sites.append((aliases[str(use.bias.target)], -1, (weight, "value")))
    for weight in dict.fromkeys(h.output for h in heads):
        sites.append((aliases[weight], uses[weight].in_axis, (weight, "output")))
    return sites, head_widths(program, heads)


class FixedRotations(Pass):
    """What a learned rotation applied, fixed: the stream's and the heads' matrices, in order."""

    name = "learn_rotation"
    exact = True

    def __init__(self, passes: Sequence[Pass]):
        self.passes = list(passes)

    def call(self, program: Program) -> PassResult:
        modified = False
        for p in self.passes:
            modified |= p(program).modified
        return PassResult(modified)


def _canonical_names(program: Program) -> dict[str, str]:
    """Every name a parameter is read under -> the one `named_parameters` lists it by (a tied table has two)."""
    first = {id(t): name for name, t in _state(program).items()}
    every = dict(program.gm.named_parameters(remove_duplicate=False))
    every.update(dict(program.gm.named_buffers(remove_duplicate=False)))
    return {name: first[id(t)] for name, t in every.items() if id(t) in first}

