"""CausalAttention: a verified causal mask becomes is_causal=True; exact, idempotent, and picky about masks."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fxslice import PassManager, capture_module
from fxslice.core.graph import aten
from fxslice.models.kvcache import capture_cached
from fxslice.passes import CausalAttention, CleanupIR
from fxslice.testing import check_exact_pass, check_pass_leaves_alone, tiny_causal_lm

SDPA = aten.scaled_dot_product_attention.default
FAMILIES = ["llama", "gpt2", "opt", "phi", "falcon", "gpt_neox", "mixtral", "olmo2", "qwen3"]


def _attention(program):
    return list(program.graph.find_nodes(op="call_function", target=SDPA))


def _masked(program):
    return [n for n in _attention(program) if len(n.args) > 3 or n.kwargs.get("attn_mask") is not None]


@pytest.mark.parametrize("name", FAMILIES)
def test_causal_attention_is_exact_in_float64(name):
    model = tiny_causal_lm(name, dtype=torch.float64)
    program = capture_module(model)
    ids = torch.randint(3, 128, (2, 23), generator=torch.Generator().manual_seed(0))
    before, nodes = program(ids), len(program.graph.nodes)
    result = PassManager([CleanupIR(), CausalAttention()], check_numerics=True).run(program)
    assert result.records[-1].info["rewritten"] == model.config.num_hidden_layers
    assert all(n.kwargs.get("is_causal") for n in _attention(program)) and not _masked(program)
    assert len(program.graph.nodes) < nodes  # the mask's subgraph is gone
    torch.testing.assert_close(program(ids), before, rtol=1e-12, atol=1e-12)
    assert not PassManager([CausalAttention()]).run(program).modified, "a second run must find nothing"


def test_sliding_window_masks_stay_explicit():
    program = capture_module(tiny_causal_lm("gemma3"))  # window 16: both tiny layers slide
    masked = len(_masked(program))
    assert masked and not PassManager([CausalAttention()]).run(program).modified
    assert len(_masked(program)) == masked


def test_a_kv_cache_graph_is_left_alone():
    """Keys are longer than queries there: is_causal's top-left alignment would be wrong."""
    program = capture_cached(tiny_causal_lm("llama"))
    assert not PassManager([CausalAttention()]).run(program).modified


class _SizeMask(nn.Module):
    """Attention whose mask is built from the sequence length alone: causal, or causal within a window."""

    def __init__(self, window: int | None):
        super().__init__()
        self.window = window
        self.embed = nn.Embedding(32, 16)

    def forward(self, input_ids, use_cache=None):
        x = self.embed(input_ids).view(*input_ids.shape, 2, 8).transpose(1, 2)
        pos = torch.arange(input_ids.shape[1])
        mask = pos[:, None] >= pos[None, :]
        if self.window is not None:
            mask = mask & (pos[:, None] - pos[None, :] < self.window)
        return nn.functional.scaled_dot_product_attention(x, x, x, attn_mask=mask).sum(1)


@settings(max_examples=8, deadline=None)
@given(window=st.one_of(st.none(), st.integers(1, 300)), length=st.integers(1, 40))
def test_only_a_mask_that_is_causal_at_every_probed_length_is_rewritten(window, length):
    program = capture_module(_SizeMask(window))
    ids = torch.randint(0, 32, (2, length), generator=torch.Generator().manual_seed(length))
    before = program(ids)
    modified = PassManager([CausalAttention(probe_limit=512)]).run(program).modified
    assert modified is (window is None)
    torch.testing.assert_close(program(ids), before, rtol=1e-6, atol=1e-6)


def test_a_declared_window_longer_than_the_probes_leaves_the_graph_alone():
    program = capture_module(_SizeMask(None))
    program.config = {"max_position_embeddings": 8192, "sliding_window": 4096}
    assert not PassManager([CausalAttention(probe_limit=512)]).run(program).modified
    program.config = {"max_position_embeddings": 8192, "sliding_window": 100}  # probed at 101: causal there
    assert PassManager([CausalAttention(probe_limit=512)]).run(program).modified


def test_causal_attention_passes_the_shared_exact_pass_checks(tiny_programs):
    reports = check_exact_pass(CausalAttention, tiny_programs("llama", "gpt2", "opt", "falcon", "qwen3"),
                               prepare=lambda: [CleanupIR()])
    assert len(reports) == 10


def test_causal_attention_leaves_graphs_without_a_causal_mask_alone(tiny_programs, plain_program):
    check_pass_leaves_alone(CausalAttention, [("no-attention", plain_program), *tiny_programs("gemma3")],
                            prepare=lambda: [CleanupIR()])
