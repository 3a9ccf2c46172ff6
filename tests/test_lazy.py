"""Weights left on disk (`fxslice.models.lazy`, `fxslice.core.disk`): a capture that holds no weight computes what
the eager capture computes, a compression through it saves the very bytes the in-memory one saves, a weight on disk
cannot be edited in place, and the safetensors file written tensor by tensor reads back exactly."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import fxslice
from fxslice import CaptureError, CorruptModel, InvalidOption
from fxslice.core.disk import DiskTensor, Scratch, read_tensor, tensors_in
from fxslice.core.graph import tensor_of
from fxslice.models.capture import capture_module
from fxslice.models.lazy import capture_lazily
from fxslice.models.tensor_file import DTYPE_CODES, Deferred, write_tensors
from fxslice.recipes import Calibration
from fxslice.testing import char_tokenizer, tiny_causal_lm


def _checkpoint(tmp_path, family: str, dtype: torch.dtype = torch.bfloat16):
    """The tiny model as a sharded checkpoint in `dtype` (as the hub's are), with a character tokenizer."""
    path = tmp_path / family
    tiny_causal_lm(family).to(dtype).save_pretrained(path, max_shard_size="40KB")
    char_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("family", ["llama-tied", "gemma2", "phi3", "gpt2", "falcon"])
def test_a_lazy_capture_computes_the_eager_captures_logits_without_holding_a_weight(tmp_path, family):
    path = _checkpoint(tmp_path, family)
    assert len(list(path.glob("*.safetensors"))) > 1  # sharded
    eager = capture_module(transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    lazy, cached = capture_lazily(path, with_cache=True)
    weights = [tensor_of(lazy.gm, n) for n in lazy.graph.find_nodes(op="get_attr")]
    parameters = [w for w in weights if isinstance(w, torch.nn.Parameter)]
    assert parameters and all(isinstance(w, DiskTensor) for w in parameters)
    assert lazy.num_parameters() == eager.num_parameters() and lazy.dtype == torch.float32
    ids = eager.probe_input()
    assert torch.equal(lazy(ids), eager(ids))
    kv = cached.cache.allocate(2, 12, torch.float32)
    steps = torch.cat([cached.step(ids[:, :5], 0, kv), cached.step(ids[:, 5:], 5, kv)], 1)
    torch.testing.assert_close(steps, eager(ids), rtol=1e-4, atol=1e-4)


def test_a_float64_copy_of_a_lazy_program_is_written_to_disk_too(tmp_path, monkeypatch):
    """The copy exact passes are proved on: converted weight by weight into the scratch folder, not into memory."""
    monkeypatch.setattr(Scratch, "MIN_BYTES", 0)
    path = _checkpoint(tmp_path, "llama", torch.float32)
    eager = capture_module(transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    lazy, _ = capture_lazily(path)
    wide = lazy.to(torch.float64)
    weights = [p for p in wide.gm.parameters()]
    assert weights and all(isinstance(w, DiskTensor) and w.dtype == torch.float64 for w in weights)
    ids = eager.probe_input()
    assert torch.equal(wide(ids), eager.to(torch.float64)(ids))


@pytest.mark.parametrize("family", ["mixtral", "gpt_neox"])
def test_a_family_whose_loader_renames_its_weights_is_refused_with_the_names(tmp_path, family):
    path = tmp_path / family
    tiny_causal_lm(family).save_pretrained(path)
    with pytest.raises(CaptureError, match="not in the checkpoint under their own names .first: .*without lazy"):
        capture_lazily(path)


def _recipe(kind: str, text: str):
    from fxslice.passes import prune_recipe, slicegpt_recipe
    from fxslice.passes.quantize.stages import Quantize
    from fxslice.passes.rewrite.stages import Cleanup
    from fxslice.recipes import Recipe

    calibration = Calibration(source=text, windows=4, length=32)
    return {"slice": lambda: slicegpt_recipe(sparsity=0.25, multiple=4, calibration=calibration),
            "prune": lambda: prune_recipe(target=0.2, shots=2, calibration=calibration),
            "quantize": lambda: Recipe((Cleanup(), Quantize(bits=4, group_size=16)), calibration)}[kind]()


@pytest.mark.parametrize(("family", "kind"), [("llama", "slice"), ("qwen3", "slice"), ("phi3", "prune"),
                                              ("gemma2", "quantize")])
def test_compressing_with_weights_on_disk_saves_the_bytes_the_in_memory_run_saves(tmp_path, monkeypatch, family, kind):
    monkeypatch.setattr(Scratch, "MIN_BYTES", 0)  # every edited weight goes to the scratch folder, however small
    written = []
    real_write = Scratch.write
    monkeypatch.setattr(Scratch, "write", lambda self, value: written.append(self.folder) or real_write(self, value))
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    path = _checkpoint(tmp_path, family, torch.float32)
    reports = {lazy: fxslice.compress(str(path), _recipe(kind, str(text)), out=tmp_path / f"out-{lazy}",
                                      evaluation=str(text), eval_windows=2, eval_length=32, lazy=lazy, progress=False)
               for lazy in (False, True)}
    assert written  # the edits went through scratch files
    memory, disk = (load_file(tmp_path / f"out-{lazy}" / "model.safetensors") for lazy in (False, True))
    assert memory.keys() == disk.keys() and all(torch.equal(memory[k], disk[k]) for k in memory)
    assert reports[True].perplexity == reports[False].perplexity
    assert reports[True].record["lazy"] is True
    ids = reports[True].program.probe_input()
    assert torch.equal(fxslice.load(tmp_path / "out-True")(ids), fxslice.load(tmp_path / "out-False")(ids))
    del reports
    gc.collect()
    assert not written[0].exists()  # the scratch folder went with the program


def test_lazy_refuses_a_module_already_in_memory():
    from fxslice.passes import slicegpt_recipe

    with pytest.raises(InvalidOption, match="lazy loading reads a checkpoint"):
        fxslice.compress(tiny_causal_lm("llama"), slicegpt_recipe(sparsity=0.25), lazy=True, evaluation=None)


def test_a_weight_on_disk_is_read_by_ops_only_and_cannot_be_edited_in_place(tmp_path, monkeypatch):
    value = torch.randn(6, 5, dtype=torch.bfloat16)
    save_file({"w": value}, str(tmp_path / "w.safetensors"))
    weight = DiskTensor(tmp_path / "w.safetensors", "w", value.shape, torch.float32)
    reads = []
    real_load = DiskTensor.load
    monkeypatch.setattr(DiskTensor, "load", lambda self: reads.append(self.key) or real_load(self))
    alias = weight.detach()
    empty = torch.empty_like(weight, device="meta")
    assert isinstance(alias, DiskTensor) and empty.shape == value.shape and not reads
    x = torch.randn(3, 5)
    assert torch.equal(torch.nn.functional.linear(x, weight), torch.nn.functional.linear(x, value.float()))
    assert reads == ["w"]
    with pytest.raises(RuntimeError, match="mul_.* on .* read-only: compute the new value and write it with"):
        weight.mul_(2)
    with pytest.raises(RuntimeError, match="read-only"):
        weight[0] = 0


_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int8, torch.uint8, torch.bool]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_DTYPES), st.lists(st.integers(0, 5), max_size=3)), min_size=1, max_size=6),
       st.integers(0, 2**31))
def test_a_file_written_tensor_by_tensor_reads_back_as_save_file_writes_it(tmp_path_factory, specs, seed):
    gen = torch.Generator().manual_seed(seed)
    tensors = {f"t{i}": (torch.randn(shape, generator=gen) * 50).to(dtype) for i, (dtype, shape) in enumerate(specs)}
    folder = tmp_path_factory.mktemp("files")
    write_tensors(folder / "ours.safetensors", tensors, {"k": "v"})
    save_file(tensors, str(folder / "theirs.safetensors"), metadata={"k": "v"})
    ours, theirs = load_file(folder / "ours.safetensors"), load_file(folder / "theirs.safetensors")
    assert ours.keys() == theirs.keys() == tensors.keys()
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in tensors)
    assert set(DTYPE_CODES) >= set(_DTYPES)
    for path in (folder / "ours.safetensors", folder / "theirs.safetensors"):  # fxslice's own reader, either file
        entries = tensors_in(path)
        assert {k: (e.dtype, e.shape) for k, e in entries.items()} == {
            k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
        assert all(torch.equal(read_tensor(path, k), tensors[k]) for k in tensors)


def test_a_deferred_tensor_is_made_when_written_and_must_keep_its_promise(tmp_path):
    """A quantized weight's packed integers are made only as the writer reaches them; a maker that gives another
    shape or dtype than promised stops the write instead of corrupting the header's byte ranges."""
    made = []
    value = torch.arange(12, dtype=torch.uint8)
    deferred = Deferred((12,), torch.uint8, lambda: made.append(1) or value)
    write_tensors(tmp_path / "ok.safetensors", {"a": torch.ones(3), "b": deferred})
    assert made == [1] and torch.equal(load_file(tmp_path / "ok.safetensors")["b"], value)
    with pytest.raises(RuntimeError, match="promised"):
        write_tensors(tmp_path / "bad.safetensors", {"b": Deferred((13,), torch.uint8, lambda: value)})


def test_a_broken_safetensors_file_is_refused_naming_it(tmp_path):
    import json
    import struct

    good = tmp_path / "good.safetensors"
    save_file({"w": torch.ones(4, 4)}, str(good))
    data = good.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + length])

    def variant(name: str, **entry) -> Path:
        path = tmp_path / f"{name}.safetensors"
        text = json.dumps({"w": {**header["w"], **entry}}).encode()
        path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length:])
        return path

    with pytest.raises(CorruptModel, match="dtype F4, which fxslice does not read"):
        tensors_in(variant("dtype", dtype="F4"))
    with pytest.raises(CorruptModel, match="do not fit its shape"):
        tensors_in(variant("shape", shape=[4, 5]))
    with pytest.raises(CorruptModel, match="do not fit"):
        tensors_in(variant("offsets", data_offsets=[0, 10**6]))
    (tmp_path / "short.safetensors").write_bytes(data[:6])
    with pytest.raises(CorruptModel, match="not a safetensors file"):
        tensors_in(tmp_path / "short.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data)
    assert tensors_in(truncated)  # the header read, then the file cut short under its reader
    truncated.write_bytes(data[:-8])
    with pytest.raises(CorruptModel):
        read_tensor(truncated, "w")


def test_the_cli_leaves_the_weights_on_disk_when_asked(tiny_model_dir, tmp_path):
    import json
    import subprocess
    import sys

    model = tiny_model_dir("llama")
    done = subprocess.run([sys.executable, "-m", "fxslice.cli", "prune", str(model), "--target", "0.2", "--shots", "2",
                           "--calib-windows", "4", "--calib-length", "32", "--eval", "none", "--lazy", "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(weights left on disk)" in done.stderr
    record = json.loads((tmp_path / "out" / "fxslice.json").read_text())
    assert record["lazy"] is True and record["parameters"] < record["dense_parameters"]
    assert fxslice.load(tmp_path / "out").num_parameters() == record["parameters"]


@pytest.mark.parametrize("kind", ["sliced+cache", "quantized"])
def test_a_saved_model_loads_lazily_and_computes_what_it_computes_loaded_whole(tmp_path, monkeypatch, exportable, kind):
    monkeypatch.setattr(Scratch, "MIN_BYTES", 0)
    program = exportable(kind)
    fxslice.save(program, tmp_path / "m")
    whole, lazy = fxslice.load(tmp_path / "m"), fxslice.load(tmp_path / "m", lazy=True)
    parameters = list(lazy.gm.parameters())
    assert parameters and all(isinstance(p, DiskTensor) for p in parameters)
    assert lazy.quantized.keys() == whole.quantized.keys() and lazy.num_parameters() == whole.num_parameters()
    ids = program.probe_input()
    assert torch.equal(lazy(ids), whole(ids))
    fxslice.save(lazy, tmp_path / "again")  # written tensor by tensor from the files it reads
    a, b = load_file(tmp_path / "m" / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_larger_than_half_the_available_memory_is_left_on_disk_unasked(tmp_path, monkeypatch):
    import importlib

    from fxslice.passes import slicegpt_recipe

    job = importlib.import_module("fxslice.jobs.compress")  # the module (the package exports the function by its name)

    path = _checkpoint(tmp_path, "llama")
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    recipe = slicegpt_recipe(sparsity=0.25, calibration=Calibration(source=str(text), windows=2, length=16))
    weights = sum(p.numel() for p in tiny_causal_lm("llama").parameters()) * 4  # float32 bytes
    for free, expected in ((2 * weights + 1, False), (2 * weights - 1, True)):
        monkeypatch.setattr(job, "available_bytes", lambda free=free: free)
        notes = []
        report = fxslice.compress(str(path), recipe, evaluation=None, progress=False, note=notes.append)
        assert report.record["lazy"] is expected
        assert any("stay on disk (lazy)" in n for n in notes) is expected
    explicit = fxslice.compress(str(path), recipe, evaluation=None, progress=False, lazy=False, note=notes.append)
    assert explicit.record["lazy"] is False  # asked for: kept in memory whatever is free


def test_a_lazily_loaded_model_exports_the_files_the_whole_one_exports(tmp_path, exportable):
    from fxslice.models.export import export_hf
    from fxslice.models.gguf_export import export_gguf

    fxslice.save(exportable("pruned"), tmp_path / "m")
    for how, program in (("whole", fxslice.load(tmp_path / "m")), ("lazy", fxslice.load(tmp_path / "m", lazy=True))):
        export_gguf(program, tmp_path / f"{how}.gguf", weight_type="f32")
        export_hf(program, tmp_path / f"{how}-hf")
    assert (tmp_path / "lazy.gguf").read_bytes() == (tmp_path / "whole.gguf").read_bytes()
    a, b = (load_file(tmp_path / f"{how}-hf" / "model.safetensors") for how in ("whole", "lazy"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
