import torch

from fxslice import PassManager, PassResult, as_pass
from fxslice.core.graph import aten


@as_pass(name="double_logits", exact=False)
def double_logits(program):
    """Known change: one new node before the output, the output rewired to it."""
    output = next(n for n in program.graph.nodes if n.op == "output")
    logits = output.args[0]
    with program.graph.inserting_before(output):
        doubled = program.graph.call_function(aten.mul.Tensor, (logits, 2.0))
    output.args = (doubled,)
    return PassResult(True)


def test_diff_lists_exactly_the_nodes_a_pass_changed(tiny):
    _, program = tiny("llama")
    names_before = {n.name for n in program.graph.nodes}
    result = PassManager([double_logits]).run(program)
    record = result.records[0]
    added = [n.name for n in record.added]
    assert len(added) == 1 and added[0] not in names_before
    assert [new.name for _, new in record.rewired] == ["output"]
    assert record.removed == [] and record.params == []
    node = next(n for n in program.graph.nodes if n.name == added[0])
    assert node.meta["fxslice_created_by"] == "double_logits"
    text = result.text()
    assert "double_logits" in text and added[0] in text
    page = result.html()
    assert page.startswith("<!doctype html>") and "class='n added'" in page and "(unchanged)" in page
    ids = program.probe_input()
    assert torch.isfinite(program(ids)).all()


def test_diff_reports_parameter_shape_changes(tiny):
    _, program = tiny("llama")

    @as_pass(name="shrink_head", exact=False)
    def shrink_head(p):
        head = p.gm.get_submodule("lm_head")
        head.weight = torch.nn.Parameter(head.weight.detach()[:, :32].clone())
        node = next(n for n in p.graph.nodes if n.op == "call_function" and n.target == aten.linear.default
                    and n.args[1].target == "lm_head.weight")
        with p.graph.inserting_before(node):
            sliced = p.graph.call_function(aten.slice.Tensor, (node.args[0], -1, 0, 32))
        node.args = (sliced, *node.args[1:])
        return True

    record = PassManager([shrink_head]).run(program).records[0]
    assert ("lm_head.weight", "reshaped", "[128, 64] -> [128, 32]") in record.params


def test_a_pass_that_edits_but_reports_no_change_is_named(tiny):
    import pytest
    import torch

    from fxslice import PassCheckFailed, PassManager

    _, program = tiny("llama")

    def forgets_to_say(program):
        node = next(n for n in program.graph.nodes if n.target == torch.ops.aten.rsqrt.default)
        with program.graph.inserting_after(node):
            doubled = program.graph.call_function(torch.ops.aten.mul.Tensor, (node, 2.0))
        node.replace_all_uses_with(doubled)
        doubled.args = (node, 2.0)
        return False  # wrong: it edited

    with pytest.raises(PassCheckFailed, match="pass 'forgets_to_say' changed the graph .* reported modified=False"):
        PassManager([as_pass(forgets_to_say, exact=False)]).run(program)


def test_a_changed_literal_shows_in_the_diff(tiny):
    import torch

    from fxslice import PassManager

    _, program = tiny("llama")

    def another_eps(program):
        node = next(n for n in program.graph.nodes if n.target == torch.ops.aten.add.Tensor
                    and isinstance(n.args[1], float))
        node.args = (node.args[0], 1e-5)
        return True

    result = PassManager([as_pass(another_eps, exact=False)]).run(program)
    assert len(result.records[0].rewired) == 1
    text = result.text()
    assert "rewired" in text and "1e-06" in text and "1e-05" in text
