"""Count the matmul FLOPs of a program from its graph, to read measured speed-ups against the ideal one.

Counted: every linear-like op (`linear`, `addmm`, `mm`, `matmul`, `bmm`) as 2·m·k·n, and attention
(`scaled_dot_product_attention`) as the two products QKᵀ and PV over the whole key length (what a dense
kernel computes; causal kernels may skip up to half). Element-wise work (norms, activations, rotary) is
not counted: it is a few percent of a transformer's FLOPs and does not change with slicing's widths much.
Shapes come from running the graph on fake tensors, so counting is instant at any batch and length.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from math import prod

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode

from fxslice.core.graph import aten
from fxslice.core.program import Program

__all__ = ["FlopCount", "count_flops"]

_MATMULS = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default, aten.bmm.default}
_ATTENTION = {aten.scaled_dot_product_attention.default}


@dataclass(frozen=True)
class FlopCount:
    total: int
    by_op: dict[str, int]

    def ratio(self, other: FlopCount) -> float:
        return self.total / other.total


class _Counter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.counts: Counter[str] = Counter()

    def call_function(self, target, args, kwargs):  # noqa: ANN001 - fx.Interpreter's signature
        out = super().call_function(target, args, kwargs)
        if target in _MATMULS:
            a = args[1] if target == aten.addmm.default else args[0]
            self.counts[target.__name__] += 2 * out.numel() * a.shape[-1]
        elif target in _ATTENTION:
            q, k, v = args[:3]
            batch_heads = prod(q.shape[:-2])
            self.counts[target.__name__] += 2 * batch_heads * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])
        return out


def count_flops(program: Program, batch: int = 1, length: int = 512) -> FlopCount:
    """Matmul and attention FLOPs of one forward pass over `batch` x `length` tokens (from an empty cache)."""
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        ids = torch.zeros(batch, length, dtype=torch.long)
        inputs: list[torch.Tensor] = [ids]
        if program.cache is not None:
            inputs += [torch.tensor(0), *program.cache.allocate(batch, length, program.dtype)]
        counter = _Counter(program.gm)
        counter.run(*(mode.from_tensor(t) for t in inputs))
    counts = {k: int(v) for k, v in counter.counts.items()}
    return FlopCount(sum(counts.values()), counts)
