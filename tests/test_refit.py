"""Closed-form refit of the linears at the stream: the identity where nothing was removed, a lower layer-wise
reconstruction error otherwise, and the same weights again when replayed onto another capture."""

import functools

import pytest
import torch

from fxslice import InvalidOption, PassManager, capture, replay
from fxslice.analysis.stream import stream_analysis
from fxslice.core.graph import tensor_of
from fxslice.passes import CleanupIR, FuseNorms, ProjectNormWriters, RotateStream, slicegpt_recipe
from fxslice.passes.recovery import RefitLinears
from fxslice.passes.slicegpt.rotations import random_orthogonal
from fxslice.passes.slicegpt.slice_stream import SliceStream, constant_widths
from fxslice.passes.slicegpt.stages import SliceGPT
from fxslice.testing import arithmetic_sequences, trained_tiny_causal_lm

CALIBRATION = torch.randint(0, 128, (12, 24), generator=torch.Generator().manual_seed(0))


def fused64(program):
    PassManager([CleanupIR(), ProjectNormWriters(), FuseNorms()]).run(program)
    return program.to(torch.float64)


def stream_weights(program):
    stream = program.analysis(stream_analysis)
    uses = [r.linear for r in stream.readers] + [w.linear for w in stream.writers if w.linear is not None]
    return {u.node.name: tensor_of(program.gm, u.weight).clone() for u in uses}


@pytest.mark.parametrize("name", ["llama", "gpt2", "llama-tied", "opt-project"])
def test_nothing_removed_means_nothing_changes(tiny, name):
    reference = fused64(tiny(name)[1])
    rotated = reference.clone()
    rotate = RotateStream(random_orthogonal(3))
    PassManager([rotate]).run(rotated)
    before = stream_weights(rotated)
    refit = RefitLinears(reference, CALIBRATION, bases=rotate.matrices, damping=0.01, batch_size=4)
    PassManager([refit]).run(rotated)
    writers = {w.linear.node.name for w in rotated.analysis(stream_analysis).writers if w.linear is not None}
    assert writers and writers <= {f.linear for f in refit.fits}, "every writer was refitted"
    for name_, weight in stream_weights(rotated).items():
        torch.testing.assert_close(weight, before[name_], rtol=1e-9, atol=1e-9)
    assert max(f.error_before for f in refit.fits) < 1e-12  # the expanded quadratic form cancels to round-off


@pytest.mark.parametrize("name", ["llama", "gpt2", "opt-project"])
@pytest.mark.parametrize("writers", [False, True])
def test_after_slicing_every_linear_reconstructs_the_reference_better(tiny, name, writers):
    reference = fused64(tiny(name)[1])
    sliced = reference.clone()
    slicer = SliceStream(CALIBRATION, constant_widths(0.3), batch_size=4)
    PassManager([slicer]).run(sliced)
    refit = RefitLinears(reference, CALIBRATION, readers=not writers, bases=slicer.bases if writers else None,
                         damping=0.01, batch_size=4)
    PassManager([refit]).run(sliced)
    stream = sliced.analysis(stream_analysis)
    expected = [w for w in stream.writers if w.linear is not None] if writers else stream.readers
    assert len(refit.fits) == len(expected) - len(refit.skipped) > 0
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
    recipe = slicegpt_recipe(sparsity=0.4, batch_size=8, refit="readers")
    result = recipe.run(refitted, calibration=calibration)
    report = result.stages[1][1].report["refit"]
    assert report["linears"] > 0 and report["reconstruction_error_after"] < report["reconstruction_error_before"]
    assert refitted.num_parameters() == plain.num_parameters()
    assert loss(refitted) < loss(plain)
    assert SliceGPT.from_dict(recipe.to_dict()["stages"][1]).refit == "readers"
    again = dense.clone()
    passes = [p for _, r in result.stages for p in r.passes]
    replay(passes, again, refitted)  # raises unless every weight comes out bit-identical
    torch.testing.assert_close(again(held), refitted(held))


def test_bad_options_are_refused(tiny):
    program = tiny("llama")[1]
    with pytest.raises(InvalidOption, match="reference must be a Program"):
        RefitLinears(object(), CALIBRATION)
    with pytest.raises(InvalidOption, match="damping"):
        RefitLinears(program, CALIBRATION, damping=-1)
    with pytest.raises(InvalidOption, match="nothing to refit"):
        RefitLinears(program, CALIBRATION, readers=False)
    with pytest.raises(InvalidOption, match="refit_damping"):
        SliceGPT(sparsity=0.2, refit="readers", refit_damping="a lot")
    with pytest.raises(InvalidOption, match="refit must be one of"):
        SliceGPT(sparsity=0.2, refit=True)
    with pytest.raises(InvalidOption, match="2 bases for the reference's"):
        fused = fused64(program)
        PassManager([RefitLinears(fused.clone(), CALIBRATION, bases=[torch.eye(64)] * 2)]).run(fused)
