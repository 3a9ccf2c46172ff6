"""The manager's contract with a pass author: exactness is declared and proved in float64, edits are seen, returns
are checked, torch.fx passes are welcome when wrapped."""

import pytest
import torch
from torch.fx.passes.infra.pass_base import PassBase
from torch.fx.passes.infra.pass_base import PassResult as TorchFxResult

from fxslice import InvalidOption, Pass, PassCheckFailed, PassManager, PassResult, as_pass
from fxslice.core import pass_manager
from fxslice.passes import CleanupIR

aten = torch.ops.aten


def _gelu_to_tanh(graph) -> bool:
    changed = False
    for node in graph.find_nodes(op="call_function", target=aten.gelu.default):
        if node.kwargs.get("approximate", "none") == "none":
            node.kwargs = {**node.kwargs, "approximate": "tanh"}
            changed = True
    return changed


class GeluToTanh(Pass):
    """GELU -> its tanh approximation: moves logits by ~1e-6 relative, below float32's check."""

    name = "gelu_to_tanh"

    def __init__(self, exact: bool):
        self.exact = exact

    def call(self, program):
        return _gelu_to_tanh(program.graph)


def test_a_lossy_pass_declared_exact_is_refused_in_a_float32_program(tiny):
    _, program = tiny("gpt_neox")
    assert program.dtype == torch.float32
    with pytest.raises(PassCheckFailed, match=r"exact pass 'gelu_to_tanh' changed the logits of a float64 copy"):
        PassManager([GeluToTanh(exact=True)]).run(program)


def test_the_same_pass_declared_lossy_runs_and_its_change_is_measured_and_shown(tiny):
    _, program = tiny("gpt_neox")
    record = PassManager([GeluToTanh(exact=False)]).run(program).records[0]
    assert record.modified and record.checked == "" and 0 < record.max_relative_error < 1e-3
    assert "logits moved" in record.summary()
    text = PassManager([]).run(program).text() + "\n".join(
        f"{new.arguments}" for _, new in record.rewired)
    assert "approximate='tanh'" in text  # the diff shows the literal that changed


def test_an_exact_pass_is_proved_on_a_float64_copy_and_the_record_says_so(tiny):
    _, program = tiny("llama")
    record = PassManager([CleanupIR()]).run(program).records[0]
    assert record.modified and record.checked == "float64"
    assert record.float64_error is not None and record.float64_error <= 1e-9
    assert record.max_relative_error <= 1e-4 and "proved in float64" in record.summary()
    assert program.dtype == torch.float32  # the program itself is not converted


def test_a_program_too_large_for_the_float64_copy_is_checked_in_its_dtype_and_says_why(tiny, monkeypatch):
    monkeypatch.setattr(pass_manager, "FLOAT64_PROOF_BYTES", 0)
    _, program = tiny("llama")
    record = PassManager([CleanupIR()]).run(program).records[0]
    assert record.checked == "float32" and record.float64_error is None and "GiB" in record.unproved
    assert "not proved in float64" in record.summary()


def test_a_pass_that_does_not_say_whether_it_is_exact_is_refused_before_it_runs():
    class Undeclared(Pass):
        name = "undeclared"

        def call(self, program):  # pragma: no cover - must not run
            raise AssertionError("ran")

    with pytest.raises(InvalidOption, match="'undeclared' does not say whether it is exact"):
        PassManager([Undeclared()])
    with pytest.raises(InvalidOption, match="as_pass"):
        PassManager([lambda program: False])


def test_a_pass_that_returns_nothing_is_told_what_to_return(tiny):
    _, program = tiny("llama")

    @as_pass(exact=True)
    def forgets_return(program):
        pass

    with pytest.raises(InvalidOption, match="returned NoneType: return True when it edited"):
        PassManager([forgets_return]).run(program)


def test_a_class_pass_may_return_a_bool(tiny):
    _, program = tiny("gpt_neox")
    assert PassManager([GeluToTanh(exact=False)]).run(program).records[0].modified


class TorchFxGeluToTanh(PassBase):
    def call(self, graph_module):
        changed = _gelu_to_tanh(graph_module.graph)
        graph_module.recompile()
        return TorchFxResult(graph_module, changed)


def test_a_torch_fx_pass_is_refused_bare_and_runs_wrapped(tiny):
    _, program = tiny("gpt_neox")
    with pytest.raises(InvalidOption, match="TorchFxGeluToTanh' is a torch.fx PassBase; wrap it"):
        PassManager([TorchFxGeluToTanh()])
    record = PassManager([as_pass(TorchFxGeluToTanh(), exact=False)]).run(program).records[0]
    assert record.name == "TorchFxGeluToTanh" and record.modified and record.max_relative_error > 0
    with pytest.raises(PassCheckFailed, match="float64 copy"):
        _, fresh = tiny("gpt_neox")
        PassManager([as_pass(TorchFxGeluToTanh(), exact=True)]).run(fresh)


def test_a_pass_result_is_still_accepted(tiny):
    _, program = tiny("llama")
    assert not PassManager([as_pass(lambda p: PassResult(False), name="noop", exact=True)]).run(program).modified


def _example(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, path


def test_dropping_a_layer_computes_the_shorter_model_and_takes_its_weights():
    """In float64, the graph with the last layer dropped equals transformers' model built with one layer fewer."""
    from fxslice import capture
    from fxslice.testing.tiny_models import tiny_causal_lm

    model = tiny_causal_lm("llama", dtype=torch.float64)
    layers = model.config.num_hidden_layers
    program = capture(model)
    sdpa = len(program.graph.find_nodes(op="call_function", target=aten.scaled_dot_product_attention.default))
    drop, _ = _example("drop_layers")
    record = PassManager([drop.DropLastLayers(1)]).run(program).records[0]
    assert {p[1] for p in record.params} == {"removed"}
    assert all(p[0].startswith(f"model.layers.{layers - 1}.") for p in record.params)
    assert not any(f"layers.{layers - 1}." in n for n, _ in program.gm.named_parameters())
    remaining = program.graph.find_nodes(op="call_function", target=aten.scaled_dot_product_attention.default)
    assert len(remaining) == sdpa - 1  # torch.fx's own DCE keeps SDPA (nondeterministic); ours knows it is pure
    assert not program.graph.find_nodes(op="call_function", target=aten._assert_tensor_metadata.default) or all(
        n.args[0].users for n in program.graph.find_nodes(op="call_function", target=aten._assert_tensor_metadata.default))
    assert program.config["num_hidden_layers"] == layers - 1

    shorter = type(model)(type(model.config)(**{**model.config.to_dict(), "num_hidden_layers": layers - 1}))
    missing, unexpected = shorter.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(f"layers.{layers - 1}." in k for k in unexpected)
    ids = program.probe_input()
    with torch.no_grad():
        expected = shorter.to(torch.float64).eval()(ids).logits
    assert torch.allclose(program(ids), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("skeleton", [False, True], ids=["weights", "skeleton"])
def test_a_recipe_passes_arguments_to_a_pass_and_the_kv_cache_capture_follows_it(tmp_path, skeleton):
    """`{pass: drop_layers.py:DropLastLayers, n: 1}` runs; replayed on the KV-cache capture, the cache updates of the
    dropped layer go too, and step-by-step decoding gives the same logits as the whole sequence."""
    import shutil

    from fxslice import capture, replay
    from fxslice.models.kvcache import capture_cached
    from fxslice.passes import load_recipe
    from fxslice.testing.tiny_models import tiny_causal_lm

    _, source = _example("drop_layers")
    shutil.copy(source, tmp_path / "drop_layers.py")
    (tmp_path / "recipe.yaml").write_text("stages:\n- {stage: passes, passes: [{pass: drop_layers.py:DropLastLayers, n: 1}]}\n")
    with pytest.raises(InvalidOption, match="names code"):
        load_recipe(tmp_path / "recipe.yaml")
    recipe = load_recipe(tmp_path / "recipe.yaml", trust_code=True)
    model = tiny_causal_lm("llama")
    program, cached = capture(model), capture_cached(model)
    cached = cached.skeleton() if skeleton else cached
    result = recipe.run(program)
    assert [p.name for p in result.passes] == ["drop_last_layers"]
    replay(result.passes, cached, program)
    writes = cached.graph.find_nodes(op="call_function", target=aten.index_copy_.default)
    assert len(writes) == 2 * (model.config.num_hidden_layers - 1)
    ids = program.probe_input(batch=1, length=9)
    kv = cached.cache.allocate(1, 16, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        whole = program(ids)
        steps = torch.cat([cached.step(ids[:, :5], 0, kv), *(cached.step(ids[:, t:t + 1], t, kv) for t in range(5, 9))], 1)
    assert torch.allclose(steps, whole, atol=1e-5)


def test_a_pass_given_arguments_it_does_not_take_is_refused_with_what_it_takes(tmp_path):
    import shutil

    from fxslice.passes import load_pass

    _, source = _example("drop_layers")
    shutil.copy(source, tmp_path / "drop_layers.py")
    with pytest.raises(InvalidOption, match=r"unexpected keyword argument 'm'.*its arguments: n"):
        load_pass({"pass": f"{tmp_path}/drop_layers.py:DropLastLayers", "m": 1})
    with pytest.raises(InvalidOption, match="n must be a positive integer"):
        load_pass({"pass": f"{tmp_path}/drop_layers.py:DropLastLayers", "n": 0})
    with pytest.raises(InvalidOption, match="no pass name"):
        load_pass({"n": 1})


def test_a_passes_stage_declares_the_facts_a_recipe_orders_it_by():
    from fxslice import Recipe
    from fxslice.passes import RunPasses
    from fxslice.passes.rewrite.stages import Cleanup
    from fxslice.passes.surgeon.stages import Surgeon

    needs_clean = RunPasses(passes=("fuse_norms",), needs_facts=("clean",))
    with pytest.raises(InvalidOption, match="needs clean, which no earlier stage provides"):
        Recipe((needs_clean,))
    Recipe((Cleanup(), needs_clean))
    with pytest.raises(InvalidOption, match="quantized"):
        Recipe((Cleanup(), RunPasses(passes=("cleanup_ir",), provides_facts=("quantized",)), Surgeon()))
    with pytest.raises(InvalidOption, match=r"needs_facts \['tidy'\] are not facts"):
        RunPasses(passes=("cleanup_ir",), needs_facts=("tidy",))
    stage = RunPasses(passes=("cleanup", {"pass": "fuse_norms"}), provides_facts=("clean",))
    assert RunPasses.from_dict(stage.to_dict()) == stage
