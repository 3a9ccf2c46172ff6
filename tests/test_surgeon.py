"""The LLM Surgeon: exact on a quadratic loss, the target met, groups really removed, baselines from the same code."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxslice import InvalidOption, PassManager
from fxslice.analysis.groups import group_analysis
from fxslice.evaluation.perplexity import perplexity
from fxslice.passes import STAGES, CleanupIR, prune_recipe
from fxslice.passes.rewrite.stages import Cleanup
from fxslice.passes.surgeon import SurgeonMask, SurgeonPrune
from fxslice.passes.surgeon.obs import column_cost, damped_inverse, remove_columns, remove_rows, row_cost
from fxslice.passes.surgeon.stages import Surgeon
from fxslice.recipes import Recipe
from fxslice.testing.quadratic import kronecker_quadratic, random_spd

CALIBRATION = torch.randint(3, 128, (8, 24), generator=torch.Generator().manual_seed(0))


@settings(max_examples=30, deadline=None)
@given(out=st.integers(2, 9), inp=st.integers(2, 9), seed=st.integers(0, 10_000), data=st.data())
def test_costs_and_updates_are_exact_and_optimal_on_a_kronecker_quadratic(out, inp, seed, data):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=gen, dtype=torch.float64)
    g, a = random_spd(out, gen), random_spd(inp, gen)
    loss = kronecker_quadratic(w, g, a)
    rows = sorted(data.draw(st.sets(st.integers(0, out - 1), min_size=1, max_size=out - 1)))
    cols = sorted(data.draw(st.sets(st.integers(0, inp - 1), min_size=1, max_size=inp - 1)))
    g_inv, a_inv = torch.linalg.inv(g), torch.linalg.inv(a)
    pruned = remove_rows(w, g_inv, rows)
    assert pruned[rows].abs().max() == 0
    assert abs(loss(pruned) - row_cost(w, a, g_inv, rows)) < 1e-9 * max(1.0, loss(pruned))
    # optimal: the gradient G (W' - W) A vanishes on every weight that was free to move
    grad = g @ (pruned - w) @ a
    keep = [r for r in range(out) if r not in rows]
    assert grad[keep].abs().max() < 1e-9 * max(1.0, float(grad.abs().max()))
    pruned = remove_columns(w, a_inv, cols)
    assert pruned[:, cols].abs().max() == 0
    assert abs(loss(pruned) - column_cost(w, g, a_inv, cols)) < 1e-9 * max(1.0, loss(pruned))
    grad = g @ (pruned - w) @ a
    keep = [c for c in range(inp) if c not in cols]
    assert grad[:, keep].abs().max() < 1e-9 * max(1.0, float(grad.abs().max()))


def test_damping_is_relative_to_the_mean_diagonal():
    m = torch.diag(torch.tensor([1.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(damped_inverse(m, 0.5), torch.diag(1 / torch.tensor([2.0, 4.0], dtype=torch.float64)))
    torch.testing.assert_close(damped_inverse(torch.zeros(2, 2), 0.5), 2 * torch.eye(2, dtype=torch.float64))


@pytest.mark.parametrize("curvature", ["kfac", "kobd", "activations", "identity"])
@pytest.mark.parametrize("name", ["llama", "gpt2", "phi3"])
def test_the_target_is_met_within_one_group_and_the_matrices_shrink(tiny, name, curvature):
    _, program = tiny(name)
    PassManager([CleanupIR()]).run(program)
    groups = program.analysis(group_analysis)
    dense = program.num_parameters()
    surgeon = SurgeonPrune(CALIBRATION, target=0.25, shots=2, curvature=curvature, batch_size=4)
    PassManager([surgeon]).run(program)
    smallest = min(sum(1 for _ in g.units) for g in groups.groups) * 128  # a generous bound on a group's size
    assert abs(program.num_parameters() - round(0.75 * dense)) <= smallest
    assert program.num_parameters() == surgeon.reports[-1].parameters < surgeon.reports[0].parameters < dense
    after = program.analysis(group_analysis)
    assert len(after.groups) == len(groups.groups) - sum(r.removed_groups for r in surgeon.reports)
    assert program(program.probe_input(batch=1, length=5)).shape == (1, 5, 128)


@pytest.fixture(scope="module")
def trained():
    from fxslice import capture
    from fxslice.testing import trained_tiny_causal_lm

    return capture(trained_tiny_causal_lm("llama"))


def test_on_a_trained_model_the_surgeon_beats_k_obd_and_l_obd_which_beats_magnitude(trained):
    from fxslice.testing import arithmetic_sequences

    calib, test = arithmetic_sequences(16, seed=1000), arithmetic_sequences(16, seed=2000)
    dense = perplexity(trained, test)
    pruned = {}
    for curvature in ("kfac", "kobd", "activations", "identity"):
        program = trained.clone()
        PassManager([CleanupIR()]).run(program)
        PassManager([SurgeonPrune(calib, target=0.3, shots=3, curvature=curvature, batch_size=8)]).run(program)
        pruned[curvature] = perplexity(program, test)
    print(f"held-out perplexity at 30% fewer parameters: dense {dense:.3f}, {pruned}")
    assert dense < pruned["kfac"] < min(pruned["kobd"], pruned["activations"])
    assert pruned["activations"] < pruned["identity"]


def test_predicted_loss_increase_tracks_the_measured_one_for_small_steps(tiny):
    _, program = tiny("llama")
    program = program.to(torch.float64)
    PassManager([CleanupIR()]).run(program)
    surgeon = SurgeonPrune(CALIBRATION, target=0.05, shots=1, batch_size=4)
    PassManager([surgeon]).run(program)
    [shot] = surgeon.reports
    measured = shot.loss_after - shot.loss_before
    assert shot.predicted_loss_increase > 0
    assert abs(measured) < 20 * shot.predicted_loss_increase + 1e-3  # the same order: KFAC is an approximation


@pytest.mark.parametrize("options,message", [
    ({"target": 1.2}, "target"), ({"shots": 0}, "shots"), ({"method": "kfac"}, "method must be one of surgeon, kobd"),
    ({"structures": "rows_cols"}, "structures must be"), ({"labels": "mine"}, "labels"),
    ({"structures": "2:4", "target": 0.6}, r"\(0, 0.5\]"), ({"target": 1.0}, r"\(0, 1\)"),
])
def test_bad_surgeon_options_are_refused(options, message):
    with pytest.raises(InvalidOption, match=message):
        Surgeon(**options)


@pytest.mark.parametrize("structures", ["groups", "unstructured", "2:4"])
def test_the_stage_and_its_passes_take_the_same_targets(structures):
    """One check for `target`: what the stage accepts its pass accepts, and what it refuses the pass refuses too."""
    from fxslice.passes.surgeon.options import check_target

    windows = torch.zeros(1, 4, dtype=torch.long)
    for target in (0.0, 0.3, 0.5, 0.6, 1.0):
        accepted = []
        for build in (lambda t: Surgeon(target=t, structures=structures),
                      lambda t: SurgeonPrune(windows, target=t) if structures == "groups"
                      else SurgeonMask(windows, target=t, structures=structures),
                      lambda t: check_target(t, structures)):
            try:
                build(target)
                accepted.append(True)
            except InvalidOption:
                accepted.append(False)
        assert len(set(accepted)) == 1, (structures, target, accepted)


def test_a_recipe_written_with_curvature_reads_as_the_method_with_a_warning():
    data = {"stages": [{"stage": "cleanup"}, {"stage": "surgeon", "target": 0.2, "curvature": "activations"}]}
    with pytest.warns(UserWarning, match="now 'method: lobd'"):
        recipe = Recipe.from_dict(data, STAGES)
    assert recipe.stages[1].method == "lobd"
    assert "curvature" not in recipe.stages[1].to_dict()


def test_the_surgeon_stage_runs_after_slicegpt_and_reports_every_shot(tiny):
    from fxslice.passes.slicegpt.stages import SliceGPT

    _, program = tiny("llama")
    recipe = Recipe((Cleanup(), SliceGPT(sparsity=0.25, batch_size=4), Surgeon(target=0.2, shots=2, batch_size=4)))
    assert Recipe.from_dict(recipe.to_dict(), STAGES) == recipe
    result = recipe.run(program, calibration=CALIBRATION)
    sliced = result.stages[1][1]
    report = result.stages[2][1].report
    assert len(report["shots"]) == 2 and report["shots"][-1]["parameters"] == result.parameters
    assert result.parameters <= round(0.8 * program.num_parameters() / 0.8)
    assert sliced.report["widths"] == [48] * 5
    assert program.record["facts"] == ["captured", "clean", "pruned", "sliced"]


def test_cli_prune_saves_a_smaller_model_that_reloads_and_generates(tmp_path, tiny_model_dir):
    import json
    import subprocess
    import sys

    import fxslice

    out = tmp_path / "pruned"
    cmd = [sys.executable, "-m", "fxslice.cli", "prune", str(tiny_model_dir("llama")), "--target", "0.3", "--shots", "2",
           "--calib-windows", "4", "--calib-length", "32", "--eval-windows", "2", "--eval-length", "32", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "fxslice.json").read_text())
    assert record["parameters"] <= 0.72 * record["dense_parameters"]
    assert [s["stage"] for s in record["stages"]] == ["cleanup", "surgeon", "fuse_gqa"]
    assert len(record["stages"][1]["report"]["shots"]) == 2
    back = fxslice.load(out)
    assert back.num_parameters() == record["parameters"]
    generated = subprocess.run([sys.executable, "-m", "fxslice.cli", "generate", str(out), "abc", "--max-new-tokens", "4"],
                               capture_output=True, text=True)
    assert generated.returncode == 0, generated.stderr[-2000:]
    bad = subprocess.run([*cmd[:4], "x", "--method", "obs", "--out", str(tmp_path / "o2")], capture_output=True, text=True)
    assert bad.returncode == 2 and "method must be one of surgeon, kobd, lobd, magnitude" in bad.stderr


def test_a_model_without_removable_groups_is_refused_naming_what_blocks_them(plain_program):
    from fxslice import UnsupportedStructure

    with pytest.raises(UnsupportedStructure, match="no removable dimension groups") as refused:
        PassManager([SurgeonPrune(CALIBRATION[:, :8] % 20, target=0.2, shots=1)]).run(plain_program)
    message = str(refused.value)
    assert "head.weight: reaches the graph's output at output" in message  # the weight, the reason and the node


def test_multiple_leaves_every_mlp_a_whole_number_of_blocks(tiny):
    """`multiple=32`: each MLP keeps a multiple of 32 channels (GGUF blocks), the target still within a block's
    worth of parameters per layer, and the model still computes."""
    from fxslice.models.decoder_layout import decoder_layout

    _, program = tiny("llama")  # MLP width 128
    calibration = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    dense = program.num_parameters()
    prune_recipe(target=0.3, shots=2, batch_size=4, multiple=32).run(program, calibration=calibration)
    widths = [layer.mlp.width for layer in decoder_layout(program).layers]
    assert all(w % 32 == 0 and 0 < w < 128 for w in widths), widths
    assert abs((1 - program.num_parameters() / dense) - 0.3) < 0.1


def test_a_target_beyond_the_removable_groups_is_refused_with_the_reachable_maximum(tiny):
    """A tiny model whose table is most of its parameters cannot lose 90 %: refused before any calibration,
    naming the maximum; at that maximum every layer keeps a head group and an MLP channel."""
    _, program = tiny("llama")
    PassManager([CleanupIR()]).run(program)
    surgeon = SurgeonPrune(CALIBRATION, target=0.9, shots=1, batch_size=4)
    reach = surgeon.reachable(program)
    assert 0.2 < reach < 0.9
    with pytest.raises(InvalidOption, match=rf"at most {reach:.1%} .* give target ≤ {int(reach * 1000) / 1000}"):
        PassManager([surgeon]).run(program)
    PassManager([SurgeonPrune(CALIBRATION, target=int(reach * 1000) / 1000, shots=1, batch_size=4)]).run(program)
    from fxslice.models.decoder_layout import decoder_layout

    layers = decoder_layout(program).layers
    assert all(layer.mlp.width >= 1 and layer.attention.kv_heads >= 1 for layer in layers)


@pytest.mark.parametrize("curvature", ["kfac", "activations"])
def test_factors_collected_a_few_readers_at_a_time_give_the_same_weights(tiny, monkeypatch, curvature):
    """A budget smaller than the factors: one sweep per couple of readers, the factors kept on disk between; the
    same sums, so the same costs, groups and updates, bit for bit."""
    from fxslice.calibration import moments

    sweeps = []
    real = moments.linear_statistics
    monkeypatch.setattr("fxslice.passes.surgeon.surgeon.linear_statistics",
                        lambda *a, **k: sweeps.append(k["linears"]) or real(*a, **k))
    weights = []
    for budget in (None, 8 * 2 * 64 * 64):  # two readers' worth of 64 x 64 factors
        _, program = tiny("llama")
        PassManager([CleanupIR()]).run(program)
        sweeps.clear()
        PassManager([SurgeonPrune(CALIBRATION, target=0.25, shots=2, curvature=curvature, batch_size=4,
                                  factor_bytes=budget)]).run(program)
        weights.append(dict(program.gm.named_parameters()))
        assert (len(sweeps) > 2) == (budget is not None)
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_factor_budget_that_is_not_a_positive_integer_is_refused():
    with pytest.raises(InvalidOption, match="factor_bytes must be a positive number of bytes"):
        SurgeonPrune(CALIBRATION, target=0.2, factor_bytes=0)


def test_a_shot_reports_its_sweeps_as_they_go_off_a_terminal(tiny, capsys, monkeypatch):
    """A shot on a real model runs for minutes: its loss and curvature sweeps print their own lines before the
    shot's, so a log shows progress within the first shot."""
    from fxslice.core import progress

    monkeypatch.setattr(progress, "PLAIN_EVERY", 0.0)
    _, program = tiny("llama")
    PassManager([CleanupIR()]).run(program)
    PassManager([SurgeonPrune(CALIBRATION, target=0.1, shots=1, batch_size=4, progress=True)]).run(program)
    lines = capsys.readouterr().err.splitlines()
    shot = next(i for i, line in enumerate(lines) if line.startswith("surgeon shots: 1/1"))
    before = [line.split(":")[0] for line in lines[:shot]]
    assert {"calibration loss", "forward and backward"} <= set(before)
    assert sum(line.startswith("forward and backward: ") for line in lines[:shot]) == 2  # 8 windows, batches of 4
