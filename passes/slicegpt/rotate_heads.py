"""Rotate each attention head's values: the value rows of one key/value head by R, the columns of the linear after
attention that read it (for every query head attending with it) by R too. Exact: attention averages value vectors
over tokens and never mixes the head dimension, so `softmax(·) (V R) = (softmax(·) V) R`, and the reading linear
absorbs Rᵀ. QuaRot and SpinQuant rotate this pair (their R2) so that no head channel stands out when the value and
output weights are rounded; here the pairs come from the graph (`fxslice.analysis.groups.ValueHead`), so any
architecture whose values reach attention by data movement alone takes it (fused QKV, multi-query, a KV cache).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from fxslice import InvalidOption, Pass, PassResult, Program
from fxslice.analysis.groups import ValueHead, group_analysis
from fxslice.analysis.weights import transform_input, transform_output
from fxslice.core.graph import tensor_of
from fxslice.passes.slicegpt.rotations import hadamard, orthogonality_error

__all__ = ["HeadKey", "RotateHeads", "head_hadamard", "head_key", "head_matrices", "head_widths"]

#: a value head as the pass knows it across captures of one model: (value weight, its rows in head order)
HeadKey = tuple[str, tuple[int, ...]]


def head_key(head: ValueHead) -> HeadKey:
    return head.value, head.rows


def head_hadamard(seed: int = 0) -> Callable[[int, int], torch.Tensor]:
    """A Hadamard matrix with random signs per head (the head width a power of two; otherwise a Haar-random one)."""

    def make(index: int, width: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed * 100_003 + 7919 + index)
        if width & (width - 1):
            q, r = torch.linalg.qr(torch.randn(width, width, generator=gen, dtype=torch.float64))
            return q * torch.sign(torch.diagonal(r))
        signs = torch.randint(0, 2, (width,), generator=gen).to(torch.float64) * 2 - 1
        return signs[:, None] * hadamard(width)

    return make


def head_matrices(heads: list[ValueHead], rotations: Mapping[HeadKey, torch.Tensor],
                  sizes: Mapping[tuple[str, str], int]) -> dict[tuple[str, str], torch.Tensor]:
    """(weight, "value" or "output") -> the full matrix that rotates every head of that weight: identity except each
    head's block (`sizes`: the width of the rotated axis, the value's outputs or the output's inputs, by the same
    keys). Differentiable in the rotations."""
    blocks: dict[tuple[str, str], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for head in heads:
        r = rotations[head_key(head)]
        blocks.setdefault((head.value, "value"), []).append((torch.tensor(head.rows), r))
        for cols in head.cols:
            blocks.setdefault((head.output, "output"), []).append((torch.tensor(cols), r))
    full = {}
    for (weight, side), parts in blocks.items():
        dtype, device = parts[0][1].dtype, parts[0][1].device
        m = torch.eye(sizes[(weight, side)], dtype=dtype, device=device)
        for index, r in parts:
            m = m.index_put((index[:, None].to(device), index[None, :].to(device)), r)
        full[(weight, side)] = m
    return full


def head_widths(program: Program, heads: list[ValueHead]) -> dict[tuple[str, str], int]:
    """The widths `head_matrices` needs: each value weight's outputs, each output weight's inputs."""
    uses = program.analysis(group_analysis).linears
    widths = {}
    for head in heads:
        value, output = uses[head.value], uses[head.output]
        widths[(head.value, "value")] = tensor_of(program.gm, value.weight).shape[value.out_axis]
        widths[(head.output, "output")] = tensor_of(program.gm, output.weight).shape[output.in_axis]
    return widths


class RotateHeads(Pass):
    """Rotate every value head the graph exposes (`group_analysis(program).value_heads`) by `rotations`: a callable
    (head index, head width) -> orthogonal matrix, or a mapping `head_key(head)` -> matrix (what `replay` fixes,
    so that another capture of the model gets the same ones). Exact."""

    name = "rotate_heads"
    exact = True

    def __init__(self, rotations: Callable[[int, int], torch.Tensor] | Mapping[HeadKey, torch.Tensor], *,
                 tol: float = 1e-8):
        if not callable(rotations) and not isinstance(rotations, Mapping):
            raise InvalidOption("rotate_heads: rotations must be a callable (head, width) -> R or a mapping of heads")
        self.rotations, self.tol = rotations, tol
        self.matrices: dict[HeadKey, torch.Tensor] = {}

    def replay(self) -> RotateHeads:
        return RotateHeads(dict(self.matrices), tol=self.tol) if self.matrices else self

    def _rotations(self, heads: list[ValueHead]) -> dict[HeadKey, torch.Tensor]:
        chosen = {}
        for i, head in enumerate(heads):
            key = head_key(head)
            if callable(self.rotations):
                r = self.rotations(i, len(head.rows))
            elif key in self.rotations:
                r = self.rotations[key]
            else:
                raise InvalidOption(f"rotate_heads: no rotation given for the value head {head.value} rows "
                                    f"{head.rows[0]}..{head.rows[-1]} (at {head.attention})")
            r = torch.as_tensor(r, dtype=torch.float64)
            if r.shape != (len(head.rows),) * 2 or orthogonality_error(r) > self.tol:
                raise InvalidOption(f"rotate_heads: the rotation for {head.value} rows {head.rows[0]}.. is not an "
                                    f"orthogonal {len(head.rows)}x{len(head.rows)} matrix (shape {tuple(r.shape)})")
            chosen[key] = r
        return chosen

    def call(self, program: Program) -> PassResult:
        groups = program.analysis(group_analysis)
        heads = groups.value_heads
        if not heads:
            return PassResult(False, {"heads": 0})
        self.matrices = self._rotations(heads)
        uses, gm = groups.linears, program.gm
        for (weight, side), m in head_matrices(heads, self.matrices, head_widths(program, heads)).items():
            if side == "value":
                transform_output(gm, uses[weight], m)
            else:
                transform_input(gm, uses[weight], m)
        return PassResult(True, {"heads": len(heads), "weights": len({h.value for h in heads} | {h.output for h in heads})})
