"""The setup the SmolLM2 benchmarks share: one capture with its tokenizer, calibration windows from WikiText-2
validation (seed 0) and the first evaluation windows of 2048 tokens of WikiText-2 test."""

from __future__ import annotations

import torch

from fxslice import Program, capture
from fxslice.data import load_text, token_windows
from fxslice.models.capture import load_model

__all__ = ["smollm2_and_windows"]


def smollm2_and_windows(calib_windows: int, calib_length: int, eval_windows: int, *,
                        dtype: torch.dtype = torch.float32) -> tuple[Program, torch.Tensor, torch.Tensor]:
    """(the dense capture in `dtype`, calibration windows [calib_windows, calib_length], test windows [eval_windows,
    2048]); eval_windows=0 takes the whole test split."""
    model, tokenizer = load_model("smollm2", dtype=dtype)
    dense = capture(model)
    dense.tokenizer = tokenizer
    calib = token_windows(tokenizer, load_text("wikitext2:validation"), calib_length, count=calib_windows, seed=0)
    test = token_windows(tokenizer, load_text("wikitext2:test"), 2048)[: eval_windows or None]
    return dense, calib, test
