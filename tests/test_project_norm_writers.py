"""ProjectNormWriters: a norm that writes into the stream gets a D x D projection (identity), exact."""

import torch

from fxslice import PassManager
from fxslice.analysis.stream import stream_analysis
from fxslice.passes import CleanupIR, FuseNorms, ProjectNormWriters
from fxslice.testing import check_exact_pass, check_pass_leaves_alone

WRITING_NORMS = ["gemma2", "gemma3", "olmo2", "bloom", "modernbert_decoder"]  # post-norms, embedding norms


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


def test_a_linear_reading_a_norm_writer_directly_keeps_the_norm_and_the_stream_stays_centrable(tiny_programs):
    """ModernBERT's first block has no attention norm: its q/k/v read the embedding LayerNorm's output, which is
    also the stream's first value. Had they read the projection, they would read the stream directly and a
    LayerNorm model's centred stream would lose the mean they see (FuseNorms refuses that)."""
    [(_, program)] = tiny_programs("modernbert_decoder")
    PassManager([CleanupIR()]).run(program)
    [writer] = [w for w in program.analysis(stream_analysis).writers if w.kind == "norm"]
    readers = [u for u in writer.norm.output.users if u.target == torch.ops.aten.linear.default]
    assert readers, "the tiny model no longer has a linear reading its embedding norm"
    PassManager([ProjectNormWriters()]).run(program)
    stream = program.analysis(stream_analysis)
    assert all(writer.norm.output in r.args for r in readers)
    assert not [r for r in stream.readers if r.norm is None]
    PassManager([FuseNorms()]).run(program)  # centring needs no direct reader: it runs
