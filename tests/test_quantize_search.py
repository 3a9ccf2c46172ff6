"""The mixed-precision search: its space gives exact byte counts, the multi-task GP finds a known optimum while
spending most evaluations on the cheap task, the budget is never exceeded, and a logged search resumes."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fxslice import InvalidOption, PassManager
from fxslice.analysis.linears import weight_kinds
from fxslice.core.graph import set_tensor, tensor_of
from fxslice.core.quantized import BITS
from fxslice.passes.quantize import QuantizeWeights
from fxslice.passes.quantize.allocation import BitAllocation
from fxslice.passes.quantize.search import CHEAP, EXPENSIVE, multitask_search, random_search, single_task_search
from fxslice.passes.quantize.stages import Quantize
from fxslice.recipes import Recipe
from fxslice.testing import arithmetic_sequences

OPTIMUM = (0.7, 0.3)


def two_tasks(calls: dict[int, int]):
    """An expensive function with its maximum at OPTIMUM, and a cheap one that is it plus a smooth bias."""

    def objective(x: list[float], task: int) -> float:
        calls[task] = calls.get(task, 0) + 1
        value = -sum((a - b) ** 2 for a, b in zip(x, OPTIMUM, strict=True))
        return value + (0.05 * math.sin(5 * x[0]) - 0.02 if task == CHEAP else 0.0)

    return objective


def test_the_multitask_search_finds_a_known_optimum_spending_mostly_cheap_evaluations():
    calls: dict[int, int] = {}
    result = multitask_search(two_tasks(calls), 2, expensive=4, expensive_every=4, seed=0)
    assert calls == {CHEAP: 12, EXPENSIVE: 4}
    assert math.dist(result.best, OPTIMUM) < 0.08, result.best
    # with the same 4 expensive evaluations, the baselines land further away (seeds 0-3: 0.03, 0.04, 0.02, 0.14
    # for the multi-task GP; 0.29, 0.08, 0.17, 0.28 for the single-task GP; 0.19, 0.26, 0.33, 0.23 at random)
    for baseline in (single_task_search, random_search):
        other = baseline(two_tasks({}), 2, expensive=4, seed=0)
        assert math.dist(result.best, OPTIMUM) < math.dist(other.best, OPTIMUM), baseline.__name__


def test_only_feasible_points_are_evaluated_or_chosen():
    def feasible(x: list[float]) -> bool:
        return x[0] <= 0.5  # the optimum is outside: the answer must sit on the boundary

    calls: dict[int, int] = {}
    result = multitask_search(two_tasks(calls), 2, expensive=3, expensive_every=3, seed=1, feasible=feasible)
    assert all(e.x[0] <= 0.5 for e in result.evaluations) and result.best[0] <= 0.5
    assert result.best[0] > 0.35


@pytest.mark.parametrize("search", [multitask_search, single_task_search, random_search])
def test_the_answer_is_the_best_point_the_expensive_task_has_seen(search):
    """A GP's optimum that no expensive evaluation has confirmed is not an answer: with a few evaluations of a
    step function (whole bits) it is a guess. The model's best guess gets the last expensive evaluation instead."""
    options = {"expensive_every": 3} if search is multitask_search else {}
    result = search(two_tasks({}), 2, expensive=4, seed=2, **options)
    seen = result.expensive
    assert len(seen) == 4 and len({tuple(e.x) for e in seen}) == 4  # the last step never repeats a seen point
    best = max(seen, key=lambda e: e.value)
    assert result.best == best.x and result.value == best.value


def test_a_logged_search_resumes_without_repeating_evaluations(tiny, tmp_path):
    _, program = tiny("llama")
    windows = arithmetic_sequences(4, seed=1)
    log = tmp_path / "search.jsonl"
    options = dict(search="mtgp", budget_bits=12.0, group_size=16, expensive_every=2, cheap_windows=1, log=str(log))
    Recipe((Quantize(evaluations=1, **options),)).run(program.clone(), calibration=windows)
    first = log.read_text().splitlines()
    assert len(first) == 1 + 2  # header, one cheap and one expensive evaluation
    result = Recipe((Quantize(evaluations=2, **options),)).run(program.clone(), calibration=windows)
    again = log.read_text().splitlines()
    assert again[:3] == first and len(again) == 1 + 4
    assert len(result.stages[0][1].report["search"]["evaluations"]) == 4
    with pytest.raises(InvalidOption, match="another search.*budget_bits"):
        Recipe((Quantize(evaluations=1, **{**options, "budget_bits": 11.0}),)).run(program.clone(), calibration=windows)
    other = tiny("llama")[1]  # the same shapes, other weights: its log's evaluations do not apply
    set_tensor(other.gm, "model.layers.0.mlp.up_proj.weight", tensor_of(other.gm, "model.layers.0.mlp.up_proj.weight") * 2)
    with pytest.raises(InvalidOption, match="differs in: model"):
        Recipe((Quantize(evaluations=2, **options),)).run(other, calibration=windows)
    with pytest.raises(InvalidOption, match="differs in: calibration"):
        Recipe((Quantize(evaluations=2, **options),)).run(program.clone(), calibration=windows.flip(1))
    assert log.read_text().splitlines() == again  # nothing was appended by the refused runs


@pytest.mark.parametrize("content", ["directory", "not json", "binary"])
def test_a_log_that_is_not_a_search_log_is_refused_by_name(tiny, tmp_path, content):
    log = tmp_path / "log"
    if content == "directory":
        log.mkdir()
    else:
        log.write_bytes(b"hello\n" if content == "not json" else bytes(range(256)))
    stage = Quantize(search="mtgp", budget_bits=12.0, group_size=16, evaluations=1, log=str(log))
    with pytest.raises(InvalidOption, match="--log"):
        Recipe((stage,)).run(tiny("llama")[1], calibration=arithmetic_sequences(4, seed=1))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.floats(0, 1), min_size=4, max_size=4))
def test_the_byte_count_of_a_point_is_what_quantizing_gives(tiny_programs, x):
    (_, program), = tiny_programs("llama")  # a fresh copy per example
    allocation = BitAllocation.of(program, group_size=16, embeddings=8, head=None)
    PassManager([QuantizeWeights(allocation.widths(x), group_size=16, embeddings=8, head=None)]).run(program)
    assert program.num_bytes() == allocation.nbytes(x)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.floats(0, 1), min_size=5, max_size=5), st.sampled_from(["llama-tied", "llama"]))
def test_a_searched_tables_width_is_counted_and_given_to_the_table(tiny_programs, x, family):
    (_, program), = tiny_programs(family)
    allocation = BitAllocation.of(program, group_size=16, embeddings=8, head=8, search_tables=True)
    tables = weight_kinds(program).tables
    assert allocation.dim == 5 and set(allocation.tables) == set(tables) and allocation.table_choices == (2, 3, 4, 5, 6, 8)
    widths = allocation.widths(x)
    PassManager([QuantizeWeights(widths, group_size=16, embeddings=8, head=8)]).run(program)
    assert program.num_bytes() == allocation.nbytes(x)
    assert {program.quantized[t].bits for t in tables} == {widths[t] for t in tables}


def test_a_searched_table_is_never_narrower_than_the_linears_uniform_width(tiny):
    _, program = tiny("llama-tied")
    allocation = BitAllocation.of(program, group_size=16, embeddings=8, head=None, search_tables=True).around(4, 1)
    assert allocation.choices == (3, 4, 5) and allocation.table_choices == (4, 5, 6, 8)
    widths = allocation.widths(allocation.uniform(4))
    assert widths.pop("lm_head.weight") == 8 and set(widths.values()) == {4}  # uniform: the table at --embeddings
    assert allocation.widths([0.5] * 4 + [0.0])["lm_head.weight"] == 4
    fixed = BitAllocation.of(program, group_size=16, embeddings=8, head=None)
    assert fixed.dim == 4 and fixed.nbytes(fixed.uniform(4)) == allocation.nbytes(allocation.uniform(4))
    assert BitAllocation.of(program, group_size=16, embeddings=4, head=None, search_tables=True).around(5, 1).dim == 4


def test_a_search_over_the_tables_width_answers_it_within_budget(tiny):
    from fxslice.passes.quantize.mixed import search_allocation

    _, program = tiny("llama-tied")
    fixed = BitAllocation.of(program, group_size=16, embeddings=8, head=None)
    budget_bits = 8 * fixed.nbytes(fixed.uniform(4)) / program.num_parameters()
    chosen, result, allocation = search_allocation(
        program, arithmetic_sequences(2, seed=1), budget_bits=budget_bits, group_size=16, embeddings=8, head=None,
        search="gp", evaluations=3, cheap_windows=1)  # the tables' width is searched by default
    assert allocation.dim == 5 and chosen["lm_head.weight"] in (4, 5, 6, 8)
    assert all(allocation.nbytes(e.x) <= budget_bits * program.num_parameters() / 8 for e in result.evaluations)
    assert len({allocation.widths(e.x)["lm_head.weight"] for e in result.evaluations}) > 1  # the table is searched


@pytest.fixture(scope="module")
def sliced_llama():
    from fxslice import capture
    from fxslice.passes.rewrite.stages import Cleanup
    from fxslice.passes.slicegpt.stages import SliceGPT
    from fxslice.testing import tiny_causal_lm

    program = capture(tiny_causal_lm("llama"))
    Recipe((Cleanup(), SliceGPT(sparsity=0.25))).run(program, calibration=arithmetic_sequences(8, seed=3))
    return program


@pytest.mark.parametrize("shortcuts", [8, None])
def test_a_sliced_models_shortcuts_are_not_searched_but_counted(sliced_llama, shortcuts):
    program = sliced_llama.clone()
    allocation = BitAllocation.of(program, group_size=16, embeddings=8, head=8, shortcuts=shortcuts)
    kinds = weight_kinds(program)
    assert kinds.shortcuts and not kinds.shortcuts & set(allocation.names)
    assert set(allocation.names) | kinds.shortcuts == set(kinds.linears)
    x = [0.1, 0.9, 0.6, 0.3]
    PassManager([QuantizeWeights(allocation.widths(x), group_size=16, embeddings=8, head=8,
                                 shortcuts=shortcuts)]).run(program)
    assert program.num_bytes() == allocation.nbytes(x)
    assert {program.quantized[n].bits if n in program.quantized else None for n in kinds.shortcuts} == {shortcuts}


def test_uniform_points_and_roles(tiny):
    _, program = tiny("llama")
    allocation = BitAllocation.of(program, group_size=16, embeddings=8, head=8)
    for bits in BITS:
        assert set(allocation.widths(allocation.uniform(bits)).values()) == {bits}
    roles = dict(zip(allocation.names, allocation.roles, strict=True))
    assert roles["model.layers.0.self_attn.q_proj.weight"] == "attention"
    assert roles["model.layers.1.mlp.down_proj.weight"] == "mlp"
    assert allocation.depth[0] == 0 and allocation.depth[-1] == 1


def test_a_budget_below_the_smallest_model_is_refused(tiny):
    _, program = tiny("llama")
    with pytest.raises(InvalidOption, match="below the smallest"):
        Recipe((Quantize(search="mtgp", budget_bits=1.0, group_size=16),)).run(
            program, calibration=arithmetic_sequences(2, seed=1))
    with pytest.raises(InvalidOption, match="budget_bits"):
        Quantize(search="mtgp")


@pytest.mark.parametrize(("search", "spread", "widths"), [("mtgp", 1, (3, 4, 5)), ("gp", 1, (3, 4, 5)),
                                                        ("random", 1, (3, 4, 5)), ("mtgp", 6, BITS)])
def test_every_search_starts_from_the_uniform_allocation_and_spends_its_budget(tiny, search, spread, widths):
    from fxslice.passes.quantize.mixed import search_allocation

    _, program = tiny("llama")
    full = BitAllocation.of(program, group_size=16, embeddings=8, head=None)
    budget_bits = 8 * full.nbytes(full.uniform(4)) / program.num_parameters() + 0.3
    budget = budget_bits * program.num_parameters() / 8
    chosen, result, allocation = search_allocation(
        program, arithmetic_sequences(2, seed=1), budget_bits=budget_bits, group_size=16, embeddings=8, head=None,
        search=search, evaluations=3, expensive_every=2, cheap_windows=1, spread=spread)
    assert allocation.choices == widths  # the widest uniform width that fits, and `spread` either side
    assert result.expensive[0].x == pytest.approx(allocation.uniform(4))  # the widest uniform point that fits
    others = [e for e in result.evaluations if e is not result.expensive[0]]
    assert others and all(0.95 * budget <= allocation.nbytes(e.x) <= budget for e in others)
    def linear_widths(w: dict[str, int]) -> set[int]:
        return {bits for name, bits in w.items() if name in allocation.names}

    assert all(linear_widths(allocation.widths(e.x)) <= set(widths) for e in result.evaluations)
    assert 0.95 * budget <= allocation.nbytes(result.best) <= budget or result.best == result.expensive[0].x
    assert linear_widths(chosen) <= set(widths) and chosen["model.embed_tokens.weight"] in allocation.table_choices
