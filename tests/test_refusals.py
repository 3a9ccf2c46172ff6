"""Structures that break invariance are refused with the node, the module and the source line."""

import pytest
import torch
import transformers
from torch import nn

from fxslice import PassManager, UnsupportedStructure, capture
from fxslice.analysis.stream import stream_analysis
from fxslice.core import relative_error
from fxslice.passes import CleanupIR, exact_pipeline
from fxslice.passes.slicegpt.rotations import random_orthogonal


class TinyLM(nn.Module):
    """embed -> h + mlp(norm(h)) -> [something on the stream] -> norm -> head."""

    def __init__(self, on_stream):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(32, 16)
        self.norm, self.final = nn.LayerNorm(16), nn.LayerNorm(16)
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)
        self.scale = nn.Parameter(torch.rand(16) + 0.5)
        self.other = nn.Linear(16, 4)
        self.head = nn.Linear(16, 32)
        self.on_stream = on_stream

    def forward(self, input_ids, use_cache=False):
        h = self.embed(input_ids)
        if self.on_stream == "repeat":  # whole rows copied (Llama-4 repeats tokens per expert): not a breaker
            h = h + self.down(torch.relu(self.up(self.norm(h).repeat(1, 2, 1))))[:, ::2]
        else:
            h = h + self.down(torch.relu(self.up(self.norm(h))))
        if self.on_stream == "gelu":
            h = torch.nn.functional.gelu(h)
        elif self.on_stream == "scale":
            h = h * self.scale
        elif self.on_stream == "centre":
            h = h - h.mean(-1, keepdim=True)
        elif self.on_stream == "concat":
            h = torch.cat([h[..., :12], self.other(h)], dim=-1)
        return self.head(self.final(h))


def assert_rotation_is_exact(program) -> None:
    """The exact pipeline with a random rotation, numerics checked after every pass, changes no logit."""
    ids = program.probe_input()
    before = program(ids)
    PassManager(exact_pipeline(random_orthogonal(0)), check_numerics=True).run(program)
    assert relative_error(program(ids), before) < 1e-9


def slice_checked(dense):
    """Slice a copy of `dense` at 25 %, after checking that slicing at full width is a change of basis only (the
    same logits); the sliced copy, its logits' shape checked."""
    from fxslice.passes.slicegpt.pipeline import slicegpt
    from fxslice.passes.slicegpt.slice_stream import constant_widths

    windows = torch.randint(0, 32, (4, 12))
    kept = dense.clone()
    slicegpt(kept, windows, constant_widths(0.0, multiple=4))
    assert relative_error(kept(windows), dense(windows)) < 1e-9
    sliced = dense.clone()
    slicegpt(sliced, windows, constant_widths(0.25, multiple=4))
    assert sliced(windows).shape == (4, 12, 32)
    return sliced


def cleaned_stream(model):
    """The stream analysis of `model`'s capture after the IR clean-up."""
    program = capture(model)
    PassManager([CleanupIR()]).run(program)
    return program.analysis(stream_analysis)


@pytest.mark.parametrize("on_stream,op", [("gelu", "gelu"), ("scale", "mul"), ("centre", "sub"), ("concat", "slice")])
def test_non_linear_stream_ops_are_refused_by_name(on_stream, op):
    program = capture(TinyLM(on_stream)).to(torch.float64)
    with pytest.raises(UnsupportedStructure) as info:
        PassManager(exact_pipeline(random_orthogonal(0))).run(program)
    message = str(info.value)
    assert f"{op}" in message and "source:" in message and "test_refusals.py" in message
    print(message)


@pytest.mark.parametrize("on_stream", ["none", "repeat"])
def test_the_same_model_without_the_op_is_accepted_and_exact(on_stream):
    program = capture(TinyLM(on_stream)).to(torch.float64)
    assert_rotation_is_exact(program)


def test_post_norm_model_is_refused():
    config = transformers.OPTConfig(hidden_size=32, ffn_dim=64, num_attention_heads=4, num_hidden_layers=2,
                                    vocab_size=64, do_layer_norm_before=False, word_embed_proj_dim=32)
    program = capture(transformers.OPTForCausalLM(config).eval())
    with pytest.raises(UnsupportedStructure, match="post-norm"):
        PassManager(exact_pipeline(random_orthogonal(0))).run(program)


class PositionCoded(TinyLM):
    """A sinusoidal position code (computed from positions, never from the stream) added to the embeddings,
    as CTRL does."""

    def forward(self, input_ids, use_cache=False):
        positions = torch.arange(input_ids.shape[1], dtype=torch.float32)[:, None]
        code = torch.sin(positions * torch.linspace(0.1, 1.0, 16))  # [length, 16]
        h = self.embed(input_ids) + code
        h = h + self.down(torch.relu(self.up(self.norm(h))))
        return self.head(self.final(h))


def test_a_value_entering_the_stream_without_reading_it_gets_a_projection_and_stays_exact():
    from fxslice.passes import slicegpt_recipe

    program = capture(PositionCoded("none")).to(torch.float64)
    assert [w.kind for w in program.analysis(stream_analysis).writers].count("other") == 1
    assert_rotation_is_exact(program)
    sliced = capture(PositionCoded("none"))
    slicegpt_recipe(sparsity=0.25, batch_size=4).run(sliced, calibration=torch.randint(0, 32, (8, 12)))
    assert sliced(program.probe_input()).shape == (2, 12, 32)


class PositionTable(TinyLM):
    """CTRL's stream start: the embedding scaled in place, plus rows of a position table (a buffer, indexed by
    position), plus `0` for an absent token-type embedding — LayerNorms after it, so the position rows must be
    centred like every other writer."""

    def __init__(self, on_stream):
        super().__init__(on_stream)
        self.register_buffer("table", torch.randn(64, 16))

    def forward(self, input_ids, use_cache=False):
        h = self.embed(input_ids)
        h *= 4.0
        h = h + self.table[torch.arange(input_ids.shape[1])] + 0
        h = h + self.down(torch.relu(self.up(self.norm(h))))
        return self.head(self.final(h))


def test_rows_of_a_parameter_entering_the_stream_are_a_writer_not_a_silent_error():
    program = capture(PositionTable("none")).to(torch.float64)
    assert_rotation_is_exact(program)
    stream = cleaned_stream(PositionTable("none"))  # the clean-up drops the `+ 0`
    assert not stream.violations
    kinds = [w.kind for w in stream.writers]  # the embedding scaled in place is still the embedding
    assert kinds.count("other") == 1 and kinds.count("embedding") == 1  # the position rows need a projection


class SeparateBias(TinyLM):
    """GPT-NeoX-Japanese's attention output: a bias-free linear, then its bias (a parameter of its own) expanded
    to the stream's shape and added, then the residual: the sum is the linear's bias, not a value entering."""

    def __init__(self, on_stream):
        super().__init__(on_stream)
        self.down.bias = None
        self.down_bias = nn.Parameter(torch.randn(16))

    def forward(self, input_ids, use_cache=False):
        h = self.embed(input_ids)
        h = self.down(torch.relu(self.up(self.norm(h)))) + self.down_bias.expand_as(h) + h
        return self.head(self.final(h))


def test_a_bias_added_after_its_linear_is_that_linears_bias():
    program = capture(SeparateBias("none")).to(torch.float64)
    assert_rotation_is_exact(program)
    writers = cleaned_stream(SeparateBias("none")).writers
    assert [w.kind for w in writers] == ["embedding", "linear"] and writers[1].linear.bias is not None


class StackedExperts(TinyLM):
    """Llama-4's experts: every token copied once per expert, then `bmm` against [experts, in, out] parameters."""

    def __init__(self, on_stream):
        super().__init__(on_stream)
        self.norm, self.final = nn.RMSNorm(16), nn.RMSNorm(16)  # no shift to absorb into the expert stacks
        for norm in (self.norm, self.final):
            norm.weight.data = torch.rand(16) + 0.5
        self.gate_up = nn.Parameter(torch.randn(3, 16, 32) / 4)
        self.experts_down = nn.Parameter(torch.randn(3, 32, 16) / 6)

    def forward(self, input_ids, use_cache=False):
        h = self.embed(input_ids)
        x = self.norm(h).reshape(-1, 16)
        routed = torch.bmm(x.repeat(3, 1).view(3, -1, 16), self.gate_up)
        out = torch.bmm(torch.relu(routed), self.experts_down).view(3, -1, 16).sum(0)
        h = h + out.view(h.shape)
        return self.head(self.final(h))


def test_bmm_against_stacked_expert_weights_is_a_linear():
    program = capture(StackedExperts("none")).to(torch.float64)
    kinds = [r.linear.node.target for r in program.analysis(stream_analysis).readers]
    assert torch.ops.aten.bmm.default in kinds
    assert_rotation_is_exact(program)


class RoutedRows(TinyLM):
    """JetMoE's experts written out: tokens gathered and split by expert (rows, not features), `linear(x_i, W[i])`
    against a stacked parameter, the rows added back into zeros at their tokens (`index_add`), then a bias vector
    on the stream. `swapped` then swaps the two halves of the stream's features (a split along features: a breaker)."""

    def __init__(self, on_stream):
        super().__init__(on_stream)
        self.norm, self.final = nn.RMSNorm(16), nn.RMSNorm(16)
        for norm in (self.norm, self.final):
            norm.weight.data = torch.rand(16) + 0.5
        self.experts_in = nn.Parameter(torch.randn(2, 32, 16) / 4)
        self.experts_out = nn.Parameter(torch.randn(2, 16, 32) / 6)
        self.bias = nn.Parameter(torch.randn(16))

    def forward(self, input_ids, use_cache=False):
        h = self.embed(input_ids)
        x = self.norm(h).reshape(-1, 16)
        order = torch.arange(x.shape[0] - 1, -1, -1)  # a permutation of the tokens, as a router's sort gives
        parts = x[order].split([1, x.shape[0] - 1], dim=0)
        y = torch.cat([nn.functional.linear(torch.relu(nn.functional.linear(p, self.experts_in[i])),
                                            self.experts_out[i]) for i, p in enumerate(parts)], dim=0)
        out = torch.zeros(x.shape[0], 16, dtype=y.dtype).index_add(0, order, y).view(h.shape) + self.bias
        h = h + out
        if self.on_stream == "swapped":
            h = torch.cat(h.split([8, 8], dim=-1)[::-1], dim=-1)
        return self.head(self.final(h))


def test_rows_split_by_expert_and_added_back_into_zeros_rotate_and_slice_exactly():
    program = capture(RoutedRows("none")).to(torch.float64)
    dense = program.clone()
    assert_rotation_is_exact(program)
    stream = program.analysis(stream_analysis)
    assert [w.kind for w in stream.writers] == ["embedding", "linear", "linear", "bias"]  # no projection needed
    assert not any("projection" in name for name, _ in program.gm.named_parameters())
    sliced = slice_checked(dense)
    assert sliced.num_parameters() < dense.num_parameters()
    assert {tuple(p.shape) for n, p in sliced.gm.named_parameters() if n.startswith("bias")} == {(12,)}


def test_a_split_of_the_features_is_still_refused():
    program = capture(RoutedRows("swapped")).to(torch.float64)
    with pytest.raises(UnsupportedStructure, match="split"):
        PassManager(exact_pipeline(random_orthogonal(0))).run(program)


class ShiftedExperts(TinyLM):
    """PhiMoE's layout: a LayerNorm with a shift in front of expert weights stacked in one parameter and applied
    by transformers' grouped matmul (rows sorted by expert), which has no bias to absorb the shift."""

    def __init__(self):
        super().__init__("none")
        for norm in (self.norm, self.final):
            norm.weight.data, norm.bias.data = torch.rand(16) + 0.5, torch.rand(16) + 0.5
        self.experts_in = nn.Parameter(torch.randn(2, 16, 32) / 4)
        self.experts_out = nn.Parameter(torch.randn(2, 32, 16) / 6)

    def forward(self, input_ids, use_cache=False):
        h = self.embed(input_ids)
        x = self.norm(h).reshape(-1, 16)
        offsets = torch.tensor([1, x.shape[0]], dtype=torch.int32)  # expert 0 takes the first row, 1 the rest
        import transformers.integrations.moe  # noqa: F401 - registers torch.ops.transformers.grouped_mm_fallback

        grouped = torch.ops.transformers.grouped_mm_fallback
        y = grouped(torch.relu(grouped(x, self.experts_in, offsets)), self.experts_out, offsets)
        return self.head(self.final(h + y.view(h.shape)))


def test_a_norm_shift_in_front_of_expert_weights_rotates_and_slices_exactly():
    dense = capture(ShiftedExperts()).to(torch.float64)
    program = dense.clone()
    assert_rotation_is_exact(program)
    shifts = [s for seg in program.analysis(stream_analysis).segments for s in seg.shifts]
    assert len(shifts) == 1  # one shift kept in front of the first expert matmul, in the stream's basis
    sliced = slice_checked(dense)
    assert {tuple(p.shape) for n, p in sliced.gm.named_parameters() if "shift" in n} == {(12,)}


def test_a_zero_scale_in_front_of_expert_weights_is_refused_by_name():
    model = ShiftedExperts()
    model.norm.weight.data[3] = 0.0  # the shift cannot move in front of the scaled weights: it would divide by 0
    program = capture(model).to(torch.float64)
    with pytest.raises(UnsupportedStructure, match="zero scale.*\n.*grouped_mm_fallback"):
        PassManager(exact_pipeline(random_orthogonal(0))).run(program)


class MaskedRows(TinyLM):
    """transformers 5.15's experts zero the rows of tokens no expert took (`masked_fill_(x, mask[..., None], 0)`):
    whole rows set to zero are zero in every basis. `fill` sets them to another value (an affine map: a breaker),
    `per_feature` masks single features (a breaker)."""

    def __init__(self, fill=0.0, per_feature=False):
        super().__init__("none")
        self.fill, self.per_feature = fill, per_feature

    def forward(self, input_ids, use_cache=False):
        h = self.embed(input_ids)
        x = self.norm(h)
        mask = (input_ids % 3 == 0)[..., None]
        if self.per_feature:
            mask = mask & (torch.arange(16) % 2 == 0)
        x = x.clone()
        x.masked_fill_(mask, self.fill)
        h = h + self.down(torch.relu(self.up(x)))
        return self.head(self.final(h))


def test_rows_zeroed_by_a_mask_keep_the_stream_and_rotate_exactly():
    program = capture(MaskedRows()).to(torch.float64)
    assert torch.ops.aten.masked_fill_.Scalar in {n.target for n in program.graph.nodes}  # the spelling under test
    assert_rotation_is_exact(program)


@pytest.mark.parametrize("fill,per_feature", [(1.0, False), (0.0, True)])
def test_rows_filled_with_a_constant_or_masked_features_are_refused(fill, per_feature):
    program = capture(MaskedRows(fill, per_feature)).to(torch.float64)
    with pytest.raises(UnsupportedStructure, match="masked_fill"):
        PassManager(exact_pipeline(random_orthogonal(0))).run(program)
