import pytest
import torch

from fxslice import PassManager
from fxslice.core.graph import aten
from fxslice.passes import CleanupIR
from fxslice.testing import check_exact_pass, check_pass_leaves_alone


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


class _Slices(torch.nn.Module):
    """Two whole-dimension slices (dropped) and two partial ones (kept)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(16, 8)

    def forward(self, input_ids, use_cache=None):
        x = self.embed(input_ids)
        return x[:, :] * 2 + x[..., 1:].sum(-1, keepdim=True) + x[:, :, :3].sum(-1, keepdim=True) + x[:, :, :]


def test_cleanup_drops_whole_slices_only():
    from fxslice import capture_module

    program = capture_module(_Slices())
    ids = torch.randint(0, 16, (2, 5))
    before = program(ids)
    slices = lambda: program.graph.find_nodes(op="call_function", target=aten.slice.Tensor)  # noqa: E731
    assert len(slices()) >= 4
    PassManager([CleanupIR()]).run(program)
    kept = [(n.args[2], n.args[3]) for n in slices()]
    assert sorted(kept) == [(0, 3), (1, 9223372036854775807)]
    assert torch.equal(program(ids), before)


def test_cleanup_passes_the_shared_exact_pass_checks(tiny_programs):
    reports = check_exact_pass(CleanupIR, tiny_programs("llama", "gpt2", "phi3", "falcon", "opt", "gemma2"))
    assert len(reports) == 12 and all(r.modified for r in reports)


def test_cleanup_leaves_a_clean_graph_alone(plain_program):
    check_pass_leaves_alone(CleanupIR, [("no-norms", plain_program)])
