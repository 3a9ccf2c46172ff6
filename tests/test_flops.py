"""The graph FLOP counter against counts done by hand from the config."""

import torch

from fxslice import PassManager, capture_module
from fxslice.analysis.flops import count_flops
from fxslice.models.kvcache import capture_cached
from fxslice.passes import CleanupIR, FuseNorms, ProjectNormWriters
from fxslice.passes.slicegpt.slice_stream import SliceStream, constant_widths
from fxslice.testing import tiny_causal_lm


def _llama_flops(c, tokens: int, batch: int, length: int, d: int, shortcuts: int) -> int:
    """2·tokens·(weights read per token) + attention, for a Llama whose stream is `d` wide."""
    hd = c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    per_layer = d * (q + 2 * kv) + q * d + 2 * d * c.intermediate_size + c.intermediate_size * d
    matmuls = c.num_hidden_layers * per_layer + d * c.vocab_size + shortcuts * d * d
    attention = c.num_hidden_layers * 2 * batch * c.num_attention_heads * length * length * 2 * hd
    return 2 * tokens * matmuls + attention


def test_dense_count_matches_the_hand_count_and_the_cached_graph():
    model = tiny_causal_lm("llama")
    c = model.config
    flops = count_flops(capture_module(model), batch=3, length=20)
    assert flops.total == _llama_flops(c, 60, 3, 20, c.hidden_size, shortcuts=0)
    assert count_flops(capture_cached(model), batch=3, length=20) == flops


def test_sliced_count_matches_the_hand_count_with_shortcuts():
    model = tiny_causal_lm("llama")
    c = model.config
    program = capture_module(model)
    calibration = torch.randint(0, c.vocab_size, (8, 16), generator=torch.Generator().manual_seed(0))
    PassManager([CleanupIR(), ProjectNormWriters(), FuseNorms(),
                 SliceStream(calibration, constant_widths(0.25), batch_size=4)]).run(program)
    segments = 2 * c.num_hidden_layers + 1
    expected = _llama_flops(c, 16, 1, 16, 48, shortcuts=segments - 1)
    assert count_flops(program, batch=1, length=16).total == expected
    dense = count_flops(capture_module(model), batch=1, length=16)
    assert 0.5 < count_flops(program, batch=1, length=16).ratio(dense) < 1
