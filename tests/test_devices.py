"""Programs carry no device of their own: after `to(device)` every tensor the graph computes is on that device.
Proved without a GPU on the `meta` device, where a forgotten `device=cpu` in a factory op shows up as a CPU tensor."""

from __future__ import annotations

import pytest
import torch
from torch import fx

from fxslice import PassManager, capture
from fxslice.passes import prune_recipe, slicegpt_recipe
from fxslice.passes.quantize import QuantizeWeights
from fxslice.testing import tiny_causal_lm

FAMILIES = ("llama", "gpt2", "gemma2", "opt", "phi3", "mixtral", "bloom", "falcon", "qwen3")


def devices_computed(program, *inputs: torch.Tensor) -> set[str]:
    """The device of every tensor any node of the graph produces, running it node by node."""
    seen: set[str] = set()

    class Watch(fx.Interpreter):
        def run_node(self, node: fx.Node):
            out = super().run_node(node)
            for value in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(value, torch.Tensor):
                    seen.add(value.device.type)
            return out

    Watch(program.gm).run(*inputs)
    return seen


@pytest.mark.parametrize("name", FAMILIES)
def test_a_program_moved_to_a_device_computes_only_there(name):
    program = capture(tiny_causal_lm(name))
    ids = torch.zeros(2, 7, dtype=torch.long, device="meta")
    moved = program.to("meta")
    assert devices_computed(moved, ids) == {"meta"}
    assert moved(ids).shape == (2, 7, program.vocab_size)
    assert {p.device.type for p in program.gm.parameters()} == {"cpu"}  # a copy: the original stays


def test_moving_only_the_weights_leaves_the_captured_device_in_the_graph():
    program = capture(tiny_causal_lm("llama"))
    program.gm.to("meta")  # what a user would try first: weights move, the graph still says device=cpu
    with pytest.raises(NotImplementedError, match="meta tensor"):  # RoPE's frequencies cast back to the CPU
        devices_computed(program, torch.zeros(2, 7, dtype=torch.long, device="meta"))


def test_sliced_pruned_and_quantized_programs_move_too(tiny):
    calibration = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    ids = torch.zeros(1, 5, dtype=torch.long, device="meta")
    for recipe in (slicegpt_recipe(sparsity=0.25, batch_size=4), prune_recipe(target=0.2, shots=1, batch_size=4)):
        _, program = tiny("llama")
        recipe.run(program, calibration=calibration)
        assert devices_computed(program.to("meta"), ids) == {"meta"}
    _, program = tiny("llama")
    PassManager([QuantizeWeights(4, group_size=16)]).run(program)
    assert devices_computed(program.to("meta"), ids) == {"meta"}


def test_to_takes_device_and_dtype_as_torch_does(tiny):
    _, program = tiny("llama")
    both = program.to("meta", torch.float64)
    assert {(p.device.type, p.dtype) for p in both.gm.parameters()} == {("meta", torch.float64)}
    assert program.to(dtype=torch.float64)(program.probe_input()).dtype == torch.float64


def test_a_kv_cache_program_moves_with_its_cache():
    from fxslice.models.kvcache import capture_cached

    moved = capture_cached(tiny_causal_lm("llama")).to("meta")
    ids = torch.zeros(1, 5, dtype=torch.long, device="meta")
    kv = moved.cache.allocate(1, 8, moved.dtype, torch.device("meta"))
    assert devices_computed(moved, ids, torch.tensor(0, device="meta"), *kv) == {"meta"}
