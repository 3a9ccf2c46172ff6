"""Loading a shared model never runs code: crafted graphs, hf `program` tensors, records and recipes each try to
create a marker file; the marker never appears and the load fails with one message naming what is wrong."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fxslice import CorruptModel, InvalidOption
from fxslice.models import io
from fxslice.models.io import GRAPH, LEGACY_GRAPH, RECORD, WEIGHTS, load, save
from fxslice.models.remote.graph_data import GraphDataError, graph_from_data, graph_to_data
from fxslice.testing import TINY_CONFIGS, tiny_causal_lm


class _Payload:
    """Unpickling this creates `marker`: what a crafted pickle does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _rewrite(root: Path, name: str, content: bytes) -> None:
    """Replace a file of a saved model and update its checksum, as an attacker would."""
    (root / name).write_bytes(content)
    record = json.loads((root / RECORD).read_text())
    record["graph_sha256" if name in (GRAPH, LEGACY_GRAPH) else "weights_sha256"] = io._sha256(root / name)
    (root / RECORD).write_text(json.dumps(record))


@pytest.fixture
def saved(tmp_path, tiny):
    return save(tiny("llama")[1], tmp_path / "model")


def _graph(root: Path) -> dict:
    return json.loads((root / GRAPH).read_text())


def _first(data: dict, op: str) -> dict:
    return next(n for n in data["nodes"] if n["op"] == op)


INJECTIONS = {
    # a call of a Python function instead of an operator
    "target os.system": lambda d, m: _first(d, "call_function").update(target="os.system", args=[f"touch {m}"]),
    "target builtins.exec": lambda d, m: _first(d, "call_function").update(
        target="builtins.exec", args=[f"open('{m}', 'w')"]),
    "target torch.load": lambda d, m: _first(d, "call_function").update(target="torch.load", args=[str(m)]),
    "target aten.sub through torch.": lambda d, m: _first(d, "call_function").update(target="torch.ops.aten.sub.Tensor"),
    "unregistered namespace": lambda d, m: _first(d, "call_function").update(target="evil::touch"),
    # code smuggled into the generated Python source
    "weight name": lambda d, m: _first(d, "get_attr").update(
        target=f'a") or __import__("pathlib").Path("{m}").touch() or getattr(self, "b'),
    "node name": lambda d, m: _first(d, "call_function").update(name=f'x = __import__("pathlib").Path("{m}").touch()'),
    "string argument": lambda d, m: _first(d, "call_function").update(
        args=[f'"); __import__("pathlib").Path("{m}").touch(); ("']),
    "tagged argument": lambda d, m: _first(d, "call_function").update(args=[{"python": f"Path('{m}').touch()"}]),
    "dtype name": lambda d, m: _first(d, "call_function").update(args=[{"dtype": "__import__('os')"}]),
    "module op": lambda d, m: _first(d, "call_function").update(op="call_module", target="os"),
    "input name": lambda d, m: _first(d, "placeholder").update(target=f"x=__import__('os').system('touch {m}')"),
}


@pytest.mark.parametrize("injection", sorted(INJECTIONS))
def test_a_crafted_graph_runs_nothing_and_is_refused_by_name(saved, tmp_path, injection):
    marker = tmp_path / "marker"
    data = _graph(saved)
    INJECTIONS[injection](data, marker)
    _rewrite(saved, GRAPH, json.dumps(data).encode())
    with pytest.raises(CorruptModel, match="graph.json"):
        load(saved)
    assert not marker.exists()


def test_an_old_pickled_graph_is_not_read_without_trust(saved, tmp_path):
    marker = tmp_path / "marker"
    (saved / GRAPH).unlink()
    _rewrite(saved, LEGACY_GRAPH, pickle.dumps(_Payload(marker)))
    with pytest.raises(CorruptModel, match="trust-pickle"):
        load(saved)
    assert not marker.exists()


def test_the_cli_refuses_a_crafted_model_in_one_line(saved, tmp_path):
    marker = tmp_path / "marker"
    data = _graph(saved)
    INJECTIONS["target os.system"](data, marker)
    _rewrite(saved, GRAPH, json.dumps(data).encode())
    for command in (["eval", str(saved), "--eval-windows", "1"], ["export", str(saved), "--out", str(tmp_path / "x.pt2")],
                    ["generate", str(saved), "hi"]):
        done = subprocess.run([sys.executable, "-m", "fxslice.cli", *command], capture_output=True, text=True)
        assert done.returncode == CorruptModel.exit_code, done.stderr[-2000:]
        assert "os.system" in done.stderr and "Traceback" not in done.stderr
    assert not marker.exists() and not (tmp_path / "x.pt2").exists()


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS)[::3])
def test_save_and_load_keep_the_logits_bit_for_bit_in_float64(tmp_path, family):
    from fxslice.models.capture import capture_module

    program = capture_module(tiny_causal_lm(family)).to(torch.float64)
    loaded = load(save(program, tmp_path / "m"))
    ids = program.probe_input()
    assert torch.equal(loaded(ids), program(ids))
    assert loaded.num_parameters() == program.num_parameters()
    shapes = [n.meta["val"].shape for n in program.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    again = [n.meta["val"].shape for n in loaded.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    assert [len(s) for s in again] == [len(s) for s in shapes]  # every node has its fake value back
    static = [[d for d in s if isinstance(d, int)] for s in shapes]
    assert [[d for d in s if isinstance(d, int)] for s in again] == static


def test_a_graph_round_trips_through_data_unchanged(tiny):
    program = tiny("gpt2")[1]
    data = json.loads(json.dumps(graph_to_data(program.graph)))
    assert graph_to_data(graph_from_data(data)) == data


def test_a_graph_with_a_python_function_cannot_be_saved(tmp_path, tiny):
    from fxslice import UnsupportedStructure

    program = tiny("llama")[1]
    node = next(n for n in program.graph.nodes if n.target == torch.ops.aten.embedding.default)
    with program.graph.inserting_after(node):
        extra = program.graph.call_function(torch.nn.functional.gelu, (node,))
    node.replace_all_uses_with(extra)
    extra.args = (node,)
    program.gm.recompile()
    with pytest.raises(UnsupportedStructure, match="not a PyTorch operator"):
        save(program, tmp_path / "m")
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------------------------- the record

def _quantized(tmp_path):
    from fxslice import PassManager
    from fxslice.passes.quantize import QuantizeWeights

    program = tiny_causal_lm("llama")
    from fxslice.models.capture import capture_module

    program = capture_module(program)
    PassManager([QuantizeWeights(4, group_size=16)]).run(program)
    return program, save(program, tmp_path / "q")


@pytest.mark.parametrize("edit", ["bits 4 -> 2", "bits 4 -> 8", "transposed flipped", "group_size 16 -> 32",
                                  "shape swapped"])
def test_an_edited_quantized_format_is_refused_naming_the_field(tmp_path, edit):
    _, root = _quantized(tmp_path)
    record = json.loads((root / RECORD).read_text())
    square, wide = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    name = wide if edit == "shape swapped" else square  # square: a flipped layout keeps every shape
    meta = record["quantized"][name]
    if edit.startswith("bits"):
        meta["bits"] = int(edit[-1])
    elif edit == "transposed flipped":
        meta["transposed"] = not meta["transposed"]
    elif edit.startswith("group_size"):
        meta["group_size"] = 32
    else:
        meta["shape"] = meta["shape"][::-1]
    (root / RECORD).write_text(json.dumps(record))
    with pytest.raises(CorruptModel, match="quantized"):
        load(root)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 10**12) | st.floats(allow_nan=True) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                    max_leaves=6)


@pytest.fixture(scope="module")
def quantized_model(tmp_path_factory):
    program, root = _quantized(tmp_path_factory.mktemp("fuzz"))
    return program, root, (root / RECORD).read_text()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_edit_of_the_record_loads_the_same_model_or_is_refused(quantized_model, data):
    """Fuzz `fxslice.json`: set any field, or any field of a quantized format, to any JSON value. The load either
    gives the saved model's logits or raises CorruptModel; never another error, never other weights."""
    program, root, original = quantized_model
    record = json.loads(original)
    if data.draw(st.booleans()):
        field = data.draw(st.sampled_from(sorted(record)))
        target = record
    else:
        target = record["quantized"][data.draw(st.sampled_from(sorted(record["quantized"])))]
        field = data.draw(st.sampled_from(sorted(target)))
    target[field] = data.draw(JSON | st.just(None))
    (root / RECORD).write_text(json.dumps(record))
    try:
        loaded = load(root)
    except CorruptModel:
        return
    finally:
        (root / RECORD).write_text(original)
    ids = program.probe_input()
    assert torch.equal(loaded(ids), program(ids))


# ---------------------------------------------------------------------------------------------- hf export

LOAD_HF = """
import sys, torch
sys.modules["fxslice"] = None
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
try:
    model(torch.tensor([[1, 2, 3]]))
except ValueError as exc:
    print("refused:", str(exc).splitlines()[0])
    sys.exit(3)
"""


@pytest.mark.parametrize("payload", ["pickle", "graph calling os.system"])
def test_a_crafted_program_tensor_in_an_hf_export_runs_nothing(tmp_path, tiny, payload):
    from safetensors.torch import load_file, save_file

    from fxslice.models.export import export_hf

    marker = tmp_path / "marker"
    out = export_hf(tiny("llama")[1], tmp_path / "hf", stock=False).path
    tensors = load_file(str(out / "model.safetensors"))
    if payload == "pickle":
        content = pickle.dumps(_Payload(marker))
    else:
        data = json.loads(bytes(tensors["program"].numpy()))
        INJECTIONS["target os.system"](data, marker)
        content = json.dumps(data).encode()
    tensors["program"] = torch.frombuffer(bytearray(content), dtype=torch.uint8)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["program_bytes"] = len(content)
    (out / "config.json").write_text(json.dumps(config))
    done = subprocess.run([sys.executable, "-c", LOAD_HF, str(out)], capture_output=True, text=True)
    assert done.returncode == 3, done.stderr[-2000:]
    assert "refused:" in done.stdout and not marker.exists()


# ---------------------------------------------------------------------------------------------- recipes

USER_STAGE = """
from pathlib import Path
Path({marker!r}).touch()  # runs on import
from fxslice.passes.rewrite.stages import Cleanup
class MyCleanup(Cleanup):
    kind = "my_cleanup"
"""


@pytest.mark.parametrize("where", ["stage", "pass"])
def test_a_recipe_naming_code_runs_nothing_without_trust_code(tmp_path, monkeypatch, where):
    from fxslice.passes import load_recipe

    marker = tmp_path / "marker"
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "mine.py").write_text(USER_STAGE.format(marker=str(marker)) + "\nfrom fxslice import as_pass\n@as_pass(exact=True)\ndef my_pass(gm):\n    return False\n")
    entry = "{stage: mine.py:MyCleanup}" if where == "stage" else "{stage: passes, passes: [cleanup, mine.py:my_pass]}"
    (folder / "r.yaml").write_text(f"stages:\n  - {entry}\n")
    monkeypatch.chdir(tmp_path)  # the file is found from the recipe's folder, not from here
    with pytest.raises(InvalidOption, match="names code.*mine.py.*--trust-code"):
        load_recipe(folder / "r.yaml")
    assert not marker.exists()
    recipe = load_recipe(folder / "r.yaml", trust_code=True)
    assert marker.exists() and len(recipe.stages) == 1


def test_compress_help_says_a_recipe_naming_code_runs_it():
    done = subprocess.run([sys.executable, "-m", "fxslice.cli", "compress", "--help"], capture_output=True, text=True,
                          env={"COLUMNS": "200", "PATH": ""})
    text = " ".join(done.stdout.split())
    assert "--trust-code" in text and "runs that code" in text


def test_graph_data_refuses_anything_but_operators():
    for target in ("builtins.eval", "operator.attrgetter", "torch.hub.load", "aten::nonexistent_op", "aten::add.nope"):
        data = {"format": "fxslice-graph/1", "nodes": [
            {"name": "x", "op": "placeholder", "target": "x"},
            {"name": "y", "op": "call_function", "target": target, "args": [{"node": "x"}]},
            {"name": "output", "op": "output", "args": [{"node": "y"}]}]}
        with pytest.raises(GraphDataError, match="node 1"):
            graph_from_data(data)


def test_a_weights_file_swapped_for_another_models_is_refused(tmp_path, tiny):
    a = save(tiny("llama")[1], tmp_path / "a")
    b = save(tiny("gpt2")[1], tmp_path / "b")
    _rewrite(a, WEIGHTS, (b / WEIGHTS).read_bytes())
    with pytest.raises(CorruptModel, match="disagree"):
        load(a)


def _legacy(root: Path, program) -> None:
    """Turn a saved model into what fxslice wrote before graph.json: the graph as a torch.export archive whose
    weights were left out (they are in the safetensors file)."""
    import io as bytes_io

    from fxslice.models.io import example_inputs

    args, shapes = example_inputs(program)
    exported = torch.export.export(program.gm, args, dynamic_shapes=shapes, strict=False)
    for name, value in list(exported.state_dict.items()):
        empty = torch.zeros(0, dtype=value.dtype)
        exported.state_dict[name] = torch.nn.Parameter(empty, requires_grad=False) if isinstance(
            value, torch.nn.Parameter) else empty
    buffer = bytes_io.BytesIO()
    torch.export.save(exported, buffer)
    (root / GRAPH).unlink()
    _rewrite(root, LEGACY_GRAPH, buffer.getvalue())


def test_an_old_model_converts_only_when_the_user_trusts_it(tmp_path, tiny):
    program = tiny("llama")[1]
    old = save(program, tmp_path / "old")
    _legacy(old, program)
    command = [sys.executable, "-m", "fxslice.cli", "upgrade", str(old), "--out", str(tmp_path / "new")]
    refused = subprocess.run(command, capture_output=True, text=True)
    assert refused.returncode == InvalidOption.exit_code and "--trust-pickle" in refused.stderr
    assert not (tmp_path / "new").exists()
    done = subprocess.run([*command, "--trust-pickle"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    new = load(tmp_path / "new")  # no trust needed any more
    ids = program.probe_input()
    assert torch.equal(new(ids), program(ids)) and (tmp_path / "new" / GRAPH).is_file()
