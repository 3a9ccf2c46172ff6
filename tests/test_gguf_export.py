"""`--format gguf`: the real llama.cpp (llama-cpp-python) loads the exported file and computes fxslice's logits —
to float tolerance for float exports, within the quantization's own error for quantized ones — on dense, tied,
pruned (per-layer widths: llama.cpp's `deci`) and quantized tiny Llamas; structures llama.cpp lacks are refused."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from fxslice import PassManager, UnsupportedStructure, capture
from fxslice.models.decoder_layout import decoder_layout
from fxslice.models.gguf_export import export_gguf
from fxslice.models.io import load, save
from fxslice.passes import CleanupIR, prune_recipe, slicegpt_recipe
from fxslice.passes.quantize import QuantizeWeights
from fxslice.testing import tiny_causal_lm

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (installed by .ci/run) runs the exported files")

IDS = [5, 17, 3, 99, 42, 7, 64, 1, 120, 33, 8, 71]
CALIBRATION = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))


def _llama_cpp_logits(path, ids: list[int]) -> np.ndarray:
    """Logits of every position, computed by llama.cpp in a fresh process (its C logging kept out of pytest's)."""
    code = f"""
import sys, numpy as np, llama_cpp
model = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, logits_all=True, verbose=False, n_threads=1,
                        type_k=0, type_v=0)  # a float32 KV cache (llama.cpp's default is float16)
model.eval({ids!r})
np.save(sys.argv[2], np.array(model.scores[:{len(ids)}], dtype=np.float32))
"""
    out = path.with_suffix(".npy")
    done = subprocess.run([sys.executable, "-c", code, str(path), str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return np.load(out)


def _program(kind: str, group_size: int = 32, grid: str = "zero_point"):
    model = tiny_causal_lm("llama-tied" if kind in ("tied", "stream-tied") else "llama")
    program = capture(model)
    PassManager([CleanupIR()]).run(program)
    if kind == "pruned":
        prune_recipe(target=0.3, shots=2, batch_size=4).run(program, calibration=CALIBRATION)
    elif kind in ("stream", "stream-tied"):  # SliceGPT with one basis for the stream: a narrower stock Llama
        slicegpt_recipe(sparsity=0.25, shared_basis="stream", keep_ties=kind == "stream-tied",
                        batch_size=4).run(program, calibration=CALIBRATION)
    elif kind.startswith("q"):
        bits = {"q4": 4, "q5": 5, "q8": 8}[kind]
        PassManager([QuantizeWeights(bits, group_size=group_size, embeddings=8, head=8, grid=grid)]).run(program)
    return program


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("kind", ["dense", "tied", "pruned", "stream", "stream-tied"])
def test_llama_cpp_computes_fxslices_logits_from_a_float_export(tmp_path, kind):
    program = _program(kind)
    report = export_gguf(program, tmp_path / "m.gguf", weight_type="f32")
    assert report.architecture == ("deci" if kind == "pruned" else "llama")
    expected = program(torch.tensor([IDS]))[0].detach().numpy()
    got = _llama_cpp_logits(tmp_path / "m.gguf", IDS)
    assert _relative(got, expected) < 1e-4
    assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_the_pruned_export_has_per_layer_widths(tmp_path):
    import gguf

    program = _program("pruned")
    layout = decoder_layout(program)
    assert not layout.uniform  # the Surgeon removed different amounts per layer
    export_gguf(program, tmp_path / "m.gguf", weight_type="f32")
    fields = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields
    assert list(fields["deci.feed_forward_length"].contents()) == [layer.mlp.width for layer in layout.layers]
    assert list(fields["deci.attention.head_count_kv"].contents()) == [layer.attention.kv_heads for layer in layout.layers]


@pytest.mark.parametrize("kind,group_size,grid", [
    ("q4", 32, "zero_point"), ("q5", 32, "zero_point"), ("q4", 64, "zero_point"), ("q4", 32, "offset"),
    ("q5", 64, "offset"), ("q4", 32, "symmetric"), ("q5", 64, "symmetric"), ("q8", 32, "symmetric")])
def test_fxslices_integers_reach_llama_cpp_exactly(tmp_path, kind, group_size, grid):
    """4-, 5- and symmetric 8-bit weights in groups of 32 (or 64: two blocks sharing a scale) are written as GGUF
    blocks of the same integers (Q4_1 / Q5_1, symmetric: Q4_0 / Q5_0 / Q8_0): gguf's own reader dequantizes them to
    fxslice's weights — bit for bit on an offset or symmetric grid, up to the float16 rounding of `zero · scale` on
    a zero-point grid."""
    import gguf

    program = _program(kind, group_size, grid)
    report = export_gguf(program, tmp_path / "m.gguf", weight_type="f32")
    block = {"q4": "Q4", "q5": "Q5", "q8": "Q8"}[kind] + ("_0" if grid == "symmetric" else "_1")
    assert report.types[block] >= 14  # every linear of the body (and at 8 bits the table)
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    tensor = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    mine = program.gm.get_parameter("model.layers.1.mlp.down_proj.weight").detach().numpy()
    q = program.quantized["model.layers.1.mlp.down_proj.weight"]
    if grid != "zero_point":
        assert np.array_equal(values, mine)
    else:
        offset = (q.zero * q.scale).abs().max().item()
        assert np.abs(values - mine).max() <= offset * 2**-11  # half a float16 step of the offset `zero · scale`
    expected = program(torch.tensor([IDS]))[0].detach().numpy()
    got = _llama_cpp_logits(tmp_path / "m.gguf", IDS)
    assert _relative(got, expected) < 0.02  # llama.cpp rounds activations to 8 bits for quantized products


@pytest.mark.parametrize("weight_type", ["f16", "q8_0", "q4_0"])
def test_float_weights_quantized_at_export_run_within_their_own_error(tmp_path, weight_type):
    program = _program("dense")
    export_gguf(program, tmp_path / "m.gguf", weight_type=weight_type)
    expected = program(torch.tensor([IDS]))[0].detach().numpy()
    got = _llama_cpp_logits(tmp_path / "m.gguf", IDS)
    assert _relative(got, expected) < {"f16": 1e-3, "q8_0": 0.02, "q4_0": 0.3}[weight_type]


def test_a_saved_model_with_a_kv_cache_exports_through_the_cli(tmp_path):
    from fxslice.models.kvcache import capture_cached

    model = tiny_causal_lm("llama")
    cached = capture_cached(model)
    PassManager([CleanupIR()]).run(cached)
    save(cached, tmp_path / "model")
    done = subprocess.run([sys.executable, "-m", "fxslice.cli", "export", str(tmp_path / "model"), "--format", "gguf",
                           "--type", "f32", "--out", str(tmp_path / "m.gguf")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "architecture 'llama'" in done.stdout
    assert (tmp_path / "m.gguf").stat().st_mode & 0o777 == 0o666 & ~_umask()  # not mkstemp's 0600: a file to share
    expected = load(tmp_path / "model")(torch.tensor([IDS]))[0].detach().numpy()
    assert _relative(_llama_cpp_logits(tmp_path / "m.gguf", IDS), expected) < 1e-4


def test_a_model_sliced_with_one_basis_through_the_cli_runs_in_llama_cpp(tmp_path, tiny_model_dir):
    """`fxslice slice --shared-basis stream` keeps a tied head tied (behind SliceGPT's projection); the export writes
    a narrower stock Llama with a head of its own, and llama.cpp computes the saved model's logits."""
    sliced = tmp_path / "sliced"
    done = subprocess.run([sys.executable, "-m", "fxslice.cli", "slice", str(tiny_model_dir("llama-tied")),
                           "--sparsity", "0.25", "--shared-basis", "stream", "--calib-windows", "4", "--calib-length",
                           "32", "--eval-windows", "1", "--eval-length", "32", "--out", str(sliced)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run([sys.executable, "-m", "fxslice.cli", "export", str(sliced), "--format", "gguf",
                           "--type", "f32", "--out", str(tmp_path / "m.gguf")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "architecture 'llama'" in done.stdout and "a head of its own" in done.stdout
    expected = load(sliced)(torch.tensor([IDS]))[0].detach().numpy()
    assert _relative(_llama_cpp_logits(tmp_path / "m.gguf", IDS), expected) < 1e-4


@pytest.mark.parametrize("family,reason", [("qwen2", "bias"), ("gemma", r"\(1 \+ w\)"), ("stablelm", "LayerNorm"),
                                           ("gpt2", "token tables"), ("qwen3", "norm read by 0 linears")])
def test_structures_llama_cpp_lacks_are_refused_naming_them(tmp_path, family, reason):
    program = capture(tiny_causal_lm(family))
    PassManager([CleanupIR()]).run(program)
    with pytest.raises(UnsupportedStructure, match=reason):
        export_gguf(program, tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())


def test_a_width_without_a_block_type_is_refused_naming_the_tensor(tmp_path):
    program = capture(tiny_causal_lm("llama"))
    PassManager([CleanupIR(), QuantizeWeights(3, group_size=32)]).run(program)
    with pytest.raises(UnsupportedStructure, match=r"q_proj.weight' holds 3-bit integers"):
        export_gguf(program, tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())


def test_a_sliced_model_is_refused_not_a_traceback(tmp_path):
    program = capture(tiny_causal_lm("llama"))
    slicegpt_recipe(sparsity=0.25, batch_size=4).run(program, calibration=CALIBRATION)
    with pytest.raises(UnsupportedStructure, match="not a Llama-style decoder(.|\n)*shared-basis stream"):
        export_gguf(program, tmp_path / "m.gguf")


def test_a_head_untied_at_quantization_reaches_llama_cpp_as_its_own_tensor(tmp_path):
    """`Quantize(untie_head=True)`: the lookup at 4 bits, the head at 8 — two GGUF tensors of their own types."""
    import gguf

    from fxslice.passes.quantize.stages import Quantize
    from fxslice.recipes import Recipe

    program = _program("tied")
    Recipe((Quantize(bits=4, method="rtn", group_size=32, embeddings=4, head=8, untie_head=True),)).run(program)
    export_gguf(program, tmp_path / "m.gguf", weight_type="f32")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert types["token_embd.weight"] == "Q4_1" and types["output.weight"] == "Q8_0"
    expected = program(torch.tensor([IDS]))[0].detach().numpy()
    got = _llama_cpp_logits(tmp_path / "m.gguf", IDS)
    assert _relative(got, expected) < 0.02
