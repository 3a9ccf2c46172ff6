"""The `fxslice` command line: errors are one clear message and a distinct exit code (`--debug` shows the trace)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from fxslice.core.errors import FxsliceError, Interrupted, InvalidOption
from fxslice.core.pass_manager import PassManager
from fxslice.core.program import Program
from fxslice.models.capture import DEFAULT_MODEL, capture
from fxslice.passes.catalogue import PASSES
from fxslice.recipes import Recipe

if TYPE_CHECKING:
    import torch

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Compress transformer language models: SliceGPT, The LLM "
                  "Surgeon and quantization as passes over one torch.fx graph.")
err = Console(stderr=True, soft_wrap=True)  # piped output keeps whole lines (no wrap at 80 columns)
out = Console(soft_wrap=True)
_debug = False
_quiet = False

ModelArg = Annotated[str, typer.Argument(help="hub name, HF directory, .gguf file, 'smollm2' (the embedded default), or "
                                               "a directory fxslice saved (to quantize or recover it further)")]

# options several commands take, spelled once
CalibrationText = Annotated[str, typer.Option(help="calibration text: wikitext2:validation, a file, a dir, hf:NAME:SPLIT")]
CalibWindows = Annotated[int, typer.Option(min=1, help="number of calibration windows")]
CalibLength = Annotated[int, typer.Option(min=2, help="tokens per calibration window")]
EvalText = Annotated[str, typer.Option("--eval", help="perplexity text ('none' to skip)")]
EvalWindows = Annotated[int | None, typer.Option(min=1, help="evaluate on the first N windows (default: all)")]
EvalLength = Annotated[int, typer.Option(min=2, help="tokens per evaluation window")]
BatchSize = Annotated[int, typer.Option(min=1, help="windows per forward pass (1 is fastest on a CPU)")]
CalibSeed = Annotated[int, typer.Option(min=0, help="seed for sampling calibration windows")]
RecoverSteps = Annotated[int, typer.Option(min=0, help="then fine-tune this many steps on --recover-text (0: no recovery)")]
RecoverText = Annotated[str, typer.Option(help="recovery training text (never the evaluation split)")]
RecoverLr = Annotated[float, typer.Option(help="recovery learning rate (AdamW, warm-up then cosine), > 0")]
RecoverObjective = Annotated[str, typer.Option(help="what recovery learns: lm (the text's next tokens) or distill (the "
                                               "uncompressed model's output distributions; one more copy of the weights in memory)")]
RecoverMethod = Annotated[str, typer.Option(help="what recovery trains: lora (low-rank adapters, merged) or full (the "
                                            "same weights in place: more capacity; a gradient and two optimizer moments per weight)")]
Device = Annotated[str, typer.Option(help="where to compute: auto (a GPU when there is one), cpu, cuda, cuda:N, mps")]
Offload = Annotated[bool, typer.Option("--offload", help="keep the weights in host memory and copy each calibration "
                                       "stage's to --device only while it runs: models larger than the device")]
Lazy = Annotated[bool | None, typer.Option("--lazy/--in-memory", help="leave the weights in the checkpoint's safetensors "
                                           "files, each read by the op that uses it, edited ones written to a scratch "
                                           "folder: models larger than memory (default: when the weights would take "
                                           "more than half the available memory)")]
Restart = Annotated[bool, typer.Option("--restart", help="start over even where an interrupted run of this command "
                                       "left a checkpoint (OUT.resume/, which is then removed); by default the run "
                                       "continues after its last finished stage")]
LoadLazy = Annotated[bool, typer.Option("--lazy", help="leave the weights in the saved model's file, each read by the op "
                                        "that uses it: models larger than memory")]
Kernels = Annotated[str, typer.Option(help="how a quantized model's 4-bit weights run: float (dequantized once) or int4 "
                                          "(PyTorch's int4 weight-only kernels from the packed integers: in bfloat16 a "
                                          "fifth of the float32 model's memory; CUDA needs a bfloat16 model)")]
Proofs = Annotated[str, typer.Option(help="how exact passes are checked: float64 (proved on a float64 copy of the "
                                           "model) or dtype (in the run's dtype only: less memory; slicing SmolLM2 peaks at 1.6 GB, not 4.3)")]
Dtype = Annotated[str, typer.Option(help="the weights' dtype for the run: float32, bfloat16, float16 (statistics stay "
                                         "float64; the saved model keeps this dtype)")]


def _status(message: str):
    """A spinner on a terminal; elsewhere (a log, a pipe) the message as one line, so that a long step is seen."""
    import contextlib

    if _quiet:
        return contextlib.nullcontext()
    if err.is_terminal:
        return err.status(message)
    err.print(message, highlight=False, markup=False, soft_wrap=True)
    return contextlib.nullcontext()


def _silent(message: str):
    """The status of a rank other than the first under torchrun: one line per job, not one per process."""
    import contextlib

    return contextlib.nullcontext()


@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", help="show full tracebacks")] = False,
         quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress or status lines on stderr (results "
                                             "and errors still print)")] = False) -> None:
    global _debug, _quiet
    _debug, _quiet = debug, quiet
    if quiet:  # transformers' and the hub's own bars (loading weights) too
        import os

        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()


def _capture(model: str) -> Program:
    with _status(f"loading and capturing {model} ..."):
        return capture(model)


@app.command()
def inspect(
    model: ModelArg = DEFAULT_MODEL,
    stream: Annotated[bool, typer.Option("--stream", help="also print the residual stream: segments, norms, readers, writers")] = False,
    groups: Annotated[bool, typer.Option("--groups", help="also print the dimension groups pruning can remove, and what is blocked")] = False,
) -> None:
    """Capture MODEL and print a summary: parameters, op counts, the module tree the graph came from."""
    from fxslice.analysis.summary import summarize

    program = _capture(model)
    out.print(summarize(program), highlight=False, markup=False)
    if stream or groups:  # both analyses read the cleaned-up graph
        from fxslice.analysis.groups import group_analysis
        from fxslice.analysis.stream import stream_analysis
        from fxslice.passes import CleanupIR, UnstackWeights

        PassManager([CleanupIR(), UnstackWeights()]).run(program)
        for wanted, analysis in ((stream, stream_analysis), (groups, group_analysis)):
            if wanted:
                out.print(program.analysis(analysis).describe(), highlight=False, markup=False)


@app.command()
def diff(
    model: ModelArg = DEFAULT_MODEL,
    pass_: Annotated[list[str], typer.Option("--pass", "-p", help=f"pass to run (repeatable): a built-in ({', '.join(PASSES)}) "
                                             "or module:Name / file.py:Name")] = ["cleanup_ir"],  # noqa: B006
    html: Annotated[Path | None, typer.Option(help="also write a self-contained HTML view here")] = None,
    check: Annotated[bool, typer.Option(help="check numerically that exact passes keep the logits")] = True,
) -> None:
    """Run a pipeline on MODEL and show what each pass changed (nodes added/removed/rewired, parameters)."""
    from fxslice.passes import load_pass

    pipeline = [load_pass(s) for s in pass_]
    program = _capture(model)
    result = PassManager(pipeline, check_numerics=check, progress=not _quiet).run(program)
    out.print(result.text(), highlight=False, markup=False)
    if html is not None:
        tmp = html.with_name(html.name + ".partial")
        tmp.write_text(result.html(), encoding="utf-8")
        tmp.replace(html)
        err.print(f"wrote {html}")


@app.command(name="slice")
def slice_(
    model: ModelArg = DEFAULT_MODEL,
    sparsity: Annotated[float, typer.Option(help="fraction of the stream width to remove, in (0, 1)")] = 0.25,
    out_dir: Annotated[Path, typer.Option("--out", help="new directory for the sliced model")] = Path("sliced"),
    calibration: CalibrationText = "wikitext2:validation",
    calib_windows: CalibWindows = 32,
    calib_length: CalibLength = 2048,
    evaluation: EvalText = "wikitext2:test",
    eval_windows: EvalWindows = None,
    eval_length: EvalLength = 2048,
    multiple: Annotated[int, typer.Option(min=1, help="round widths down to a multiple of this (fast GEMMs)")] = 8,
    batch_size: BatchSize = 1,
    seed: CalibSeed = 0,
    untie: Annotated[bool, typer.Option("--untie", help="untie a tied head: better perplexity, V x d more parameters")] = False,
    shared_basis: Annotated[str, typer.Option(help="'none' (a basis per segment), 'block' (attention and MLP halves "
                                              "share one: half the shortcut matrices) or 'stream' (one for the whole "
                                              "stream: no shortcuts, a narrower stock decoder that llama.cpp and "
                                              "transformers load); docs/methods/slicegpt.md")] = "none",
    allocation: Annotated[str, typer.Option(help="segment widths: 'constant', or 'loss_aware' (the same parameter count "
                                            "spent where the loss's curvature says; benchmarks/README.md)")] = "constant",
    head_rank: Annotated[int, typer.Option(min=0, help="a tied head kept tied gets a rank-r correction of what the "
                                           "sliced table lost: r (d + V) parameters (docs/methods/slicegpt.md)")] = 0,
    recover_steps: RecoverSteps = 0,
    recover_text: RecoverText = "wikitext2:validation",
    recover_lr: RecoverLr = 5e-4,
    recover_objective: RecoverObjective = "lm",
    recover_method: RecoverMethod = "lora",
    save_recipe: Annotated[Path | None, typer.Option(help="also write the recipe this runs (YAML or JSON) here")] = None,
    device: Device = "auto",
    dtype: Dtype = "float32",
    offload: Offload = False,
    proofs: Proofs = "float64",
    lazy: Lazy = None,
    restart: Restart = False,
) -> None:
    """Slice MODEL with SliceGPT (sequential PCA), measure perplexity before and after, and save it to --out.

    A preset of `fxslice compress`: the recipe cleanup -> slicegpt -> fuse_gqa."""
    from fxslice.passes import slicegpt_recipe
    from fxslice.recipes import Calibration

    recipe = slicegpt_recipe(sparsity=sparsity, multiple=multiple, keep_ties=not untie, shared_basis=shared_basis,
                             batch_size=batch_size, allocation=allocation, head_rank=head_rank, calibration=Calibration(
                                 source=calibration, windows=calib_windows, length=calib_length, seed=seed))
    recipe = _with_recovery(recipe, recover_steps, recover_text, recover_lr, recover_objective, recover_method)
    if save_recipe is not None:
        recipe.save(save_recipe)
    _compress(model, recipe, out_dir, evaluation, eval_windows, eval_length, batch_size, device, dtype, offload, proofs,
              lazy, restart)


@app.command()
def prune(
    model: ModelArg = DEFAULT_MODEL,
    method: Annotated[str, typer.Option(help="surgeon (KFAC curvature, OBS updates), kobd (KFAC, no updates), lobd (activations only) or magnitude")] = "surgeon",
    target: Annotated[float, typer.Option(help="groups: fraction of the parameters to remove physically, in (0, 1); masked structures: fraction of the decoder linears' weights to zero")] = 0.2,
    structures: Annotated[str, typer.Option(help="groups (MLP channels and head groups, removed for real) or the paper's zero-masked rows_columns, unstructured, 2:4")] = "groups",
    shots: Annotated[int, typer.Option(min=1, help="shots; the curvature is re-estimated before each")] = 4,
    out_dir: Annotated[Path, typer.Option("--out", help="new directory for the pruned model")] = Path("pruned"),
    calibration: CalibrationText = "wikitext2:validation",
    calib_windows: CalibWindows = 16,
    calib_length: CalibLength = 512,
    evaluation: EvalText = "wikitext2:test",
    eval_windows: EvalWindows = None,
    eval_length: EvalLength = 2048,
    batch_size: BatchSize = 1,
    seed: CalibSeed = 0,
    recover_steps: RecoverSteps = 0,
    recover_text: RecoverText = "wikitext2:validation",
    recover_lr: RecoverLr = 5e-4,
    recover_objective: RecoverObjective = "lm",
    recover_method: RecoverMethod = "lora",
    strict: Annotated[bool, typer.Option("--strict", help="stop with an error when the target cannot be met (by "
                                         "default a warning with the share removed)")] = False,
    multiple: Annotated[int, typer.Option(min=1, help="groups: every MLP keeps a multiple of this many channels (32 "
                                          "for GGUF blocks and --format gguf of a 4-bit model, 64 for GPU tiles)")] = 1,
    device: Device = "auto",
    dtype: Dtype = "float32",
    offload: Offload = False,
    proofs: Proofs = "float64",
    lazy: Lazy = None,
    restart: Restart = False,
) -> None:
    """Prune MODEL's MLP channels and key/value head groups (The LLM Surgeon), so that its matrices shrink;
    or, with --structures, zero the paper's rows and columns, single weights or 2:4 blocks.

    A preset of `fxslice compress`: the recipe cleanup -> surgeon -> fuse_gqa."""
    from fxslice.passes import prune_recipe
    from fxslice.recipes import Calibration

    data = Calibration(source=calibration, windows=calib_windows, length=calib_length, seed=seed)
    recipe = prune_recipe(method=method, target=target, shots=shots, structures=structures, batch_size=batch_size,
                          calibration=data, strict=strict, multiple=multiple)
    recipe = _with_recovery(recipe, recover_steps, recover_text, recover_lr, recover_objective, recover_method)
    _compress(model, recipe, out_dir, evaluation, eval_windows, eval_length, batch_size, device, dtype, offload, proofs,
              lazy, restart)


@app.command()
def quantize(
    model: ModelArg = DEFAULT_MODEL,
    bits: Annotated[int, typer.Option(help="bits of every linear of the body: 2, 3, 4, 5, 6 or 8")] = 4,
    group_size: Annotated[int, typer.Option(min=1, help="columns sharing one scale and zero point")] = 64,
    method: Annotated[str, typer.Option(help="gptq (calibrated, error-compensating) or rtn (round to nearest)")] = "gptq",
    grid: Annotated[str, typer.Option(help="zero_point (an integer per group: GPTQ checkpoints), offset (a float16 per "
                                      "group: llama.cpp's Q4_1/Q5_1) or symmetric (no anchor: Q4_0/Q8_0, and "
                                      "compressed-tensors for --format hf); each exports exactly")] = "zero_point",
    embeddings: Annotated[int, typer.Option(min=0, help="bits of token tables, a tied head with them (0: keep float)")] = 8,
    head: Annotated[int, typer.Option(min=0, help="bits of an untied head (0: keep float)")] = 8,
    untie: Annotated[bool, typer.Option("--untie", help="give a tied head its own copy of the table (a V x d table "
                                        "more): the lookup at --embeddings bits, the head at --head")] = False,
    shortcuts: Annotated[int, typer.Option(min=0, help="bits of a sliced model's shortcut matrices (0: keep float); "
                                           "below 8 their errors compound over depth")] = 8,
    budget_bits: Annotated[float, typer.Option(min=0, help="search a width per linear so that the whole model "
                                               "averages this many bits per parameter (tables and scales included); "
                                               "0: every linear at --bits")] = 0.0,
    search: Annotated[str | None, typer.Option(help="with --budget-bits: mtgp (NUQ's multi-task GP, the default), gp "
                                               "or random")] = None,
    evaluations: Annotated[int | None, typer.Option(min=1, help="with --budget-bits: expensive (GPTQ) evaluations "
                                                    "(default 6)")] = None,
    spread: Annotated[int | None, typer.Option(min=1, help="with --budget-bits: widths searched either side of the "
                                               "widest uniform width the budget affords (default 1)")] = None,
    search_tables: Annotated[bool, typer.Option(help="with --budget-bits: search the token tables' width too, "
                                                "between the linears' and --embeddings")] = True,
    log: Annotated[str, typer.Option(help="with --budget-bits: JSON-lines file of every evaluation (resumed when it "
                                          "holds the same search on the same model)")] = "",
    rotation: Annotated[str, typer.Option(help="first an exact rotation of the stream: hadamard (QuaRot's randomized "
                                          "Hadamard: helps GPTQ, and a sliced model needs it), learned (the Hadamard, "
                                          "then a rotation learned against the rounding: SpinQuant) or none")] = "none",
    rotation_steps: Annotated[int | None, typer.Option(min=1, help="with --rotation learned: optimizer steps, one "
                                                       "calibration window each (default 40)")] = None,
    rotate_heads: Annotated[bool, typer.Option(help="with --rotation: each attention value head too, with the "
                                               "columns that read it (a Hadamard per head; learned with the "
                                               "stream's rotation under --rotation learned)")] = False,
    out_dir: Annotated[Path, typer.Option("--out", help="new directory for the quantized model")] = Path("quantized"),
    calibration: CalibrationText = "wikitext2:validation",
    calib_windows: CalibWindows = 16,
    calib_length: CalibLength = 512,
    evaluation: EvalText = "wikitext2:test",
    eval_windows: EvalWindows = None,
    eval_length: EvalLength = 2048,
    batch_size: BatchSize = 1,
    seed: CalibSeed = 0,
    device: Device = "auto",
    dtype: Dtype = "float32",
    offload: Offload = False,
    proofs: Proofs = "float64",
    lazy: Lazy = None,
    restart: Restart = False,
) -> None:
    """Quantize MODEL's weights group-wise (GPTQ or round to nearest), every linear at --bits or, with
    --budget-bits, at widths searched under that budget; the saved model stores packed integers and its record
    the bytes, scales included. A preset of `fxslice compress`: cleanup -> quantize."""
    from fxslice.passes.quantize.stages import Quantize
    from fxslice.passes.rewrite.stages import Cleanup
    from fxslice.passes.slicegpt.stages import Rotate
    from fxslice.recipes import Calibration

    data = Calibration(source=calibration, windows=calib_windows, length=calib_length, seed=seed)
    searching = {"--search": search, "--evaluations": evaluations, "--spread": spread, "--log": log or None}
    if not budget_bits:
        given = [name for name, value in searching.items() if value is not None]
        if given:
            raise InvalidOption(f"{', '.join(given)} set(s) up a width search, which runs only with --budget-bits "
                                "(average bits per parameter, e.g. 4.5); add it, or drop the option")
    searched = (dict(search=search or "mtgp", budget_bits=budget_bits, evaluations=evaluations or 6,
                     spread=spread or 1, log=log, search_tables=search_tables)
                if budget_bits else {})
    if rotation not in ("none", "hadamard", "learned"):
        raise InvalidOption(f"--rotation must be none, hadamard or learned, got {rotation!r}")
    if rotation_steps is not None and rotation != "learned":
        raise InvalidOption("--rotation-steps sets up a learned rotation; add --rotation learned, or drop it")
    if rotate_heads and rotation == "none":
        raise InvalidOption("--rotate-heads rotates the value heads with the stream; add --rotation hadamard or "
                            "--rotation learned, or drop it")
    learned: dict = {"rotation": "learned", "rotate_heads": rotate_heads} if rotation == "learned" else {}
    if rotation_steps is not None:
        learned["rotation_steps"] = rotation_steps
    stage = Quantize(bits=bits, group_size=group_size, method=method, grid=grid, embeddings=embeddings or None,
                     head=head or None, shortcuts=shortcuts or None, untie_head=untie, batch_size=batch_size,
                     **searched, **learned)
    hadamard = [Rotate(rotation="hadamard", heads=rotate_heads)] if rotation == "hadamard" else []
    stages = (Cleanup(), *hadamard, stage)
    recipe = Recipe(stages, data if stage.calibrates else None, name=f"quantize-{method}")
    _compress(model, recipe, out_dir, evaluation, eval_windows, eval_length, batch_size, device, dtype, offload, proofs,
              lazy, restart)


@app.command()
def compress(
    recipe_file: Annotated[Path, typer.Option("--recipe", help="a recipe (YAML or JSON): calibration and stages")],
    trust_code: Annotated[bool, typer.Option("--trust-code", help="allow a recipe that names code (module:Name, "
                                             "file.py:Name): that code runs. Without it such a recipe is refused")] = False,
    model: ModelArg = DEFAULT_MODEL,
    out_dir: Annotated[Path, typer.Option("--out", help="new directory for the compressed model")] = Path("compressed"),
    evaluation: EvalText = "wikitext2:test",
    eval_windows: EvalWindows = None,
    eval_length: EvalLength = 2048,
    batch_size: Annotated[int, typer.Option(min=1, help="windows per forward pass for evaluation")] = 1,
    device: Device = "auto",
    dtype: Dtype = "float32",
    offload: Offload = False,
    proofs: Proofs = "float64",
    lazy: Lazy = None,
    restart: Restart = False,
) -> None:
    """Run a recipe on MODEL, measure perplexity before and after, and save the result to --out.

    A recipe that names code (a stage or pass written module:Name or file.py:Name) runs that code when it is read:
    such a recipe is refused unless --trust-code is given. file.py paths are found from the recipe's folder."""
    from fxslice.passes import load_recipe

    recipe = load_recipe(recipe_file, trust_code=trust_code)  # validated before anything is loaded
    _compress(model, recipe, out_dir, evaluation, eval_windows, eval_length, batch_size, device, dtype, offload, proofs,
              lazy, restart)


def _with_recovery(recipe: Recipe, steps: int, text: str, lr: float, objective: str, method: str) -> Recipe:
    """`recipe` followed by a `recover` stage (more of its options through a recipe file), or `recipe` itself."""
    if not steps:
        return recipe
    from fxslice.passes.recovery.stages import Recover

    return Recipe((*recipe.stages, Recover(steps=steps, text=text, lr=lr, objective=objective, method=method)),
                  recipe.calibration,
                  name=f"{recipe.name}+recover")


def _compress(model: str, recipe: Recipe, out_dir: Path, evaluation: str, eval_windows: int | None, eval_length: int,
              batch_size: int, device: str = "cpu", dtype: str = "float32", offload: bool = False,
              proofs: str = "float64", lazy: bool | None = None, restart: bool = False) -> None:
    """`fxslice.compress` with the command's flags, its progress on stderr and its report on stdout. Every option of
    the method is in the recipe, which the record holds: nothing is written twice."""
    from fxslice.calibration.distributed import launched_group, rank_and_size
    from fxslice.jobs import compress

    with launched_group(device):  # under torchrun: each rank calibrates on a share of the windows
        first = rank_and_size()[0] == 0
        report = compress(model, recipe, out=out_dir, evaluation=evaluation, eval_windows=eval_windows,
                          eval_length=eval_length, batch_size=batch_size, device=device, dtype=dtype, offload=offload,
                          lazy=lazy, resume=not restart, proofs=proofs, progress=first and not _quiet, status=_status if first else _silent,
                          note=_note if first else lambda message: None)
    if first:
        out.print(str(report), highlight=False, markup=False)


def _note(message: str) -> None:
    err.print(f"note: {message}", highlight=False, markup=False)


@app.command(name="export")
def export_(
    model_dir: Annotated[Path, typer.Argument(help="a directory written by `fxslice slice` / `prune` / `quantize` / `compress`")],
    path: Annotated[Path, typer.Option("--out", help="the file (pt2, onnx) or new directory (hf) to write")],
    format_: Annotated[str, typer.Option("--format", help="pt2 (one torch.export archive, weights inside), onnx, hf "
                                                          "(a directory stock transformers loads) or gguf (one file "
                                                          "llama.cpp runs)")] = "pt2",
    weight_type: Annotated[str, typer.Option("--type", help="gguf: the type of float matrices: f32, f16, bf16, q8_0, "
                                             "q5_1, q5_0, q4_1, q4_0 (weights fxslice quantized keep their own "
                                             "integers)")] = "f16",
) -> None:
    """Export a saved model to something that loads without fxslice: `torch.export.load(path).module()` (pt2),
    `onnxruntime.InferenceSession(path)` (onnx) or `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`
    (hf)."""
    from fxslice.models.export import FORMATS, export_hf, export_onnx, export_pt2
    from fxslice.models.io import load

    if format_ not in FORMATS:
        raise InvalidOption(f"--format must be one of {', '.join(FORMATS)}, got {format_!r}")
    if format_ == "gguf":
        from fxslice.models.gguf_export import check_weight_type

        check_weight_type(weight_type)
    if path.resolve().is_relative_to(model_dir.resolve()):
        raise InvalidOption(f"--out {path} lies inside the model's own directory {model_dir}, whose files its record "
                            "checks; write the export somewhere else")
    from fxslice.models.io import check_output_dir

    check_output_dir(path)  # before loading: a typo in --out should not cost a load
    with _status(f"loading {model_dir} ..."):
        program = load(model_dir)  # checksums verified: an edited or truncated model is refused here
    if format_ == "gguf":
        _export_gguf(program, path, weight_type)
        return
    with _status(f"exporting to {path} ..."):
        written = {"pt2": export_pt2, "onnx": export_onnx, "hf": export_hf}[format_](program, path)
    if format_ == "hf":
        size = sum(f.stat().st_size for f in path.iterdir())
        if written.remote_code is None:
            integers = (f"; {written.integer_linears} linears as compressed-tensors integers (loading needs pip "
                        "install compressed-tensors)" if written.integer_linears else "")
            out.print(f"wrote {path}/ ({size / 2**20:.1f} MiB): a stock Llama checkpoint, "
                      f"AutoModelForCausalLM.from_pretrained(path) with no remote code{integers}",
                      highlight=False, markup=False)
            reasons = sorted(set(written.dequantized.values()))
            if reasons:
                _note(f"{len(written.dequantized)} quantized weight(s) written in float: " + "; ".join(reasons))
            return
        cache = "generate() with the KV cache" if program.cache is not None else "generate() without a KV cache"
        out.print(f"wrote {path}/ ({size / 2**20:.1f} MiB): AutoModelForCausalLM.from_pretrained(path, "
                  f"trust_remote_code=True); {cache}\nremote code because {written.remote_code}",
                  highlight=False, markup=False)
        return
    inputs = "(input_ids, past_length, *kv)" if program.cache is not None else "(input_ids)"
    how = "torch.export.load(path).module()" if format_ == "pt2" else "onnxruntime.InferenceSession(path): "
    outputs = "logits" + (", then the updated caches" if format_ == "onnx" and program.cache is not None else "")
    out.print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB): {how}{inputs} -> {outputs}",
              highlight=False, markup=False)


def _export_gguf(program: Program, path: Path, weight_type: str) -> None:
    from fxslice.models.gguf_export import export_gguf

    with _status(f"exporting to {path} ..."):
        report = export_gguf(program, path, weight_type=weight_type)
    types = ", ".join(f"{count} {kind}" for kind, count in sorted(report.types.items()))
    size = path.stat().st_size
    lines = [f"wrote {path} ({size / 2**20:.1f} MiB, {8 * size / program.num_parameters():.2f} bits per parameter): "
             f"llama.cpp architecture '{report.architecture}', tensors {types}", f"tokenizer {report.tokenizer}",
             *report.notes[:5], *([f"... and {len(report.notes) - 5} more"] if len(report.notes) > 5 else [])]
    out.print("\n".join(lines), highlight=False, markup=False)


@app.command()
def upgrade(
    model_dir: Annotated[Path, typer.Argument(help="a directory saved by an older fxslice (with graph.pt2)")],
    out_dir: Annotated[Path, typer.Option("--out", help="new directory for the same model in today's format")],
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="required: reading graph.pt2 unpickles it, which "
                                               "runs any code hidden in it; say so only for a model you trust")] = False,
) -> None:
    """Rewrite a model saved by an older fxslice (a pickled graph.pt2) as graph.json, which loads without running
    anything. Reading the old file can run code: only for models you wrote or trust, and only with --trust-pickle."""
    from fxslice.models.io import check_output_dir, load, save

    if not trust_pickle:
        raise InvalidOption("reading an old model's graph.pt2 unpickles it, which can run code hidden in it; if you "
                            "trust whoever wrote it, add --trust-pickle")
    check_output_dir(out_dir)
    with _status(f"loading {model_dir} ..."):
        program = load(model_dir, trust_pickle=True)
    with _status(f"saving to {out_dir} ..."):
        save(program, out_dir, program.record)  # what save itself records (checksums, formats) is written anew
    out.print(f"saved {out_dir}: loads without unpickling", highlight=False, markup=False)


@app.command(name="eval")
def eval_(
    model_dir: Annotated[Path, typer.Argument(help="a directory written by `fxslice slice` / `prune` / `compress`")],
    evaluation: EvalText = "wikitext2:test",
    eval_windows: Annotated[int | None, typer.Option(min=1, help="first N windows only (default: all)")] = None,
    eval_length: Annotated[int, typer.Option(min=2, help="tokens per window")] = 2048,
    batch_size: BatchSize = 1,
    tasks: Annotated[str, typer.Option(help="zero-shot tasks through lm-eval, comma-separated: piqa,arc_easy,arc_challenge,"
                                            "hellaswag,winogrande (online), wikitext_cloze (carried), or your own")] = "",
    include: Annotated[list[Path], typer.Option(help="a directory of lm-eval task YAML files (repeatable)")] = [],  # noqa: B006
    limit: Annotated[int | None, typer.Option(min=1, help="first N documents of each task only")] = None,
    num_fewshot: Annotated[int | None, typer.Option(min=0, help="few-shot examples (default: the task's, 0 for the paper's)")] = None,
    output: Annotated[Path | None, typer.Option(help="also write the figures here as JSON")] = None,
    device: Device = "auto",
    kernels: Kernels = "float",
    lazy: LoadLazy = False,
) -> None:
    """Measure a saved model: perplexity on a text, and/or zero-shot accuracy on lm-eval tasks."""
    import json

    from fxslice.core.devices import resolve_device
    from fxslice.data import load_text, token_windows
    from fxslice.evaluation.perplexity import perplexity
    from fxslice.models.io import load

    _check_kernels(kernels)
    task_list = [t for t in tasks.split(",") if t]
    if evaluation == "none" and not task_list:
        raise InvalidOption("nothing to measure: --eval none and no --tasks; give a perplexity text or tasks")
    missing = [str(p) for p in include if not p.is_dir()]
    if missing:
        raise InvalidOption(f"--include {missing[0]} is not a directory of lm-eval task files")
    if include and not task_list:
        raise InvalidOption("--include adds task files, which only --tasks runs; name the tasks to run")
    if output is not None:  # opened before the measurement, which a bad path would otherwise lose
        _check_new_output(output)
    if task_list:
        from fxslice.evaluation.harness import require_lm_eval

        require_lm_eval()  # a missing lm-eval is said before the model loads
    target = resolve_device(device)
    with _status(f"loading {model_dir} ..."):
        program = load(model_dir, lazy=lazy)
        parameters = program.num_parameters()
        if target != program.device:
            program = program.to(target)
        program = _with_kernels(program, kernels)
    figures: dict = {"model": str(model_dir), "parameters": parameters, "device": str(target), "kernels": kernels}
    if evaluation != "none":
        test = token_windows(program.tokenizer, load_text(evaluation), eval_length)
        test = test[:eval_windows] if eval_windows else test
        value = perplexity(program, test, batch_size=batch_size, progress=not _quiet)
        figures["perplexity"] = {"value": value, "source": evaluation, "windows": len(test), "length": eval_length}
        out.print(f"perplexity {value:.3f}  ({len(test)} windows of {eval_length} tokens, {evaluation}; "
                  f"{parameters:,} parameters)", highlight=False, markup=False)
    if task_list:
        from fxslice.evaluation.harness import evaluate_tasks

        table = evaluate_tasks(program, task_list, include=include, limit=limit, num_fewshot=num_fewshot)
        figures["tasks"] = table
        for task, metrics in table.items():
            shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if not k.endswith("_stderr"))
            out.print(f"{task:<16} {shown}", highlight=False, markup=False)
    if output is not None:
        from fxslice.models.io import write_file

        text = json.dumps(figures, indent=1)
        write_file(output, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        err.print(f"wrote {output}")


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="a directory written by `fxslice slice`, or a model as for `slice`")],
    prompt: Annotated[str, typer.Argument(help="text to continue")],
    max_new_tokens: Annotated[int, typer.Option(min=1, help="stop after this many new tokens")] = 64,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 is greedy; above 0 samples")] = 0.0,
    top_k: Annotated[int, typer.Option(min=0, help="sample from the k most likely tokens only (0: all)")] = 0,
    seed: Annotated[int | None, typer.Option(help="seed for sampling")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="wrap the prompt in the tokenizer's chat template")] = False,
    device: Device = "auto",
    compile_step: Annotated[bool, typer.Option("--compile", help="compile the decoding step (torch.compile; CUDA "
                                               "graphs on a GPU): a first step that takes a while, then faster ones")] = False,
    kernels: Kernels = "float",
) -> None:
    """Continue PROMPT with MODEL, streaming tokens as they come (KV cache when the model has one)."""
    import time

    import torch

    from fxslice.core.devices import resolve_device
    from fxslice.evaluation.generate import generate as run_generation

    _check_kernels(kernels)
    target = resolve_device(device)
    program = _load_for_generation(model)
    if target != program.device:
        program = program.to(target)
    program = _with_kernels(program, kernels)
    tokenizer = program.tokenizer
    if tokenizer is None:
        raise InvalidOption(f"{model} has no tokenizer; generation needs one to read the prompt")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        from fxslice.core.errors import BadInput

        raise BadInput("the prompt is not valid UTF-8 text; give it as UTF-8") from None
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidOption("--chat: this tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=not chat)])
    new: list[int] = []
    shown = ""

    def show(tokens: torch.Tensor) -> None:
        nonlocal shown
        new.append(int(tokens[0]))
        text = tokenizer.decode(new, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            out.print(text[len(shown):], end="", highlight=False, markup=False, soft_wrap=True)
            shown = text

    out.print(prompt if not chat else "", end="", highlight=False, markup=False, soft_wrap=True)
    start = time.perf_counter()
    run_generation(program, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                   eos_token_id=tokenizer.eos_token_id, on_tokens=show, compile=compile_step)
    elapsed = time.perf_counter() - start
    out.print()
    err.print(f"{len(new)} tokens in {elapsed:.1f} s ({len(new) / elapsed:.1f} tokens/s, "
              f"{'KV cache' if program.cache is not None else 'no KV cache: recomputing'}"
              f"{', compiled' if compile_step else ''}, {program.device})", highlight=False)


def _check_new_output(path: Path) -> None:
    """Refuse an output file that could not be written, before the work whose result it would hold."""
    import os

    if path.is_dir():
        raise InvalidOption(f"--output {path} is a directory; give a file name")
    if not path.parent.is_dir():
        raise InvalidOption(f"--output {path}: the directory {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InvalidOption(f"--output {path}: permission denied")


def _check_kernels(kernels: str) -> None:
    if kernels not in ("float", "int4"):
        raise InvalidOption(f"--kernels must be float or int4, got {kernels!r}")


def _with_kernels(program: Program, kernels: str) -> Program:
    """`program` with its 4-bit weights run by the int4 kernels (`--kernels int4`; the pass refuses, with the
    reason, a device or dtype the kernel cannot run in), or as it is (`float`)."""
    if kernels == "float":
        return program
    from fxslice.passes.quantize import Int4Kernels

    result = PassManager([Int4Kernels()]).run(program).records[0].info
    four_bit = {name: why for name, why in result["kept"].items() if not why.endswith("-bit")}
    err.print(f"int4 kernels: {result['weights']} weights from packed integers"
              + (f"; {len(four_bit)} 4-bit ones kept in float (e.g. {next(iter(four_bit))}: "
                 f"{next(iter(four_bit.values()))})" if four_bit else ""), highlight=False, markup=False)
    return program


def _load_for_generation(model: str) -> Program:
    from fxslice.models.io import RECORD, load

    if (Path(model) / RECORD).is_file():
        with _status(f"loading {model} ..."):
            return load(model)
    from fxslice.jobs import capture_with_cache

    program, cached = capture_with_cache(model, status=_status, note=_note)
    return cached or program


OUT_OF_MEMORY = 9


def _out_of_memory(exc: BaseException) -> bool:
    """Python's MemoryError, or PyTorch's allocator failing (a RuntimeError that says so)."""
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or "can't allocate memory" in text or "out of memory" in text


def _terminate(signum: int, frame: object) -> None:
    raise Interrupted()


def run() -> None:
    """Entry point: FxsliceError -> message and its exit code, no traceback unless --debug; Ctrl-C (130) and
    SIGTERM (143) unwind like an error, so that nothing half-written stays, and never exit 0."""
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    try:
        code = app(standalone_mode=False)
    except Interrupted:
        err.print("[bold red]terminated[/] (SIGTERM); nothing half-written was left")
        sys.exit(Interrupted.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        code = 130
    except FxsliceError as exc:
        if _debug:
            raise
        err.print(f"[bold red]error:[/] {type(exc).__name__}: ", end="")
        err.print(str(exc), markup=False, highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except (MemoryError, RuntimeError) as exc:
        if _debug or not _out_of_memory(exc):
            raise
        err.print("[bold red]error:[/] out of memory: the model, its calibration statistics or a batch did not fit "
                  "(try a smaller --batch-size or --calib-windows, --offload on a GPU, or a larger memory limit); "
                  "nothing half-written was left", highlight=False)
        sys.exit(OUT_OF_MEMORY)
    except Exception as exc:  # usage errors (typer's vendored click) carry their own message and exit code
        if hasattr(exc, "show") and isinstance(getattr(exc, "exit_code", None), int) and not _debug:
            exc.show()
            sys.exit(exc.exit_code)
        raise
    if code == 130:  # typer turns Ctrl-C into this exit code
        err.print("[bold red]interrupted[/] (Ctrl-C); nothing half-written was left")
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    run()
