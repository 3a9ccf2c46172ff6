"""Closed-form refit of the stream's readers: the identity where nothing was removed, a lower layer-wise
reconstruction error otherwise, and the same weights again when replayed onto another capture."""

import functools

import pytest
import torch

from fxslice import InvalidOption, PassManager, capture, replay
from fxslice.analysis.stream import stream_analysis
from fxslice.core.graph import tensor_of
from fxslice.passes import CleanupIR, FuseNorms, ProjectNormWriters, RotateStream, slicegpt_recipe
from fxslice.passes.recovery import RefitReaders
from fxslice.passes.slicegpt.rotations import random_orthogonal
from fxslice.passes.slicegpt.slice_stream import SliceStream, constant_widths
from fxslice.passes.slicegpt.stages import SliceGPT
from fxslice.testing import arithmetic_sequences, trained_tiny_causal_lm

CALIBRATION = torch.randint(0, 128, (12, 24), generator=torch.Generator().manual_seed(0))


def fused64(program):
    PassManager([CleanupIR(), ProjectNormWriters(), FuseNorms()]).run(program)
    return program.to(torch.float64)


def reader_weights(program):
    return {r.linear.node.name: tensor_of(program.gm, r.linear.weight).clone()
            for r in program.analysis(stream_analysis).readers}


@pytest.mark.parametrize("name", ["llama", "gpt2", "llama-tied", "opt-project"])
def test_nothing_removed_means_nothing_changes(tiny, name):
    reference = fused64(tiny(name)[1])
    rotated = reference.clone()
    PassManager([RotateStream(random_orthogonal(3))]).run(rotated)
    before = reader_weights(rotated)
    refit = RefitReaders(reference, CALIBRATION, damping=0.01, batch_size=4)
    PassManager([refit]).run(rotated)
    assert refit.fits, "some reader was refitted"
    for name_, weight in reader_weights(rotated).items():
        torch.testing.assert_close(weight, before[name_], rtol=1e-9, atol=1e-9)
    assert max(f.error_before for f in refit.fits) < 1e-12  # the expanded quadratic form cancels to round-off


@pytest.mark.parametrize("name", ["llama", "gpt2", "opt-project"])
def test_after_slicing_every_reader_reconstructs_the_reference_better(tiny, name):
    reference = fused64(tiny(name)[1])
    sliced = reference.clone()
    PassManager([SliceStream(CALIBRATION, constant_widths(0.3), batch_size=4)]).run(sliced)
    refit = RefitReaders(reference, CALIBRATION, damping=0.01, batch_size=4)
    PassManager([refit]).run(sliced)
    assert len(refit.fits) == len(sliced.analysis(stream_analysis).readers) - len(refit.skipped)
    for fit in refit.fits:
        assert fit.error_after <= fit.error_before + 1e-12, fit
    assert sum(f.error_after for f in refit.fits) < 0.99 * sum(f.error_before for f in refit.fits)


@functools.cache
def _trained():
    return capture(trained_tiny_causal_lm("llama"))


def test_the_stage_brings_the_sliced_model_closer_to_the_dense_one_and_replays():
    dense = _trained()
    calibration, held = arithmetic_sequences(32, seed=5), arithmetic_sequences(8, seed=6)

    def loss(program):
        logits = program(held)[:, :-1].float()
        return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), held[:, 1:].reshape(-1)))

    plain, refitted = dense.clone(), dense.clone()
    slicegpt_recipe(sparsity=0.4, batch_size=8).run(plain, calibration=calibration)
    recipe = slicegpt_recipe(sparsity=0.4, batch_size=8, refit=True)
    result = recipe.run(refitted, calibration=calibration)
    report = result.stages[1][1].report["refit"]
    assert report["readers"] > 0 and report["reconstruction_error_after"] < report["reconstruction_error_before"]
    assert refitted.num_parameters() == plain.num_parameters()
    assert loss(refitted) < loss(plain)
    assert SliceGPT.from_dict(recipe.to_dict()["stages"][1]).refit
    again = dense.clone()
    passes = [p for _, r in result.stages for p in r.passes]
    replay(passes, again, refitted)  # raises unless every weight comes out bit-identical
    torch.testing.assert_close(again(held), refitted(held))


def test_bad_options_are_refused(tiny):
    program = tiny("llama")[1]
    with pytest.raises(InvalidOption, match="reference must be a Program"):
        RefitReaders(object(), CALIBRATION)
    with pytest.raises(InvalidOption, match="damping"):
        RefitReaders(program, CALIBRATION, damping=-1)
    with pytest.raises(InvalidOption, match="refit_damping"):
        SliceGPT(sparsity=0.2, refit=True, refit_damping="a lot")
