from __future__ import annotations

import functools
import os

import pytest
import torch

from fxslice import PassManager, Program, capture
from fxslice.testing import tiny_causal_lm

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Each xdist worker gets one core's worth of threads (the CLI subprocesses inherit it): two workers each running
    # a two-thread pool on two cores spend their time contending, not computing.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


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


@pytest.fixture
def tiny_programs():
    """`tiny_programs(*names)` -> [(name, fresh Program)]: the form `fxslice.testing.check_exact_pass` takes."""

    def make(*names: str) -> list[tuple[str, Program]]:
        return [(name, _captured(name)[1].clone()) for name in names]

    return make


class NoStreamNorms(torch.nn.Module):
    """Embedding, one residual MLP, a head: no norms, no attention, no mask: most passes have nothing to do."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.mlp, self.head = torch.nn.Embedding(20, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 20)

    def forward(self, input_ids, use_cache=False):
        h = self.embed(input_ids)
        return self.head(h + self.mlp(h))


@pytest.fixture
def plain_program():
    """A captured `NoStreamNorms`, cleaned up."""
    from fxslice.passes import CleanupIR

    program = capture(NoStreamNorms())
    PassManager([CleanupIR()]).run(program)
    return program


def _make_char_tokenizer():
    from fxslice.testing import char_tokenizer

    return char_tokenizer()


def _char_tokenizer(path) -> None:
    _make_char_tokenizer().save_pretrained(path)


@pytest.fixture
def char_tokenizer():
    return _make_char_tokenizer()


@pytest.fixture
def tiny_model_dir(tmp_path):
    """`tiny_model_dir(name)` -> a directory with the tiny model and a character tokenizer: what the CLI takes."""
    from fxslice.testing import tiny_causal_lm

    def make(name: str, *, trained: bool = False):
        from fxslice.testing import trained_tiny_causal_lm

        path = tmp_path / name
        (trained_tiny_causal_lm(name) if trained else tiny_causal_lm(name)).save_pretrained(path)
        _char_tokenizer(path)
        return path

    return make


@pytest.fixture
def exportable():
    """`exportable(kind)` -> a tiny Llama program, fresh: "sliced" (SliceGPT 25%), "stream" (SliceGPT 25% with one
    basis for the stream and the head untied: a stock shape), "stream-tied" (the same on a tied model, tie kept), "pruned" (the Surgeon, 20%),
    "quantized" (4-bit RTN), "cached" (a KV-cache capture) or "sliced+cache" (the slice replayed onto one):
    what the export formats are tested on."""
    from fxslice.core.pass_manager import replay
    from fxslice.models.kvcache import capture_cached
    from fxslice.passes import prune_recipe, slicegpt_recipe
    from fxslice.passes.quantize import QuantizeWeights

    calibration = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))

    def make(kind: str) -> Program:
        model = tiny_causal_lm("llama-tied" if kind == "stream-tied" else "llama")
        if kind == "cached":
            return capture_cached(model)
        program = capture(model)
        if kind in ("sliced", "sliced+cache"):
            result = slicegpt_recipe(sparsity=0.25, batch_size=4).run(program, calibration=calibration)
            if kind == "sliced+cache":
                cached = capture_cached(model)
                replay(result.passes, cached, program)
                return cached
        elif kind in ("stream", "stream-tied"):  # the tied one keeps its tie behind a projection
            slicegpt_recipe(sparsity=0.25, shared_basis="stream", keep_ties=kind == "stream-tied",
                            batch_size=4).run(program, calibration=calibration)
        elif kind == "pruned":
            prune_recipe(target=0.2, shots=1, batch_size=4).run(program, calibration=calibration)
        elif kind == "quantized":
            PassManager([QuantizeWeights(4, group_size=16)]).run(program)
        else:
            raise KeyError(kind)
        return program

    return make
