"""Int4Kernels: 4-bit linears computed by PyTorch's int4 weight-only kernel from their packed integers give the
dequantized program's logits (float32: to the kernel's rounding; bfloat16: within bfloat16's own error), the float
copies leave memory, and what the kernel cannot take, or where the packed layout cannot go, is said."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxslice import InvalidOption, PassManager, capture, save
from fxslice.core.graph import set_tensor, tensor_of
from fxslice.core.quantized import QuantizedWeight
from fxslice.evaluation.generate import generate
from fxslice.models.kvcache import capture_cached
from fxslice.passes.quantize import Int4Kernels, QuantizeWeights
from fxslice.passes.quantize.kernels import int4_eligibility, packed_shape
from fxslice.testing import tiny_causal_lm

KERNEL = torch.ops.aten._weight_int4pack_mm_for_cpu


def _memory(program) -> int:
    return sum({id(t): t.numel() * t.element_size() for t in [*program.gm.parameters(), *program.gm.buffers()]}.values())


def _kernel_ops(program) -> int:
    return sum(n.target == KERNEL for n in program.graph.nodes)


@pytest.mark.parametrize("name", ["llama", "gpt2", "llama-tied", "mixtral"])
def test_kernels_give_the_dequantized_logits_and_drop_the_float_copies(tiny, name):
    _, program = tiny(name)
    PassManager([QuantizeWeights(4, group_size=32, head=4)]).run(program)
    x = program.probe_input()
    before, memory, quantized = program(x), _memory(program), dict(program.quantized)
    floats = {n: tensor_of(program.gm, n) for n in quantized}
    info = PassManager([Int4Kernels()]).run(program).records[0].info
    replaced = info["replaced"]
    assert replaced and _kernel_ops(program) >= len(replaced)
    assert {n for n, q in quantized.items() if q.bits == 4} == set(replaced) | {
        n for n, reason in info["kept"].items() if reason != "8-bit"}
    torch.testing.assert_close(program(x), before, rtol=1e-5, atol=1e-5 * float(before.detach().abs().max()))
    # each replaced float copy left memory, and its integers came in: half a byte a weight, a scale and an offset
    # per group in the program's dtype
    added = sum(packed_shape(q)[0] * (packed_shape(q)[1] // 2 + q.groups * 2 * 4) for n, q in quantized.items() if n in replaced)
    dropped = sum({id(floats[n]): floats[n].numel() * 4 for n in replaced}.values())
    assert _memory(program) == memory - dropped + added < memory
    assert set(program.quantized).isdisjoint(replaced) and set(info["kept"]) <= set(program.quantized)


def test_what_the_kernel_cannot_take_is_kept_with_its_reason_and_any_shape_runs(tiny):
    _, program = tiny("mixtral")  # the router's [4, 64] weight: packed with 12 zero rows, its output cut back
    names = sorted(n for n, p in program.gm.named_parameters() if p.dim() == 2 and "layers" in n)
    widths = {n: 3 if "q_proj" in n else 4 for n in names}
    PassManager([QuantizeWeights(widths, group_size=32)]).run(program)
    info = PassManager([Int4Kernels()]).run(program).records[0].info
    assert all(info["kept"][n] == "3-bit" for n in names if "q_proj" in n)
    assert {n for n in names if n.endswith("gate.weight")} <= set(info["replaced"])
    assert info["kept"]["model.embed_tokens.weight"] == "8-bit"
    _, small_groups = tiny("llama")
    PassManager([QuantizeWeights(4, group_size=16)]).run(small_groups)
    with pytest.raises(InvalidOption, match="nothing to run"):
        PassManager([Int4Kernels()]).run(small_groups)


class _OneLinear(torch.nn.Module):
    def __init__(self, vocab: int, cols: int, out: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.embed, self.head = torch.nn.Embedding(vocab, cols), torch.nn.Linear(cols, out)

    def forward(self, input_ids, use_cache=False):
        return self.head(self.embed(input_ids))


@settings(max_examples=12, deadline=None)
@given(st.integers(1, 70), st.integers(1, 150), st.sampled_from([32, 64, 128, 256]), st.integers(0, 2**31),
       st.sampled_from(["zero_point", "offset"]))
def test_any_width_runs_on_the_kernel_padded_and_cut_back(out, cols, group, seed, grid):
    from fxslice import capture_module

    program = capture_module(_OneLinear(8, cols, out, seed))
    PassManager([QuantizeWeights(4, group_size=group, embeddings=None, head=4, grid=grid)]).run(program)
    q = program.quantized["head.weight"]
    assert int4_eligibility(q) is None
    rows, padded = packed_shape(q)
    assert rows % 16 == 0 and padded % group == 0 and rows - out < 16 and padded - cols < group
    x = program.probe_input()
    before = program(x)
    info = PassManager([Int4Kernels()]).run(program).records[0].info
    assert info["replaced"] == ["head.weight"] and _kernel_ops(program) == 1
    torch.testing.assert_close(program(x), before, rtol=1e-5, atol=1e-5 * float(before.detach().abs().max()))


def test_bfloat16_kernels_stay_within_bfloat16s_own_error():
    module = tiny_causal_lm("llama").to(torch.bfloat16)
    program = capture(module)
    reference = capture(tiny_causal_lm("llama"))
    PassManager([QuantizeWeights(4, group_size=32)]).run(program)
    for name, q in program.quantized.items():  # the same integers in float32: the exact quantized model
        q32 = QuantizedWeight(q.bits, q.group_size, q.shape, q.q, q.scale, q.zero, q.transposed, torch.float32)
        set_tensor(reference.gm, name, q32.dequantize())
    x = program.probe_input()
    exact = reference(x).double()
    dequantized_error = float((program(x).double() - exact).norm() / exact.norm())
    PassManager([Int4Kernels()]).run(program)
    assert _kernel_ops(program) > 0
    kernel_error = float((program(x).double() - exact).norm() / exact.norm())
    assert kernel_error < 2 * dequantized_error + 1e-3, (kernel_error, dequantized_error)


def test_kv_cache_decoding_through_the_kernels_picks_the_same_tokens():
    model = tiny_causal_lm("llama")
    cached = capture_cached(model)
    PassManager([QuantizeWeights(4, group_size=32)]).run(cached)
    prompt = cached.probe_input(batch=2, length=5)
    expected = generate(cached, prompt, max_new_tokens=12)
    half = cached.to(torch.bfloat16)  # the cache's inputs follow the dtype: every 4-bit linear is taken
    PassManager([Int4Kernels()]).run(cached)
    assert _kernel_ops(cached) > 0
    assert torch.equal(generate(cached, prompt, max_new_tokens=12), expected)
    info = PassManager([Int4Kernels()]).run(half).records[0].info
    assert len(info["replaced"]) == _kernel_ops(cached) and all(r == "8-bit" for r in info["kept"].values())


def test_cli_generates_and_evaluates_through_the_kernels_as_without(tmp_path, tiny_model_dir):
    import json

    from typer.testing import CliRunner

    from fxslice.cli import app

    out = tmp_path / "q4"
    runner = CliRunner()
    made = runner.invoke(app, ["quantize", str(tiny_model_dir("llama")), "--bits", "4", "--group-size", "32",
                               "--method", "rtn", "--eval", "none", "--out", str(out)])
    assert made.exit_code == 0, made.output
    texts, figures = {}, {}
    for kernels in ("float", "int4"):
        generated = runner.invoke(app, ["generate", str(out), "abc", "--max-new-tokens", "6", "--device", "cpu",
                                        "--kernels", kernels])
        assert generated.exit_code == 0, generated.output
        texts[kernels] = generated.stdout
        evaluated = runner.invoke(app, ["eval", str(out), "--eval-windows", "2", "--eval-length", "32", "--device", "cpu",
                                        "--kernels", kernels, "--output", str(tmp_path / f"{kernels}.json")])
        assert evaluated.exit_code == 0, evaluated.output
        figures[kernels] = json.loads((tmp_path / f"{kernels}.json").read_text())
    assert texts["int4"] == texts["float"]
    assert figures["int4"]["perplexity"]["value"] == pytest.approx(figures["float"]["perplexity"]["value"], rel=1e-5)
    assert figures["int4"]["parameters"] == figures["float"]["parameters"]
    refused = runner.invoke(app, ["eval", str(out), "--kernels", "int8", "--device", "cpu"])
    assert isinstance(refused.exception, InvalidOption) and "float or int4" in str(refused.exception)


def test_a_kernel_program_is_neither_moved_nor_saved_and_nothing_is_written(tiny, tmp_path):
    _, program = tiny("llama")
    PassManager([QuantizeWeights(4, group_size=32), Int4Kernels()]).run(program)
    with pytest.raises(InvalidOption, match="packed for the cpu"):
        program.to("meta")
    with pytest.raises(InvalidOption, match="packed for the cpu"):
        program.offload("meta")
    with pytest.raises(InvalidOption, match="save the quantized program before choosing kernels"):
        save(program, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    x = program.probe_input()
    half = program.to(torch.bfloat16)  # another dtype on the same device: the CPU kernel takes it
    assert half(x).dtype == torch.bfloat16 and torch.isfinite(half(x)).all()


def test_kernels_are_refused_where_they_cannot_run(tiny):
    _, program = tiny("llama")
    with pytest.raises(InvalidOption, match="no quantized weights"):
        Int4Kernels()(program)
    PassManager([QuantizeWeights(4, group_size=32)]).run(program)
    with pytest.raises(InvalidOption, match="not on meta"):
        Int4Kernels()(program.to("meta"))
    with pytest.raises(InvalidOption, match="offloaded"):
        Int4Kernels()(program.offload("cpu"))
