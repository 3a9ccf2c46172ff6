"""UnstackWeights: a stacked weight read one constant slice at a time becomes one weight per slice, exactly; a
stacked weight read any other way stays."""

import torch
from torch import nn

from fxslice import PassManager, capture_module
from fxslice.core.graph import aten
from fxslice.passes import CleanupIR, UnstackWeights
from fxslice.testing import check_exact_pass


class _Experts(nn.Module):
    """Tokens split into two parts by position, part i through `linear(x_i, W[i])`; `batched` reads a second
    stacked weight whole (bmm), which must stay stacked."""

    def __init__(self, batched: bool = False):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.weight = nn.Parameter(torch.randn(2, 8, 8))
        self.other = nn.Parameter(torch.randn(2, 8, 8)) if batched else None
        self.head = nn.Linear(8, 16)

    def forward(self, input_ids, use_cache=None):
        x = self.embed(input_ids)
        first, second = x.split([1, x.shape[1] - 1], dim=1)
        y = torch.cat([nn.functional.linear(first, self.weight[0]), nn.functional.linear(second, self.weight[1])], 1)
        if self.other is not None:
            y = y + torch.einsum("btd,ed->bte", y, self.other.sum(0))
        return self.head(x + y)


def test_unstacking_is_exact_and_names_the_slices():
    module = _Experts()
    program = capture_module(module)
    ids = torch.randint(0, 16, (2, 5))
    before = program(ids)
    PassManager([CleanupIR(), UnstackWeights()]).run(program)
    assert torch.equal(program(ids), before)
    names = {n for n, _ in program.gm.named_parameters()}
    assert {"weight_0", "weight_1"} <= names and "weight" not in names
    assert not program.graph.find_nodes(op="call_function", target=aten.select.int)
    assert torch.equal(program.gm.get_parameter("weight_1"), module.weight[1])


def test_a_stacked_weight_read_whole_is_left_alone():
    program = capture_module(_Experts(batched=True))
    PassManager([CleanupIR(), UnstackWeights()]).run(program)
    names = {n for n, _ in program.gm.named_parameters()}
    assert "other" in names and {"weight_0", "weight_1"} <= names


def test_unstacking_passes_the_shared_exact_pass_checks(tiny_programs):
    reports = check_exact_pass(UnstackWeights, tiny_programs("jetmoe"), prepare=lambda: [CleanupIR()])
    assert len(reports) == 2 and all(r.modified and r.max_relative_error == 0 for r in reports)
