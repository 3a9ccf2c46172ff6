"""Checks that refuse bad weights and bad tokens before any work is spent on them."""

from __future__ import annotations

from typing import Any

import torch

from fxslice.core.errors import BadInput
from fxslice.core.graph import tensor_of
from fxslice.core.program import Program

__all__ = ["check_finite", "check_tokens"]


def check_finite(program: Program) -> None:
    """Raise BadInput naming the first weight that holds NaN or Inf."""
    for node in program.graph.find_nodes(op="get_attr"):
        value = tensor_of(program.gm, node)
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            nan, inf = int(value.isnan().sum()), int(value.isinf().sum())
            raise BadInput(f"parameter '{node.target}' {tuple(value.shape)} holds {nan} NaN and {inf} Inf values; "
                           "fxslice will not calibrate or slice it.\n  what to do: check the checkpoint (or the dtype: "
                           "float16 overflows where bfloat16 does not)")


def check_tokens(program: Program, ids: torch.Tensor, tokenizer: Any = None) -> None:
    """Raise BadInput if the token ids (or the tokenizer) do not fit the model's vocabulary."""
    vocab = program.vocab_size
    if tokenizer is not None and len(tokenizer) > vocab:
        raise BadInput(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only {vocab}: "
                       "they do not belong together.\n  what to do: use the tokenizer saved with the model")
    if ids.numel() and (int(ids.max()) >= vocab or int(ids.min()) < 0):
        raise BadInput(f"token ids range over [{int(ids.min())}, {int(ids.max())}] but the model's vocabulary has "
                       f"{vocab} entries: the text was tokenized for another model")
