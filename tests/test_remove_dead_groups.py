"""RemoveDeadGroups: a model with zeroed groups becomes a smaller dense model with the same logits."""

import pytest
import torch

from fxslice import PassManager, as_pass
from fxslice.analysis.groups import group_analysis
from fxslice.core.graph import set_tensor, tensor_of
from fxslice.passes import CleanupIR
from fxslice.passes.rewrite.remove_dead_groups import RemoveDeadGroups
from fxslice.testing import check_exact_pass, check_pass_leaves_alone

FAMILIES = ["llama", "qwen3", "gemma3", "phi3", "gpt2", "gpt_neox", "opt", "falcon", "mixtral", "llama-tied"]


def zero_groups(fraction: float, seed: int):
    """A lossy pass that zeroes the rows and columns of a random `fraction` of the groups."""

    @as_pass(name="zero_groups", exact=False)
    def zero(program):
        groups = program.analysis(group_analysis)
        gen = torch.Generator().manual_seed(seed)
        chosen = [g for g in groups.groups if float(torch.rand(1, generator=gen)) < fraction]
        for group in chosen:
            for u in group.units:
                use = groups.linears[u.weight]
                w = tensor_of(program.gm, use.weight).clone()
                w.select(use.out_axis if u.axis == "row" else use.in_axis, u.index).zero_()
                set_tensor(program.gm, u.weight, w)
        return bool(chosen)

    return zero


def test_remove_dead_groups_passes_the_shared_exact_pass_checks(tiny_programs):
    reports = check_exact_pass(RemoveDeadGroups, tiny_programs(*FAMILIES),
                               prepare=lambda: [CleanupIR(), zero_groups(0.3, seed=1)])
    assert len(reports) == 2 * len(FAMILIES)


@pytest.mark.parametrize("name", ["llama", "gpt2", "phi3"])
def test_parameters_shrink_by_exactly_the_removed_rows_and_columns(tiny_programs, name):
    [(_, program)] = tiny_programs(name)
    PassManager([CleanupIR(), zero_groups(0.4, seed=2)]).run(program)
    groups = program.analysis(group_analysis)
    dead = [g for g in groups.groups if all(
        tensor_of(program.gm, groups.linears[u.weight].weight).select(groups.linears[u.weight].in_axis, u.index)
        .eq(0).all() for u in g.cols)]
    before = program.num_parameters()
    result = PassManager([RemoveDeadGroups()]).run(program)
    removed = [groups.groups[i] for i in result.records[0].info["removed"]]
    assert set(removed) <= set(dead) and len(dead) - len(removed) <= 2  # at most one head group kept per layer
    assert all(g.kind == "heads" for g in set(dead) - set(removed))
    expected = 0
    for g in removed:
        for u in g.units:
            use = groups.linears[u.weight]
            w = tensor_of(program.gm, use.weight)
            expected += w.shape[use.in_axis] if u.axis == "row" else w.shape[use.out_axis]
            if u.axis == "row" and use.bias is not None:
                expected += 1
    assert before - program.num_parameters() == expected


def test_the_last_head_group_of_a_layer_stays_and_an_mlp_may_go(tiny_programs):
    [(_, program)] = tiny_programs("llama")
    PassManager([CleanupIR(), zero_groups(1.0, seed=0)]).run(program)  # every group zero
    ids = program.probe_input()
    before = program(ids)
    result = PassManager([RemoveDeadGroups()], check_numerics=True).run(program)
    assert torch.equal(program(ids), before)
    groups = program.analysis(group_analysis)
    assert len(groups.by_kind("heads")) == 2  # attention keeps one (zero) head group per layer
    assert not groups.by_kind("mlp_channel")  # an MLP may go entirely: a linear of width 0 is still exact
    assert result.records[0].modified


def test_a_dense_model_is_left_alone(tiny_programs):
    check_pass_leaves_alone(RemoveDeadGroups, tiny_programs("llama", "gpt2"), prepare=lambda: [CleanupIR()])


@pytest.mark.parametrize("name", ["llama", "qwen3", "phi3", "gpt_neox"])
def test_removed_heads_leave_the_kv_cache_and_decoding_follows(name):
    """The KV-cache capture of a model with dead head groups: the cache layout shrinks with the heads, and
    decoding one token at a time gives the logits of the plain program, zeroed but unshrunk."""
    from fxslice import capture
    from fxslice.core.pass_manager import replay
    from fxslice.models.kvcache import capture_cached
    from fxslice.testing.tiny_models import tiny_causal_lm

    model = tiny_causal_lm(name)
    plain, cached = capture(model), capture_cached(model)
    PassManager([CleanupIR()]).run(cached)
    result = PassManager([CleanupIR(), zero_groups(0.5, seed=3)]).run(plain)
    replay(result.passes[1:], cached, plain)
    zeroed = plain.clone()
    before = cached.cache.shapes
    PassManager([RemoveDeadGroups()]).run(cached)
    assert cached.cache.shapes != before and all(
        h <= h0 and d == d0 for (h, d), (h0, d0) in zip(cached.cache.shapes, before, strict=True))
    assert cached.num_parameters() < zeroed.num_parameters()
    ids = zeroed.probe_input(batch=2, length=7)
    expected = zeroed(ids)
    kv = cached.cache.allocate(2, 7, cached.dtype)
    steps = [cached.step(ids[:, :3], 0, kv)] + [cached.step(ids[:, i:i + 1], i, kv) for i in range(3, 7)]
    torch.testing.assert_close(torch.cat(steps, 1), expected, rtol=1e-4, atol=1e-4)


def test_a_group_added_to_an_untracked_residual_is_not_removed_and_not_offered():
    """A post-norm block whose writers are not on the residual stream: their channels are added to the
    residual, which cannot shrink with them (found by the fuzzer)."""
    from fxslice.models.capture import capture_module
    from fxslice.passes.rewrite.remove_dead_groups import removable_groups
    from fxslice.testing.random_models import ModelSpec, build

    spec = ModelSpec(width=8, blocks=2, layout="post", norm="rms_plain", bias=False, fused_qkv=False,
                     gated_mlp=False, tied=False, positions=False, embedding_norm=False, breaker=None, seed=0)
    program = capture_module(build(spec)).to(torch.float64)
    PassManager([CleanupIR()]).run(program)
    groups = program.analysis(group_analysis)
    stuck = [i for i, g in enumerate(groups.groups) if any("head" in u.weight for u in g.cols)]
    assert stuck and not set(stuck) & removable_groups(groups)
    PassManager([zero_groups(1.0, seed=0)]).run(program)
    ids = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(0))
    before = program(ids)
    PassManager([RemoveDeadGroups()]).run(program)
    torch.testing.assert_close(program(ids), before, rtol=1e-9, atol=1e-12)
