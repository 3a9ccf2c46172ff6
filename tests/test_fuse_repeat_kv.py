"""FuseRepeatKV: grouped-query attention without copying the K/V heads; exact, idempotent, picky."""

import pytest
import torch
from torch import nn

from fxslice import PassManager, capture_module
from fxslice.core.graph import aten
from fxslice.models.kvcache import capture_cached
from fxslice.passes import CleanupIR, FuseRepeatKV
from fxslice.testing import check_exact_pass, check_pass_leaves_alone, tiny_causal_lm

SDPA = aten.scaled_dot_product_attention.default
GQA_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma"]  # (gemma2 soft-caps: eager attention, no SDPA)


def _attention(program):
    return list(program.graph.find_nodes(op="call_function", target=SDPA))


@pytest.mark.parametrize("cached", [False, True], ids=["plain", "kv-cache"])
@pytest.mark.parametrize("name", GQA_FAMILIES)
def test_fused_attention_is_exact_in_float64(name, cached):
    model = tiny_causal_lm(name, dtype=torch.float64)
    program = (capture_cached if cached else capture_module)(model)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    before = program(ids)
    copies = len(program.graph.find_nodes(op="call_function", target=aten.expand.default))
    result = PassManager([CleanupIR(), FuseRepeatKV()], check_numerics=True).run(program)
    assert result.records[-1].info["fused"] == model.config.num_hidden_layers
    assert all(n.kwargs.get("enable_gqa") for n in _attention(program))
    assert len(program.graph.find_nodes(op="call_function", target=aten.expand.default)) < copies
    torch.testing.assert_close(program(ids), before, rtol=1e-12, atol=1e-12)
    assert not PassManager([FuseRepeatKV()]).run(program).modified, "a second run must find nothing"


def test_multi_head_attention_has_nothing_to_fuse():
    program = capture_module(tiny_causal_lm("stablelm"))  # 4 K/V heads for 4 query heads: no repeat_kv
    assert not PassManager([FuseRepeatKV()]).run(program).modified


class _TiledHeads(nn.Module):
    """Repeats K/V heads as h0 h1 h0 h1 (tiling), not h0 h0 h1 h1: `enable_gqa` would pair the wrong heads."""

    def __init__(self, tile: bool):
        super().__init__()
        self.tile = tile
        self.embed = nn.Embedding(32, 16)

    def forward(self, input_ids, use_cache=None):
        x = self.embed(input_ids)  # [b, s, 16]
        b, s, _ = x.shape
        q = x.view(b, s, 4, 4).transpose(1, 2)  # 4 query heads
        k = (x[..., :8] * 2).view(b, s, 2, 4).transpose(1, 2)  # 2 K/V heads
        k = k.unsqueeze(1 if self.tile else 2).expand(b, 2, 2, s, 4).reshape(b, 4, s, 4)
        return nn.functional.scaled_dot_product_attention(q, k, k, is_causal=True).sum(1)


@pytest.mark.parametrize("tile", [False, True], ids=["interleaved", "tiled"])
def test_only_the_interleaved_repeat_is_rewritten(tile):
    program = capture_module(_TiledHeads(tile))
    ids = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(1))
    before = program(ids)
    modified = PassManager([FuseRepeatKV()]).run(program).modified
    assert modified is not tile
    torch.testing.assert_close(program(ids), before, rtol=1e-6, atol=1e-6)


def test_fuse_repeat_kv_passes_the_shared_exact_pass_checks(tiny_programs):
    reports = check_exact_pass(FuseRepeatKV, tiny_programs(*GQA_FAMILIES), prepare=lambda: [CleanupIR()])
    assert len(reports) == 2 * len(GQA_FAMILIES)


def test_fuse_repeat_kv_leaves_graphs_without_repeated_heads_alone(tiny_programs, plain_program):
    check_pass_leaves_alone(FuseRepeatKV, [("no-attention", plain_program), *tiny_programs("stablelm", "gpt2")],
                            prepare=lambda: [CleanupIR()])
