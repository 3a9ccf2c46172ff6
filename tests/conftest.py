from __future__ import annotations

import functools

import pytest
import torch

from fxslice import Program, capture
from fxslice.testing import tiny_causal_lm


@functools.cache
def _captured(name: str) -> tuple[torch.nn.Module, Program]:
    model = tiny_causal_lm(name)
    return model, capture(model)


@pytest.fixture
def tiny():
    """`tiny(name)` -> (eager model, a fresh copy of its captured Program); captures are cached per session."""

    def make(name: str) -> tuple[torch.nn.Module, Program]:
        model, program = _captured(name)
        return model, program.clone()

    return make


@functools.cache
def _smollm2() -> tuple[torch.nn.Module, Program]:
    from fxslice.models.capture import load_model

    model, tokenizer = load_model("smollm2")
    program = capture(model)
    program.tokenizer = tokenizer
    return model, program


@pytest.fixture
def smollm2():
    return _smollm2()


@pytest.fixture
def smollm2_tokenizer(smollm2):
    return smollm2[1].tokenizer
