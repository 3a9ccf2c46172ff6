"""Every `*ForCausalLM` class of the installed transformers as tiny random models, through fxslice; one JSON object.

    python benchmarks/coverage.py [--only llama,gpt2] [--variants base,mha,tied,eager,window,sizes,square]
                                  [--timeout 120] [--memory-gib 6] [--jobs 1]

Per class and tiny config, in its own subprocess with a time and a memory limit: build the model (hidden 64, 2 layers,
4 heads of 16, norm scales and biases drawn away from 1 and 0), capture it, compare the float64 program with the
eager float64 model (the float32 casts HF code makes lifted on both sides, `fxslice.testing.lifted_float32`, so
the difference is round-off; mixtures of experts whose grouped matmul has no float64 kernel are run eagerly with
transformers' batched_mm experts for that reference), run the exact pipeline with a random rotation per segment in
float64, then slice at 25 %.
Outcomes:

- `exact`: capture equals eager to 1e-10 (relative error in `capture_error`), the rotated program equals the
  captured one to 1e-9, and the 25 % slice ran (`sliced`: its parameter count);
- `capture_differs`: the float64 program differs from the lifted eager model by more than 1e-10;
- `refused`: fxslice raised `UnsupportedStructure` / `CaptureError` (the reason, which names a node);
- `no_build`: transformers cannot build or run this tiny config in float64 (not fxslice's business);
- `static_only`: torch.export captured it only with static shapes (a size baked into the model's code);
- `crash`: any other exception — a bug to fix;
- `silent_error`: a pass ran but the logits moved — the worst bug;
- `timeout` / `out_of_memory`: the limits were hit.

Variants: `base` (2 KV heads), `mha` (as many KV heads as heads), `tied` (tied embeddings), `eager` (eager
attention instead of SDPA), `window` (sliding window 8, where the config has one), `sizes` (3 layers, hidden 96, 4
query heads of 32 so 128 wide, 2 KV heads as wide as the MLP: 64), `square` (the MLP as wide as the stream).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

SIZES = {  # every spelling of a size that configs use, set where the config has the attribute
    "hidden_size": 64, "n_embd": 64, "d_model": 64, "dim": 64, "embed_dim": 64,
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "n_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "num_heads": 4, "n_heads": 4, "attention_heads": 4,
    "head_dim": 16, "intermediate_size": 128, "ffn_dim": 128, "n_inner": 128, "d_ff": 128, "ffn_hidden_size": 128,
    "vocab_size": 128, "max_position_embeddings": 256, "n_positions": 256, "max_seq_len": 256,
    "num_local_experts": 4, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
    "shared_expert_intermediate_size": 64, "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8, "v_head_dim": 16, "first_k_dense_replace": 1, "rotary_dim": 8,
    "mamba_d_head": 16, "mamba_n_heads": 8, "mamba_d_state": 16, "n_routed_experts": 4, "n_group": 1,
    "topk_group": 1, "index_head_dim": 16, "index_n_heads": 4, "index_topk": 8,
    "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4, "decoder_attention_heads": 4,
    "encoder_ffn_dim": 128, "decoder_ffn_dim": 128, "num_kv_shared_layers": 0, "vocab_size_per_layer_input": 128,
    "hidden_size_per_layer_input": 16, "n_shared_experts": 1,
}
#: the `sizes` variant: 3 layers, hidden 96, 4 query heads of 32 (128 wide, not the hidden size), 2 kv heads whose
#: width (64) equals the MLP's; the `square` variant: the MLP as wide as the stream (64), where a size alone cannot
#: tell the stream from the MLP's inside.
_HIDDEN = ("hidden_size", "n_embd", "d_model", "dim", "embed_dim")
_LAYERS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers", "decoder_layers")
_MLP = ("intermediate_size", "ffn_dim", "n_inner", "d_ff", "ffn_hidden_size", "encoder_ffn_dim", "decoder_ffn_dim",
        "moe_intermediate_size", "shared_expert_intermediate_size")
OTHER_SIZES = {
    "sizes": {**dict.fromkeys(_HIDDEN, 96), **dict.fromkeys(_LAYERS, 3), **dict.fromkeys(_MLP, 64),
              "head_dim": 32, "v_head_dim": 32, "index_head_dim": 32, "mamba_n_heads": 12},
    "square": dict.fromkeys(_MLP, 64),
}
ALWAYS = {"num_experts_per_tok", "head_dim", "n_routed_experts", "n_shared_experts"}  # set even where the default config leaves None
DERIVED = {  # sizes a config computes from others in its constructor, recomputed after the change
    "qk_head_dim": lambda c: c.qk_nope_head_dim + c.qk_rope_head_dim,
    "head_dim": lambda c: c.qk_rope_head_dim if hasattr(c, "qk_rope_head_dim") else c.head_dim,
}


def _tiny_config(model_type: str, variant: str):
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    targets = [config]
    sub = getattr(config, "text_config", None)
    if sub is not None and sub is not config:
        targets.append(sub)
    sizes = {**SIZES, **OTHER_SIZES.get(variant, {})}
    layers = sizes["num_hidden_layers"]
    for target in targets:
        if _has_entries(getattr(target, "per_layer_config", None)):  # overrides name layers the tiny model lacks
            _set(target, "per_layer_config", {})
        for key, value in sizes.items():
            if hasattr(target, key) and (getattr(target, key) is not None or key in ALWAYS):
                per_layer = isinstance(getattr(target, key), list)  # one size per layer (Gemma-3n's MLP widths)
                _set(target, key, [value] * layers if per_layer else value)
        for key, rule in DERIVED.items():
            if hasattr(target, key):
                _set(target, key, rule(target))
        if hasattr(target, "num_key_value_heads"):  # latent attention (a kv_lora_rank) has no grouped heads
            grouped = variant != "mha" and not hasattr(target, "kv_lora_rank")
            _set(target, "num_key_value_heads", 2 if grouped else 4)
        if hasattr(target, "tie_word_embeddings"):
            _set(target, "tie_word_embeddings", variant == "tied")
        if hasattr(target, "sliding_window"):
            _set(target, "sliding_window", 8 if variant == "window" else target.sliding_window)
        for key in ("layer_types", "layers_block_type"):
            if isinstance(getattr(target, key, None), list):
                _set(target, key, (getattr(target, key) * layers)[:layers])
        if "layer_types" in vars(target) and target.layer_types is None:  # a config that never derives them
            _set(target, "layer_types", ["full_attention"] * layers)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if isinstance(getattr(target, key, None), int) and getattr(target, key) >= 128:
                _set(target, key, 0)
    return config


def _has_entries(value) -> bool:
    try:
        return bool(value)
    except (AttributeError, TypeError):  # a composite config's view over layers it does not hold
        return False


def _set(target, key: str, value) -> None:
    """Set a config attribute; one a config derives from others (a property without a setter) is left as is."""
    try:
        setattr(target, key, value)
    except AttributeError:
        pass


def run_one(model_type: str, variant: str) -> dict:
    """Build, capture, check and slice one tiny model; the outcome as a dict (never raises)."""
    import torch
    from transformers import AutoModelForCausalLM

    from fxslice import CaptureError, FxsliceError, PassManager, UnsupportedStructure, capture
    from fxslice.core import relative_error
    from fxslice.passes import exact_pipeline, slicegpt_recipe
    from fxslice.passes.slicegpt.rotations import random_orthogonal
    from fxslice.testing import perturb_norms

    row: dict = {"type": model_type, "variant": variant}
    try:
        config = _tiny_config(model_type, variant)
        config._attn_implementation = "eager" if variant == "eager" else "sdpa"
        torch.manual_seed(0)
        try:
            model = AutoModelForCausalLM.from_config(config)
        except ValueError:  # no SDPA path
            config._attn_implementation = "eager"
            model = AutoModelForCausalLM.from_config(config)
        perturb_norms(model, torch.Generator().manual_seed(1))
        model = model.double().eval()
        row["class"] = type(model).__name__
    except Exception as exc:  # noqa: BLE001 - any failure to build is transformers' or the tiny config's
        return {**row, "outcome": "no_build", "why": f"{type(exc).__name__}: {str(exc)[:160]}"}
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    try:
        eager = _eager_logits(model, ids, row)
    except Exception as exc:  # noqa: BLE001 - the tiny model does not run in transformers itself
        return {**row, "outcome": "no_build", "why": f"eager float64 forward: {type(exc).__name__}: {str(exc)[:160]}"}
    try:
        program = capture(model).to(torch.float64)  # lifts the float32 casts HF code makes (norms, rotary)
        if program.static_shape is not None:
            return {**row, "outcome": "static_only", "why": "torch.export gave no dynamic shapes: a size is baked "
                    "into the model's code (see the capture warning)"}
        captured = program(ids)
        row["capture_error"] = relative_error(captured, eager)
        if not row["capture_error"] <= 1e-10:
            return {**row, "outcome": "capture_differs"}
        PassManager(exact_pipeline(random_orthogonal(7)), check_numerics=False).run(program)
        row["rotate_error"] = relative_error(program(ids), captured)
        if not row["rotate_error"] <= 1e-9:
            return {**row, "outcome": "silent_error"}
        sliced = capture(model.float())
        slicegpt_recipe(sparsity=0.25, batch_size=4).run(sliced, calibration=torch.randint(0, 128, (8, 16)))
        row["sliced"] = sliced.num_parameters()
        return {**row, "outcome": "exact"}
    except (UnsupportedStructure, CaptureError) as exc:
        return {**row, "outcome": "refused", "why": str(exc)[:400]}
    except FxsliceError as exc:
        return {**row, "outcome": "crash", "why": f"{type(exc).__name__}: {str(exc)[:400]}"}
    except Exception as exc:  # noqa: BLE001 - what the benchmark exists to find
        return {**row, "outcome": "crash", "why": f"{type(exc).__name__}: {str(exc)[:400]}"}


def _eager_logits(model, ids, row: dict):
    """The eager float64 logits, with the float32 casts of HF code lifted as the float64 program lifts them
    (`lifted_float32`); grouped expert matmuls have no float64 kernel, so those run transformers' batched_mm experts
    for the reference (the capture keeps the default)."""
    import torch

    from fxslice.testing import lifted_float32

    with torch.no_grad(), lifted_float32():
        try:
            return model(input_ids=ids, use_cache=False).logits
        except RuntimeError as exc:
            if "Double" not in str(exc):
                raise
            default = model.config._experts_implementation
            model.config._experts_implementation = "batched_mm"
            try:
                row["reference_experts"] = "batched_mm"
                return model(input_ids=ids, use_cache=False).logits
            finally:
                model.config._experts_implementation = default


def _child(model_type: str, variant: str, memory_gib: float) -> None:
    limit = int(memory_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        row = run_one(model_type, variant)
    except MemoryError:
        row = {"type": model_type, "variant": variant, "outcome": "out_of_memory"}
    print("\n@@" + json.dumps(row, default=float))


def _spawn(model_type: str, variant: str, timeout: float, memory_gib: float) -> dict:
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, __file__, "--child", model_type, variant, str(memory_gib)],
                              capture_output=True, text=True, timeout=timeout)
        lines = [line for line in done.stdout.splitlines() if line.startswith("@@")]
        if lines:
            row = json.loads(lines[-1][2:])
        else:
            tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            killed = "MemoryError" in done.stderr or "Cannot allocate" in done.stderr or done.returncode in (-9, 137)
            row = {"type": model_type, "variant": variant, "outcome": "out_of_memory" if killed else "crash",
                   "why": tail[:300]}
    except subprocess.TimeoutExpired:
        row = {"type": model_type, "variant": variant, "outcome": "timeout"}
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3], float(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="model types, comma-separated (default: every causal LM)")
    parser.add_argument("--variants", default="base,mha,tied,eager,window,sizes,square")
    parser.add_argument("--timeout", type=float, default=180)
    parser.add_argument("--memory-gib", type=float, default=6)
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args()
    import torch
    import transformers

    types = [t for t in args.only.split(",") if t] or causal_lm_types()
    variants = [v for v in args.variants.split(",") if v]
    work = [(t, v) for t in types for v in variants]
    rows: list[dict] = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for row in pool.map(lambda tv: _spawn(*tv, args.timeout, args.memory_gib), work):
            rows.append(row)
            print(json.dumps({k: row.get(k) for k in ("type", "variant", "outcome", "seconds", "why") if k in row}),
                  file=sys.stderr, flush=True)
    by_type: dict[str, str] = {}
    order = ["crash", "silent_error", "capture_differs", "timeout", "out_of_memory", "static_only", "refused", "exact", "no_build"]
    for row in rows:  # a class's outcome is its worst variant's, builds aside
        now = by_type.get(row["type"])
        if now is None or order.index(row["outcome"]) < order.index(now):
            by_type[row["type"]] = row["outcome"]
    print(json.dumps({
        "torch": torch.__version__, "transformers": transformers.__version__,
        "variants": variants, "outcomes": dict(Counter(r["outcome"] for r in rows)),
        "classes": dict(Counter(by_type.values())), "rows": rows,
    }, indent=1, default=float))


if __name__ == "__main__":
    main()
