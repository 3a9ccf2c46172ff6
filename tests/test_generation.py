"""KV-cache capture, replaying a compiled pipeline on it, and generation."""

import pytest
import torch

from fxslice import CaptureError, InvalidOption, PassCheckFailed, PassManager, capture_module
from fxslice.core.pass_manager import replay
from fxslice.evaluation.generate import generate
from fxslice.models.io import load, save
from fxslice.models.kvcache import capture_cached
from fxslice.passes import CleanupIR, FuseNorms, ProjectNormWriters, RotateStream
from fxslice.passes.slicegpt.rotations import random_orthogonal
from fxslice.passes.slicegpt.slice_stream import SliceStream, constant_widths
from fxslice.testing import tiny_causal_lm

CALIBRATION = torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(1))
PROMPT = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(2))
FAMILIES = ["llama", "llama-tied", "gpt2", "falcon", "gemma2", "mixtral", "bloom", "phi3"]


def _compiled(name: str, last_pass):
    model = tiny_causal_lm(name)
    program, cached = capture_module(model), capture_cached(model)
    result = PassManager([CleanupIR(), ProjectNormWriters(), FuseNorms(), last_pass]).run(program)
    replay(result.passes, cached, program)
    return model, program, cached


@pytest.mark.parametrize("name", FAMILIES)
def test_cached_capture_decodes_like_the_whole_sequence(name):
    model = tiny_causal_lm(name)
    cached = capture_cached(model)
    ids = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = model(input_ids=ids, use_cache=False).logits
        kv = cached.cache.allocate(3, 12, torch.float32)
        pieces = [cached.step(ids[:, :5], 0, kv)] + [cached.step(ids[:, j : j + 1], j, kv) for j in range(5, 10)]
    torch.testing.assert_close(torch.cat(pieces, 1), reference, rtol=1e-4, atol=1e-5)
    assert [p.target for p in cached.graph.find_nodes(op="placeholder")][:2] == ["input_ids", "past_length"]


@pytest.mark.parametrize("name", ["llama-tied", "gpt2", "falcon", "gemma2"])
def test_rotated_model_generates_the_original_greedy_tokens(name):
    model, _, cached = _compiled(name, RotateStream(random_orthogonal(seed=5)))
    ours = generate(cached, PROMPT, max_new_tokens=12)
    theirs = model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=12, do_sample=False,
                            min_new_tokens=12, pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_replay_gives_the_cached_graph_the_sliced_weights_and_shares_them(tmp_path):
    _, program, cached = _compiled("llama-tied", SliceStream(CALIBRATION, constant_widths(0.25), batch_size=4))
    assert cached.num_parameters() == program.num_parameters() < capture_module(tiny_causal_lm("llama-tied")).num_parameters()
    shared = {id(p) for p in program.gm.parameters()}
    assert all(id(p) in shared for p in cached.gm.parameters() if p.numel())
    ids = program.probe_input()
    torch.testing.assert_close(cached(ids), program(ids), rtol=0, atol=0)


def test_sliced_model_reloads_and_generates_the_same_with_and_without_cache(tmp_path):
    _, program, cached = _compiled("gemma2", SliceStream(CALIBRATION, constant_widths(0.25), batch_size=4))
    back = load(save(cached, tmp_path / "sliced"))
    assert back.cache == cached.cache
    with_cache = generate(back, PROMPT, max_new_tokens=10)
    without = generate(program, PROMPT, max_new_tokens=10)  # recomputes the whole sequence each step
    assert torch.equal(with_cache, without)


def test_replay_refuses_a_capture_of_another_model():
    model, other = tiny_causal_lm("llama"), tiny_causal_lm("llama")
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight.add_(0.5)
    program = capture_module(model)
    result = PassManager([CleanupIR(), ProjectNormWriters(), FuseNorms()]).run(program)
    with pytest.raises(PassCheckFailed, match="up_proj"):
        replay(result.passes, capture_cached(other), program)


def test_sampling_is_seeded_and_top_1_is_greedy():
    cached = capture_cached(tiny_causal_lm("llama"))
    a = generate(cached, PROMPT, max_new_tokens=8, temperature=1.0, seed=7)
    b = generate(cached, PROMPT, max_new_tokens=8, temperature=1.0, seed=7)
    assert torch.equal(a, b)
    greedy = generate(cached, PROMPT, max_new_tokens=8)
    assert torch.equal(generate(cached, PROMPT, max_new_tokens=8, temperature=0.7, top_k=1, seed=1), greedy)


def test_generation_stops_at_eos_and_pads_finished_rows():
    cached = capture_cached(tiny_causal_lm("llama"))
    greedy = generate(cached, PROMPT, max_new_tokens=8)
    eos = int(greedy[0, PROMPT.shape[1] + 2])  # row 0's third new token
    out = generate(cached, PROMPT, max_new_tokens=8, eos_token_id=eos)
    new = out[0, PROMPT.shape[1]:]
    first = int((new == eos).nonzero()[0])
    assert first <= 2 and bool((new[first:] == eos).all())


def test_a_model_whose_cache_cannot_be_captured_says_so():
    class NoCache(torch.nn.Module):
        config = tiny_causal_lm("llama").config

        def forward(self, input_ids, **kwargs):
            return torch.zeros(*input_ids.shape, 128)

    with pytest.raises(CaptureError, match="NoCache"):
        capture_cached(NoCache())


def test_a_bfloat16_model_keeps_its_cache_and_a_wrong_cache_is_still_refused():
    """A step-by-step bfloat16 decoding differs from the whole sequence by roundings (4e-3 here with SmolLM2's
    width; 0.017 on SmolLM2 itself), which the check once took for a wrong cache; a wrong one is off by order 1."""
    import transformers

    config = transformers.LlamaConfig(hidden_size=576, intermediate_size=1152, num_hidden_layers=2, num_attention_heads=9,
                                      num_key_value_heads=1, vocab_size=512)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    cached = capture_cached(model)
    assert cached.dtype == torch.bfloat16 and cached.cache is not None

    class WrongCache(torch.nn.Module):  # its cached path is off by the logits' own size
        def __init__(self):
            super().__init__()
            self.model, self.config = model, model.config

        def forward(self, input_ids, past_key_values=None, **kwargs):
            out = self.model(input_ids=input_ids, past_key_values=past_key_values, **kwargs)
            if past_key_values is not None:
                out.logits = out.logits + out.logits.abs().mean()
            return out

    with pytest.raises(CaptureError, match="decodes wrongly"):
        capture_cached(WrongCache())


@pytest.mark.parametrize("name", ["llama-tied", "gpt2"])
def test_hf_generate_on_a_rotated_program_matches_the_original_model(name):
    from fxslice.models.hf import as_hf_model

    model, program, _ = _compiled(name, RotateStream(random_orthogonal(seed=5)))
    ours = as_hf_model(program)
    for strategy in ({"do_sample": False}, {"do_sample": False, "num_beams": 3}):
        kwargs = {"max_new_tokens": 8, "min_new_tokens": 8, "pad_token_id": 0, **strategy}
        theirs = model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), **kwargs)
        assert torch.equal(ours.generate(PROMPT, **kwargs), theirs), strategy


def test_hf_generate_on_a_reloaded_sliced_model_matches_fxslice_generate(tmp_path):
    from fxslice import InvalidOption
    from fxslice.models.hf import as_hf_model

    _, _, cached = _compiled("llama", SliceStream(CALIBRATION, constant_widths(0.25), batch_size=4))
    back = load(save(cached, tmp_path / "sliced"))
    hf = as_hf_model(back)
    assert hf.num_parameters() == back.num_parameters()
    greedy = hf.generate(PROMPT, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(greedy, generate(back, PROMPT, max_new_tokens=6))
    padded = torch.ones_like(PROMPT)
    padded[0, 0] = 0
    with pytest.raises(InvalidOption, match="padded"):
        hf.generate(PROMPT, attention_mask=padded, max_new_tokens=2)


def test_a_compiled_decoding_step_generates_what_the_captured_step_generates():
    from fxslice.evaluation.generate import compiled_step

    program = capture_cached(tiny_causal_lm("llama"))
    plain = capture_module(tiny_causal_lm("llama"))
    ids = program.probe_input(batch=2, length=5)
    eager = generate(program, ids, max_new_tokens=6)
    assert torch.equal(generate(program, ids, max_new_tokens=6, compile=True), eager)
    assert compiled_step(program) is compiled_step(program)  # compiled once per graph version
    with pytest.raises(InvalidOption, match="KV-cache program"):
        generate(plain, ids, compile=True)
    with pytest.raises(InvalidOption, match="offloaded"):
        compiled_step(program.offload("cpu"))


@pytest.mark.expensive  # two CLI runs, one compiling: 90 s; the compiled step itself is tested above
def test_cli_generates_the_same_text_with_the_compiled_step(tiny_model_dir):
    import subprocess
    import sys

    model = str(tiny_model_dir("llama", trained=True))
    runs = [subprocess.run([sys.executable, "-m", "fxslice.cli", "generate", model, "abc", "--max-new-tokens", "6",
                            "--device", "cpu", *options], capture_output=True, text=True) for options in ([], ["--compile"])]
    assert all(run.returncode == 0 for run in runs), runs[1].stderr[-2000:]
    assert runs[0].stdout == runs[1].stdout and runs[0].stdout.startswith("abc")
    assert "compiled, cpu" in runs[1].stderr


def _recipe(kind: str):
    from fxslice.passes import prune_recipe, slicegpt_recipe
    from fxslice.passes.quantize.stages import Quantize
    from fxslice.passes.rewrite.stages import Cleanup
    from fxslice.recipes import Recipe

    return {"slice": lambda: slicegpt_recipe(sparsity=0.25, batch_size=4),
            "prune": lambda: prune_recipe(target=0.3, shots=2, batch_size=4),
            "quantize": lambda: Recipe((Cleanup(), Quantize(bits=4, group_size=16, method="gptq")))}[kind]()


@pytest.mark.parametrize(("name", "kind"), [("llama-tied", "slice"), ("gemma2", "slice"), ("llama", "prune"),
                                            ("phi3", "prune"), ("gpt2", "quantize")])
def test_a_skeleton_follows_a_recipe_without_weights_and_decodes_like_a_capture_that_had_them(name, kind):
    """The KV-cache capture as `compress` keeps it: shapes only until the replay hands it the compressed weights;
    it ends as the capture replayed with weights ends: the same tensors, the same decoded logits."""
    model = tiny_causal_lm(name)
    program, skeleton, full = capture_module(model), capture_cached(model).skeleton(), capture_cached(model)
    assert skeleton.is_skeleton and not full.is_skeleton
    assert all(t.device.type == "meta" for t in skeleton.gm.parameters())
    result = _recipe(kind).run(program, calibration=CALIBRATION)
    replay(result.passes, full, program)
    replay(result.passes, skeleton, program)
    assert not skeleton.is_skeleton and skeleton.cache == full.cache
    assert {id(p) for p in skeleton.gm.parameters()} == {id(p) for p in full.gm.parameters()}
    assert skeleton.quantized.keys() == full.quantized.keys()
    ids = program.probe_input(batch=2, length=8)
    with torch.no_grad():
        for cached in (skeleton, full):
            kv = cached.cache.allocate(2, 8, torch.float32)
            steps = torch.cat([cached.step(ids[:, :4], 0, kv), *(cached.step(ids[:, t:t + 1], t, kv) for t in range(4, 8))], 1)
            torch.testing.assert_close(steps, program(ids), rtol=1e-4, atol=1e-5)


def test_a_skeleton_refuses_a_replay_that_builds_another_graph():
    """A pass whose replay edits elsewhere than it did (it does not fix its choice): shapes alone cannot show it,
    the logits with the reference's weights do."""
    from fxslice import Pass, PassResult
    from fxslice.core.graph import aten

    class DoubleNextResidual(Pass):
        name, exact = "double_next_residual", False

        def __init__(self):
            self.calls = 0

        def call(self, program):
            adds = list(program.graph.find_nodes(op="call_function", target=aten.add.Tensor))
            node = adds[self.calls]
            self.calls += 1
            with program.graph.inserting_after(node):
                doubled = program.graph.call_function(aten.mul.Tensor, (node, 2.0))
            node.replace_all_uses_with(doubled, delete_user_cb=lambda user: user is not doubled)
            program.gm.recompile()
            return PassResult(True)

    model = tiny_causal_lm("llama")
    program = capture_module(model)
    result = PassManager([CleanupIR(), DoubleNextResidual()]).run(program)
    with pytest.raises(PassCheckFailed, match="logits differ"):
        replay(result.passes, capture_cached(model).skeleton(), program)
