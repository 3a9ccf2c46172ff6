"""Sequential PCA slicing: exact without slicing, expected sizes, save/reload, refusals.

(SmolLM2's perplexity bounds: `test_smollm2_slicing.py`; the CLI end to end: `test_cli_end_to_end.py`.)"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fxslice import BadInput, CorruptModel, InvalidOption, PassManager, SaveFailed
from fxslice.core import relative_error
from fxslice.core.graph import tensor_of
from fxslice.data import load_text, token_windows
from fxslice.models.io import load, save
from fxslice.passes import CleanupIR, FuseNorms, ProjectNormWriters
from fxslice.passes.slicegpt.pipeline import slicegpt
from fxslice.passes.slicegpt.slice_stream import SliceStream, constant_widths

CALIBRATION = torch.randint(0, 128, (12, 24), generator=torch.Generator().manual_seed(0))


def fused(program):
    PassManager([CleanupIR(), ProjectNormWriters(), FuseNorms()]).run(program)
    return program


@pytest.mark.parametrize("name", ["llama", "llama-tied", "gpt2", "phi", "mixtral", "gemma3", "opt-project", "bloom"])
def test_pca_rotation_without_slicing_is_exact(tiny, name):
    _, program = tiny(name)
    program = program.to(torch.float64)
    ids = program.probe_input()
    before = program(ids)
    fused(program)
    slicer = SliceStream(CALIBRATION, constant_widths(0.0, multiple=1), batch_size=5)
    PassManager([slicer]).run(program)
    err = relative_error(program(ids), before)
    print(f"{name}: PCA-rotated, unsliced: max relative error {err:.2e}")
    assert err < 1e-9
    assert all(r.kept == r.width == 64 for r in slicer.reports)
    assert all(abs(r.variance_kept - 1.0) < 1e-12 for r in slicer.reports)


def expected_llama_parameters(d, *, vocab=128, hidden=64, inter=128, heads=4, kv=2, layers=2, tied=False, keep_tie=True):
    """Independent count for a sliced Llama: every segment width d, shortcuts d x d, no norm weights."""
    head_dim = hidden // heads
    per_layer = (heads * head_dim + 2 * kv * head_dim) * d + d * heads * head_dim + 2 * inter * d + d * inter
    shortcuts = 2 * layers * d * d
    head = (d * d if keep_tie else vocab * d) if tied else vocab * d
    return vocab * d + layers * per_layer + shortcuts + head


@pytest.mark.parametrize("name,tied", [("llama", False), ("llama-tied", True)])
@pytest.mark.parametrize("sparsity,width", [(0.25, 48), (0.5, 32)])
def test_slicing_removes_the_expected_parameters(tiny, name, tied, sparsity, width):
    _, program = tiny(name)
    result = slicegpt(program, CALIBRATION, constant_widths(sparsity), batch_size=6)
    assert [r.kept for r in result.segments] == [width] * 5
    assert result.sliced_parameters == program.num_parameters() == expected_llama_parameters(width, tied=tied)
    assert program(program.probe_input()).shape == (2, 12, 128)


def test_untying_costs_a_table(tiny):
    _, program = tiny("llama-tied")
    PassManager([CleanupIR(), ProjectNormWriters(), FuseNorms(keep_ties=False)]).run(program)
    PassManager([SliceStream(CALIBRATION, constant_widths(0.25), batch_size=6)]).run(program)
    assert program.num_parameters() == expected_llama_parameters(48, tied=True, keep_tie=False)


def test_per_segment_widths(tiny):
    _, program = tiny("gpt2")
    fused(program)
    PassManager([SliceStream(CALIBRATION, [56, 48, 40, 32, 64], batch_size=4)]).run(program)
    lookups = [n for n in program.graph.nodes if n.target == torch.ops.aten.embedding.default]
    assert [tuple(tensor_of(program.gm, n.args[0]).shape) for n in lookups] == [(128, 56), (256, 56)]
    assert program(program.probe_input()).shape == (2, 12, 128)


@pytest.mark.parametrize("name", ["llama-tied", "gpt2", "mixtral"])
def test_saved_model_reloads_with_identical_logits(tiny, tmp_path, name):
    _, program = tiny(name)
    slicegpt(program, CALIBRATION, constant_widths(0.25), batch_size=6)
    save(program, tmp_path / "m", {"note": "test"})
    loaded = load(tmp_path / "m")
    ids = torch.randint(0, 128, (3, 17))
    assert torch.equal(loaded(ids), program(ids))
    assert loaded.num_parameters() == program.num_parameters()
    assert json.loads((tmp_path / "m" / "fxslice.json").read_text())["note"] == "test"


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.2", True])
def test_bad_sparsity_is_refused(bad):
    with pytest.raises(InvalidOption, match="sparsity"):
        constant_widths(bad)  # 0 is allowed here: PCA rotation without slicing


@pytest.mark.parametrize("bad", ["0", "1", "-0.5", "abc"])
def test_cli_refuses_bad_sparsity_before_doing_anything(tmp_path, bad):
    out = tmp_path / "never"
    result = subprocess.run([sys.executable, "-m", "fxslice.cli", "slice", "--sparsity", bad, "--out", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "sparsity" in result.stderr.lower() and "Traceback" not in result.stderr
    assert not out.exists()


def test_bad_calibration_inputs(tmp_path, smollm2_tokenizer):
    short = tmp_path / "short.txt"
    short.write_text("just a few words", encoding="utf-8")
    with pytest.raises(BadInput, match="fewer than one window"):
        token_windows(smollm2_tokenizer, load_text(short), 512)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    with pytest.raises(BadInput, match="empty"):
        load_text(empty)
    binary = tmp_path / "latin1.txt"
    binary.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    with pytest.raises(BadInput, match="not UTF-8"):
        load_text(binary)
    with pytest.raises(InvalidOption, match="exceeds the model's context"):
        token_windows(smollm2_tokenizer, "text", 4096, max_length=2048)


def test_save_refuses_an_existing_directory_and_leaves_nothing_on_failure(tiny, tmp_path, monkeypatch):
    _, program = tiny("llama")
    (tmp_path / "exists").mkdir()
    with pytest.raises(InvalidOption, match="already exists"):
        save(program, tmp_path / "exists")

    def broken_save(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(Path, "write_bytes", broken_save)
    with pytest.raises(SaveFailed, match="simulated"):
        save(program, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


def test_corrupt_saved_models_are_refused(tiny, tmp_path):
    _, program = tiny("llama")
    save(program, tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptModel, match="checksum"):
        load(tmp_path / "m")
    weights.write_bytes(data)
    record = json.loads((tmp_path / "m" / "fxslice.json").read_text())
    record["weights"]["lm_head.weight"] = [128, 32]
    (tmp_path / "m" / "fxslice.json").write_text(json.dumps(record))
    with pytest.raises(CorruptModel, match="disagree"):
        load(tmp_path / "m")
    (tmp_path / "m" / "graph.json").unlink()
    with pytest.raises(CorruptModel, match="missing graph.json"):
        load(tmp_path / "m")


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt2", "phi"])
def test_shared_bases_leave_fewer_shortcuts_and_stay_exact_unsliced(tiny, name):
    from fxslice.analysis.roles import SHORTCUT
    from fxslice.core.graph import role_of
    from fxslice.passes.slicegpt.slice_stream import per_block, per_stream

    def shortcuts(program):
        return sum(role_of(n) == SHORTCUT for n in program.graph.nodes)

    _, program = tiny(name)
    program = fused(program.to(torch.float64))
    ids = program.probe_input()
    before = program(ids)
    separate, shared = program.clone(), program.clone()
    PassManager([SliceStream(CALIBRATION, constant_widths(0.0, multiple=1), batch_size=6)]).run(separate)
    PassManager([SliceStream(CALIBRATION, constant_widths(0.0, multiple=1), batch_size=6, share=per_block)]).run(shared)
    assert relative_error(shared(ids), before) < 1e-9
    layers = 2
    sequential = name != "phi"  # phi's attention and MLP already read one norm: one segment per block
    assert shortcuts(separate) == (2 * layers if sequential else layers)
    assert shortcuts(shared) == layers
    stream = program.clone()  # one basis for the whole stream: no shortcut left, still exact unsliced
    PassManager([SliceStream(CALIBRATION, constant_widths(0.0, multiple=1), batch_size=6, share=per_stream)]).run(stream)
    assert relative_error(stream(ids), before) < 1e-9
    assert shortcuts(stream) == 0
    sliced = program.clone()
    PassManager([SliceStream(CALIBRATION, constant_widths(0.25), batch_size=6, share=per_block)]).run(sliced)
    unshared = program.clone()
    PassManager([SliceStream(CALIBRATION, constant_widths(0.25), batch_size=6)]).run(unshared)
    saved = (layers if sequential else 0) * 48 * 48
    assert unshared.num_parameters() - sliced.num_parameters() == saved


def test_a_shared_basis_keeps_both_halves_of_the_block():
    """The basis of a block's shared pair spans the top eigenvectors of ΣXᵀX over *both* halves' inputs
    (embedding output and attention's residual sum for the first block, read off the eager model)."""
    from fxslice import capture
    from fxslice.passes.slicegpt.slice_stream import per_block
    from fxslice.testing import tiny_causal_lm

    model = tiny_causal_lm("llama")
    program = fused(capture(model).to(torch.float64))
    model = model.double()  # (its norms compute in float32 whatever the model's dtype: hence the tolerance)
    layer = model.model.layers[0]
    seen: dict[str, list[torch.Tensor]] = {"attention": [], "mlp": []}
    hooks = [layer.input_layernorm.register_forward_pre_hook(lambda m, a: seen["attention"].append(a[0])),
             layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a: seen["mlp"].append(a[0]))]
    with torch.no_grad():
        model(CALIBRATION, use_cache=False)
    for hook in hooks:
        hook.remove()
    covariance = sum(x.reshape(-1, 64).T @ x.reshape(-1, 64) for xs in seen.values() for x in xs)
    expected = torch.linalg.eigh(covariance)[1][:, -40:]
    slicer = SliceStream(CALIBRATION, [40] * 5, batch_size=4, share=per_block)  # 2 blocks x 2 halves + head
    PassManager([slicer]).run(program)
    q = slicer.bases[0]
    assert slicer.bases[1] is q
    torch.testing.assert_close(q @ q.T, expected @ expected.T, rtol=0, atol=1e-4)
    attention_only = torch.linalg.eigh(sum(x.reshape(-1, 64).T @ x.reshape(-1, 64) for x in seen["attention"]))[1][:, -40:]
    assert float((q @ q.T - attention_only @ attention_only.T).abs().max()) > 1e-2  # the test can tell them apart


def test_one_basis_for_the_stream_spans_every_norms_input(capsys):
    """`per_stream`: one basis from Σ x̂x̂ᵀ over the token directions at every norm's input of the (dense) eager
    model — each layer's two and the final one — so that all segments share it and no shortcut is left."""
    from fxslice import capture
    from fxslice.passes.slicegpt.slice_stream import per_stream
    from fxslice.testing import tiny_causal_lm

    model = tiny_causal_lm("llama")
    program = fused(capture(model).to(torch.float64))
    model = model.double()
    norms = [m for name, m in model.named_modules() if name.endswith("norm")]
    seen: list[torch.Tensor] = []
    hooks = [norm.register_forward_pre_hook(lambda m, a: seen.append(a[0])) for norm in norms]
    with torch.no_grad():
        model(CALIBRATION, use_cache=False)
    for hook in hooks:
        hook.remove()
    assert len(norms) == 5 and len(seen) == 5
    rows = [x.reshape(-1, 64) for x in seen]
    directions = [x / x.norm(dim=1, keepdim=True).clamp_min(1e-300) for x in rows]  # each direction once (pad: 0)
    expected = torch.linalg.eigh(sum(x.T @ x for x in directions))[1][:, -40:]
    slicer = SliceStream(CALIBRATION, [40] * 5, batch_size=12, share=per_stream, progress=True)
    PassManager([slicer]).run(program)
    assert "covariances for one basis: 4/4" in capsys.readouterr().err  # the calibration is at the first segment
    assert all(q is slicer.bases[0] for q in slicer.bases)
    q = slicer.bases[0]
    torch.testing.assert_close(q @ q.T, expected @ expected.T, rtol=0, atol=1e-4)
    by_energy = torch.linalg.eigh(sum(x.T @ x for x in rows))[1][:, -40:]
    assert float((q @ q.T - by_energy @ by_energy.T).abs().max()) > 1e-2  # the test can tell them apart
