import pytest
import torch
from torch import nn

import fxslice
from fxslice import CaptureError, capture
from fxslice.core import relative_error
from fxslice.core.graph import tensor_of
from fxslice.testing import TINY_CONFIGS, lifted_float32

FAMILIES = ["llama", "qwen2", "gemma3", "opt", "gpt2", "gpt_neox", "phi", "falcon", "bloom", "mixtral"]


@pytest.mark.parametrize("name", FAMILIES)
def test_exported_logits_equal_eager(tiny, name):
    model, program = tiny(name)
    ids = torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(1))  # not the export's shape
    with torch.no_grad():
        eager = model(ids, use_cache=False).logits
        graph = program(ids)
    diff = (graph - eager).abs().max().item()
    print(f"{name}: max abs diff exported vs eager = {diff:.3g}")
    assert graph.shape == eager.shape
    assert diff <= 1e-5


@pytest.mark.parametrize("name", ["llama", "gpt2", "llama-tied"])
def test_weights_keep_their_qualified_names(tiny, name):
    model, program = tiny(name)
    state = dict(model.named_parameters(remove_duplicate=False))
    weights = [n for n in program.graph.nodes if n.op == "get_attr" and n.users and "rotary" not in n.target]
    assert weights
    for node in weights:
        if node.target in state:
            assert torch.equal(tensor_of(program.gm, node), state[node.target].detach())
    assert {n.target for n in weights} <= set(dict(model.named_parameters(remove_duplicate=False))) | set(
        dict(model.named_buffers())
    )
    assert any(t.endswith("layers.1.self_attn.q_proj.weight") or t.endswith("h.1.attn.c_attn.weight") for t in state)


def test_program_computes_in_float64_including_internal_casts(tiny):
    model, program = tiny("llama")
    p64 = program.to(torch.float64)
    assert p64.dtype == torch.float64
    casts = [n for n in p64.graph.nodes if n.kwargs.get("dtype") == torch.float32 or torch.float32 in n.args]
    assert not casts
    ids = program.probe_input()
    assert p64(ids).dtype == torch.float64
    assert torch.allclose(p64(ids).float(), program(ids), atol=1e-4)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_the_float64_program_equals_the_float64_model_without_float32_islands(tiny, name):
    """HF code rounds to float32 on purpose (norms, rotary, eager softmax), in a float64 model too; with those casts
    lifted on both sides the program equals the model to round-off, so a float64 check sees errors of 1e-12."""
    import copy

    model, program = tiny(name)
    model = copy.deepcopy(model).double()
    if getattr(model.config, "_experts_implementation", None) not in (None, "eager"):
        model.config._experts_implementation = "batched_mm"  # grouped expert matmuls have no float64 kernel
    p64 = program.to(torch.float64)
    ids = program.probe_input()
    with torch.no_grad(), lifted_float32():
        reference = model(ids, use_cache=False).logits
    assert relative_error(p64(ids), reference) <= 1e-12


def test_the_float32_islands_are_real_and_lifted_on_both_sides(tiny):
    model, program = tiny("llama")
    model = __import__("copy").deepcopy(model).double()
    ids = program.probe_input()
    with torch.no_grad():
        plain = model(ids, use_cache=False).logits  # its RMSNorm rounds to float32
        with lifted_float32():
            lifted = model(ids, use_cache=False).logits
            assert torch.ones(2, dtype=torch.float32).dtype == torch.float64 and lifted.dtype == torch.float64
    p64 = program.to(torch.float64)
    assert relative_error(plain, p64(ids)) > 1e-10  # what a float64 check would have mistaken for a pass's error
    assert relative_error(lifted, p64(ids)) <= 1e-12


class ComplexRotary(nn.Module):
    """A rotary table kept as complex numbers and cast to `table_dtype` (Llama-4's and DeepSeek-V2's rotary)."""

    def __init__(self, table_dtype=torch.complex64):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Embedding(16, 8), nn.Linear(8, 16)
        self.freq = nn.Parameter(torch.rand(4) * 3)
        self.table_dtype = table_dtype

    def forward(self, input_ids, use_cache=False):
        h = self.embed(input_ids)
        angles = torch.arange(h.shape[1], dtype=h.dtype)[:, None] * self.freq
        table = torch.polar(torch.ones_like(angles), angles).to(self.table_dtype)
        z = torch.view_as_complex(h.reshape(*h.shape[:2], 4, 2)) * table
        return self.head(torch.view_as_real(z).reshape(h.shape))


def test_complex_casts_follow_the_program_to_float64():
    program = capture(ComplexRotary())
    p64 = program.to(torch.float64)
    complex64 = [n.name for n in p64.graph.nodes
                 if isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dtype == torch.complex64]
    assert complex64 == []
    reference = ComplexRotary(torch.complex128).double()
    ids = torch.randint(0, 16, (2, 7))
    with torch.no_grad():
        assert relative_error(p64(ids), reference(ids)) <= 1e-12
        assert relative_error(ComplexRotary().double()(ids), reference(ids)) > 1e-10  # the island is real


class LiteralCutoff(nn.Module):
    """A number written in the code as a float32 tensor (Gemma-3n's activation sparsity, 0.95), then computed on."""

    def __init__(self, literal_dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Embedding(16, 8), nn.Linear(8, 16)
        self.literal_dtype = literal_dtype

    def forward(self, input_ids, use_cache=False):
        h = self.embed(input_ids)
        sparsity = torch.tensor(0.95, dtype=self.literal_dtype)
        cutoff = torch.erfinv(2 * sparsity - 1).to(h.dtype)
        return self.head(torch.relu(h - cutoff * h.std(-1, keepdim=True)))


def test_float32_literals_become_the_number_in_float64():
    p64 = capture(LiteralCutoff()).to(torch.float64)
    reference = LiteralCutoff(torch.float64).double()
    ids = torch.randint(0, 16, (2, 7))
    with torch.no_grad():
        assert relative_error(p64(ids), reference(ids)) <= 1e-12
        assert relative_error(LiteralCutoff().double()(ids), reference(ids)) > 1e-10  # the island is real
    p32 = capture(LiteralCutoff()).to(torch.float32)  # no lift below float64: the float32 value stays bit for bit
    assert torch.equal(p32(ids), LiteralCutoff()(ids))


class NoDoubleKernel(nn.Module):
    """Runs eagerly in float32 only (as transformers' grouped experts), and its export computes something else than
    the model (as a routing baked in at trace time would)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Embedding(16, 8), nn.Linear(8, 16)

    def forward(self, input_ids, use_cache=False):
        h = self.embed(input_ids)
        if torch.compiler.is_exporting():
            return self.head(2 * h)
        if h.dtype == torch.float64:
            raise RuntimeError("Expected mat_a to be Float32, BFloat16 or Float16 matrix, got Double")
        return self.head(h)


def test_the_other_shape_check_compares_in_float32_where_float64_has_no_kernel():
    with pytest.warns(UserWarning, match="only with static shapes"):  # the dynamic export was found to differ
        program = capture(NoDoubleKernel().double())
    assert program.static_shape is not None


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)

    def forward(self, input_ids, use_cache=False):
        h = self.embed(input_ids)
        if h.sum() > 0:  # data-dependent Python control flow: torch.export cannot trace it
            return h * 2
        return h


def test_untraceable_model_gives_one_clear_error():
    with pytest.raises(CaptureError) as info:
        capture(DataDependent())
    message = str(info.value)
    assert "DataDependent" in message and "what to try" in message


class KwargsOnly(nn.Module):
    """A causal LM whose `forward` takes `use_cache` only through `**kwargs` (as GPT-1 and Granite-MoE do)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.lm = inner

    def forward(self, input_ids=None, **kwargs):
        return self.lm(input_ids=input_ids, **kwargs)


def test_a_model_taking_use_cache_through_kwargs_captures_with_dynamic_shapes(tiny):
    model, bare = tiny("llama")
    program = capture(KwargsOnly(model))
    assert program.static_shape is None
    names = {n.target for n in program.graph.nodes if n.op == "get_attr"}
    assert names == {"lm." + n.target for n in bare.graph.nodes if n.op == "get_attr"}  # no wrapper prefix leaks
    for shape in [(1, 5), (3, 11)]:
        ids = torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            assert torch.allclose(program(ids), model(ids, use_cache=False).logits, atol=1e-5)


class LengthBaked(nn.Module):
    """Exports with dynamic shapes yet only works at the example's length (CpmAnt's prompt offsets do this)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10)

    def forward(self, input_ids, use_cache=False):
        h = self.embed(input_ids)
        if input_ids.shape[1] == 16:  # specialises the length to 16 without failing the dynamic export
            h = h * 2
        return (self.head(h),)


def test_a_size_baked_into_the_code_gives_a_static_program_that_says_so(tmp_path):
    model = LengthBaked().eval()
    with pytest.warns(UserWarning, match="static shapes"):
        program = capture(model)
    assert program.static_shape == (2, 16)
    ids = torch.randint(0, 10, (2, 16))
    assert torch.equal(program(ids), model(ids)[0])
    with pytest.raises(ValueError, match=r"static shapes and takes input_ids of shape \(2, 16\) only, not \(2, 9\)"):
        program(ids[:, :9])
    assert program.probe_input().shape == (2, 16)
    fxslice.save(program, tmp_path / "static")
    assert fxslice.load(tmp_path / "static").static_shape == (2, 16)


def test_missing_model_path_is_a_capture_error(tmp_path):
    with pytest.raises(CaptureError, match="not found"):
        capture(tmp_path / "nothing.gguf")


@pytest.mark.slow
def test_smollm2_capture_equals_eager(smollm2):
    model, program = smollm2
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 2]])
    with torch.no_grad():
        diff = (program(ids) - model(ids, use_cache=False).logits).abs().max().item()
    print(f"SmolLM2-135M: max abs diff exported vs eager = {diff:.3g}")
    assert diff <= 1e-5
    assert program.num_parameters() == sum(p.numel() for p in model.parameters())


class _NanoGPTStyle(torch.nn.Module):
    """A model of one's own: tokens as `idx`, an optional `targets`, a dict out with the logits under a key."""

    def __init__(self, width=16, vocab=40, output="dict"):
        super().__init__()
        self.output = output
        self.embed = torch.nn.Embedding(vocab, width)
        self.norms = torch.nn.ModuleList([torch.nn.RMSNorm(width), torch.nn.RMSNorm(width)])
        self.up, self.down = torch.nn.Linear(width, 4 * width), torch.nn.Linear(4 * width, width)
        self.head = torch.nn.Linear(width, vocab, bias=False)
        for norm in self.norms:
            torch.nn.init.uniform_(norm.weight, 0.5, 1.5)

    def forward(self, idx, targets=None):
        h = self.embed(idx)
        h = h + self.down(torch.relu(self.up(self.norms[0](h))))
        logits = self.head(self.norms[1](h))
        if self.output == "dict":
            return {"loss": None, "logits": logits}
        if self.output == "tuple":
            return logits, None
        return {"scores": logits}


@pytest.mark.parametrize("output", ["dict", "tuple"])
def test_a_plain_module_with_its_own_names_and_outputs_captures_with_dynamic_shapes_and_slices(output):
    from fxslice.passes import slicegpt_recipe

    torch.manual_seed(0)
    model = _NanoGPTStyle(output=output).double()
    program = capture(model)
    assert program.static_shape is None and program.input_names == ["input_ids"]
    ids = program.probe_input(batch=3, length=9)
    want = model(ids)["logits"] if output == "dict" else model(ids)[0]
    assert torch.allclose(program(ids), want, rtol=0, atol=1e-12)
    calibration = torch.randint(0, 40, (4, 12), generator=torch.Generator().manual_seed(1))
    slicegpt_recipe(sparsity=0.25).run(program, calibration=calibration)
    assert program(ids).shape == (3, 9, 40) and program.num_parameters() < sum(p.numel() for p in model.parameters())


def test_a_plain_module_whose_logits_are_elsewhere_is_told_how_to_name_them():
    model = _NanoGPTStyle(output="scores")
    with pytest.raises(CaptureError, match=r"keys \['scores'\] and no 'logits'; name the logits: capture\(model, logits=KEY\)"):
        capture(model)
    program = capture(model, logits="scores")
    ids = program.probe_input()
    assert torch.allclose(program(ids), model(ids)["scores"])


def test_a_module_that_needs_more_than_tokens_is_refused_with_the_contract():
    class NeedsMask(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)

        def forward(self, tokens, mask):
            return self.embed(tokens) * mask

    with pytest.raises(CaptureError, match="also requires mask: capture takes a module called on one tensor"):
        capture(NeedsMask())
