"""SmolLM2 sliced by the library: perplexity within a stated bound of dense, and worse the more is removed.

(Its own file, apart from the CLI's end-to-end run, so that pytest-xdist's `--dist loadfile` gives the two slowest
tests of the suite to different workers.)"""

import pytest

from fxslice.data import load_text, token_windows
from fxslice.evaluation.perplexity import perplexity
from fxslice.passes.slicegpt.pipeline import slicegpt
from fxslice.passes.slicegpt.slice_stream import constant_widths


@pytest.mark.slow
def test_smollm2_at_10_percent_stays_within_2x_dense_and_more_slicing_is_worse(smollm2):
    _, dense = smollm2
    tok = dense.tokenizer
    calib = token_windows(tok, load_text("wikitext2:validation"), 1024, count=16, seed=0)
    test = token_windows(tok, load_text("wikitext2:test"), 256)[:6]
    base = perplexity(dense, test, batch_size=3)
    results = {}
    for sparsity in (0.1, 0.3):
        program = dense.clone()
        slicegpt(program, calib, constant_widths(sparsity), batch_size=4)
        results[sparsity] = perplexity(program, test, batch_size=3)
    print(f"SmolLM2 perplexity (6 x 256 test tokens): dense {base:.2f}, 10% {results[0.1]:.2f}, 30% {results[0.3]:.2f}")
    assert results[0.1] < 2 * base
    assert results[0.3] >= results[0.1]
