"""Loss-aware SliceGPT widths: the exact parameter count of any widths, the greedy allocation under a budget."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fxslice import InvalidOption, PassManager, UnsupportedStructure
from fxslice.passes import CleanupIR, FuseNorms, ProjectNormWriters, slicegpt_recipe
from fxslice.passes.slicegpt.slice_stream import SliceStream
from fxslice.passes.slicegpt.widths import SlicedSize, loss_aware_widths, stream_sensitivity

CALIBRATION = torch.randint(0, 128, (12, 24), generator=torch.Generator().manual_seed(0))


def fused(program, keep_ties=True):
    PassManager([CleanupIR(), ProjectNormWriters(), FuseNorms(keep_ties=keep_ties)]).run(program)
    return program


@pytest.mark.parametrize("name,keep_ties", [("llama", True), ("llama-tied", True), ("llama-tied", False),
                                            ("gpt2", True), ("mixtral", True), ("opt-project", True), ("bloom", True)])
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])  # tiny() clones
@given(data=st.data())
def test_the_predicted_count_is_the_sliced_models(tiny, name, keep_ties, data):
    program = fused(tiny(name)[1], keep_ties)
    size = SlicedSize(program)
    widths = [data.draw(st.integers(1, full)) for full in size.full]
    predicted = size.parameters(widths)
    PassManager([SliceStream(CALIBRATION, widths, batch_size=6)]).run(program)
    assert program.num_parameters() == predicted


def test_the_count_needs_a_fused_program(tiny):
    with pytest.raises(UnsupportedStructure, match="FuseNorms first"):
        SlicedSize(tiny("llama")[1])


def test_the_allocation_meets_the_budget_and_spends_it_where_the_loss_is(tiny):
    program = fused(tiny("llama")[1])
    size = SlicedSize(program)
    count = len(size.full)
    costly = [torch.full((64,), 1.0 if k == 2 else 1e-6, dtype=torch.float64) for k in range(count)]
    budget = size.parameters([48] * count)
    widths = loss_aware_widths(size, costly, budget)
    assert size.parameters(widths) <= budget
    assert widths[2] == 64  # the one segment whose directions cost loss keeps them all
    assert all(w % 8 == 0 and w >= 8 for w in widths)
    steps = [size.parameters([w + 8 if j == k else v for j, v in enumerate(widths)]) for k, w in enumerate(widths)
             if w < 64]
    assert min(steps) > budget  # no segment could keep 8 more dimensions within the budget
    fixed = loss_aware_widths(size, costly, budget, fixed=(count - 1,))
    assert fixed[-1] == 64 and size.parameters(fixed) <= budget
    with pytest.raises(InvalidOption, match="below what the narrowest slicing keeps"):
        loss_aware_widths(size, costly, 1000)


def test_sensitivities_are_per_direction_and_follow_the_variance_order(tiny):
    program = fused(tiny("llama")[1]).to(torch.float64)
    costs = stream_sensitivity(program, CALIBRATION[:4], batch_size=2)
    assert len(costs) == len(SlicedSize(program).full)
    for cost in costs:
        assert cost.shape == (64,) and bool((cost >= 0).all()) and float(cost.sum()) > 0
        assert float(cost[-16:].sum()) > float(cost[:16].sum())  # the strongest directions matter most


def test_loss_aware_slicing_keeps_the_constant_widths_parameter_count(tiny):
    _, constant = tiny("llama-tied")
    loss_aware = constant.clone()
    slicegpt_recipe(sparsity=0.3, batch_size=4).run(constant, calibration=CALIBRATION)
    recipe = slicegpt_recipe(sparsity=0.3, batch_size=4, allocation="loss_aware", sensitivity_windows=2)
    result = recipe.run(loss_aware, calibration=CALIBRATION)
    assert loss_aware.num_parameters() <= constant.num_parameters()
    assert all(w % 8 == 0 for w in result.stages[1][1].report["widths"])
    assert loss_aware(loss_aware.probe_input()).shape == (2, 12, 128)
    assert recipe.to_dict()["stages"][1]["allocation"] == "loss_aware"


@pytest.mark.parametrize("options", [{"allocation": "spectrum", "sparsity": 0.2},
                                     {"allocation": "loss_aware", "widths": (8, 8)},
                                     {"allocation": "loss_aware", "sparsity": 0.2, "shared_basis": True}])
def test_bad_allocations_are_refused(options):
    with pytest.raises(InvalidOption, match="allocation"):
        slicegpt_recipe(**options)


def test_cli_slices_with_loss_aware_widths(tmp_path, tiny_model_dir):
    import json
    import subprocess
    import sys

    source = str(tiny_model_dir("llama", trained=True))
    common = ["--sparsity", "0.25", "--calib-windows", "4", "--calib-length", "32", "--eval-windows", "2",
              "--eval-length", "32"]
    sizes = {}
    for allocation in ("constant", "loss_aware"):
        out = tmp_path / allocation
        done = subprocess.run([sys.executable, "-m", "fxslice.cli", "slice", source, *common, "--allocation", allocation,
                               "--out", str(out)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        record = json.loads((out / "fxslice.json").read_text())
        assert record["recipe"]["stages"][1]["allocation"] == allocation
        sizes[allocation] = record["parameters"]
    assert sizes["loss_aware"] <= sizes["constant"]
    bad = subprocess.run([sys.executable, "-m", "fxslice.cli", "slice", source, "--allocation", "spectrum", "--out",
                          str(tmp_path / "bad")], capture_output=True, text=True)
    assert bad.returncode == 2 and "allocation" in bad.stderr and not (tmp_path / "bad").exists()
