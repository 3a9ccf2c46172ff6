"""Untying a tied head: exact on every tied family, a no-op elsewhere, and a quantized model whose lookup and head
take their own widths, saved and reloaded, and read by llama.cpp."""

from __future__ import annotations

import pytest
import torch

from fxslice import PassManager, load
from fxslice.analysis.linears import logits_linear, weight_kinds
from fxslice.core.graph import tensor_of
from fxslice.models.io import save
from fxslice.passes.quantize.stages import Quantize
from fxslice.passes.rewrite import UntieHead
from fxslice.recipes import Recipe
from fxslice.testing import check_exact_pass

TIED = ["llama-tied", "gpt2", "gemma2", "bloom", "opt-project"]


def _table_and_head(program) -> tuple[torch.Tensor, torch.Tensor]:
    lookup = next(n for n in program.graph.nodes if n.target == torch.ops.aten.embedding.default)
    return tensor_of(program.gm, lookup.args[0]), tensor_of(program.gm, logits_linear(program).weight)


@pytest.mark.parametrize("name", TIED)
def test_untying_is_exact_and_gives_the_head_its_own_table(tiny_programs, name):
    [(_, program)] = tiny_programs(name)
    table, head = _table_and_head(program)
    assert table is head, f"{name} is not tied: the test needs a tied family"
    before = program.num_parameters()
    check_exact_pass(UntieHead, [(name, program.clone())])
    result = PassManager([UntieHead()]).run(program)
    assert result.records[0].checked == "float64"
    table, head = _table_and_head(program)
    assert table is not head and torch.equal(table, head)
    assert program.num_parameters() == before + table.numel()
    assert program.analysis(weight_kinds).head == str(logits_linear(program).weight.target)


@pytest.mark.parametrize("name", ["llama", "phi"])
def test_an_untied_head_is_left_alone(tiny_programs, name):
    [(_, program)] = tiny_programs(name)
    assert not PassManager([UntieHead()]).run(program).records[0].modified


def test_quantize_with_an_untied_head_gives_lookup_and_head_their_own_widths(tiny, tmp_path):
    _, program = tiny("llama-tied")
    _, tied = tiny("llama-tied")
    x = program.probe_input()
    reference = program(x)
    Recipe((Quantize(bits=4, method="rtn", group_size=16, embeddings=3, head=8, untie_head=True),)).run(program)
    Recipe((Quantize(bits=4, method="rtn", group_size=16, embeddings=3, head=8),)).run(tied)
    kinds = program.analysis(weight_kinds)
    [table] = kinds.tables
    assert program.quantized[table].bits == 3 and program.quantized[kinds.head].bits == 8
    assert tied.quantized[table].bits == 3 and tied.analysis(weight_kinds).head is None
    # the head scores at 8 bits: closer to the float logits than the tied model, whose head is the 3-bit table
    error = (program(x) - reference).abs().max()
    assert error < (tied(x) - reference).abs().max()
    save(program, tmp_path / "q")
    back = load(tmp_path / "q")
    assert torch.equal(back(x), program(x))
    assert set(back.quantized) == set(program.quantized)


def test_cli_quantize_untie_saves_the_lookup_and_the_head_at_their_own_widths(tmp_path, tiny_model_dir):
    import json
    import subprocess
    import sys

    out = tmp_path / "q"
    cmd = [sys.executable, "-m", "fxslice.cli", "quantize", str(tiny_model_dir("llama-tied")), "--method", "rtn",
           "--group-size", "16", "--embeddings", "4", "--head", "8", "--untie", "--eval", "none", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    widths = json.loads((out / "fxslice.json").read_text())["stages"][-1]["report"]["weights"]
    back = load(out)
    kinds = back.analysis(weight_kinds)
    [table] = kinds.tables
    assert widths[table] == 4 and widths[kinds.head] == 8
