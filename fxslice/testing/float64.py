"""An eager float64 reference without float32 islands.

Hugging Face code casts to float32 on purpose (norms, rotary tables, `softmax(..., dtype=torch.float32)` in eager
attention), so `model.double()` still rounds to float32 there, and comparing the float64 program with it measures
that rounding (1e-7), not the program. `Program.to(torch.float64)` lifts those casts in the graph; `lifted_float32()`
lifts them in eager code, by giving every torch call that names float32 float64 instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["lifted_float32"]

_TO_FLOAT = {torch.Tensor.float}


def _lift(value: Any) -> Any:
    return torch.float64 if value is torch.float32 else value


class lifted_float32(TorchFunctionMode):  # noqa: N801 - used as a context manager, like torch's own modes
    """`with lifted_float32(): model(ids)`: float32 requested anywhere inside computes in float64."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = {k: _lift(v) for k, v in (kwargs or {}).items()}
        if func in _TO_FLOAT:
            return args[0].double(**kwargs)
        return func(*(_lift(a) for a in args), **kwargs)
