import pytest
import torch

from fxslice import PassManager
from fxslice.graph import aten
from passes import CleanupIR


@pytest.mark.parametrize("name", ["llama", "gpt2", "phi3", "falcon"])
def test_cleanup_preserves_outputs_and_is_idempotent(tiny, name):
    _, program = tiny(name)
    ids = program.probe_input()
    before = program(ids)
    first = PassManager([CleanupIR()], check_numerics=True).run(program)
    assert first.modified
    assert torch.equal(program(ids), before)
    targets = {n.target for n in program.graph.nodes}
    assert aten._assert_tensor_metadata.default not in targets
    assert aten.alias.default not in targets
    second = PassManager([CleanupIR()]).run(program)
    assert not second.modified


def test_cleanup_keeps_casts_that_change_dtype(tiny):
    _, program = tiny("llama")
    half = program.to(torch.bfloat16)
    PassManager([CleanupIR()]).run(half)
    casts = [n for n in half.graph.nodes if n.target in (aten.to.dtype, aten._to_copy.default)]
    assert casts, "the norm's float32 up-casts matter in bfloat16 and must stay"
