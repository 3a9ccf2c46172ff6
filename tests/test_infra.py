import pytest
import torch

from fxslice import Pass, PassCheckFailed, PassManager, PassResult, as_pass
from fxslice.core.graph import set_tensor, tensor_of


class CorruptAWeight(Pass):
    """Claims to be exact but adds noise to one weight: the manager must catch it."""

    name = "corrupt_a_weight"
    exact = True

    def call(self, program):
        node = next(n for n in program.graph.nodes if n.op == "get_attr" and "q_proj" in n.target)
        set_tensor(program.gm, node.target, tensor_of(program.gm, node) + 0.1)
        return PassResult(True)


@as_pass(name="drop_output_dependency", exact=True)
def break_signature(program):
    """Feeds the model constant tokens: input_ids becomes unused."""
    input_ids = next(n for n in program.graph.nodes if n.op == "placeholder")
    with program.graph.inserting_after(input_ids):
        zeros = program.graph.call_function(torch.ops.aten.zeros.default, ([2, 12],), {"dtype": torch.int64})
    input_ids.replace_all_uses_with(zeros)
    return True


def test_manager_names_the_pass_that_changed_the_logits(tiny):
    _, program = tiny("llama")
    with pytest.raises(PassCheckFailed, match="corrupt_a_weight"):
        PassManager([CorruptAWeight()], check_numerics=True).run(program)


def test_lossy_pass_is_allowed_to_change_the_logits(tiny):
    _, program = tiny("llama")
    lossy = CorruptAWeight()
    lossy.exact = False
    result = PassManager([lossy], check_numerics=True).run(program)
    assert result.records[0].params and result.records[0].params[0][1] == "values"


def test_manager_catches_a_broken_graph(tiny):
    _, program = tiny("llama")
    with pytest.raises(PassCheckFailed, match="drop_output_dependency.*input_ids is no longer used"):
        PassManager([break_signature]).run(program)


def test_requires_is_checked_before_the_pass_runs(tiny):
    class NeedsNothing(Pass):
        name = "needs_bias"
        exact = True

        def requires(self, program):
            raise PassCheckFailed("needs_bias: the model has no bias")

        def call(self, program):  # pragma: no cover - must not run
            raise AssertionError("ran despite failing requires")

    _, program = tiny("llama")
    with pytest.raises(PassCheckFailed, match="no bias"):
        PassManager([NeedsNothing()]).run(program)


def test_analysis_is_cached_until_the_graph_changes(tiny):
    _, program = tiny("llama")
    calls = []

    def count_nodes(p):
        calls.append(1)
        return len(p.graph.nodes)

    first = program.analysis(count_nodes)
    assert program.analysis(count_nodes) == first and len(calls) == 1
    PassManager([CorruptAWeight()], check_numerics=False).run(program)  # modified=True bumps the version
    program.analysis(count_nodes)
    assert len(calls) == 2


def test_progress_off_a_terminal_is_plain_lines_with_count_and_time_left(capsys, monkeypatch):
    from fxslice.core import progress

    monkeypatch.setattr(progress, "PLAIN_EVERY", 0.0)
    assert list(progress.progress_bar(range(3), "calibration")) == [0, 1, 2]
    with progress.StepProgress(2, "recovery") as bar:
        bar.advance("loss 2.31")
        bar.advance("loss 2.20")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("calibration: 1/3 in ") and "s left" in lines[0]
    assert lines[2].startswith("calibration: 3/3 in ") and "left" not in lines[2]
    assert lines[3].startswith("recovery: 1/2") and lines[3].endswith("loss 2.31") and len(lines) == 5
