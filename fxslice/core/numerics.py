"""How far two outputs are apart, and how far an exact pass may move them, by dtype."""

from __future__ import annotations

import torch

__all__ = ["TOLERANCE", "relative_error"]

#: relative tolerance of the numeric check of an exact pass, by the dtype the program computes in
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64; infinite when the shapes differ."""
    if actual.shape != expected.shape:
        return float("inf")
    a, b = actual.detach().to(torch.float64), expected.detach().to(torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
