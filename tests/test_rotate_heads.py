"""RotateHeads: each value head and the columns that read it, rotated together, exactly, on every family whose
values reach attention by data movement alone; the pairs come from the graph, and a graph that mixes the head
dimension between attention and the output linear gets none."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fxslice import InvalidOption, PassManager, PassResult, capture, replay
from fxslice.analysis.groups import group_analysis
from fxslice.core.graph import tensor_of
from fxslice.models.kvcache import capture_cached
from fxslice.passes.slicegpt.rotate_heads import RotateHeads, head_hadamard
from fxslice.testing import check_exact_pass

# separate q/k/v (GQA, a value bias), fused QKV (Linear and Conv1D layouts), multi-query, q/k norms, MoE MLPs
FAMILIES = ["llama", "qwen2", "phi3", "gpt2", "falcon", "gpt_neox", "olmo2", "mixtral", "gemma3"]


def haar(index: int, width: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(width, width, generator=torch.Generator().manual_seed(index),
                                       dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


class RotateHeadsOnce(RotateHeads):
    """Rotating rotated heads is a new rotation, not a no-op; the shared checker's idempotence check asks for a
    pass that does it once."""

    def call(self, program):
        if program.gm.meta.get("heads_rotated"):
            return PassResult(False)
        program.gm.meta["heads_rotated"] = True
        return super().call(program)


def test_rotating_value_heads_is_exact_on_every_family(tiny_programs):
    reports = check_exact_pass(lambda: RotateHeadsOnce(haar), tiny_programs(*FAMILIES))
    assert len(reports) == 2 * len(FAMILIES)


def test_rotating_value_heads_is_exact_on_a_kv_cache_capture_and_replays_onto_it(tiny):
    model, program = tiny("llama")
    cached = capture_cached(model)
    ids = program.probe_input(batch=2, length=9)
    before = cached(ids)
    result = PassManager([RotateHeads(head_hadamard(3))]).run(program)
    replay(result.passes, cached, program)  # raises unless every weight comes out bit-identical
    torch.testing.assert_close(cached(ids), before, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cached(ids), program(ids), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("name", "kv_heads", "readers"), [("llama", 2, 2), ("falcon", 1, 4), ("phi3", 4, 1)])
def test_each_value_head_is_found_once_with_every_query_head_that_reads_it(tiny, name, kv_heads, readers):
    _, program = tiny(name)
    groups = program.analysis(group_analysis)
    heads = groups.value_heads
    layers = {h.attention for h in heads}
    assert len(layers) == 2 and len(heads) == 2 * kv_heads
    for layer in layers:
        mine = [h for h in heads if h.attention == layer]
        rows = [r for h in mine for r in h.rows]
        cols = [c for h in mine for reader in h.cols for c in reader]
        assert all(len(h.cols) == readers for h in mine)
        assert len(set(rows)) == len(rows) == kv_heads * 16  # head width 16: no row in two heads
        output = groups.linears[mine[0].output]
        assert sorted(cols) == list(range(tensor_of(program.gm, output.weight).shape[output.in_axis]))


class GatedAttention(torch.nn.Module):
    """One attention layer whose output is either read by the output linear directly or first gated channel by
    channel (as some recent models do): the gate mixes nothing across the head, but it does not commute with a
    rotation of it, so only the plain layer has value heads."""

    def __init__(self, gated: bool):
        super().__init__()
        torch.manual_seed(0)
        self.gated = gated
        self.embed = torch.nn.Embedding(32, 16)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(16, 16) for _ in range(4))
        self.gate = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 32)

    def forward(self, input_ids, use_cache=False):
        x = self.embed(input_ids)
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, 2, 8).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, 16)
        if self.gated:
            a = a * torch.sigmoid(self.gate(x))
        return self.head(x + self.o(a))


def test_a_gate_between_attention_and_the_output_linear_leaves_no_value_heads():
    plain, gated = capture(GatedAttention(gated=False)), capture(GatedAttention(gated=True))
    assert len(plain.analysis(group_analysis).value_heads) == 2
    assert gated.analysis(group_analysis).value_heads == []
    assert not PassManager([RotateHeads(haar)]).run(gated).records[0].modified
    ids = torch.randint(0, 32, (2, 7))
    before = plain(ids)
    PassManager([RotateHeads(haar)]).run(plain)
    torch.testing.assert_close(plain(ids), before, rtol=1e-5, atol=1e-6)


def test_a_rotation_that_is_not_orthogonal_or_not_given_is_refused(tiny):
    _, program = tiny("llama")
    with pytest.raises(InvalidOption, match="not an orthogonal"):
        PassManager([RotateHeads(lambda i, width: torch.ones(width, width))]).run(program)
    with pytest.raises(InvalidOption, match="no rotation given"):
        PassManager([RotateHeads({})]).run(program)


def test_the_model_is_unchanged_but_its_value_and_output_weights_move(tiny):
    model, program = tiny("qwen2")  # a value bias, which must turn with its rows
    head = program.analysis(group_analysis).value_heads[0]
    before = {n: tensor_of(program.gm, n).clone() for n in (head.value, head.output)}
    PassManager([RotateHeads(haar)]).run(program)
    for name, value in before.items():
        assert not torch.allclose(tensor_of(program.gm, name), value), name
    ids = program.probe_input(batch=2, length=9)
    torch.testing.assert_close(program(ids), model(ids).logits, rtol=1e-4, atol=1e-5)


def test_the_rotate_stage_turns_the_heads_with_the_stream_exactly(tiny):
    from fxslice.passes.rewrite.stages import Cleanup
    from fxslice.passes.slicegpt.stages import Rotate
    from fxslice.recipes import Recipe

    model, program = tiny("llama")
    result = Recipe((Cleanup(), Rotate(rotation="hadamard", heads=True))).run(program)
    records = result.stages[-1][1].records
    assert records[-1].name == "rotate_heads" and records[-1].modified and records[-1].float64_error < 1e-10
    ids = program.probe_input(batch=2, length=9)
    torch.testing.assert_close(program(ids), model(ids).logits, rtol=1e-4, atol=1e-5)
    with pytest.raises(InvalidOption, match="goes with rotation='hadamard'"):
        Rotate(rotation="random", heads=True)
