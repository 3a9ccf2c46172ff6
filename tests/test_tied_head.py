"""The tied head's low-rank correction after slicing: at full rank the tied model computes the untied one's
log-probabilities; below it, the logit error it leaves is the one it predicts; it replays and saves."""

import functools

import pytest
import torch

from fxslice import InvalidOption, PassManager, UnsupportedStructure, capture, load, replay, save
from fxslice.passes import CleanupIR, FuseNorms, ProjectNormWriters, slicegpt_recipe
from fxslice.passes.slicegpt import CorrectTiedHead, SliceStream
from fxslice.passes.slicegpt.slice_stream import constant_widths
from fxslice.passes.slicegpt.stages import SliceGPT
from fxslice.testing import arithmetic_sequences, trained_tiny_causal_lm

CALIBRATION = torch.randint(0, 128, (12, 24), generator=torch.Generator().manual_seed(0))
HELD = torch.randint(0, 128, (3, 24), generator=torch.Generator().manual_seed(1))


def fused64(program, *, keep_ties=True):
    program = program.to(torch.float64)  # before fusing: the untied head's E·diag(g) is then exact too
    PassManager([CleanupIR(), ProjectNormWriters(), FuseNorms(keep_ties=keep_ties)]).run(program)
    return program


def sliced_pair(tiny, sparsity=0.25):
    """The tied tiny Llama fused and sliced with the tie kept, its reference, and the slicer."""
    reference = fused64(tiny("llama-tied")[1])
    sliced = reference.clone()
    slicer = SliceStream(CALIBRATION, constant_widths(sparsity), batch_size=4)
    PassManager([slicer]).run(sliced)
    return reference, sliced, slicer


def centred(logits):
    return logits - logits.mean(dim=-1, keepdim=True)


def test_at_full_rank_the_tied_model_gives_the_untied_ones_probabilities(tiny):
    reference, tied, slicer = sliced_pair(tiny)
    untied = fused64(tiny("llama-tied")[1], keep_ties=False)
    PassManager([slicer.replay()]).run(untied)  # the same bases, the head sliced on its own
    before = torch.log_softmax(tied(HELD), -1)
    correct = CorrectTiedHead(reference, slicer.bases, CALIBRATION, rank=64, batch_size=4)
    PassManager([correct]).run(tied)
    assert correct.report.rank == 16 and correct.report.centred  # 64 - 48: what the embedding segment lost
    expected = torch.log_softmax(untied(HELD), -1)
    assert (before - expected).abs().max() > 1e-3  # slicing the table did cost something
    torch.testing.assert_close(torch.log_softmax(tied(HELD), -1), expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("rank", [1, 4, 12])
def test_below_full_rank_the_logit_error_left_is_the_predicted_one(tiny, rank):
    reference, tied, slicer = sliced_pair(tiny)
    untied = fused64(tiny("llama-tied")[1], keep_ties=False)
    PassManager([slicer.replay()]).run(untied)
    target = untied(CALIBRATION)

    def error(program):  # the Σ-weighted norm on the calibration text, per token, shifts removed
        return float((centred(target - program(CALIBRATION)) ** 2).sum(-1).mean())

    plain = error(tied)
    size = tied.num_parameters()
    correct = CorrectTiedHead(reference, slicer.bases, CALIBRATION, rank=rank, batch_size=4)
    PassManager([correct]).run(tied)
    assert 0 < correct.report.restored < 1
    assert error(tied) == pytest.approx((1 - correct.report.restored) * plain, rel=1e-7)
    width, vocab = 48, untied(HELD).shape[-1]
    assert tied.num_parameters() - size == correct.report.parameters == rank * (width + vocab)


def test_an_unsliced_embedding_segment_leaves_nothing_to_correct(tiny):
    reference = fused64(tiny("llama-tied")[1])
    sliced = reference.clone()
    slicer = SliceStream(CALIBRATION, lambda seg, full: full if seg.index == 0 else full - 16, batch_size=4)
    PassManager([slicer]).run(sliced)
    size, before = sliced.num_parameters(), sliced(HELD)
    correct = CorrectTiedHead(reference, slicer.bases, CALIBRATION, rank=8, batch_size=4)
    PassManager([correct]).run(sliced)
    assert correct.report.rank == 0 and sliced.num_parameters() == size
    torch.testing.assert_close(sliced(HELD), before, rtol=0, atol=0)


@functools.cache
def _trained_tied():
    return capture(trained_tiny_causal_lm("llama-tied"))


def test_the_stage_reports_replays_and_saves(tmp_path):
    dense = _trained_tied()
    calibration, held = arithmetic_sequences(32, seed=5), arithmetic_sequences(8, seed=6)
    program = dense.clone()
    recipe = slicegpt_recipe(sparsity=0.4, batch_size=8, head_rank=8)
    result = recipe.run(program, calibration=calibration)
    report = result.stages[1][1].report["head_correction"]
    assert report["rank"] == 8 and 0 < report["restored"] <= 1
    assert SliceGPT.from_dict(recipe.to_dict()["stages"][1]).head_rank == 8
    again = dense.clone()
    replay([p for _, r in result.stages for p in r.passes], again, program)  # bit-identical weights or it raises
    torch.testing.assert_close(again(held), program(held))
    loaded = load(save(program, tmp_path / "out"))
    torch.testing.assert_close(loaded(held), program(held))
    assert loaded.num_parameters() == program.num_parameters()


def test_bad_uses_are_refused(tiny):
    with pytest.raises(InvalidOption, match="head_rank must be an integer"):
        SliceGPT(sparsity=0.2, head_rank=-1)
    with pytest.raises(InvalidOption, match="keep_ties=False"):
        SliceGPT(sparsity=0.2, head_rank=4, keep_ties=False)
    with pytest.raises(InvalidOption, match="rank must be a positive integer"):
        CorrectTiedHead(tiny("llama")[1], [], CALIBRATION, rank=0)
    reference = fused64(tiny("llama")[1])  # untied: no projection in front of the head
    sliced = reference.clone()
    slicer = SliceStream(CALIBRATION, constant_widths(0.25), batch_size=4)
    PassManager([slicer]).run(sliced)
    with pytest.raises(UnsupportedStructure, match="0 tied head projections"):
        PassManager([CorrectTiedHead(reference, slicer.bases, CALIBRATION, rank=4)]).run(sliced)


def test_the_cli_slices_with_a_corrected_head_and_saves_it_with_its_cache(tmp_path, tiny_model_dir):
    import json
    import subprocess
    import sys

    out = tmp_path / "corrected"
    cmd = [sys.executable, "-m", "fxslice.cli", "slice", str(tiny_model_dir("llama-tied")), "--sparsity", "0.25",
           "--head-rank", "4", "--calib-windows", "4", "--calib-length", "32", "--eval-windows", "2",
           "--eval-length", "32", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "fxslice.json").read_text())
    back = load(out)
    assert back.cache is not None  # the correction was replayed onto the KV-cache capture
    assert back.num_parameters() == record["parameters"]
    assert any("tied_head_correction" in name for name, _ in back.gm.named_parameters())
