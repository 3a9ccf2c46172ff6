"""Norm matchers over a product of variants, and FuseNorms: numerics, idempotence, no-op."""

import itertools

import pytest
import torch
from torch import nn

from fxslice import PassManager, capture
from fxslice.analysis.matchers import match_norms
from fxslice.analysis.stream import stream_analysis
from fxslice.core import relative_error
from fxslice.passes import CleanupIR, FuseNorms, ProjectNormWriters, exact_pipeline
from fxslice.passes.slicegpt.rotations import random_orthogonal
from fxslice.testing import check_exact_pass, check_pass_leaves_alone


class RMSVariant(nn.Module):
    """An HF-style decomposed RMSNorm in one of its spellings."""

    def __init__(self, width, *, square, weight, upcast, root="rsqrt"):
        super().__init__()
        self.square, self.weight_kind, self.upcast, self.root, self.eps = square, weight, upcast, root, 1e-5
        self.weight = nn.Parameter(torch.rand(width) + 0.5) if weight != "none" else None

    def forward(self, x):
        h = x.to(torch.float32) if self.upcast else x
        sq = h.pow(2) if self.square == "pow" else h.square() if self.square == "square" else h * h
        variance = sq.mean(-1, keepdim=True) + self.eps
        if self.root in ("sqrt", "pow_half"):  # x / sqrt(v): the textbook spelling
            h = h / (torch.sqrt(variance) if self.root == "sqrt" else variance ** 0.5)
        else:
            h = h * (torch.rsqrt(variance) if self.root == "rsqrt" else torch.pow(variance, -0.5))  # Gemma-4: pow
        h = h.to(x.dtype) if self.upcast else h
        if self.weight_kind == "right":
            h = h * self.weight
        elif self.weight_kind == "left":
            h = self.weight * h
        elif self.weight_kind == "gemma":
            h = h * (1.0 + self.weight)
        return h


class Norms(nn.Module):
    def __init__(self, make_norm, width=16, vocab=40):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, width)
        self.n1, self.n2 = make_norm(width), make_norm(width)
        self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, input_ids, use_cache=False):
        h = self.embed(input_ids)
        h = h + self.down(torch.relu(self.up(self.n1(h))))
        return self.head(self.n2(h))


RMS_VARIANTS = [*itertools.product(["pow", "mul"], ["right", "left", "gemma", "none"], [False, True], ["rsqrt"]),
                ("pow", "right", True, "pow"), ("mul", "none", False, "pow"), ("square", "right", False, "rsqrt"),
                ("square", "left", True, "sqrt"), ("pow", "right", False, "sqrt"), ("mul", "left", False, "pow_half")]


@pytest.mark.parametrize("square,weight,upcast,root", RMS_VARIANTS)
def test_decomposed_rms_variants_are_matched_and_fused_exactly(square, weight, upcast, root):
    make = lambda d: RMSVariant(d, square=square, weight=weight, upcast=upcast, root=root)  # noqa: E731
    program = capture(Norms(make)).to(torch.float64)
    PassManager([CleanupIR()]).run(program)
    norms = match_norms(program.gm)
    assert len(norms) == 2
    for norm in norms:
        assert norm.kind == "rms" and not norm.centres and norm.eps == 1e-5 and norm.width == 16
        assert (norm.weight is not None) == (weight != "none")
        assert norm.weight_offset == (1.0 if weight == "gemma" else 0.0)
    ids = program.probe_input()
    before = program(ids)
    result = PassManager(exact_pipeline(random_orthogonal(1)), check_numerics=True).run(program)
    assert relative_error(program(ids), before) < 1e-9
    fuse = next(r for r in result.records if r.name == "fuse_norms")
    assert fuse.modified  # every variant divides by the current width (mean), which fusion makes explicit
    assert torch.ops.aten.mean.dim not in {n.target for n in program.graph.nodes}


class WeightInsideTheRoot(nn.Module):
    """`w * x / sqrt(mean(x²) + eps)`: scaled before normalising, a spelling the matchers do not fit."""

    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(width) + 0.5)

    def forward(self, x):
        return self.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)


def test_a_norm_spelled_in_an_unrecognised_way_is_refused_as_a_norm():
    from fxslice import UnsupportedStructure

    program = capture(Norms(WeightInsideTheRoot)).to(torch.float64)
    with pytest.raises(UnsupportedStructure, match=r"(?s)looks like a norm .* does not recognise; recognised: .* in module 'n1'"):
        PassManager(exact_pipeline(random_orthogonal(1))).run(program)


class ScaledStream(Norms):
    """Gemma-4's layer ends by scaling the whole stream in place by a learned one-element parameter: a scalar
    commutes with every rotation, so the stream goes on through it."""

    def __init__(self, make_norm, width=16, vocab=40):
        super().__init__(make_norm, width, vocab)
        self.layer_scalar = nn.Parameter(torch.tensor([0.7]))

    def forward(self, input_ids, use_cache=False):
        h = self.embed(input_ids)
        h = h + self.down(torch.relu(self.up(self.n1(h))))
        h *= self.layer_scalar
        h = h + self.down(torch.relu(self.up(self.n1(h))))
        return self.head(self.n2(h))


def test_a_stream_scaled_in_place_by_a_parameter_stays_one_stream_and_rotates_exactly():
    program = capture(ScaledStream(lambda d: RMSVariant(d, square="pow", weight="right", upcast=True))).to(torch.float64)
    PassManager([CleanupIR()]).run(program)
    assert torch.ops.aten.mul_.Tensor in {n.target for n in program.graph.nodes}  # the spelling under test
    stream = stream_analysis(program)
    assert not stream.violations
    assert any(n.target == torch.ops.aten.mul_.Tensor for segment in stream.segments for n in segment.nodes)
    ids = program.probe_input()
    before = program(ids)
    PassManager(exact_pipeline(random_orthogonal(2)), check_numerics=True).run(program)
    assert relative_error(program(ids), before) < 1e-9


@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, False)])
def test_layer_norm_variants_are_fused_to_weightless_rms(affine, bias):
    program = capture(Norms(lambda d: nn.LayerNorm(d, elementwise_affine=affine, bias=bias))).to(torch.float64)
    ids = program.probe_input()
    before = program(ids)
    PassManager([CleanupIR(), ProjectNormWriters(), FuseNorms()], check_numerics=True).run(program)
    targets = {n.target for n in program.graph.nodes}
    assert torch.ops.aten.layer_norm.default not in targets
    norms = program.analysis(stream_analysis).norms
    assert len(norms) == 2 and all(n.kind == "rms" and not n.has_affine and n.width == 16 for n in norms)
    assert relative_error(program(ids), before) < 1e-9


@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma3"])
def test_fusion_is_idempotent(tiny, name):
    _, program = tiny(name)
    PassManager([CleanupIR(), ProjectNormWriters(), FuseNorms()]).run(program)
    again = PassManager([ProjectNormWriters(), FuseNorms()]).run(program)
    assert not again.modified


def test_passes_leave_a_model_without_stream_norms_alone(plain_program):
    result = PassManager([ProjectNormWriters(), FuseNorms()]).run(plain_program)
    assert not any(r.modified for r in result.records)
    check_pass_leaves_alone(FuseNorms, [("no-norms", plain_program)])


FUSED_FAMILIES = ["llama", "llama-tied", "gpt2", "gemma", "gemma3", "phi", "gpt_neox", "opt-project", "bloom", "olmo"]


def test_fuse_norms_passes_the_shared_exact_pass_checks(tiny_programs):
    reports = check_exact_pass(FuseNorms, tiny_programs(*FUSED_FAMILIES), prepare=lambda: [CleanupIR(), ProjectNormWriters()])
    assert len(reports) == 2 * len(FUSED_FAMILIES)


def test_fuse_norms_untying_passes_the_shared_exact_pass_checks(tiny_programs):
    check_exact_pass(lambda: FuseNorms(keep_ties=False), tiny_programs("llama-tied", "gemma"),
                     prepare=lambda: [CleanupIR(), ProjectNormWriters()])
