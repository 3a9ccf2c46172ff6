"""ProjectNormWriters: a norm that writes into the stream gets a D x D projection (identity), exact."""

from fxslice import PassManager
from fxslice.analysis.stream import stream_analysis
from fxslice.passes import CleanupIR, ProjectNormWriters
from fxslice.testing import check_exact_pass, check_pass_leaves_alone

WRITING_NORMS = ["gemma2", "gemma3", "olmo2", "bloom"]  # post-norms, and BLOOM's embedding norm


def test_project_norm_writers_passes_the_shared_exact_pass_checks(tiny_programs):
    reports = check_exact_pass(ProjectNormWriters, tiny_programs(*WRITING_NORMS), prepare=lambda: [CleanupIR()])
    assert len(reports) == 2 * len(WRITING_NORMS)


def test_after_it_no_norm_writes_into_the_stream(tiny_programs):
    for name, program in tiny_programs(*WRITING_NORMS):
        PassManager([CleanupIR()]).run(program)
        assert any(w.kind == "norm" for w in program.analysis(stream_analysis).writers), name
        PassManager([ProjectNormWriters()]).run(program)
        assert not any(w.kind == "norm" for w in program.analysis(stream_analysis).writers), name


def test_models_whose_norms_only_read_are_left_alone(tiny_programs, plain_program):
    check_pass_leaves_alone(ProjectNormWriters, [("no-norms", plain_program), *tiny_programs("llama", "gpt2", "phi")],
                            prepare=lambda: [CleanupIR()])
