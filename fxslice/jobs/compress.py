"""`compress(model, recipe)`: the job behind `fxslice compress|slice|prune|quantize`, as one library call.

It owns the steps every caller used to assemble by hand: capture (with a KV-cache capture beside it for
generation), the health checks, calibration text, perplexity before and after, the recipe, the replay of its passes
on the KV-cache capture, one record and the save. The CLI turns flags into a recipe and prints the `Report`; the
examples and benchmarks call the same function, so that every saved model carries the same record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxslice.calibration.distributed import barrier, rank_and_size
from fxslice.core.devices import resolve_device, resolve_dtype
from fxslice.core.errors import CaptureError, CorruptModel, InvalidOption, PassCheckFailed, SaveFailed
from fxslice.core.health import check_finite, check_tokens
from fxslice.core.memory import available_bytes
from fxslice.core.pass_manager import Pass, float64_proofs, replay
from fxslice.core.program import Program
from fxslice.core.version import __version__
from fxslice.data import load_text, token_windows
from fxslice.evaluation.perplexity import perplexity
from fxslice.jobs.checkpoint import JobCheckpoint, Restored, model_identity, steps_in_words
from fxslice.models.capture import capture_module, check_module_dtype, load_model
from fxslice.models.io import RECORD, check_output_dir, is_saved_model, load, save
from fxslice.models.kvcache import capture_cached
from fxslice.models.lazy import capture_lazily, local_checkpoint_numel
from fxslice.recipes import KV_CACHE, Recipe, RecipeResult, StageResult

__all__ = ["Report", "capture_with_cache", "compress", "continuing"]

#: how exact passes are checked during a job (see `compress`)
PROOFS = ("float64", "dtype")

#: tokens per evaluation window unless given: the papers' 2048, or the model's context where it is shorter
DEFAULT_EVAL_LENGTH = 2048


@dataclass
class Report:
    """What a compression did: the program, the recipe's result, the measurements and the record saved with it."""

    program: Program
    result: RecipeResult
    record: dict[str, Any]
    perplexity: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    out: Path | None = None
    notes: list[str] = field(default_factory=list)
    cached: Program | None = None  # the KV-cache capture with the compressed weights (generation), where it follows

    def lines(self) -> list[str]:
        """The summary a person reads: parameters, each stage's own lines, perplexity, time, where it went."""
        r = self.result
        lines = [f"parameters   dense {r.dense_parameters:,}   compressed {r.parameters:,} "
                 f"({r.parameters / r.dense_parameters:.1%} of dense, shortcuts and any untied head included)"]
        for stage, stage_result in r.stages:
            lines += stage.summary(stage_result)
        if self.perplexity:
            evaluation = self.record["evaluation"]
            before = "dense" if "dense" in self.perplexity else "before"  # a saved model's own, continued from
            lines.append(f"perplexity   {before} {self.perplexity[before]:.3f}   compressed "
                         f"{self.perplexity.get('compressed', float('nan')):.3f}   ({evaluation['windows']} windows "
                         f"of {evaluation['length']} tokens, {evaluation['source']})")
        lines.append("seconds      " + "  ".join(f"{k} {v:.1f}" for k, v in self.seconds.items()))
        if self.out is not None:
            lines.append(f"saved        {self.out}")
        return lines

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _say(message: str) -> contextlib.AbstractContextManager[None]:
    """The default status: the message as one line on stderr (a log, a notebook, a pipe all show it)."""
    print(message, file=sys.stderr, flush=True)
    return contextlib.nullcontext()


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


def compress(
    model: str | os.PathLike | nn.Module,
    recipe: Recipe,
    *,
    out: str | os.PathLike | None = None,
    evaluation: str | None = "wikitext2:test",
    eval_windows: int | None = None,
    eval_length: int | None = None,
    batch_size: int = 1,
    device: str = "cpu",
    dtype: str = "float32",
    offload: bool = False,
    lazy: bool | None = None,
    proofs: str = "float64",
    resume: bool = True,
    options: dict[str, Any] | None = None,
    progress: bool = True,
    status: Callable[[str], contextlib.AbstractContextManager[Any]] = _say,
    note: Callable[[str], None] = _note,
) -> Report:
    """Compress `model` (a hub name, a directory, a .gguf file, "smollm2", or an nn.Module with its own tokenizer
    given as `model.tokenizer`; or a directory `save` wrote, to go on compressing it: see `continuing`) with
    `recipe`; measure perplexity on `evaluation` (None: skip) before and after, on its first `eval_windows` windows
    (all when None) of `eval_length` tokens (2048, or the model's context); save to `out` when given (checked before
    any work). `lazy`: weights stay in the checkpoint's files and are read
    when used, edited ones go to a scratch folder (`fxslice.models.lazy`: for a model larger than memory); None (the
    default) does so when a local checkpoint's weights in `dtype` would take more than half the available memory.
    `proofs`: "float64" proves every exact pass on a float64 copy
    (up to `FLOAT64_PROOF_BYTES`), "dtype" checks it in the run's dtype only, for less peak memory (the copy is most of what
    slicing and quantizing hold; `fxslice.core.pass_manager.float64_proofs`). `options` are recorded as given, beside the recipe (which holds
    every stage's options). `status` and `note` show progress and remarks (a line on stderr by default).

    With `out`, the job keeps a checkpoint in `OUT.resume/` as each calibrating stage ends (`fxslice.jobs.checkpoint`):
    interrupted, the same call continues after the last stage done and saves what an uninterrupted run saves;
    `resume=False` removes such a checkpoint and starts over. The folder is removed once the model is saved.

    Under a `torch.distributed` process group (`torchrun`) every rank calibrates on its share of the windows, all
    ranks end with the same model, and rank 0 alone saves it."""
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        check_output_dir(out_dir)  # before the long work: a typo in `out` should not cost a calibration
    if eval_length is not None and (not isinstance(eval_length, int) or eval_length < 2):
        raise InvalidOption(f"eval_length must be an integer ≥ 2, got {eval_length!r}")
    if proofs not in PROOFS:
        raise InvalidOption(f"proofs must be one of {PROOFS} (float64: exact passes proved on a float64 copy; dtype: "
                            f"checked in the run's dtype only, less memory), got {proofs!r}")
    _check_lazy(model, lazy)
    saved = not isinstance(model, nn.Module) and is_saved_model(model)
    if saved:
        recipe = continuing(recipe, model)  # type: ignore[arg-type]
    target = resolve_device(device)
    precision = resolve_dtype(dtype, target)
    if lazy is None:
        lazy = not saved and _too_large_for_memory(model, precision, note)
    calibrating = [s.kind for s in recipe.stages if s.calibrates]
    if calibrating and recipe.calibration is None:
        raise InvalidOption(f"stage '{calibrating[0]}' calibrates but the recipe has no calibration section; add "
                            "e.g. `calibration: {source: wikitext2:validation, windows: 32, length: 2048}`")
    checkpoint = None
    if out_dir is not None and not isinstance(model, nn.Module):
        run = {"model": model_identity(model), "recipe": recipe.to_dict(), "device": str(target), "dtype": dtype,
               "offload": offload, "proofs": proofs, "evaluation": evaluation, "eval_windows": eval_windows,
               "eval_length": eval_length, "batch_size": batch_size, "fxslice": __version__,
               "processes": rank_and_size()[1]}
        checkpoint = JobCheckpoint(out_dir, run)
        if not resume:
            checkpoint.discard()
    seconds: dict[str, float] = {}
    notes: list[str] = []
    with _timed(seconds, "capture"):
        restored = checkpoint.restore(lazy=lazy) if checkpoint is not None else None
        if restored is not None:
            within = f", and {steps_in_words(restored.steps)} of the next" if restored.steps else ""
            note(f"continuing the interrupted run from {restored.folder}: {len(restored.stages)} of "
                 f"{len(recipe.stages)} stages done{within} (resume=False / --restart starts over)")
            program, cached = _placed(restored.program, restored.cached, target, offload, status)
            for p in (program, cached):
                if p is not None:
                    p.source = str(model)
            notes += restored.notes
        else:
            program, cached = capture_with_cache(model, target, precision, offload, status, note, lazy=lazy)
            # the cache graph takes the compressed weights at the end: it need not hold the original ones meanwhile
            cached = cached.skeleton() if cached is not None else None
    done = restored.stages if restored is not None else []
    if program.tokenizer is None:
        raise InvalidOption(f"{program.model_class} comes without a tokenizer; compression needs one to read text")
    check_tokens(program, torch.zeros(0, dtype=torch.long), program.tokenizer)
    recipe.check(program, len(done))  # options that do not fit this model, before calibration and evaluation
    calibration = recipe.calibration.load(program) if recipe.calibration is not None else None
    test = None
    if evaluation not in (None, "none"):
        context = (program.config or {}).get("max_position_embeddings")
        eval_length = eval_length or min(DEFAULT_EVAL_LENGTH, context or DEFAULT_EVAL_LENGTH)
        test = token_windows(program.tokenizer, load_text(evaluation), eval_length, max_length=context)
        test = test[:eval_windows] if eval_windows else test
    ppl: dict[str, float] = dict(restored.perplexity) if restored is not None else {}
    if restored is not None:
        seconds |= {k: v for k, v in restored.seconds.items() if k == "evaluate_dense"}
    before = "before" if saved else "dense"  # a saved model is not dense: its figure is the one it continues from
    if test is not None and before not in ppl:
        with _timed(seconds, "evaluate_dense"):
            ppl[before] = perplexity(program, test, batch_size=batch_size, progress=progress)
    teacher = None
    if restored is not None and any(s.learns_from_teacher for s in recipe.stages[len(done):]):
        teacher = capture_with_cache(model, target, precision, offload, status, note, lazy=lazy)[0]
    if restored is not None:
        dense_parameters = restored.dense_parameters
    elif saved:  # the original's count, as the saved model's record has it
        dense_parameters = program.record.get("dense_parameters") or program.num_parameters()
    else:
        dense_parameters = program.num_parameters()
    finished = list(done)
    steps = restored.steps if restored is not None else 0  # of the stage in progress

    def measured() -> dict[str, Any]:
        return {"dense_parameters": dense_parameters, "perplexity": ppl, "notes": notes,
                "seconds": {k: v for k, v in seconds.items() if k == "evaluate_dense"}}

    def records() -> list[dict[str, Any]]:
        return RecipeResult(program, list(zip(recipe.stages, finished, strict=False)), dense_parameters, 0).record()["stages"]

    def after_stage(i: int, stage_result: StageResult) -> None:
        """Let the KV-cache capture follow the stage, and keep a checkpoint after a stage that calibrated."""
        nonlocal cached, steps
        finished.append(stage_result)
        steps = 0
        if cached is not None:  # the same passes, the same bases: generation gets the new weights and a cache
            try:
                replay(stage_result.passes, cached, program)
            except PassCheckFailed as exc:
                notes.append(f"the KV-cache capture cannot follow ({exc}); the saved model generates without a KV cache")
                note(notes[-1])
                cached = None
        stage = recipe.stages[i]
        if checkpoint is not None and stage.calibrates and rank_and_size()[0] == 0:
            try:
                with status(f"checkpoint after stage {i + 1} of {len(recipe.stages)} ({stage.kind}) in "
                            f"{checkpoint.folder} ..."):
                    checkpoint.write(program, cached, records(), measured())
            except (SaveFailed, OSError) as exc:  # the run matters more than its checkpoint
                note(f"no checkpoint after stage {i + 1} ({exc}); the run goes on without it")
        if cached is not None:
            cached = cached.skeleton()  # shapes only again while the next stage replaces the weights

    def after_step(i: int, state: dict[str, Any], passes: list[Pass]) -> None:
        """Within a stage that works in steps: a checkpoint now and then, its KV-cache graph following the steps."""
        nonlocal steps
        steps += 1
        if checkpoint is None or rank_and_size()[0] != 0 or not checkpoint.step_due():
            return
        following = None
        if cached is not None:  # a copy follows the steps: `cached` follows the whole stage when it ends
            following = cached.skeleton()
            try:
                replay(passes, following, program)
            except PassCheckFailed:
                following = None  # the stage's end will say why, and go on without a KV cache
        try:
            with status(f"checkpoint within stage {i + 1} of {len(recipe.stages)} ({recipe.stages[i].kind}), after "
                        f"step {steps}, in {checkpoint.folder} ..."):
                checkpoint.write(program, following, records(), measured(), {"stage": i, "state": state}, steps)
        except (SaveFailed, OSError) as exc:
            note(f"no checkpoint within stage {i + 1} ({exc}); the run goes on without it")

    with _say_how_to_resume(checkpoint, note):
        with float64_proofs(proofs == "float64"):
            result = recipe.run(program, calibration=calibration, progress=progress, teacher=teacher, done=done,
                                dense_parameters=dense_parameters, after_stage=after_stage, after_step=after_step,
                                partial=_partial_state(restored))
        del teacher
        if cached is not None:
            replay([], cached, program)  # the cache graph takes the compressed weights
        seconds.update({stage.kind: r.seconds for stage, r in result.stages})
        if test is not None:
            with _timed(seconds, "evaluate_compressed"):
                ppl["compressed"] = perplexity(program, test, batch_size=batch_size, progress=progress)
        record = {
            "passes": [entry["name"] for _, r in result.stages for entry in r.pass_entries()],
            "device": str(target), "dtype": dtype, "offload": offload, "lazy": lazy, "proofs": proofs,
            **(options or {}),
            "calibration": None if recipe.calibration is None else dataclasses.asdict(recipe.calibration),
            "evaluation": {"source": evaluation or "none", "windows": 0 if test is None else len(test), "length": eval_length},
            "perplexity": ppl,
            "recipe": recipe.to_dict(),
            "facts": program.record.get("facts", []),
            **({"continued_from": {"model": program.source, **{k: program.record.get(k) for k in (
                "recipe", "parameters", "perplexity", "evaluation")}}} if saved else {}),
            **result.record(),
        }
        if out_dir is not None and rank_and_size()[0] == 0:  # every rank holds the same model: the first one saves it
            with _timed(seconds, "save"), status(f"saving to {out_dir} ..."):
                save(cached or program, out_dir, record)
    if checkpoint is not None:
        barrier()  # no rank reads a weight from the checkpoint any more
        if rank_and_size()[0] == 0:
            checkpoint.discard()
    return Report(program, result, record, ppl, seconds, out_dir, notes, cached)


@contextlib.contextmanager
def _say_how_to_resume(checkpoint: JobCheckpoint | None, note: Callable[[str], None]) -> Iterator[None]:
    """Whatever stops the job once a checkpoint is written (Ctrl-C, a crash, a full disk) is followed by where it is."""
    try:
        yield
    except BaseException:
        if checkpoint is not None and (checkpoint.stages_done or checkpoint.steps_done):
            note(f"the run stopped; {checkpoint.folder} holds it after {checkpoint.where()}: the same "
                 "command continues from there (--restart / resume=False starts over)")
        raise


def _partial_state(restored: Restored | None) -> dict[str, Any] | None:
    """The state of the stage a restored checkpoint fell within, checked to be the stage after those it holds."""
    if restored is None or restored.partial is None:
        return None
    if restored.partial.get("stage") != len(restored.stages):
        raise CorruptModel(f"the checkpoint {restored.folder} holds {len(restored.stages)} stages and the state of stage "
                           f"{restored.partial.get('stage')}; remove {restored.folder.parent} to start over")
    return restored.partial["state"]


@contextlib.contextmanager
def _timed(seconds: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = time.perf_counter() - start


def capture_with_cache(model: str | os.PathLike | nn.Module, device: torch.device = torch.device("cpu"),
                       dtype: torch.dtype = torch.float32, offload: bool = False,
                       status: Callable[[str], contextlib.AbstractContextManager[Any]] = _say,
                       note: Callable[[str], None] = _note, *, lazy: bool = False) -> tuple[Program, Program | None]:
    """The plain capture (for calibration) and, where the model allows it, one with a KV cache (for generation);
    the model converted to `dtype` before capture (so its own casts around norms stay), both moved to `device`, or
    with `offload` computing there while their weights stay in host memory; with `lazy`, in their files."""
    name = type(model).__name__ if isinstance(model, nn.Module) else str(model)
    _check_lazy(model, lazy)
    if not isinstance(model, nn.Module) and is_saved_model(model):  # its graph is the KV-cache one: nothing to replay
        with status(f"loading {name}, saved by fxslice{' (weights left on disk)' if lazy else ''} ..."):
            program = load(model, lazy=lazy)
        check_finite(program)
        program, _ = _placed(program, None, device, offload, status)
        program.source = name
        return program, None
    with status(f"loading and capturing {name}{' (weights left on disk)' if lazy else ''} ..."):
        if lazy:
            program, cached = capture_lazily(model, dtype=dtype, with_cache=True)  # type: ignore[arg-type]
            tokenizer = program.tokenizer
            check_finite(program)
            if cached is None:
                note("the model cannot be captured with a KV cache; the saved model will generate without one")
        else:
            program, cached, tokenizer = _capture_in_memory(model, dtype, note)
    program, cached = _placed(program, cached, device, offload, status)
    for p in (program, cached):
        if p is not None:
            p.tokenizer, p.source = tokenizer, name
    return program, cached


def continuing(recipe: Recipe, saved: str | os.PathLike) -> Recipe:
    """`recipe` to run on the model `save` wrote to `saved`: it starts from the facts that model's record states (it
    was quantized, rotated, ...) and from a KV-cache graph, the one it keeps; a stage that calibrates on the
    original's plain capture (slicing, pruning) is refused before any work, saying what to do instead."""
    refusing = [s.kind for s in recipe.stages if KV_CACHE in s.refuses]
    if refusing:
        raise InvalidOption(f"{saved} is a model saved by fxslice, which keeps the graph that computes with a KV cache "
                            f"and no plain capture; {', '.join(refusing)} calibrate(s) on the original model's plain "
                            "capture: run it on the original model (every step in one recipe: fxslice compress "
                            "--recipe), and quantize, rotate or recover a saved model")
    try:
        facts = json.loads((Path(saved) / RECORD).read_text(encoding="utf-8")).get("facts") or []
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        facts = []  # `load` names what is wrong with the record
    if not isinstance(facts, list) or not all(isinstance(f, str) for f in facts):
        facts = []
    try:
        return dataclasses.replace(recipe, start=tuple(sorted({*recipe.start, KV_CACHE, *facts})))
    except InvalidOption as exc:
        raise InvalidOption(f"{saved} is a model saved by fxslice that is already {', '.join(sorted(facts)) or 'compressed'}"
                            f": {exc}") from None


def _placed(program: Program, cached: Program | None, device: torch.device, offload: bool,
            status: Callable[[str], contextlib.AbstractContextManager[Any]]) -> tuple[Program, Program | None]:
    """Both programs computing on `device`: moved there, or with `offload` their weights left in host memory."""
    if offload:
        return program.offload(device), (cached.offload(device) if cached is not None else None)
    if device.type != "cpu":
        with status(f"moving to {device} ..."):
            return program.to(device), (cached.to(device) if cached is not None else None)
    return program, cached


def _too_large_for_memory(model: str | os.PathLike | nn.Module, dtype: torch.dtype, note: Callable[[str], None]) -> bool:
    """Whether `model` is a local checkpoint whose weights in `dtype` would take more than half the available memory
    (the rest is for what the job computes); says so when it is."""
    numel = None if isinstance(model, nn.Module) else local_checkpoint_numel(model)
    free = available_bytes()
    if numel is None or free is None or numel * dtype.itemsize <= free / 2:
        return False
    note(f"the weights take {numel * dtype.itemsize / 2**30:.1f} GiB in {str(dtype).replace('torch.', '')}, more "
         f"than half of the {free / 2**30:.1f} GiB available: they stay on disk (lazy), read when used")
    return True


def _check_lazy(model: str | os.PathLike | nn.Module, lazy: bool | None) -> None:
    if lazy and isinstance(model, nn.Module):
        raise InvalidOption("lazy loading reads a checkpoint (a directory, .gguf file or hub name), not a module that "
                            "is already in memory")


def _capture_in_memory(model: str | os.PathLike | nn.Module, dtype: torch.dtype,
                       note: Callable[[str], None]) -> tuple[Program, Program | None, Any]:
    if isinstance(model, nn.Module):
        check_module_dtype(model, dtype)
        module, tokenizer = model, getattr(model, "tokenizer", None)
    else:
        module, tokenizer = load_model(model)
        if dtype != torch.float32:
            module = module.to(dtype)
    program = capture_module(module)
    check_finite(program)  # a broken model is refused as such, not as a cache that decodes wrongly
    try:
        cached = capture_cached(module)
    except CaptureError as exc:
        note(f"{exc}; the saved model will generate without a KV cache")
        cached = None
    return program, cached, tokenizer
