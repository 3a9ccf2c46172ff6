"""LearnRotation: the rotation read off RotateStream on every family, learned against the rounding, applied exactly;
the Quantize stage's option, its refusals and its replay."""

import pytest
import torch
import torch.nn.functional as F

from fxslice import InvalidOption, PassManager, capture, replay
from fxslice.analysis.stream import stream_analysis
from fxslice.core.graph import set_tensor, tensor_of
from fxslice.passes import CleanupIR, FuseNorms, ProjectNormWriters, RotateStream
from fxslice.passes.quantize.learned_rotation import LearnRotation, rotated_weights, rotation_axes, rotation_groups
from fxslice.passes.quantize.quantize import QuantizeWeights
from fxslice.passes.quantize.stages import Quantize
from fxslice.passes.rewrite.stages import Cleanup
from fxslice.passes.slicegpt.rotations import random_orthogonal, randomized_hadamard
from fxslice.passes.slicegpt.stages import Rotate, SliceGPT
from fxslice.recipes import Recipe
from fxslice.testing import arithmetic_sequences, trained_tiny_causal_lm

FAMILIES = ["llama", "llama-tied", "gpt2", "gemma2", "phi", "qwen3", "mixtral", "opt-project", "bloom", "olmo2"]
HADAMARD = lambda: [CleanupIR(), ProjectNormWriters(), FuseNorms(), RotateStream(randomized_hadamard(0))]  # noqa: E731


def _rounding(bits: int = 3, group_size: int = 16) -> QuantizeWeights:
    return QuantizeWeights(bits, group_size=group_size, embeddings=None, head=None)


def _kl(program, reference: torch.Tensor, ids: torch.Tensor) -> float:
    log_probs = program(ids).double().log_softmax(-1)
    return float(F.kl_div(log_probs.flatten(0, -2), reference.flatten(0, -2), log_target=True, reduction="batchmean"))


@pytest.mark.parametrize("name", FAMILIES)
def test_axes_read_off_rotate_stream_reproduce_it(tiny, name):
    """The differentiable weights the rotation is learned through equal what RotateStream writes, for a random R."""
    _, program = tiny(name)
    PassManager(HADAMARD()).run(program)
    stream = program.analysis(stream_analysis)
    groups = rotation_groups(stream)
    assert len(groups) == 1  # an unsliced stream: every residual edge plain, one rotation for all
    axes = rotation_axes(program, groups)
    assert axes, "the rotation changes no parameter"
    r = random_orthogonal(11)(stream.segments[0], stream.width)
    expected = program.clone()
    RotateStream([r] * len(stream.segments))(expected)
    state = {**dict(expected.gm.named_parameters()), **dict(expected.gm.named_buffers())}
    before = {**dict(program.gm.named_parameters()), **dict(program.gm.named_buffers())}
    for param, value in rotated_weights({k: v.detach() for k, v in before.items()}, axes, [r.float()]).items():
        torch.testing.assert_close(value, state[param].detach(), rtol=1e-4, atol=1e-5, msg=param)
    untouched = set(before) - set(axes)
    for param in untouched:
        assert torch.equal(before[param], state[param]), param


@pytest.mark.parametrize("name", FAMILIES)
def test_learned_rotation_is_exact_and_moves(tiny, name):
    _, program = tiny(name)
    ids = program.probe_input()
    before = program(ids)
    learn = LearnRotation(_rounding().rounding, arithmetic_sequences(4, length=16), steps=3, lr=0.05)
    result = PassManager([*HADAMARD(), learn]).run(program)
    record = result.records[-1]
    assert record.name == "learn_rotation" and record.modified
    assert record.float64_error < 1e-10  # the manager's float64 proof of the replayed (fixed) rotation
    torch.testing.assert_close(program(ids), before, rtol=1e-3, atol=1e-4)
    matrix = learn.replay().matrices or learn.rotate.matrices
    eye = torch.eye(len(matrix[0]), dtype=torch.float64)
    assert float((matrix[0] - eye).abs().max()) > 1e-3  # it learned something
    assert float((matrix[0].T @ matrix[0] - eye).abs().max()) < 1e-12


def test_learning_lowers_the_rounded_models_divergence():
    """On the windows it learned from, the 3-bit model after the learned rotation is closer to float than after the
    Hadamard alone (a trained tiny model: a random one's divergence is noise). Whether that carries to held-out text
    is a question of enough data, measured on SmolLM2 (benchmarks/README.md)."""
    program = capture(trained_tiny_causal_lm("llama"))
    PassManager(HADAMARD()).run(program)
    ids = arithmetic_sequences(8, length=32, seed=3)
    reference = program(ids).double().log_softmax(-1)
    hadamard = program.clone()
    PassManager([_rounding()]).run(hadamard)
    learn = LearnRotation(_rounding().rounding, ids, steps=40, lr=0.01, batch_size=4)
    PassManager([learn, _rounding()]).run(program)
    assert _kl(program, reference, ids) < 0.75 * _kl(hadamard, reference, ids)


def test_a_sliced_stream_learns_one_rotation_per_segment(tiny):
    """Segments joined by shortcut matrices need not share a rotation; the shortcuts take both sides exactly."""
    _, program = tiny("llama")
    Recipe((Cleanup(), SliceGPT(sparsity=0.25))).run(program, calibration=arithmetic_sequences(16, seed=1000))
    ids = program.probe_input()
    before = program(ids)
    stream = program.analysis(stream_analysis)
    groups = rotation_groups(stream)
    assert len(groups) == len(stream.segments) > 1
    learn = LearnRotation(_rounding().rounding, arithmetic_sequences(4, length=16), steps=2, lr=0.05)
    result = PassManager([RotateStream(randomized_hadamard(0)), learn]).run(program)
    assert result.records[-1].float64_error < 1e-10
    assert len(learn.rotate.matrices) == len(stream.segments)
    torch.testing.assert_close(program(ids), before, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", ["llama", "qwen2", "phi3", "gpt2", "falcon"])
def test_head_rotations_learned_through_their_sites_reproduce_rotate_heads(tiny, name):
    """The value and output weights the head rotations are learned through equal what RotateHeads writes, for random
    head rotations; the learned pass with heads is exact and moves them."""
    from fxslice.analysis.groups import group_analysis
    from fxslice.analysis.weights import contract
    from fxslice.passes.quantize.learned_rotation import head_sites
    from fxslice.passes.slicegpt.rotate_heads import RotateHeads, head_key, head_matrices

    _, program = tiny(name)
    PassManager(HADAMARD()).run(program)
    groups = program.analysis(group_analysis)
    heads = groups.value_heads
    assert heads
    for head in heads:  # a value bias (qwen2's starts at zero, which any rotation leaves alone)
        bias = groups.linears[head.value].bias
        if bias is not None:
            set_tensor(program.gm, str(bias.target), torch.randn(tensor_of(program.gm, bias).shape))
    program.mark_changed()
    segment = program.analysis(stream_analysis).segments[0]
    rotations = {head_key(h): random_orthogonal(i)(segment, len(h.rows)) for i, h in enumerate(heads)}
    expected = program.clone()
    RotateHeads(rotations)(expected)
    sites, sizes = head_sites(program, heads)
    full = head_matrices(heads, rotations, sizes)
    state = {**dict(program.gm.named_parameters()), **dict(program.gm.named_buffers())}
    after = {**dict(expected.gm.named_parameters()), **dict(expected.gm.named_buffers())}
    for param, axis, key in sites:
        value = contract(state[param].detach().double(), axis, full[key])
        torch.testing.assert_close(value.float(), after[param].detach(), rtol=1e-4, atol=1e-5, msg=param)
    changed = {p for p, v in state.items() if not torch.equal(v, after[p])}
    assert changed == {param for param, _, _ in sites}  # a value bias included

    ids = program.probe_input()
    before = program(ids)
    learn = LearnRotation(_rounding().rounding, arithmetic_sequences(4, length=16), steps=3, lr=0.05, heads=True)
    result = PassManager([learn]).run(program)
    assert result.records[-1].float64_error < 1e-10 and result.records[-1].info["heads"] == len(heads)
    torch.testing.assert_close(program(ids), before, rtol=1e-3, atol=1e-4)
    eye = torch.eye(len(heads[0].rows), dtype=torch.float64)
    assert max(float((r - eye).abs().max()) for r in learn.rotate_heads.matrices.values()) > 1e-3


@pytest.mark.parametrize("rotate_heads", [False, True])
def test_quantize_stage_learns_and_replays_onto_another_capture(tiny, rotate_heads):
    _, program = tiny("llama-tied")
    _, other = tiny("llama-tied")
    stage = Quantize(bits=3, group_size=16, method="rtn", rotation="learned", rotation_steps=3, rotation_lr=0.05,
                     rotate_heads=rotate_heads)
    result = Recipe((Cleanup(), stage)).run(program, calibration=arithmetic_sequences(4, length=16))
    report = result.stages[-1][1].report
    assert report["rotation"]["steps"] == 3 and len(report["rotation"]["kl_first_last_10"]) == 2
    assert any("rotation" in line for line in stage.summary(result.stages[-1][1]))
    passes = [p for _, r in result.stages for p in r.passes]
    replay(passes, other, program)  # raises naming a weight that differs
    ids = program.probe_input()
    torch.testing.assert_close(other(ids), program(ids))
    bare = tiny("llama-tied")[1].skeleton()  # shapes only, as `compress` keeps its KV-cache capture
    replay(passes, bare, program)
    torch.testing.assert_close(bare(ids), program(ids))
    assert Quantize.from_dict(stage.to_dict()) == stage


@pytest.mark.parametrize("options, message", [
    (dict(rotation="hadamard"), "rotation must be one of"),
    (dict(rotation="learned", rotation_steps=0), "rotation_steps must be a positive integer"),
    (dict(rotation="learned", rotation_lr=0.0), "rotation_lr must be positive"),
    (dict(rotate_heads=True), "needs rotation='learned'"),
])
def test_quantize_refuses_bad_rotation_options(options, message):
    with pytest.raises(InvalidOption, match=message):
        Quantize(**options)


def test_a_learned_rotation_is_refused_after_another_rotation():
    with pytest.raises(InvalidOption, match="rotated"):
        Recipe((Cleanup(), Rotate(rotation="hadamard"), Quantize(rotation="learned"))).validate()


def test_learn_rotation_refuses_bad_windows_and_steps():
    with pytest.raises(InvalidOption, match="non-empty"):
        LearnRotation(_rounding().rounding, torch.zeros(0, 4, dtype=torch.long))
    with pytest.raises(InvalidOption, match="positive"):
        LearnRotation(_rounding().rounding, torch.ones(2, 4, dtype=torch.long), steps=0)


@pytest.mark.parametrize("heads", [[], ["--rotate-heads"]])
def test_cli_quantize_with_a_learned_rotation_saves_a_model_that_reloads_and_generates(tmp_path, tiny_model_dir, heads):
    """Through the CLI: the learned matrices (the value heads' too) are replayed onto the KV-cache capture that is
    saved."""
    import json

    from typer.testing import CliRunner

    from fxslice import load
    from fxslice.cli import app

    out = tmp_path / "learned"
    runner = CliRunner()
    made = runner.invoke(app, ["quantize", str(tiny_model_dir("llama")), "--bits", "4", "--group-size", "16",
                               "--method", "rtn", "--rotation", "learned", "--rotation-steps", "2", "--calib-windows",
                               "2", "--calib-length", "32", "--eval", "none", "--out", str(out), *heads])
    assert made.exit_code == 0, made.output
    assert "rotation     learned in 2 steps" in made.output
    record = json.loads((out / "fxslice.json").read_text())
    assert [s["stage"] for s in record["recipe"]["stages"]] == ["cleanup", "quantize"]
    assert record["recipe"]["stages"][1]["rotation"] == "learned"
    assert record["recipe"]["stages"][1]["rotate_heads"] == bool(heads)
    names = [p["name"] for p in record["stages"][1]["passes"]]
    assert names[-2:] == ["learn_rotation", "quantize_weights"] and ("rotate_heads" in names) == bool(heads)
    assert load(out).cache is not None
    generated = runner.invoke(app, ["generate", str(out), "abc", "--max-new-tokens", "4", "--device", "cpu"])
    assert generated.exit_code == 0, generated.output


@pytest.mark.parametrize("args, message", [
    (["--rotation", "spin"], "--rotation must be none, hadamard or learned"),
    (["--rotation-steps", "5"], "add --rotation learned"),
    (["--rotate-heads"], "add --rotation hadamard or --rotation learned"),
])
def test_cli_refuses_rotation_options_that_do_not_fit(args, message, tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from fxslice.cli import app

    result = CliRunner().invoke(app, ["quantize", str(tiny_model_dir("llama")), *args, "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and message in result.output + str(result.exception)
    assert not (tmp_path / "x").exists()


def test_a_kv_cache_capture_learns_the_rotation_the_plain_capture_learns():
    """A saved model is a KV-cache graph: learning on it (each window from an empty cache) gives the plain capture's
    matrices, heads included."""
    from fxslice.models.kvcache import capture_cached
    from fxslice.testing import tiny_causal_lm

    model = tiny_causal_lm("llama")
    learned = []
    for program in (capture(model), capture_cached(model)):
        learn = LearnRotation(_rounding().rounding, arithmetic_sequences(4, length=16), steps=3, lr=0.05, heads=True)
        result = PassManager([*HADAMARD(), learn]).run(program)
        assert result.records[-1].float64_error < 1e-10
        learned.append(learn)
    plain, cached = learned
    torch.testing.assert_close(cached.rotate.matrices[0], plain.rotate.matrices[0], rtol=1e-5, atol=1e-6)
    assert plain.rotate_heads.matrices.keys() == cached.rotate_heads.matrices.keys()
    for key, r in plain.rotate_heads.matrices.items():
        torch.testing.assert_close(cached.rotate_heads.matrices[key], r, rtol=1e-5, atol=1e-6)
