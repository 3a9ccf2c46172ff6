"""Offloaded programs (`Program.offload`): weights stay in host memory, each op or calibration stage gets a copy on
the compute device. Without a GPU the compute device is the CPU itself (every weight is still copied, so the
streaming code runs) or `meta` (where a weight that was not streamed shows up as a CPU tensor)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fxslice.calibration.runner import StagedRunner
from fxslice.core.graph import module_path, tensor_of
from fxslice.core.offload import WeightSource, keep_host_weights
from fxslice.passes import prune_recipe, slicegpt_recipe

COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default, torch.ops.aten.clone.default}


class DevicesSeen(TorchDispatchMode):
    """The device types of every tensor an op reads or writes, copies between devices left out."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func not in COPIES:
            flat = torch.utils._pytree.tree_leaves((args, kwargs, out))
            self.seen.update(t.device.type for t in flat if isinstance(t, torch.Tensor))
        return out


def weight_devices(program) -> set[str]:
    return {p.device.type for p in program.gm.parameters()}


@pytest.mark.parametrize("name", ["llama", "gpt2", "mixtral", "falcon"])
def test_an_offloaded_program_computes_what_the_program_computes(tiny, name):
    _, program = tiny(name)
    ids = program.probe_input()
    offloaded = program.offload("cpu")
    assert offloaded.execution_device == torch.device("cpu")
    assert torch.equal(offloaded(ids), program(ids))


def test_an_offloaded_program_computes_only_on_its_device_and_keeps_its_weights(tiny):
    _, program = tiny("llama")
    offloaded = program.offload("meta")
    assert offloaded.device.type == "meta" and weight_devices(offloaded) == {"cpu"}
    ids = program.probe_input().to("meta")
    with DevicesSeen() as mode:
        logits = offloaded(ids)
    assert logits.device.type == "meta" and mode.seen == {"meta"}
    with pytest.raises(RuntimeError, match="device mismatch"):  # the same graph run directly, weights unstreamed
        offloaded.gm(ids)
    assert offloaded.to("meta").execution_device is None  # moving the whole program ends the offload


def test_a_kv_cache_program_decodes_offloaded():
    from fxslice.models.kvcache import capture_cached
    from fxslice.testing import tiny_causal_lm

    program = capture_cached(tiny_causal_lm("llama"))
    offloaded = program.offload("cpu")
    ids = program.probe_input(batch=1, length=6)
    kv_a, kv_b = (program.cache.allocate(1, 8, program.dtype, torch.device("cpu")) for _ in range(2))
    assert torch.equal(program.step(ids[:, :5], 0, kv_a), offloaded.step(ids[:, :5], 0, kv_b))
    assert torch.equal(program.step(ids[:, 5:], 5, kv_a), offloaded.step(ids[:, 5:], 5, kv_b))
    assert all(torch.equal(a, b) for a, b in zip(kv_a, kv_b, strict=True))


@pytest.mark.parametrize("recipe", [lambda: slicegpt_recipe(sparsity=0.25, batch_size=2),
                                    lambda: prune_recipe(target=0.2, shots=2, batch_size=2)], ids=["slicegpt", "surgeon"])
def test_compressing_offloaded_gives_the_same_model(tiny, recipe):
    calibration = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    _, program = tiny("llama")
    offloaded = program.offload("cpu")
    dense_bytes = program.num_bytes()
    recipe().run(program, calibration=calibration)
    result = recipe().run(offloaded, calibration=calibration)
    ours, theirs = dict(program.gm.named_parameters()), dict(offloaded.gm.named_parameters())
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert offloaded.execution_device == torch.device("cpu")
    reports = [s["report"] for s in result.record()["stages"] if s["stage"] == "slicegpt"]
    for report in (r["offload"] for r in reports):  # a stage held about a quarter of the model's weights
        assert 0 < report["peak_stage_weight_bytes"] < 0.3 * report["weight_bytes"]
        assert report["weight_bytes"] == dense_bytes


def test_a_calibration_stage_holds_only_its_own_weights_on_the_device(tiny):
    _, program = tiny("llama")
    offloaded = program.offload("cpu")
    nodes = [n for n in offloaded.graph.nodes if n.op == "call_function"]
    stages = [max((n for n in nodes if module_path(n).startswith(f"model.layers.{i}.")), key=nodes.index)
              for i in range(2)] + [nodes[-1]]
    runner = StagedRunner(offloaded, [offloaded.probe_input()])
    read: list[int] = []
    done: set = set()
    for stop in stages:
        todo = [n for n in nodes[: nodes.index(stop) + 1] if n not in done]
        done.update(todo)
        weights = {id(t): t.numel() * t.element_size() for n in todo for a in n.all_input_nodes if a.op == "get_attr"
                   for t in [tensor_of(offloaded.gm, a)] if isinstance(t, torch.Tensor)}
        read.append(sum(weights.values()))
        runner.run_through(stop)
    total = sum(p.numel() * p.element_size() for p in offloaded.gm.parameters())
    assert runner.peak_staged_bytes == max(read) < 0.6 * total
    assert StagedRunner(program, [program.probe_input()]).peak_staged_bytes == 0


def test_autograd_keeps_the_host_weight_not_the_device_copy(tiny):
    _, program = tiny("llama")
    node = next(n for n in program.graph.find_nodes(op="get_attr") if str(n.target).endswith("q_proj.weight"))
    host = tensor_of(program.gm, node)
    x = torch.randn(3, host.shape[1], requires_grad=True)
    expected = torch.autograd.grad(torch.nn.functional.linear(x, host.detach()).square().sum(), x)[0]
    for kept in (True, False):
        source = WeightSource(program.gm, torch.device("cpu"))
        copy = source(node)
        assert copy is not host and torch.equal(copy, host)
        with keep_host_weights(source) if kept else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            y = torch.ops.aten.linear.default(x, copy).square().sum()
        source.release()
        alive = weakref.ref(copy)
        del copy
        gc.collect()
        assert (alive() is None) == kept  # without the hooks autograd pins the copy until backward
        assert torch.allclose(torch.autograd.grad(y, x)[0], expected, rtol=1e-6, atol=1e-6)


def test_cli_slices_offloaded_to_the_same_saved_model(tmp_path, tiny_model_dir):
    import json
    import subprocess
    import sys

    from fxslice import load

    saved = {}
    for offload in (False, True):
        out = tmp_path / f"offload-{offload}"
        cmd = [sys.executable, "-m", "fxslice.cli", "slice", str(tiny_model_dir("llama", trained=True)), "--sparsity",
               "0.25", "--calib-windows", "4", "--calib-length", "32", "--eval-windows", "2", "--eval-length", "32",
               "--device", "cpu", "--out", str(out), *(["--offload"] if offload else [])]
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads((out / "fxslice.json").read_text())["offload"] is offload
        saved[offload] = load(out)
    plain, offloaded = (dict(saved[k].gm.named_parameters()) for k in (False, True))
    assert plain.keys() == offloaded.keys() and all(torch.equal(plain[k], offloaded[k]) for k in plain)
    assert saved[True].cache is not None and saved[True].execution_device is None  # loads as a plain program


def test_recovery_trains_an_offloaded_program_as_it_trains_the_program(tiny):
    from fxslice.passes.recovery.stages import Recover
    from fxslice.recipes import Recipe
    from fxslice.testing import arithmetic_sequences

    _, program = tiny("llama")
    offloaded = program.offload("cpu")
    data = arithmetic_sequences(16, seed=4)
    stage = Recover(rank=2, steps=3, lr=1e-2, batch_size=4, text="", held_out=4)
    ours = Recipe((stage,)).run(program, calibration=data).stages[0][1].report
    theirs = Recipe((stage,)).run(offloaded, calibration=data).stages[0][1].report
    assert theirs["losses"] == ours["losses"] and theirs["held_out_after"] < theirs["held_out_before"]
    plain, moved = dict(program.gm.named_parameters()), dict(offloaded.gm.named_parameters())
    assert plain.keys() == moved.keys() and all(torch.equal(plain[k], moved[k]) for k in plain)
