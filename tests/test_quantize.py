"""Weight quantization: exact packing, RTN's error bound, GPTQ's optimality where it is known and its gain where
inputs correlate, the tie kept, and a saved model that reloads to the same logits with the bytes it reports."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxslice import InvalidOption, PassManager, Program, capture, load
from fxslice.analysis.linears import weight_kinds
from fxslice.core import quantized
from fxslice.core.quantized import BITS, GRIDS, QuantizedWeight, pack_bits, round_trip, unpack_bits
from fxslice.models.io import save
from fxslice.passes.quantize import QuantizeWeights, gptq
from fxslice.passes.quantize.stages import Quantize
from fxslice.passes.rewrite.stages import Cleanup
from fxslice.passes.slicegpt.stages import Rotate, SliceGPT
from fxslice.recipes import Recipe
from fxslice.testing import arithmetic_sequences


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(BITS), st.integers(0, 200), st.integers(0, 2**31))
def test_packing_round_trips_exactly_in_the_promised_bytes(bits, count, seed):
    values = torch.randint(0, 1 << bits, (count,), generator=torch.Generator().manual_seed(seed))
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (count * bits + 7) // 8
    assert torch.equal(unpack_bits(packed, bits, count), values.to(torch.uint8))


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(BITS), st.integers(0, 200), st.sampled_from([8, 16, 24]), st.integers(0, 2**31))
def test_packing_in_steps_writes_the_stream_of_one_step(bits, count, chunk, seed):
    """A large table is packed a step of values at a time; the bytes are those of packing it at once."""
    values = torch.randint(0, 1 << bits, (count,), generator=torch.Generator().manual_seed(seed))
    whole = pack_bits(values, bits)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quantized, "_PACK_CHUNK", chunk)
        stepped = pack_bits(values, bits)
        assert torch.equal(unpack_bits(whole, bits, count), values.to(torch.uint8))
    assert torch.equal(stepped, whole)


def test_packing_refuses_values_that_do_not_fit():
    with pytest.raises(InvalidOption, match="3 bits"):
        pack_bits(torch.tensor([8]), 3)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(BITS), st.integers(1, 40), st.integers(1, 70), st.integers(1, 32), st.integers(0, 2**31),
       st.sampled_from(GRIDS), st.floats(-3, 3))
def test_round_to_nearest_is_within_half_a_step_of_every_weight(bits, rows, cols, group, seed, grid, shift):
    m = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 3 + shift
    q = QuantizedWeight.from_matrix(m, bits, group, grid=grid)
    assert q.q.dtype == torch.uint8 and int(q.q.max()) < 1 << bits
    error = (q.dequantize() - m).abs()
    assert (error <= q.expand(q.scale).abs() * 0.5 * (1 + 1e-3) + 1e-6).all()
    assert torch.equal(round_trip(m, bits, group, grid), q.dequantize())  # the fast path a learned rotation uses
    back = QuantizedWeight.from_tensors("w", q.tensors("w"), q.meta())
    assert torch.equal(back.dequantize(), q.dequantize())
    assert sum(t.numel() * t.element_size() for t in q.tensors("w").values()) == q.nbytes


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 30), st.integers(1, 70), st.sampled_from([1, 7, 32]), st.integers(1, 300), st.sampled_from(GRIDS),
       st.booleans(), st.integers(0, 2**31))
def test_dequantizing_a_few_rows_at_a_time_gives_every_weight_its_groups_value(rows, cols, group, numbers, grid,
                                                                               transposed, seed):
    """Each weight is its integer on its own group's grid, however many rows one step takes (`numbers`)."""
    m = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    q = QuantizedWeight.from_matrix(m, 4, group, grid=grid, transposed=transposed)
    expected = quantized.from_levels(q.q.float(), q.expand(q.scale).float(), q.expand(q.zero).float(), grid)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quantized, "DEQUANTIZE_NUMBERS", numbers)
        value = q.dequantize()
    assert torch.equal(value, expected.T if transposed else expected)


def test_a_symmetric_grid_stores_no_anchor_and_mirrors_its_levels_toward_the_larger_side():
    """Levels −8..7 times the scale: a group whose largest magnitude is positive takes a negative scale, so that
    its largest weight lands on the extra level, and nothing is clamped either way."""
    for sign in (1.0, -1.0):
        m = sign * torch.tensor([[8.0, -7.0, 1.0, 3.0] * 8])
        q = QuantizedWeight.from_matrix(m, 4, 32, grid="symmetric")
        assert float(q.scale) == -sign and torch.equal(q.dequantize(), m)
        assert set(q.tensors("w")) == {"w.qweight", "w.scales"}


def test_an_offset_grid_fits_a_one_signed_group_tighter_than_a_zero_point():
    """A group of positive weights: the integer zero point must keep 0 on the grid and spends levels below the
    smallest weight; the float offset starts at it, so its step is smaller and its error too."""
    m = torch.rand(16, 64, generator=torch.Generator().manual_seed(0)) + 1.0  # weights in [1, 2)
    zero, offset = (QuantizedWeight.from_matrix(m, 4, 32, grid=g) for g in ("zero_point", "offset"))
    assert (offset.scale < 0.6 * zero.scale).all()
    assert (offset.dequantize() - m).abs().max() < 0.6 * (zero.dequantize() - m).abs().max()


def _layer_error(m: torch.Tensor, q: QuantizedWeight, h: torch.Tensor) -> float:
    d = (m - q.dequantize()).double()
    return float(torch.trace(d @ h.double() @ d.T))


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    m = torch.randn(24, 64, generator=torch.Generator().manual_seed(0))
    h = torch.diag(torch.rand(64, generator=torch.Generator().manual_seed(1)) + 0.5)
    assert torch.equal(gptq(m, h, 3, 16).q, QuantizedWeight.from_matrix(m, 3, 16).q)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_round_to_nearest_on_the_layer_error_when_inputs_correlate(bits, grid):
    gen = torch.Generator().manual_seed(bits)
    m = torch.randn(32, 96, generator=gen)
    x = torch.randn(512, 96, generator=gen) @ (torch.eye(96) + 0.5 * torch.randn(96, 96, generator=gen))
    h = x.T @ x
    rtn = QuantizedWeight.from_matrix(m, bits, 32, grid=grid)
    for act_order in (False, True):
        q = gptq(m, h, bits, 32, grid=grid, act_order=act_order)
        assert q.grid == grid and _layer_error(m, q, h) < 0.8 * _layer_error(m, rtn, h)


@pytest.fixture
def counting():
    from fxslice.testing import trained_tiny_causal_lm

    return capture(trained_tiny_causal_lm("llama"))


def test_gptq_beats_round_to_nearest_on_a_trained_model(counting):
    test = arithmetic_sequences(32, seed=2000)
    losses = {}
    for method in ("rtn", "gptq", "dense"):
        program = counting.clone()
        if method != "dense":  # 2 bits: at 3 the two are within noise of each other on this model
            PassManager([QuantizeWeights(2, group_size=16, method=method, windows=arithmetic_sequences(16, seed=1000),
                                         embeddings=None, head=None)]).run(program)
        logits = program(test)[:, :-1]
        losses[method] = float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                                 test[:, 1:].reshape(-1)))
    assert losses["gptq"] - losses["dense"] < 0.8 * (losses["rtn"] - losses["dense"]), losses


@pytest.mark.parametrize("name,grid", [("llama-tied", "zero_point"), ("gpt2", "zero_point"), ("llama", "zero_point"),
                                       ("llama-tied", "offset"), ("gpt2", "offset"), ("llama", "symmetric")])
def test_a_saved_quantized_model_reloads_with_identical_logits_and_reports_its_file_bytes(tiny, name, grid, tmp_path):
    _, program = tiny(name)
    dense_bytes = program.num_bytes()
    PassManager([QuantizeWeights(4, group_size=16, grid=grid)]).run(program)
    x = program.probe_input()
    before = program(x)
    save(program, tmp_path / "q")
    back = load(tmp_path / "q")
    assert torch.equal(back(x), before)
    record = json.loads((tmp_path / "q" / "fxslice.json").read_text())
    header = (tmp_path / "q" / "model.safetensors").read_bytes()
    size = int.from_bytes(header[:8], "little")
    meta = json.loads(header[8: 8 + size])
    file_bytes = sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in meta.items() if k != "__metadata__")
    assert record["weight_bytes"] == file_bytes
    assert back.num_bytes() == program.num_bytes() < dense_bytes / 4  # 4-bit body, 8-bit tables, float norms
    assert set(back.quantized) == set(program.quantized) == set(record["quantized"])


def test_the_tie_stays_one_tensor_and_nothing_is_quantized_twice(tiny):
    _, program = tiny("llama-tied")
    quantize = QuantizeWeights(4, group_size=16)
    PassManager([quantize]).run(program)
    table = next(n for n in program.graph.nodes if n.target == torch.ops.aten.embedding.default).args[0]
    assert str(table.target) in program.quantized and program.quantized[str(table.target)].bits == 8
    again = PassManager([QuantizeWeights(2, group_size=16)]).run(program)
    assert not again.records[0].modified


def test_per_weight_widths_and_float_tables(tiny):
    _, program = tiny("llama")
    names = sorted(n for n, p in program.gm.named_parameters() if p.dim() == 2 and "layers" in n)
    widths = {n: (2, 3, 8)[i % 3] for i, n in enumerate(names)}
    PassManager([QuantizeWeights(widths, group_size=16, embeddings=None, head=None)]).run(program)
    assert {n: q.bits for n, q in program.quantized.items()} == widths


@pytest.mark.parametrize(("options", "message"), [
    (dict(bits=7), "bits"), (dict(group_size=0), "group_size"), (dict(method="awq"), "method"),
    (dict(embeddings=1), "bits"), (dict(budget_bits=4.5), "does nothing without a search"),
    (dict(grid="nf4"), "grid must be one of"),
])
def test_bad_quantize_options_are_refused(options, message):
    with pytest.raises(InvalidOption, match=message):
        Quantize(**options)


def test_gptq_without_windows_and_unknown_weights_are_refused(tiny):
    with pytest.raises(InvalidOption, match="windows"):
        QuantizeWeights(4, method="gptq")
    _, program = tiny("llama")
    with pytest.raises(InvalidOption, match="no linear reads"):
        PassManager([QuantizeWeights({"model.nothing.weight": 4})]).run(program)


def test_cli_quantize_saves_packed_weights_that_reload_and_generate(tmp_path, tiny_model_dir):
    import subprocess
    import sys

    out = tmp_path / "q4"
    cmd = [sys.executable, "-m", "fxslice.cli", "quantize", str(tiny_model_dir("llama")), "--bits", "4", "--group-size",
           "16", "--grid", "offset", "--calib-windows", "4", "--calib-length", "32", "--eval-windows", "2",
           "--eval-length", "32", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "bits per parameter" in done.stdout
    record = json.loads((out / "fxslice.json").read_text())
    assert [s["stage"] for s in record["stages"]] == ["cleanup", "quantize"]
    assert {q.get("grid") for q in record["quantized"].values()} == {"offset"}
    back = load(out)
    assert back.num_bytes() == record["stages"][1]["report"]["bytes"] and back.cache is not None
    generated = subprocess.run([sys.executable, "-m", "fxslice.cli", "generate", str(out), "abc", "--max-new-tokens", "4"],
                               capture_output=True, text=True)
    assert generated.returncode == 0, generated.stderr[-2000:]


def test_cli_quantize_rotates_and_searches_widths_under_a_byte_budget(tmp_path, tiny_model_dir):
    import subprocess
    import sys

    out, log = tmp_path / "mixed", tmp_path / "search.jsonl"
    cmd = [sys.executable, "-m", "fxslice.cli", "quantize", str(tiny_model_dir("llama")), "--budget-bits", "5.5",
           "--evaluations", "2", "--group-size", "16", "--calib-windows", "4", "--calib-length", "32",
           "--eval-windows", "2", "--eval-length", "32", "--log", str(log), "--rotation", "hadamard", "--search-tables",
           "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    stages = json.loads((out / "fxslice.json").read_text())["stages"]
    assert [s["stage"] for s in stages] == ["cleanup", "rotate", "quantize"]
    report = stages[2]["report"]
    assert report["search"]["budget_bits"] == 5.5 and 0 < report["bits_per_parameter"] <= 5.5
    assert sum(e["task"] == 1 for e in report["search"]["evaluations"]) == 2
    table_widths = report["search"]["table_widths"]
    assert len(table_widths) > 1 and report["weights"]["model.embed_tokens.weight"] in table_widths
    assert len(log.read_text().splitlines()) == 1 + len(report["search"]["evaluations"])  # header, then each one
    assert load(out).num_bytes() == report["bytes"]


def test_a_weight_changed_after_quantizing_is_not_saved_as_its_stale_integers(tiny, tmp_path):
    from fxslice.core.graph import set_tensor, tensor_of

    _, program = tiny("llama")
    PassManager([QuantizeWeights(4, group_size=16)]).run(program)
    name = next(iter(program.quantized))
    set_tensor(program.gm, name, tensor_of(program.gm, name) * 1.01)
    with pytest.raises(InvalidOption, match="changed after it was quantized"):
        save(program, tmp_path / "stale")
    assert not (tmp_path / "stale").exists()


def test_gptq_in_activation_order_keeps_the_stored_format_and_beats_round_to_nearest():
    gen = torch.Generator().manual_seed(5)
    m = torch.randn(32, 96, generator=gen)
    x = torch.randn(512, 96, generator=gen) @ (torch.eye(96) + 0.5 * torch.randn(96, 96, generator=gen))
    x[:, 7] *= 30  # an outlier input channel, which activation order quantizes first
    h = x.T @ x
    ordered = gptq(m, h, 3, 32, act_order=True)
    assert ordered.q.shape == m.shape and ordered.scale.shape == (32, 3)
    assert _layer_error(m, ordered, h) < 0.8 * _layer_error(m, QuantizedWeight.from_matrix(m, 3, 32), h)


@pytest.mark.parametrize("width", [64, 96, 576])
def test_the_randomized_hadamard_is_orthogonal_and_spreads_every_channel(width):
    from fxslice.passes.slicegpt.rotations import hadamard, orthogonality_error, randomized_hadamard

    h = hadamard(64)
    assert orthogonality_error(h) < 1e-12 and torch.allclose(h.abs(), torch.full_like(h, 64**-0.5))
    q = randomized_hadamard(seed=3)(None, width)
    assert q.shape == (width, width) and orthogonality_error(q) < 1e-12
    assert torch.equal(q, randomized_hadamard(seed=3)(None, width))  # the same matrix for every segment
    power = width & -width
    # every channel is spread over at least 2^k others: no entry is larger than a Hadamard's
    assert float(q.abs().max()) <= power**-0.5 + 1e-12
    with pytest.raises(ValueError, match="power of two"):
        hadamard(48)


@pytest.mark.parametrize("name", ["llama", "llama-tied"])
def test_a_hadamard_rotation_before_quantizing_is_exact_and_adds_no_shortcut(tiny, name):
    from fxslice.analysis.roles import SHORTCUT
    from fxslice.core import relative_error
    from fxslice.core.graph import role_of
    from fxslice.passes.rewrite.stages import Cleanup
    _, program = tiny(name)
    program = program.to(torch.float64)
    ids = program.probe_input()
    before, size = program(ids), program.num_parameters()

    def tables():  # distinct [128, 64] tensors: the vocabulary's table(s), and the MLPs' gate and up
        return len({id(p) for p in program.gm.parameters() if tuple(p.shape) == (128, 64)})

    count = tables()
    Recipe((Cleanup(), Rotate(rotation="hadamard"))).run(program)
    assert relative_error(program(ids), before) < 1e-12
    assert not [n for n in program.graph.nodes if role_of(n) == SHORTCUT]  # one matrix for the whole stream
    assert tables() == count  # a tied table stays one tensor: no copy for the head
    # the norm scales are fused; a tied head gains one 64 x 64 projection in front of it, nothing else
    assert program.num_parameters() <= size + (64 * 64 if name == "llama-tied" else 0)
    Recipe((Cleanup(), Rotate(rotation="random"))).run(rotated := tiny(name)[1].to(torch.float64))
    assert any(role_of(n) == SHORTCUT for n in rotated.graph.nodes)  # (a matrix per segment pays shortcuts)
    with pytest.raises(InvalidOption, match="hadamard"):
        Rotate(rotation="haar")


def _sliced(counting) -> Program:
    sliced = counting.clone()
    Recipe((Cleanup(), SliceGPT(sparsity=0.25))).run(sliced, calibration=arithmetic_sequences(16, seed=1000))
    return sliced


def test_a_slicings_shortcut_matrices_keep_their_own_width(counting):
    sliced = _sliced(counting)
    kinds = weight_kinds(sliced)
    body = set(kinds.linears) - kinds.shortcuts
    assert kinds.shortcuts and body and kinds.shortcuts <= set(kinds.linears)
    assert not weight_kinds(counting).shortcuts
    test = arithmetic_sequences(32, seed=2000)
    losses = {}
    for shortcuts in (None, 8, 2):
        program = sliced.clone()
        PassManager([QuantizeWeights(4, group_size=16, shortcuts=shortcuts, embeddings=None, head=None)]).run(program)
        widths = {n: q.bits for n, q in program.quantized.items()}
        assert {widths[n] for n in body} == {4}
        assert {widths.get(n) for n in kinds.shortcuts} == {shortcuts}
        logits = program(test)[:, :-1]
        losses[shortcuts] = float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                                    test[:, 1:].reshape(-1)))
    # 8-bit shortcuts cost almost nothing next to float ones; 2-bit ones (rounded like the body) cost much more
    assert abs(losses[8] - losses[None]) < 0.25 * abs(losses[2] - losses[None]), losses
    named = sorted(kinds.shortcuts)[0]  # a width given by name wins
    program = sliced.clone()
    PassManager([QuantizeWeights({named: 3}, group_size=16, embeddings=None, head=None)]).run(program)
    assert program.quantized[named].bits == 3
    assert {program.quantized[n].bits for n in kinds.shortcuts - {named}} == {8}


@pytest.mark.parametrize("allocation", ["constant", "loss_aware"])
def test_a_hadamard_rotation_after_slicing_is_exact_and_adds_nothing(allocation):
    """What a sliced model needs before it is quantized (its principal bases pile the energy into a few
    coordinates): the Hadamard runs after SliceGPT, on segments of equal or different widths; a random rotation
    there is refused."""
    from fxslice.core import relative_error
    from fxslice.testing import tiny_causal_lm

    program = capture(tiny_causal_lm("llama-tied")).to(torch.float64)
    recipe = (Cleanup(), SliceGPT(sparsity=0.25, allocation=allocation, head_rank=4))
    Recipe(recipe).run(program, calibration=arithmetic_sequences(8, seed=3))
    ids = program.probe_input()
    before, size = program(ids), program.num_parameters()
    shortcuts = weight_kinds(program).shortcuts
    Recipe((*recipe, Rotate(rotation="hadamard"), Quantize(bits=4, method="rtn"))).validate()
    result = Recipe((Rotate(rotation="hadamard"),), start=("captured", "clean", "sliced")).run(program)
    assert any(record.modified for record in result.stages[0][1].records)
    assert relative_error(program(ids), before) < 1e-12
    assert program.num_parameters() == size and weight_kinds(program).shortcuts == shortcuts
    with pytest.raises(InvalidOption, match="already sliced"):
        Recipe((*recipe, Rotate(rotation="random")))


def test_gptq_on_a_kv_cache_capture_chooses_the_plain_captures_integers():
    """Calibration runs a KV-cache graph on whole windows from an empty cache: a saved model (which keeps its cache)
    quantizes like the plain capture, integer for integer."""
    from fxslice import PassManager, capture
    from fxslice.models.kvcache import capture_cached
    from fxslice.passes.quantize import QuantizeWeights
    from fxslice.testing import tiny_causal_lm

    model = tiny_causal_lm("llama")
    windows = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    plain, cached = capture(model), capture_cached(model)
    for program in (plain, cached):
        PassManager([QuantizeWeights(4, group_size=32, method="gptq", windows=windows)]).run(program)
    assert plain.quantized.keys() == cached.quantized.keys()
    assert all(torch.equal(plain.quantized[k].q, cached.quantized[k].q) for k in plain.quantized)


def test_gptq_is_sequential_and_holds_one_inputs_statistics(tiny, monkeypatch):
    """GPTQ calibrates each linear on what the weights quantized before it compute (the sweep gives an input's Σxxᵀ
    before any of its readers runs, and goes on with the quantized weights): the integers are those of a plain
    reference that collects each weight's statistics afresh from the program as quantized so far. At most one
    input's statistics is alive while a weight is quantized (at 7 B all of them would be 30 GB). Statistics handed
    in (a width search's) are used as given and stay whole."""
    import weakref

    from fxslice.analysis.linears import weight_kinds
    from fxslice.calibration import moments
    from fxslice.calibration.moments import dense_linears, linear_statistics
    from fxslice.passes.quantize import quantize as module

    _, program = tiny("llama")
    windows = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    kinds = program.analysis(weight_kinds)
    targets = [*kinds.linears, kinds.head]
    collected, reference, reused = program.clone(), program.clone(), program.clone()

    alive, made, most = weakref.WeakSet(), [], []

    class Counted(moments.SecondMoment):
        def __init__(self, **options):
            super().__init__(**options)
            alive.add(self)
            made.append(1)

    real_store = module._store
    monkeypatch.setattr(moments, "SecondMoment", Counted)
    monkeypatch.setattr(module, "_store", lambda *a: most.append(len(alive)) or real_store(*a))
    PassManager([QuantizeWeights(4, group_size=32, method="gptq", windows=windows)]).run(collected)
    monkeypatch.undo()
    uses, order = dense_linears(program), {n.name: i for i, n in enumerate(program.graph.nodes)}
    assert len(made) == len({uses[w].input for w in targets}) >= 9 and max(most) <= 1

    PassManager([QuantizeWeights({}, group_size=32, head=None)]).run(reference)  # the table, rounded first
    for weight in sorted(targets, key=lambda w: order[uses[w].input.name]):
        statistics = linear_statistics(reference, windows, linears=[weight])
        width = 8 if weight == kinds.head else 4  # the untied head at its own default width
        PassManager([QuantizeWeights({weight: width}, group_size=32, method="gptq", statistics=statistics,
                                     embeddings=None, head=None)]).run(reference)
    assert collected.quantized.keys() == reference.quantized.keys() and len(collected.quantized) == len(targets) + 1
    for k, q in collected.quantized.items():
        assert torch.equal(q.q, reference.quantized[k].q) and torch.equal(q.scale, reference.quantized[k].scale), k
    ids = program.probe_input()
    assert torch.equal(collected(ids), reference(ids))

    given = linear_statistics(program, windows, linears=targets)  # from the float program: not what the sweep saw
    PassManager([QuantizeWeights(4, group_size=32, method="gptq", statistics=given)]).run(reused)
    assert all(m.sum is not None for m in given.inputs.values())
    assert reused.quantized.keys() == collected.quantized.keys()
    assert not all(torch.equal(q.q, collected.quantized[k].q) for k, q in reused.quantized.items())


def test_gptq_stopped_part_way_continues_to_the_integers_of_one_run(tiny):
    """What makes a quantization resumable from a checkpoint of the program alone: the first weights quantized in
    one pass, the rest in another, give the integers of a single pass."""
    from fxslice.analysis.linears import weight_kinds

    _, program = tiny("llama")
    windows = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    whole, parts = program.clone(), program.clone()
    PassManager([QuantizeWeights(4, group_size=32, method="gptq", windows=windows)]).run(whole)
    first = list(program.analysis(weight_kinds).linears)[:5]
    PassManager([QuantizeWeights(dict.fromkeys(first, 4), group_size=32, method="gptq", windows=windows,
                                 head=None)]).run(parts)
    assert len(parts.quantized) == 6  # the five and the table
    PassManager([QuantizeWeights(4, group_size=32, method="gptq", windows=windows)]).run(parts)
    assert whole.quantized.keys() == parts.quantized.keys()
    for k, q in whole.quantized.items():
        assert torch.equal(q.q, parts.quantized[k].q) and torch.equal(q.scale, parts.quantized[k].scale), k


def test_streamed_moments_without_a_replacement_are_linear_statistics(tiny):
    from fxslice.calibration.moments import dense_linears, linear_statistics, streamed_input_moments

    _, program = tiny("qwen2")
    windows = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(1))
    names = list(dense_linears(program))
    whole = linear_statistics(program, windows, linears=names)
    streamed = dict(streamed_input_moments(program, windows, names))
    assert streamed.keys() == set(names)
    assert all(torch.equal(streamed[n], whole.A(n)) for n in names)
