"""`--format hf`: stock transformers loads an exported model with fxslice blocked, gives fxslice's logits, and its
`generate()` gives fxslice's greedy tokens; through the model's own KV cache where the program has one."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fxslice import InvalidOption
from fxslice.evaluation.generate import generate
from fxslice.models.export import export_hf
from fxslice.models.io import load, save

LOAD_WITH_TRANSFORMERS = """
import json, sys, torch
sys.modules["fxslice"] = None  # `import fxslice` now fails
from transformers import AutoModelForCausalLM
path, ids_path, out_path = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
ids = torch.load(ids_path)
steps = []
forward = model.forward
def counting(*args, **kwargs):
    steps.append(int(kwargs["input_ids"].shape[1]))
    return forward(*args, **kwargs)
model.forward = counting
tokens = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
model.forward = forward
beams = model.generate(ids, max_new_tokens=4, num_beams=3, do_sample=False, eos_token_id=None, pad_token_id=0)
recomputed = model.generate(ids, max_new_tokens=4, num_beams=3, do_sample=False, eos_token_id=None, pad_token_id=0,
                            use_cache=False)
try:
    model(ids, attention_mask=torch.ones_like(ids).index_fill(1, torch.tensor([0]), 0))
    padded = "accepted"
except ValueError as exc:
    padded = str(exc)
logits = model(ids).logits
model.to("meta")  # no op names the CPU: the program runs wherever its weights are
meta = model(ids.to("meta")).logits
assert meta.device.type == "meta" and meta.shape == logits.shape, (meta.device, meta.shape)
torch.save({"beams_agree": torch.equal(beams, recomputed), "logits": logits, "tokens": tokens, "steps": steps, "padded": padded,
            "parameters": sum(p.numel() for p in model.parameters())}, out_path)
"""

def _in_transformers(code: str, tmp_path, ids: torch.Tensor) -> dict:
    """Run `code` on the export in tmp_path/hf in a fresh process where `import fxslice` fails; what it saved."""
    torch.save(ids, tmp_path / "ids.pt")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "hf"), str(tmp_path / "ids.pt"),
                           str(tmp_path / "out.pt")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(tmp_path / "out.pt")


@pytest.mark.parametrize("kind", ["sliced", "sliced+cache", "pruned", "quantized"])
def test_transformers_loads_the_export_without_fxslice_and_generates_fxslices_tokens(kind, tmp_path, exportable):
    save(exportable(kind), tmp_path / "model")
    program = load(tmp_path / "model")
    export_hf(program, tmp_path / "hf", stock=False)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    got = _in_transformers(LOAD_WITH_TRANSFORMERS, tmp_path, ids)
    torch.testing.assert_close(got["logits"], program(ids), rtol=1e-5, atol=1e-5)
    assert torch.equal(got["tokens"], generate(program, ids, max_new_tokens=6))
    # with a cache the prompt runs once and then one token per step; without one, every step reads everything
    expected_steps = [7, 1, 1, 1, 1, 1] if program.cache is not None else [7, 8, 9, 10, 11, 12]
    assert got["steps"] == expected_steps
    assert "without an attention-mask input" in got["padded"]
    assert got["beams_agree"]  # beam search reorders the program's cache as it would recompute
    assert got["parameters"] == program.num_parameters()  # one tensor per weight: the tie is not duplicated
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_fxslice.FxsliceForCausalLM"


def test_the_hf_export_holds_the_weights_once_and_the_graph_none(tmp_path, exportable):
    from safetensors import safe_open

    program = exportable("sliced")
    assert export_hf(program, tmp_path / "hf").remote_code  # a sliced model's shortcuts: not a stock Llama
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        graph = f.get_tensor("program")
    weights = {str(n.target) for n in program.graph.find_nodes(op="get_attr")}
    assert names == {f"weights.{w}" for w in weights} | {"program"}
    data = json.loads(graph.numpy().tobytes())  # the graph is data: operators, literals, input names
    ops = {n["op"] for n in data["nodes"]}
    assert ops == {"placeholder", "call_function", "output"}  # every weight is an input, stored once, outside


def test_hf_export_refuses_an_existing_directory_and_leaves_nothing_on_failure(tmp_path, monkeypatch, exportable):
    program = exportable("sliced")
    (tmp_path / "taken").mkdir()
    with pytest.raises(InvalidOption, match="already exists"):
        export_hf(program, tmp_path / "taken")
    import fxslice.models.export as export

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export.shutil, "copyfile", broken)
    with pytest.raises(Exception, match="nothing was left behind"):
        export_hf(program, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


STOCK = """
import sys, torch
sys.modules["fxslice"] = None
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])  # no trust_remote_code
ids = torch.load(sys.argv[2])
torch.save({"class": type(model).__name__, "logits": model(ids).logits,
            "tokens": model.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)},
           sys.argv[3])
"""


@pytest.mark.parametrize("kind", ["cached", "quantized", "tied", "untied", "stream", "stream-tied"])
def test_a_stock_shaped_model_exports_as_a_stock_llama_without_remote_code(tmp_path, exportable, kind):
    from fxslice import PassManager, capture
    from fxslice.passes.rewrite import UntieHead
    from fxslice.testing import tiny_causal_lm

    program = capture(tiny_causal_lm("llama-tied")) if kind in ("tied", "untied") else exportable(kind)
    if kind == "untied":  # a tied model given its own head (Quantize(untie_head=True) does this)
        PassManager([UntieHead()]).run(program)
    written = export_hf(program, tmp_path / "hf")
    assert written.remote_code is None
    assert not list((tmp_path / "hf").glob("*.py"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    assert config["tie_word_embeddings"] == (kind == "tied")
    assert config["hidden_size"] == (48 if kind.startswith("stream") else 64)  # one basis for the stream: a narrower Llama
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    got = _in_transformers(STOCK, tmp_path, ids)
    assert got["class"] == "LlamaForCausalLM"
    torch.testing.assert_close(got["logits"], program(ids), rtol=1e-5, atol=1e-5)
    assert torch.equal(got["tokens"], generate(program, ids, max_new_tokens=5))


def test_per_layer_widths_fall_back_to_remote_code_and_say_why(tmp_path, exportable):
    written = export_hf(exportable("pruned"), tmp_path / "hf")
    assert written.remote_code is not None and "different widths" in written.remote_code


@pytest.mark.parametrize("bits", [4, 8])
def test_symmetric_integers_reach_transformers_as_compressed_tensors(tmp_path, bits):
    """A stock-shaped model quantized on a symmetric grid keeps its integers in the checkpoint (pack-quantized
    compressed-tensors, what llm-compressor writes and vLLM serves): transformers, without fxslice, decompresses
    them to fxslice's weights and computes its logits; the tied table, an embedding, stays float, and says so."""
    pytest.importorskip("compressed_tensors")
    from fxslice import PassManager, capture
    from fxslice.passes import CleanupIR
    from fxslice.passes.quantize import QuantizeWeights
    from fxslice.testing import tiny_causal_lm

    program = capture(tiny_causal_lm("llama-tied"))
    PassManager([CleanupIR()]).run(program)
    PassManager([QuantizeWeights(bits, group_size=32, grid="symmetric", embeddings=8)]).run(program)
    written = export_hf(program, tmp_path / "hf")
    assert written.remote_code is None
    assert list(written.dequantized) == ["model.embed_tokens.weight"] and written.integer_linears == 14
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    [group] = config["quantization_config"]["config_groups"].values()
    assert group["weights"] == {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}
    assert len(group["targets"]) == 14  # every linear of the body
    from safetensors import safe_open

    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        packed = {k: f.get_tensor(k) for k in f.keys() if k.endswith(".weight_packed")}
    assert len(packed) == 14 and all(t.dtype == torch.int32 for t in packed.values())
    levels = sum(t.numel() for t in packed.values()) * 32 / bits  # the integers, packed without a bit to spare
    assert levels == sum(q.q.numel() for q in program.quantized.values()) - 128 * 64  # all but the table
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    got = _in_transformers(STOCK, tmp_path, ids)
    assert got["class"] == "LlamaForCausalLM"
    torch.testing.assert_close(got["logits"], program(ids), rtol=1e-5, atol=1e-5)
    if bits == 4:  # the CLI says what it kept as integers and what it wrote in float, and why
        save(program, tmp_path / "model")
        done = subprocess.run([sys.executable, "-m", "fxslice.cli", "export", str(tmp_path / "model"), "--format", "hf",
                               "--out", str(tmp_path / "cli-hf")], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "14 linears as compressed-tensors integers" in done.stdout
        assert "1 quantized weight(s) written in float: a token table" in done.stderr


def test_our_packing_is_compressed_tensors_own_for_every_width_and_shape():
    """The int32 words we write are the words compressed-tensors' own packer writes, for every width and for rows
    that are not whole words (hypothesis)."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from fxslice.core.quantized import BITS, QuantizedWeight
    from fxslice.models.compressed_tensors import packed_rows

    @settings(max_examples=40, deadline=None)
    @given(st.sampled_from(BITS), st.integers(1, 9), st.integers(1, 140), st.integers(0, 2**31))
    def check(bits, rows, cols, seed):
        m = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
        q = QuantizedWeight.from_matrix(m, bits, cols, grid="symmetric")
        assert torch.equal(packed_rows(q), pack_to_int32((q.q.to(torch.int64) - (1 << (bits - 1))).to(torch.int8), bits))

    check()
