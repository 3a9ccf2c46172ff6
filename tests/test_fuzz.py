"""Property: on any generated transformer-like model, the exact passes give the same logits (1e-9
relative, float64) or refuse with an error naming a node. Never a wrong model, never another crash.

CI runs FXSLICE_FUZZ_EXAMPLES (default 25) examples; a long run:
    FXSLICE_FUZZ_EXAMPLES=300 python -m pytest tests/test_fuzz.py -q -s --hypothesis-show-statistics
"""

import os
from collections import Counter

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fxslice.passes import exact_pipeline
from fxslice.passes.slicegpt.rotations import random_orthogonal
from fxslice.testing.random_models import ModelSpec, build, compile_and_compare, specs

EXAMPLES = int(os.environ.get("FXSLICE_FUZZ_EXAMPLES", "25"))
SEEN: Counter[str] = Counter()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs(), rotation_seed=st.integers(0, 10_000))
def test_exact_passes_are_exact_or_refuse(spec, rotation_seed):
    outcome = compile_and_compare(spec, lambda: exact_pipeline(random_orthogonal(rotation_seed)))
    event(outcome.kind)
    SEEN[outcome.kind] += 1
    SEEN[f"{outcome.kind} / {spec.layout}"] += 1


def test_fuzz_report():
    """Print what the property test covered (runs after it in file order; skipped when run alone)."""
    if not SEEN:
        pytest.skip("run together with test_exact_passes_are_exact_or_refuse")
    print(f"\nfuzz: {SEEN['exact'] + SEEN['refused']} models, {SEEN['exact']} exact, {SEEN['refused']} refused; "
          + ", ".join(f"{k}: {v}" for k, v in sorted(SEEN.items()) if "/" in k))
    assert SEEN["exact"] + SEEN["refused"] >= min(EXAMPLES, 10)


@pytest.mark.parametrize("breaker", ["tanh", "feature_scale", "feature_max", "feature_roll"])
def test_every_breaker_is_refused_with_its_node(breaker):
    outcome = compile_and_compare(ModelSpec(breaker=breaker), lambda: exact_pipeline(random_orthogonal(0)))
    assert outcome.kind == "refused"
    assert "would break invariance" in outcome.message and "node '" in outcome.message


@pytest.mark.parametrize("norm", ["layernorm", "layernorm_no_bias", "layernorm_plain", "rms_torch", "rms_llama",
                                  "rms_gemma", "rms_plain", "rms_sum"])
@pytest.mark.parametrize("layout", ["sequential", "parallel_shared", "parallel_two", "sandwich"])
def test_supported_models_are_exact(norm, layout):
    spec = ModelSpec(norm=norm, layout=layout, tied=layout == "sequential", positions=True, embedding_norm=True)
    outcome = compile_and_compare(spec, lambda: exact_pipeline(random_orthogonal(3)))
    assert outcome.kind == "exact" and outcome.error <= 1e-9


def test_generated_weights_are_far_from_identity():
    model = build(ModelSpec(norm="layernorm"))
    weight = model.final_norm.weight.detach()
    assert float(weight.min()) >= 1.5 and float(model.final_norm.bias.detach().min()) >= 0.5


@settings(max_examples=max(EXAMPLES // 2, 5), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs(), fraction=st.floats(0.1, 0.9), seed=st.integers(0, 10_000))
def test_dead_group_removal_is_exact_on_any_model(spec, fraction, seed):
    """Zero a random share of the dimension groups the analysis finds, then remove the dead ones: the logits
    stay (float64), the parameters drop by what was removed, and a second run changes nothing."""
    import torch

    from fxslice import PassManager
    from fxslice.analysis.groups import group_analysis
    from fxslice.core.graph import set_tensor, tensor_of
    from fxslice.core.numerics import relative_error
    from fxslice.models.capture import capture_module
    from fxslice.passes import CleanupIR
    from fxslice.passes.rewrite.remove_dead_groups import RemoveDeadGroups

    program = capture_module(build(spec)).to(torch.float64)
    PassManager([CleanupIR()]).run(program)
    groups = program.analysis(group_analysis)
    gen = torch.Generator().manual_seed(seed)
    for group in groups.groups:
        if float(torch.rand(1, generator=gen)) < fraction:
            for u in group.units:
                use = groups.linears[u.weight]
                w = tensor_of(program.gm, use.weight).clone()
                w.select(use.out_axis if u.axis == "row" else use.in_axis, u.index).zero_()
                set_tensor(program.gm, u.weight, w)
    program.mark_changed()
    ids = torch.randint(0, 32, (2, 9), generator=gen)
    with torch.no_grad():
        before, count = program(ids), program.num_parameters()
    result = PassManager([RemoveDeadGroups()]).run(program)
    with torch.no_grad():
        error = relative_error(program(ids), before)
    assert error <= 1e-9, f"WRONG MODEL after removing dead groups: {error:.3g} for {spec}"
    assert (program.num_parameters() < count) == result.records[0].modified or not groups.groups
    assert not PassManager([RemoveDeadGroups()]).run(program).records[0].modified
    event(f"groups: {'removed' if result.records[0].modified else 'none'}")
