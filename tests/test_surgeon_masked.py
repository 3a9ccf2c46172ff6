"""The Surgeon's zero-masked structures (rows and columns, single weights, 2:4) and K-OBD: costs exact on a
Kronecker-factored quadratic, updates optimal where the paper's algebra says so, targets met, patterns kept."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxslice import PassManager
from fxslice.analysis.groups import group_analysis
from fxslice.evaluation.perplexity import perplexity
from fxslice.passes import CleanupIR
from fxslice.passes.surgeon import SurgeonMask
from fxslice.passes.surgeon.linears import decoder_linears, matrix_of
from fxslice.passes.surgeon.obs import (
    column_cost,
    remove_columns,
    remove_elements,
    remove_rows,
    remove_rows_and_columns,
    row_cost,
    structure_costs,
)
from fxslice.testing.quadratic import kronecker_quadratic, random_spd

CALIBRATION = torch.randint(3, 128, (8, 24), generator=torch.Generator().manual_seed(0))


def _constrained_optimum(w, g, a, mask):
    """min ½ vec(δ)ᵀ (G ⊗ A) vec(δ) subject to (w + δ)[mask] = 0, by the KKT system: independent of the
    inverse-based formulas under test."""
    h = torch.kron(g, a)
    picked = mask.reshape(-1).nonzero()[:, 0]
    e = torch.eye(h.shape[0], dtype=torch.float64)[picked]
    kkt = torch.cat([torch.cat([h, e.T], 1), torch.cat([e, torch.zeros(len(picked), len(picked),
                                                                         dtype=torch.float64)], 1)])
    rhs = torch.cat([torch.zeros(h.shape[0], dtype=torch.float64), -w.reshape(-1)[picked]])
    delta = torch.linalg.solve(kkt, rhs)[: h.shape[0]].reshape(w.shape)
    return w + delta


@settings(max_examples=25, deadline=None)
@given(out=st.integers(2, 7), inp=st.integers(2, 7), seed=st.integers(0, 10_000))
def test_single_structure_costs_are_exact_for_obs_and_obd(out, inp, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=gen, dtype=torch.float64)
    g, a = random_spd(out, gen), random_spd(inp, gen)
    loss = kronecker_quadratic(w, g, a)
    g_inv, a_inv = torch.linalg.inv(g), torch.linalg.inv(a)
    obs = structure_costs(w, a, g, 1 / g_inv.diagonal(), 1 / a_inv.diagonal())
    obd = structure_costs(w, a, g, g.diagonal(), a.diagonal())
    for r in range(out):
        assert obs.rows[r] == pytest.approx(row_cost(w, a, g_inv, [r]), rel=1e-9)
        zeroed = w.clone()
        zeroed[r] = 0
        assert obd.rows[r] == pytest.approx(loss(zeroed), rel=1e-9)  # OBD: zeroing, no update
    for c in range(inp):
        assert obs.cols[c] == pytest.approx(column_cost(w, g, a_inv, [c]), rel=1e-9)
        zeroed = w.clone()
        zeroed[:, c] = 0
        assert obd.cols[c] == pytest.approx(loss(zeroed), rel=1e-9)
    i, j = seed % out, (seed // 7) % inp
    mask = torch.zeros(out, inp, dtype=torch.bool)
    mask[i, j] = True
    assert obs.elements[i, j] == pytest.approx(loss(_constrained_optimum(w, g, a, mask)), rel=1e-6)  # float32
    zeroed = w.clone()
    zeroed[i, j] = 0
    assert obd.elements[i, j] == pytest.approx(loss(zeroed), rel=1e-6)


@settings(max_examples=25, deadline=None)
@given(out=st.integers(1, 6), inp=st.integers(2, 8), seed=st.integers(0, 10_000), density=st.floats(0.05, 0.95))
def test_element_removal_is_the_optimal_update_when_rows_are_independent(out, inp, seed, density):
    """With G diagonal the rows decouple, and removing each row's set through A⁻¹ is the constrained optimum."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=gen, dtype=torch.float64)
    g = torch.diag(torch.rand(out, generator=gen, dtype=torch.float64) + 0.5)
    a = random_spd(inp, gen)
    mask = torch.rand(out, inp, generator=gen) < density
    mask[0, 0] = True
    pruned = remove_elements(w, torch.linalg.inv(a), mask, budget=7)  # a tiny budget: one row per batch
    assert pruned[mask].abs().max() == 0
    torch.testing.assert_close(pruned, _constrained_optimum(w, g, a, mask), rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(remove_elements(w, None, mask), w.masked_fill(mask, 0))


def test_rows_and_columns_together_add_the_two_updates_and_zero_both():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    g_inv, a_inv = torch.linalg.inv(random_spd(6, gen)), torch.linalg.inv(random_spd(5, gen))
    torch.testing.assert_close(remove_rows_and_columns(w, g_inv, a_inv, [1, 4], []), remove_rows(w, g_inv, [1, 4]))
    torch.testing.assert_close(remove_rows_and_columns(w, g_inv, a_inv, [], [0, 2]), remove_columns(w, a_inv, [0, 2]))
    both = remove_rows_and_columns(w, g_inv, a_inv, [1], [2])
    expected = remove_rows(w, g_inv, [1]) + remove_columns(w, a_inv, [2]) - w
    expected[1], expected[:, 2] = 0, 0
    torch.testing.assert_close(both, expected)
    torch.testing.assert_close(remove_rows_and_columns(w, None, None, [1], [2]),
                               w.index_fill(0, torch.tensor([1]), 0).index_fill(1, torch.tensor([2]), 0))


def _decoder_weights(program):
    groups = program.analysis(group_analysis)
    return {w: matrix_of(program, groups.linears[w]) for w in decoder_linears(groups)}


@pytest.mark.parametrize("curvature", ["kfac", "kobd", "activations", "identity"])
@pytest.mark.parametrize("structures", ["rows_columns", "unstructured", "2:4"])
def test_the_masked_target_is_met_and_the_rest_of_the_model_is_untouched(tiny, structures, curvature):
    _, program = tiny("llama")
    PassManager([CleanupIR()]).run(program)
    before = dict(program.gm.named_parameters())
    scope = _decoder_weights(program)
    total = sum(m.numel() for m in scope.values())
    target = 0.5 if structures == "2:4" else 0.3
    surgeon = SurgeonMask(CALIBRATION, target=target, shots=2, structures=structures, curvature=curvature,
                          batch_size=4)
    PassManager([surgeon]).run(program)
    first, last = surgeon.reports
    assert first.fraction < last.fraction
    largest = max(max(m.shape) for m in scope.values())
    assert last.fraction == pytest.approx(target, abs=largest / total + 1e-9 if structures == "rows_columns" else 1e-3)
    for name, value in program.gm.named_parameters():
        if name.replace("_", ".") not in {w.replace("_", ".") for w in scope}:
            assert torch.equal(value, before[name]), f"{name} is outside the decoder linears and changed"
    if structures == "2:4":  # every block of four along a row has two zeros at least
        for w, m in _decoder_weights(program).items():
            zeros = m.eq(0).reshape(m.shape[0], -1, 4).sum(-1)
            assert bool((zeros >= 2).all()), w
    assert program(program.probe_input(batch=1, length=5)).shape == (1, 5, 128)
    assert last.parameters == program.num_parameters()


def test_dead_channels_left_by_the_mask_are_removed_for_real(tiny):
    """Zeroed columns of down_proj kill MLP channels: the pass deletes them, so the masked model shrinks."""
    _, program = tiny("llama")
    PassManager([CleanupIR()]).run(program)
    dense = program.num_parameters()
    surgeon = SurgeonMask(CALIBRATION, target=0.4, shots=2, structures="rows_columns", curvature="identity")
    PassManager([surgeon]).run(program)
    assert surgeon.reports[-1].parameters == program.num_parameters() < dense


@pytest.fixture(scope="module")
def trained():
    from fxslice import capture
    from fxslice.testing import trained_tiny_causal_lm

    return capture(trained_tiny_causal_lm("llama"))


def test_on_rows_and_columns_the_surgeon_beats_k_obd_l_obd_and_magnitude(trained):
    from fxslice.testing import arithmetic_sequences

    calib, test = arithmetic_sequences(16, seed=1000), arithmetic_sequences(16, seed=2000)
    pruned = {}
    for curvature in ("kfac", "kobd", "activations", "identity"):
        program = trained.clone()
        PassManager([CleanupIR()]).run(program)
        PassManager([SurgeonMask(calib, target=0.3, shots=6, curvature=curvature, batch_size=8)]).run(program)
        pruned[curvature] = perplexity(program, test)
    print(f"held-out perplexity at 30% of decoder weights zeroed (rows and columns): {pruned}")
    assert pruned["kfac"] < min(pruned["kobd"], pruned["activations"], pruned["identity"])
