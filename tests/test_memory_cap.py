"""A model whose weights do not fit in the memory the process may use still compresses with its weights on disk
(`lazy`): the process's data is capped (RLIMIT_DATA, which counts the heap and private mappings, not a file's
page cache) below the size of the weights in the run's dtype, after a warm-up run has loaded every module. The
same run with the weights in memory fails under the same cap, so the cap is real."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import gc, json, resource, sys
    from pathlib import Path

    import torch, transformers
    import fxslice
    from fxslice.core.memory import release_freed
    from fxslice.passes import slicegpt_recipe
    from fxslice.recipes import Calibration
    from fxslice.testing import char_tokenizer

    root, share = Path(sys.argv[1]), float(sys.argv[2])
    text = root / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)

    def checkpoint(name, layers):
        config = transformers.LlamaConfig(vocab_size=96, hidden_size=768, intermediate_size=2048,
                                          num_hidden_layers=layers, num_attention_heads=12, num_key_value_heads=12,
                                          max_position_embeddings=128, tie_word_embeddings=False)
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config)
        numel = sum(p.numel() for p in model.parameters())
        model.to(torch.bfloat16).save_pretrained(root / name, max_shard_size="40MB")
        char_tokenizer().save_pretrained(root / name)
        return root / name, numel

    recipe = slicegpt_recipe(sparsity=0.25, calibration=Calibration(source=str(text), windows=4, length=64))

    def run(path, out, lazy):
        return fxslice.compress(str(path), recipe, out=root / out, evaluation=str(text), eval_windows=1,
                                eval_length=64, lazy=lazy, proofs="dtype", progress=False)

    small, _ = checkpoint("small", 1)
    big, numel = checkpoint("big", 12)
    run(small, "warm", True)  # every module imported, every code path's first allocations made
    gc.collect()
    release_freed()
    data = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmData:"))
    weights = 4 * numel  # float32, the run's dtype
    resource.setrlimit(resource.RLIMIT_DATA, (data + int(share * weights), resource.getrlimit(resource.RLIMIT_DATA)[1]))
    report = run(big, "lazy", True)
    lazy = {"parameters": report.program.num_parameters(), "dense": numel,
            "perplexity": report.perplexity.get("compressed")}
    del report
    gc.collect()
    release_freed()
    try:
        run(big, "eager", False)
        eager = "completed"
    except Exception as exc:
        eager = type(exc).__name__
    print(json.dumps({"weights": weights, "cap": int(share * weights), "lazy": lazy, "eager": eager}))
''')


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA and /proc/self/status are Linux's")
def test_a_model_larger_than_the_memory_allowed_slices_with_its_weights_on_disk(tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), "0.5"], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["cap"] < result["weights"] and result["weights"] > 300e6
    assert result["lazy"]["parameters"] < 0.9 * result["lazy"]["dense"]  # it was sliced
    assert result["lazy"]["perplexity"] is not None and result["lazy"]["perplexity"] > 0
    assert result["eager"] != "completed"  # the same model in memory does not fit under the cap
    assert not (tmp_path / "eager").exists()  # and leaves nothing behind
