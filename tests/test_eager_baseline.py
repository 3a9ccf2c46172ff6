"""Differential test: fxslice, working from the graph alone, slices a Llama exactly as a hand-written
eager SliceGPT (benchmarks/eager_slicegpt.py, the official implementation's two-pass method) does."""

import importlib.util
from pathlib import Path

import pytest
import torch

from fxslice import PassManager, capture
from fxslice.passes import CleanupIR, FuseNorms, ProjectNormWriters
from fxslice.passes.slicegpt.slice_stream import SliceStream, constant_widths
from fxslice.testing import tiny_causal_lm

_SPEC = importlib.util.spec_from_file_location(
    "eager_slicegpt", Path(__file__).parents[1] / "benchmarks" / "eager_slicegpt.py")
eager = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(eager)


def _float64(name: str):
    """The tiny model in float64 twice: eager (for the baseline) and as a float64 program, whose norms do not
    round through float32 as HF's RMSNorm does whatever the model's dtype (a float64 reference)."""
    model = tiny_causal_lm(name)
    return model.double(), capture(model).to(torch.float64)


def _calibration(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (6, 24), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["llama", "llama-tied"])
def test_the_eager_baseline_is_exact_without_slicing(name):
    model, program = _float64(name)
    ids = _calibration(1)
    sliced = eager.slice_llama(model, _calibration(), model.config.hidden_size)
    torch.testing.assert_close(sliced(ids), program(ids), rtol=1e-8, atol=1e-8)  # HF computes rope in float32


@pytest.mark.parametrize("name", ["llama", "llama-tied"])
@pytest.mark.parametrize("sparsity", [0.25, 0.5])
def test_fxslice_slices_like_the_eager_two_pass_baseline(name, sparsity):
    model, program = _float64(name)
    calib, ids = _calibration(), _calibration(1)
    widths = constant_widths(sparsity)
    dense = program(ids)
    PassManager([CleanupIR(), ProjectNormWriters(), FuseNorms(keep_ties=False),
                 SliceStream(calib, widths, batch_size=2)]).run(program)
    baseline = eager.slice_llama(model, calib, widths(None, model.config.hidden_size), batch_size=4)
    expected = baseline(ids)
    assert not torch.allclose(expected, dense, atol=1e-3)  # slicing did change the function
    torch.testing.assert_close(program(ids), expected, rtol=1e-8, atol=1e-8)
    assert program.num_parameters() == eager.parameters(baseline)
