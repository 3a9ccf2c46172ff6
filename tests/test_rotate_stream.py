"""RotateStream: any orthogonal matrix per segment, exact; shortcuts only where bases differ; refusals."""

import pytest
import torch

from fxslice import InvalidOption, PassManager, UnsupportedStructure
from fxslice.analysis.roles import SHORTCUT
from fxslice.analysis.stream import stream_analysis
from fxslice.core.graph import role_of
from fxslice.passes import CleanupIR, FuseNorms, ProjectNormWriters, RotateStream
from fxslice.passes.slicegpt.rotations import identity, random_orthogonal
from fxslice.testing import check_exact_pass, check_pass_leaves_alone

FUSE = lambda: [CleanupIR(), ProjectNormWriters(), FuseNorms()]  # noqa: E731 - the checker's `prepare`


class RotateOnce(RotateStream):
    """Rotating an already rotated stream is a new rotation, not a no-op; the shared checker's idempotence
    check asks for a pass that refuses to rotate twice, which is what the stream's shortcuts tell."""

    def call(self, program):
        if any(role_of(n) == SHORTCUT for n in program.graph.nodes):
            from fxslice import PassResult

            return PassResult(False)
        return super().call(program)


def test_rotate_stream_passes_the_shared_exact_pass_checks(tiny_programs):
    names = ["llama", "llama-tied", "gpt2", "gemma2", "phi", "qwen3", "mixtral", "opt-project", "bloom", "olmo2"]
    reports = check_exact_pass(lambda: RotateOnce(random_orthogonal(3)), tiny_programs(*names), prepare=FUSE)
    assert len(reports) == 2 * len(names)


def test_rotate_stream_leaves_a_stream_without_segments_alone(plain_program):
    check_pass_leaves_alone(lambda: RotateStream(identity()), [("no-norms", plain_program)])


def test_identity_rotation_inserts_no_shortcuts(tiny):
    _, program = tiny("llama")
    PassManager([CleanupIR(), ProjectNormWriters(), FuseNorms(), RotateStream(identity())]).run(program)
    assert not [n for n in program.graph.nodes if role_of(n) == SHORTCUT]


def test_shared_rotation_inserts_no_shortcuts_between_equal_bases(tiny):
    _, program = tiny("llama")
    q = random_orthogonal(5)
    same = [q(program.analysis(stream_analysis).segments[0], 64)] * 5
    ids = program.probe_input()
    before = program(ids)
    PassManager([CleanupIR(), ProjectNormWriters(), FuseNorms(), RotateStream(same)]).run(program)
    assert not [n for n in program.graph.nodes if role_of(n) == SHORTCUT]
    assert torch.allclose(program(ids), before, atol=1e-4, rtol=1e-4)


def test_rotation_rejects_a_matrix_that_is_not_orthogonal(tiny):
    _, program = tiny("llama")
    with pytest.raises(InvalidOption, match="not an orthogonal"):
        PassManager([CleanupIR(), ProjectNormWriters(), FuseNorms(),
                     RotateStream(lambda seg, d: torch.ones(d, d, dtype=torch.float64))]).run(program)


def test_rotate_requires_fused_norms(tiny):
    _, program = tiny("gpt2")
    with pytest.raises(UnsupportedStructure, match="run FuseNorms first"):
        PassManager([CleanupIR(), RotateStream(identity())]).run(program)
